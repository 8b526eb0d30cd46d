"""TensorBoard logs of one model: logs/<model>/{train,validation,test} and the HParams session.

Train, validation and test use the same tag names (accuracy, cross_entropy) in three runs, so
TensorBoard draws them on one chart, and every model's runs sit side by side under logs/: the
teacher's curves appear beside the students' on each chart. Steps are epochs; the final test
scalars and the confusion matrix are written at the last epoch's step. The folder logs/<model>
itself is the model's HParams session (see trainer/evaluation/hparams_logging.py), and the train
run also holds the model's graph and, with --profile_steps, a profiler trace
(train/plugins/profile).
"""

import logging
import os

import tensorflow as tf

from trainer.evaluation import figures, hparams_logging

# `loss` is what each model minimizes: for a student that includes the distillation term, so it
# is not comparable with the teacher's. `cross_entropy` is the same quantity for every model.
CROSS_ENTROPY = "cross_entropy"
CROSS_ENTROPY_DESCRIPTION = ("cross-entropy with the true labels, comparable across the teacher "
                             "and the students (a student's `loss` adds the distillation term)")


def label_cross_entropy(metrics: dict) -> float:
  """Cross-entropy with the labels: a Distiller's student_loss, a Classifier's loss."""
  return metrics["student_loss"] if "student_loss" in metrics else metrics["loss"]


def png_summary_image(png: bytes):
  """A PNG as the [1, H, W, C] uint8 batch tf.summary.image takes."""
  return tf.expand_dims(tf.io.decode_png(png), 0)


class ModelLogs:
  """Summary writers of one model; a no-op on workers that must not write (non-chief)."""

  def __init__(self, log_root: str, name: str, enabled: bool = True):
    self.enabled = enabled
    self.name = name
    self.dir = os.path.join(log_root, name)
    self.train_dir = os.path.join(self.dir, "train")
    if enabled:
      self.train = tf.summary.create_file_writer(self.train_dir)
      self.validation = tf.summary.create_file_writer(os.path.join(self.dir, "validation"))

  def write_session(self, hparams: dict) -> None:
    """The HParams session start info (hyperparameters), in logs/<model> itself."""
    if not self.enabled:
      return
    writer = tf.summary.create_file_writer(self.dir)
    hparams_logging.write_session(writer, self.name, hparams)
    writer.close()

  def write_graph(self, net) -> None:
    """The graph of one inference forward pass of `net`, in the train run (Graphs dashboard)."""
    if not self.enabled:
      return
    try:
      forward = tf.function(lambda images: net(images, training=False))
      spec = tf.TensorSpec((None, *net.input_shape[1:]), tf.float32, name="images")
      graph = forward.get_concrete_function(spec).graph
      with self.train.as_default():
        tf.summary.graph(graph)
    except Exception as e:  # pylint: disable=broad-except  # a picture must not stop training
      logging.warning("%s: could not write the model graph: %s", self.name, e)

  def write_epoch(self, record: dict) -> None:
    if not self.enabled:
      return
    step = record["epoch"]
    with self.train.as_default(step=step):
      for tag, value in record["train"].items():
        tf.summary.scalar(tag, value)
      tf.summary.scalar(CROSS_ENTROPY, label_cross_entropy(record["train"]),
                        description=CROSS_ENTROPY_DESCRIPTION)
      tf.summary.scalar("learning_rate", record["learning_rate"])
      tf.summary.scalar("examples_per_second", record["examples_per_second"])
      if "train_seconds" in record:
        tf.summary.scalar("train_seconds", record["train_seconds"])
    with self.validation.as_default(step=step):
      for tag, value in record["validation"].items():
        tf.summary.scalar(tag, value)
      tf.summary.scalar(CROSS_ENTROPY, label_cross_entropy(record["validation"]),
                        description=CROSS_ENTROPY_DESCRIPTION)
    self.flush()

  def flush(self) -> None:
    if self.enabled:
      self.train.flush()
      self.validation.flush()

  def close(self) -> None:
    if self.enabled:
      self.train.close()
      self.validation.close()


def write_test(log_root: str, name: str, step: int, report: dict, labels, predictions) -> None:
  """Final test scalars and the confusion matrix of one model, in logs/<model>/test."""
  counts = figures.confusion_matrix(labels, predictions)
  png = figures.confusion_matrix_png(counts, name)
  writer = tf.summary.create_file_writer(os.path.join(log_root, name, "test"))
  with writer.as_default(step=step):
    tf.summary.scalar("accuracy", report["test_accuracy"])
    tf.summary.scalar("errors", report["test_errors"])
    tf.summary.scalar(CROSS_ENTROPY, report["test_loss"], description=CROSS_ENTROPY_DESCRIPTION)
    tf.summary.image("confusion_matrix", png_summary_image(png),
                     description="rows: true digit, columns: predicted digit (test split)")
  writer.close()
