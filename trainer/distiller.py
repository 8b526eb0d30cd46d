"""Knowledge distillation (Hinton, Vinyals & Dean 2015) as a Keras model.

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(y, s)

alpha weighs the distillation term (0: labels only, 1: teacher only). T^2 keeps the soft
targets' gradient scale independent of T. Teacher logits come either from the teacher, run in
inference mode and never updated, or precomputed, as a third element of each batch.

Losses are reduced with `tf.nn.compute_average_loss` over the *global* batch, so that N replicas
whose gradients are summed give the update one device gives on the same global batch; the
metrics track per-example means and so read the true, unscaled values.
"""

import functools

import keras
import tensorflow as tf

from trainer import batch_slices
from trainer.metrics import ExampleMeans, correct_predictions


def distillation_loss(teacher_logits, student_logits, temperature):
  """Per-example T^2 * KL(softmax(t/T) || softmax(s/T)), as Keras' LogitsDistillation.

  Computed from log-softmaxes: exact where probabilities underflow (no clipping needed), and
  fewer ops than two softmaxes and a log, which matters in a 28k-parameter student's step."""
  teacher_log_probs = tf.nn.log_softmax(teacher_logits / temperature, axis=-1)
  student_log_probs = tf.nn.log_softmax(student_logits / temperature, axis=-1)
  kl = tf.reduce_sum(tf.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
  return kl * (temperature**2)


sparse_ce_from_logits = functools.partial(
    keras.losses.sparse_categorical_crossentropy, from_logits=True)


class Distiller(keras.Model):
  """Trains `student` to match labels and, with weight alpha, a frozen teacher's soft targets."""

  def __init__(self, student, teacher=None, **kwargs):
    super().__init__(**kwargs)
    self.student = student
    self.teacher = teacher
    if teacher is not None:
      teacher.trainable = False

  def compile(self, optimizer="adam", metrics=None, student_loss_fn=None,
              distillation_loss_fn=None, alpha=0.5, temperature=4.0, slices=1, **kwargs):
    """Notebook-style compile. The loss functions must return per-example losses.

    `distillation_loss_fn(teacher_logits, student_logits, temperature)` defaults to the T^2-scaled
    KL divergence; `student_loss_fn(labels, student_logits)` to sparse cross-entropy on logits.
    `metrics` are extra metrics updated with (labels, student_logits). `slices` > 1 runs the
    networks over that many slices of each batch side by side (trainer/batch_slices.py).
    """
    if not 0.0 <= alpha <= 1.0:
      raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {temperature}")
    super().compile(optimizer=optimizer, **kwargs)
    self.alpha = float(alpha)
    self.temperature = float(temperature)
    self.slices = slices
    self.student_loss_fn = student_loss_fn or sparse_ce_from_logits
    self.distillation_loss_fn = distillation_loss_fn or distillation_loss
    # Running means of loss, distillation_loss, student_loss and accuracy, in one variable.
    self.means = ExampleMeans(("loss", "distillation_loss", "student_loss", "accuracy"))
    self.extra_metrics = [keras.metrics.get(m) for m in (metrics or [])]

  @property
  def metrics(self):
    return [self.means, *self.extra_metrics]

  def call(self, images, training=False):
    return self.student(images, training=training)

  def _teacher_logits(self, data):
    if len(data) == 3:
      return data[2]
    if self.teacher is None:
      raise ValueError("no teacher: pass batches of (images, labels, teacher_logits)")
    return batch_slices.forward(self.teacher, data[0], False, self.slices)

  def _per_example_losses(self, data, student_logits):
    """Per-example (total, distillation, student) losses for one batch."""
    labels = data[1]
    student = self.student_loss_fn(labels, student_logits)
    if self.alpha > 0.0 or len(data) == 3 or self.teacher is not None:
      teacher_logits = tf.stop_gradient(self._teacher_logits(data))
      distill = self.distillation_loss_fn(teacher_logits, student_logits, self.temperature)
    else:  # labels only and no teacher at hand: the term is not needed
      distill = tf.zeros_like(student)
    total = self.alpha * distill + (1.0 - self.alpha) * student
    return total, distill, student

  def _update_metrics(self, data, student_logits, losses):
    total, distill, student = losses
    self.means.update_state({"loss": total, "distillation_loss": distill,
                             "student_loss": student,
                             "accuracy": correct_predictions(data[1], student_logits)})
    for metric in self.extra_metrics:
      metric.update_state(data[1], student_logits)
    return self.get_metrics_result()

  def train_step(self, data):
    with tf.GradientTape() as tape:
      student_logits = batch_slices.forward(self.student, data[0], True, self.slices)
      losses = self._per_example_losses(data, student_logits)
      loss = tf.nn.compute_average_loss(losses[0])
      scaled = self.optimizer.scale_loss(loss)
    variables = self.student.trainable_variables
    grads = tape.gradient(scaled, variables)
    self.optimizer.apply(grads, variables)
    return self._update_metrics(data, student_logits, losses)

  def test_step(self, data):
    student_logits = batch_slices.forward(self.student, data[0], False, self.slices)
    return self._update_metrics(data, student_logits, self._per_example_losses(data, student_logits))
