"""The fused Adam and the one-variable metrics do what the Keras classes they replace do."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.modeling import models
from trainer.modeling.metrics import ExampleMeans, correct_predictions
from trainer.modeling.optimizers import FusedAdam, cosine_adam


def _train(optimizer, steps=5):
  """`steps` Adam steps of the student on fixed random batches; returns its weights."""
  keras.utils.set_random_seed(0)
  net = models.build_student()
  rng = np.random.default_rng(1)
  images = rng.uniform(size=(steps, 16, 28, 28, 1)).astype("float32")
  labels = rng.integers(0, 10, size=(steps, 16))

  @tf.function
  def step(x, y):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
          y, net(x, training=True), from_logits=True))
    optimizer.apply(tape.gradient(loss, net.trainable_variables), net.trainable_variables)

  for x, y in zip(images, labels):
    step(tf.constant(x), tf.constant(y))
  return [w.numpy() for w in net.weights]


def _assert_same_weights(fused, reference, atol=2e-5):
  for a, b in zip(fused, reference):
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)  # rounding only: steps are ~1e-2


@pytest.mark.parametrize("make_lr", [lambda: 1e-2, lambda: keras.optimizers.schedules.CosineDecay(
    1e-2, decay_steps=5)], ids=["constant", "cosine"])
def test_fused_adam_matches_keras_adam(make_lr):
  fused = _train(FusedAdam(make_lr()))
  reference = _train(keras.optimizers.Adam(make_lr()))
  initial = _train(keras.optimizers.SGD(0.0))
  moved = max(float(np.abs(a - b).max()) for a, b in zip(reference, initial))
  assert moved > 1e-3  # five steps at 1e-2 really moved the weights
  _assert_same_weights(fused, reference)


def test_fused_adam_falls_back_to_keras_for_amsgrad():
  fused = _train(FusedAdam(1e-2, amsgrad=True))
  reference = _train(keras.optimizers.Adam(1e-2, amsgrad=True))
  _assert_same_weights(fused, reference)


def test_fused_adam_under_loss_scaling_matches_keras_adam():
  """mixed_float16 wraps the optimizer in a LossScaleOptimizer; the fused kernel runs inside."""
  fused = _train(keras.optimizers.LossScaleOptimizer(FusedAdam(1e-2)))
  reference = _train(keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-2)))
  _assert_same_weights(fused, reference)


def test_cosine_adam_weight_decay_matches_keras_adamw():
  def adamw():
    reference = keras.optimizers.AdamW(
        keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=5), weight_decay=0.5)
    reference.exclude_from_weight_decay(var_names=["bias"])
    return reference

  decayed = _train(cosine_adam(1e-2, decay_steps=5, weight_decay=0.5))
  _assert_same_weights(decayed, _train(adamw()), atol=5e-5)  # one weight in 2048 is 3e-5 off
  plain = _train(cosine_adam(1e-2, decay_steps=5))
  assert max(float(np.abs(a - b).max()) for a, b in zip(decayed, plain)) > 1e-4


def test_weight_decay_shrinks_kernels_by_lr_times_decay_and_leaves_biases():
  """With zero gradients Adam moves nothing: what changes is the decay alone."""
  net = models.build_student()
  for w in net.weights:
    w.assign(tf.ones_like(w))
  optimizer = cosine_adam(0.1, decay_steps=1000, weight_decay=0.5)
  optimizer.apply([tf.zeros_like(w) for w in net.trainable_variables], net.trainable_variables)
  for w in net.trainable_variables:
    expected = 1.0 if "bias" in w.name else 1.0 - 0.1 * 0.5
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)


def test_example_means_match_keras_metrics_over_uneven_batches():
  rng = np.random.default_rng(0)
  means = ExampleMeans(("loss", "accuracy"))
  keras_mean = keras.metrics.Mean()
  keras_accuracy = keras.metrics.SparseCategoricalAccuracy()
  for size in (7, 32, 1):  # uneven: a mean of batch means would differ
    losses = rng.exponential(size=size).astype("float32")
    labels = rng.integers(0, 10, size=size)
    logits = rng.normal(size=(size, 10)).astype("float32")
    means.update_state({"loss": losses, "accuracy": correct_predictions(labels, logits)})
    keras_mean.update_state(losses)
    keras_accuracy.update_state(labels, logits)
  result = {k: float(v) for k, v in means.result().items()}
  assert result["loss"] == pytest.approx(float(keras_mean.result()), rel=1e-6)
  assert result["accuracy"] == pytest.approx(float(keras_accuracy.result()), rel=1e-6)
  assert 0.0 < result["accuracy"] < 1.0
  means.reset_state()
  assert {k: float(v) for k, v in means.result().items()} == {"loss": 0.0, "accuracy": 0.0}
