"""Per-example losses of the teacher and the students (Hinton, Vinyals & Dean 2015).

    objective = w * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - w) * CE(y, s)

w, the distillation weight, weighs the teacher's soft targets (0: labels only, 1: teacher only);
the CLI calls it `alpha`. keras-io's example uses the same letter for the *labels'* weight, hence
the longer name here. T^2 keeps the soft targets' gradient scale independent of T.

Every function returns one loss per example, not a mean: the training steps reduce over the
global batch (tf.nn.compute_average_loss) so that replicas add up to one device's update, and
the metrics average over examples.
"""

from typing import NamedTuple

import keras
import tensorflow as tf


def sparse_cross_entropy(labels, logits):
  """Per-example cross-entropy of integer labels against logits."""
  return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def distillation_loss(teacher_logits, student_logits, temperature):
  """Per-example T^2 * KL(softmax(t/T) || softmax(s/T)), as Keras' LogitsDistillation.

  Computed from log-softmaxes: exact where probabilities underflow (no clipping needed), and
  fewer ops than two softmaxes and a log, which matters in a small student's step."""
  teacher_log_probs = tf.nn.log_softmax(teacher_logits / temperature, axis=-1)
  student_log_probs = tf.nn.log_softmax(student_logits / temperature, axis=-1)
  kl = tf.reduce_sum(tf.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
  return kl * (temperature**2)


class Losses(NamedTuple):
  """Per-example terms of the objective, each [batch]."""

  total: tf.Tensor
  distillation: tf.Tensor
  student: tf.Tensor


def distillation_objective(labels, student_logits, teacher_logits, distillation_weight,
                           temperature, student_loss_fn=sparse_cross_entropy,
                           distillation_loss_fn=distillation_loss) -> Losses:
  """w * distillation + (1 - w) * student loss, per example, with both terms.

  `teacher_logits` may be None only when w is 0 (labels only, no teacher at hand); the
  distillation term is then reported as zeros. The loss functions are pluggable:
  `student_loss_fn(labels, student_logits)` and
  `distillation_loss_fn(teacher_logits, student_logits, temperature)`, both per example.
  """
  student = student_loss_fn(labels, student_logits)
  if teacher_logits is None:
    if distillation_weight > 0.0:
      raise ValueError("a distillation weight > 0 needs teacher logits")
    distill = tf.zeros_like(student)
  else:
    distill = distillation_loss_fn(teacher_logits, student_logits, temperature)
  total = distillation_weight * distill + (1.0 - distillation_weight) * student
  return Losses(total, distill, student)
