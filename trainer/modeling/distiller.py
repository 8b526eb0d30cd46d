"""Knowledge distillation (Hinton, Vinyals & Dean 2015) as a Keras model.

    loss = w * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - w) * CE(y, s)

w is the distillation weight (trainer/modeling/losses.py; the CLI's `alpha`): 0 trains on the
labels only, 1 on the teacher only. Teacher logits come either from the teacher, run in inference
mode and never updated, or precomputed, as a third element of each batch.

Losses are reduced with `tf.nn.compute_average_loss` over the *global* batch, so that N replicas
whose gradients are summed give the update one device gives on the same global batch; the
metrics track per-example means and so read the true, unscaled values.
"""

import keras
import tensorflow as tf

from trainer.modeling import batch_slices, losses
from trainer.modeling.metrics import ExampleMeans, correct_predictions


class Distiller(keras.Model):
  """Trains `student` on labels and, by the distillation weight, a frozen teacher's soft targets."""

  def __init__(self, student, teacher=None, **kwargs):
    super().__init__(**kwargs)
    self.student = student
    self.teacher = teacher
    if teacher is not None:
      teacher.trainable = False

  def compile(self, optimizer="adam", metrics=None, student_loss_fn=None,
              distillation_loss_fn=None, distillation_weight=None, temperature=4.0, slices=1,
              alpha=None, **kwargs):
    """Notebook-style compile. The loss functions must return per-example losses.

    `distillation_weight` (default 0.5) weighs the distillation term; `alpha` is accepted as
    its alias, the CLI's name for the same number (not keras-io's label weight).
    `distillation_loss_fn(teacher_logits, student_logits, temperature)` defaults to
    losses.distillation_loss (T^2-scaled KL); `student_loss_fn(labels, student_logits)` to
    losses.sparse_cross_entropy. `metrics` are extra metrics updated with
    (labels, student_logits). `slices` > 1 runs the networks over that many slices of each
    batch side by side (trainer/modeling/batch_slices.py).
    """
    if distillation_weight is not None and alpha is not None:
      raise ValueError("pass distillation_weight or its alias alpha, not both")
    weight = alpha if distillation_weight is None else distillation_weight
    weight = 0.5 if weight is None else weight
    if not 0.0 <= weight <= 1.0:
      raise ValueError(f"distillation_weight (alpha) must be in [0, 1], got {weight}")
    if temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {temperature}")
    super().compile(optimizer=optimizer, **kwargs)
    self.distillation_weight = float(weight)
    self.temperature = float(temperature)
    self.slices = slices
    # The training loop traces the steps without AutoGraph (trainer/training/loop.py); a
    # caller's own loss keeps it, as under Keras' fit, by being a tf.function of its own.
    self.student_loss_fn = (tf.function(student_loss_fn) if student_loss_fn
                            else losses.sparse_cross_entropy)
    self.distillation_loss_fn = (tf.function(distillation_loss_fn) if distillation_loss_fn
                                 else losses.distillation_loss)
    # Running means of loss, distillation_loss, student_loss and accuracy, in one variable.
    self.means = ExampleMeans(("loss", "distillation_loss", "student_loss", "accuracy"))
    self.extra_metrics = [keras.metrics.get(m) for m in (metrics or [])]

  @property
  def alpha(self):
    """Alias of `distillation_weight` under the CLI's name."""
    return self.distillation_weight

  @property
  def metrics(self):
    return [self.means, *self.extra_metrics]

  def call(self, images, training=False):
    return self.student(images, training=training)

  def teacher_logits(self, data):
    """The batch's teacher logits, never differentiated: its third element when cached, else
    the frozen teacher run in inference mode; None with neither (only valid for weight 0)."""
    if len(data) == 3:
      return tf.stop_gradient(data[2])
    if self.teacher is None:
      if self.distillation_weight > 0.0:
        raise ValueError("no teacher: pass batches of (images, labels, teacher_logits)")
      return None
    return tf.stop_gradient(batch_slices.forward(self.teacher, data[0], False, self.slices))

  def _objective(self, data, student_logits):
    return losses.distillation_objective(
        data[1], student_logits, self.teacher_logits(data), self.distillation_weight,
        self.temperature, self.student_loss_fn, self.distillation_loss_fn)

  def _update_metrics(self, data, student_logits, per_example):
    self.means.update_state({"loss": per_example.total,
                             "distillation_loss": per_example.distillation,
                             "student_loss": per_example.student,
                             "accuracy": correct_predictions(data[1], student_logits)})
    for metric in self.extra_metrics:
      metric.update_state(data[1], student_logits)
    return self.get_metrics_result()

  def train_step(self, data):
    with tf.GradientTape() as tape:
      student_logits = batch_slices.forward(self.student, data[0], True, self.slices)
      per_example = self._objective(data, student_logits)
      scaled = self.optimizer.scale_loss(tf.nn.compute_average_loss(per_example.total))
    variables = self.student.trainable_variables
    self.optimizer.apply(tape.gradient(scaled, variables), variables)
    return self._update_metrics(data, student_logits, per_example)

  def test_step(self, data):
    student_logits = batch_slices.forward(self.student, data[0], False, self.slices)
    return self._update_metrics(data, student_logits, self._objective(data, student_logits))
