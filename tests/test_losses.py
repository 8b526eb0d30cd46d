"""The per-example losses against hand-computed values and Keras' own LogitsDistillation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.modeling import losses

RNG = np.random.default_rng(7)
T = 4.0


def softmax(z):
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def hand_losses(teacher_logits, student_logits, labels, temperature):
  """(T^2 * KL, cross-entropy) per example, in numpy."""
  p_t = softmax(teacher_logits / temperature)
  p_s = softmax(student_logits / temperature)
  kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=-1)
  ce = -np.log(softmax(student_logits)[np.arange(len(labels)), labels])
  return temperature**2 * kl, ce


def _logits(n=8):
  y = RNG.integers(0, 10, size=n)
  t = (3 * RNG.normal(size=(n, 10))).astype("float32")
  s = (2 * RNG.normal(size=(n, 10))).astype("float32")
  return y, t, s


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_objective_matches_hand_computation(weight):
  y, t, s = _logits()
  total, distill, student = (v.numpy() for v in losses.distillation_objective(y, s, t, weight, T))
  hand_distill, hand_ce = hand_losses(t, s, y, T)
  np.testing.assert_allclose(distill, hand_distill, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(student, hand_ce, rtol=1e-5)
  np.testing.assert_allclose(losses.sparse_cross_entropy(y, s).numpy(), hand_ce, rtol=1e-5)
  np.testing.assert_allclose(total, weight * hand_distill + (1 - weight) * hand_ce, rtol=1e-4,
                             atol=1e-6)
  if weight == 0.0:
    np.testing.assert_allclose(total, hand_ce, rtol=1e-5)
  if weight == 1.0:
    np.testing.assert_allclose(total, hand_distill, rtol=1e-4, atol=1e-6)


def test_temperature_squared_factor():
  _, t, s = _logits()
  for temperature in (1.0, 2.0, 8.0):
    p_t, p_s = softmax(t / temperature), softmax(s / temperature)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=-1)
    ratio = losses.distillation_loss(t, s, temperature).numpy() / kl
    np.testing.assert_allclose(ratio, temperature**2, rtol=1e-3)


def test_agrees_with_keras_logits_distillation():
  _, t, s = _logits(32)
  # Pass the KLDivergence *instance*: with the default string "kl_divergence", Keras 3.15
  # resolves a plain function, misses its isinstance check and applies KL to raw logits
  # without softmax or T^2 (see the issue note).
  reference = keras.distillation.LogitsDistillation(temperature=T,
                                                    loss=keras.losses.KLDivergence())
  ours = float(tf.reduce_mean(losses.distillation_loss(t, s, T)))
  theirs = float(reference.compute_loss(t, s))
  assert ours == pytest.approx(theirs, rel=1e-5)


def test_no_teacher_logits_only_with_weight_zero():
  y, _, s = _logits()
  total, distill, student = losses.distillation_objective(y, s, None, 0.0, T)
  assert not np.any(distill.numpy())
  np.testing.assert_array_equal(total.numpy(), student.numpy())
  with pytest.raises(ValueError, match="teacher logits"):
    losses.distillation_objective(y, s, None, 0.5, T)


def test_pluggable_loss_functions_are_the_ones_used():
  y, t, s = _logits()
  total, distill, student = losses.distillation_objective(
      y, s, t, 0.25, T, student_loss_fn=lambda labels, logits: tf.fill([len(labels)], 2.0),
      distillation_loss_fn=lambda tl, sl, temperature: tf.reduce_sum(tl - sl, -1) * temperature)
  np.testing.assert_allclose(student.numpy(), 2.0)
  np.testing.assert_allclose(distill.numpy(), (t - s).sum(-1) * T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(total.numpy(), 0.25 * (t - s).sum(-1) * T + 0.75 * 2.0,
                             rtol=1e-5, atol=1e-5)
