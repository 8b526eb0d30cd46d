"""The benchmark's baseline: training the way the course notebook does, written for this repo.

What it keeps from the notebook is its cost profile: Keras `Model.fit`/`evaluate` on numpy float
arrays (Keras builds its own input pipeline from them on every call), batch size 32, one step
per `tf.function` call, and a keras-io-style distiller whose `train_step` runs the teacher on
every batch. What it does not keep is anything that would make its numbers wrong: the loss is

    alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(y, s)

with alpha weighing the distillation term, exactly as this project's Distiller (so both use the
same alpha and T for the same objective), and losses are batch means.

Run on its own it trains the notebook's whole schedule (a 20-epoch teacher, then 5-epoch
students) and prints a JSON line with its wall time and test accuracies:

    python -m benchmarks.notebook --idx_dir=/work/shared/data/mnist

With --teacher_model (a trained teacher's model.keras) it loads that teacher instead of training
one and distills only the students named by --students: the notebook's side of the short run
that benchmarks/whole_process.py times as a whole process.
"""

import argparse
import json
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from trainer.data import idx
from trainer.modeling import models

BATCH_SIZE = 32
TEACHER_EPOCHS = 20
STUDENT_EPOCHS = 5
TRAIN_EXAMPLES = 60_000  # the notebook trains on the whole MNIST training split
TEST_EXAMPLES = 10_000
# The notebook's students: (name, alpha, temperature). All go through the distiller, so all
# pay for the teacher on every step, as the notebook's do.
STUDENTS = (("labels_only", 0.0, 4.0), ("teacher_only", 1.0, 4.0), ("distilled", 0.5, 4.0))


def float_images(images: np.ndarray) -> np.ndarray:
  """uint8 [N,28,28] -> float32 [N,28,28,1] in [0, 1], as the notebook prepares its arrays."""
  return (images.astype(np.float32) / 255.0)[..., np.newaxis]


def compile_teacher(net: keras.Model) -> keras.Model:
  """The notebook's teacher setup: Adam, sparse cross-entropy on logits, accuracy."""
  net.compile(optimizer=keras.optimizers.Adam(),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
  return net


class NotebookDistiller(keras.Model):
  """keras-io-style distiller: the teacher runs inside every training step."""

  def __init__(self, student, teacher):
    super().__init__()
    self.student = student
    self.teacher = teacher

  def compile(self, optimizer, alpha=0.5, temperature=4.0):
    super().compile(optimizer=optimizer)
    self.alpha = float(alpha)
    self.temperature = float(temperature)
    self.student_loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    self.distillation_loss_fn = keras.losses.KLDivergence()
    self.loss_tracker = keras.metrics.Mean(name="loss")
    self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

  @property
  def metrics(self):
    return [self.loss_tracker, self.accuracy]

  def call(self, x, training=False):
    return self.student(x, training=training)

  def compute_distillation_loss(self, x, y, student_logits):
    """Batch-mean loss; the teacher runs here, on every call."""
    teacher_logits = self.teacher(x, training=False)
    t = self.temperature
    distillation = self.distillation_loss_fn(
        tf.nn.softmax(teacher_logits / t, axis=-1),
        tf.nn.softmax(student_logits / t, axis=-1)) * (t * t)
    student = self.student_loss_fn(y, student_logits)
    return self.alpha * distillation + (1.0 - self.alpha) * student

  def train_step(self, data):
    x, y = data
    with tf.GradientTape() as tape:
      student_logits = self.student(x, training=True)
      loss = self.compute_distillation_loss(x, y, student_logits)
    variables = self.student.trainable_variables
    self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    self.loss_tracker.update_state(loss)
    self.accuracy.update_state(y, student_logits)
    return {m.name: m.result() for m in self.metrics}

  def test_step(self, data):
    """As keras-io's: the student alone; "loss" is then its cross-entropy on the labels."""
    x, y = data
    student_logits = self.student(x, training=False)
    self.loss_tracker.update_state(self.student_loss_fn(y, student_logits))
    self.accuracy.update_state(y, student_logits)
    return {m.name: m.result() for m in self.metrics}


def make_distiller(teacher: keras.Model, alpha=0.5, temperature=4.0) -> NotebookDistiller:
  distiller = NotebookDistiller(models.build_student(), teacher)
  distiller.compile(keras.optimizers.Adam(), alpha=alpha, temperature=temperature)
  return distiller


def run_notebook(train_images, train_labels, test_images, test_labels, teacher_epochs,
                 student_epochs, students=STUDENTS, seed=42, teacher=None) -> dict:
  """The notebook's whole schedule; returns wall seconds and test accuracies. With `teacher`
  (a trained network) no teacher is trained; it is still evaluated, as the notebook does."""
  started = time.perf_counter()
  keras.utils.set_random_seed(seed)
  x, y = float_images(train_images), train_labels.astype(np.int64)
  x_test, y_test = float_images(test_images), test_labels.astype(np.int64)
  if teacher is None:
    teacher = compile_teacher(models.build_teacher())
    teacher.fit(x, y, batch_size=BATCH_SIZE, epochs=teacher_epochs, verbose=0)
  else:
    teacher = compile_teacher(teacher)
    teacher_epochs = 0
  accuracies = {"teacher": float(teacher.evaluate(x_test, y_test, batch_size=BATCH_SIZE,
                                                  verbose=0, return_dict=True)["accuracy"])}
  for name, alpha, temperature in students:
    keras.utils.set_random_seed(seed)
    distiller = make_distiller(teacher, alpha, temperature)
    distiller.fit(x, y, batch_size=BATCH_SIZE, epochs=student_epochs, verbose=0)
    accuracies[name] = float(distiller.evaluate(x_test, y_test, batch_size=BATCH_SIZE,
                                                verbose=0, return_dict=True)["accuracy"])
  return {"wall_seconds": time.perf_counter() - started, "test_accuracy": accuracies,
          "teacher_epochs": teacher_epochs, "student_epochs": student_epochs,
          "batch_size": BATCH_SIZE, "train_examples": int(len(y))}


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m benchmarks.notebook",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--idx_dir", required=True, help="folder with the four MNIST IDX files")
  parser.add_argument("--teacher_epochs", type=int, default=TEACHER_EPOCHS)
  parser.add_argument("--student_epochs", type=int, default=STUDENT_EPOCHS)
  parser.add_argument("--max_train_examples", type=int, default=None)
  parser.add_argument("--max_test_examples", type=int, default=None)
  parser.add_argument("--seed", type=int, default=42)
  parser.add_argument("--teacher_model", default=None,
                      help="a trained teacher (.keras): load it instead of training one")
  parser.add_argument("--students", default=",".join(s[0] for s in STUDENTS),
                      help=f"comma-separated, of {[s[0] for s in STUDENTS]}")
  args = parser.parse_args(argv)
  students = [s for s in STUDENTS if s[0] in args.students.split(",")]
  teacher = (keras.models.load_model(args.teacher_model, compile=False)
             if args.teacher_model else None)
  train_images, train_labels = idx.load_split(args.idx_dir, "train")
  test_images, test_labels = idx.load_split(args.idx_dir, "test")
  n, m = args.max_train_examples, args.max_test_examples
  report = run_notebook(train_images[:n], train_labels[:n], test_images[:m], test_labels[:m],
                        args.teacher_epochs, args.student_epochs, students, args.seed, teacher)
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  sys.exit(main())
