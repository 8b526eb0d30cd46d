"""Precision and XLA modes: each one trains in our custom loop, float16 really uses loss
scaling, and results.json records the mode a run used."""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.data import idx
from trainer.data.pipeline import ArrayPipeline, normalize_images
from trainer.job.runtime import resolve_precision
from trainer.modeling import losses, models
from trainer.modeling.classifier import Classifier
from trainer.modeling.distiller import Distiller
from trainer.training.loop import LoopConfig, TrainingLoop

from helpers import MNIST_DIR, run_cli

LOW_PRECISION = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


@pytest.fixture(autouse=True)
def restore_float32():
  yield
  keras.mixed_precision.set_dtype_policy("float32")


@pytest.fixture(scope="module")
def mnist():
  images, labels = idx.load_split(MNIST_DIR, "train")
  return images[:512], labels[:512].astype(np.int64)


def _soft_targets(labels):
  """Stand-in teacher logits that know the labels (the loop treats them as cached logits)."""
  return np.eye(10, dtype=np.float32)[labels] * 6.0


@pytest.mark.parametrize("policy,jit_compile", [
    ("float32", False), ("float32", True), ("mixed_float16", False), ("mixed_bfloat16", False)])
def test_each_mode_trains_in_the_loop(mnist, tmp_path, policy, jit_compile):
  images, labels = mnist
  keras.mixed_precision.set_dtype_policy(policy)
  keras.utils.set_random_seed(1)
  net = models.build_student()
  distiller = Distiller(net)
  distiller.compile(optimizer=keras.optimizers.Adam(1e-2), alpha=0.5, temperature=4.0)
  pipeline = ArrayPipeline(images, labels, 64, 1, _soft_targets(labels))
  loop = TrainingLoop(distiller, net, tf.distribute.get_strategy(), pipeline, pipeline,
                      str(tmp_path), LoopConfig(epochs=3, seed=0, jit_compile=jit_compile))
  history = loop.run()
  losses = [record["train"]["loss"] for record in history]
  assert all(math.isfinite(v) for v in losses), losses
  assert losses[-1] < 0.8 * losses[0], losses  # 24 steps: the loss clearly falls
  assert history[-1]["validation"]["accuracy"] > 0.5  # chance is 0.1
  # Computation ran in the policy's dtype; the logits layer stays float32.
  assert net.layers[0].compute_dtype == LOW_PRECISION.get(policy, "float32")
  assert net.get_layer("logits").compute_dtype == "float32"
  assert net(normalize_images(images[:2])).dtype == tf.float32
  assert all(v.dtype == "float32" for v in net.weights)  # variables stay float32
  is_scaled = isinstance(distiller.optimizer, keras.optimizers.LossScaleOptimizer)
  assert is_scaled == (policy == "mixed_float16")


def _classifier(net):
  model = Classifier(net)
  model.compile(optimizer=keras.optimizers.SGD(0.05))
  return model


def _distiller(net):
  model = Distiller(net)
  model.compile(optimizer=keras.optimizers.SGD(0.05), alpha=0.5, temperature=4.0)
  return model


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_mixed_float16_scales_the_loss_and_applies_unscaled_gradients(mnist, kind):
  """Keras' compile wraps the optimizer in a LossScaleOptimizer (initial scale 2^15); our
  train_step scales the loss and the optimizer divides the gradients back before applying
  them: one SGD step moves the weights by lr * (unscaled gradient)."""
  images, labels = mnist
  keras.mixed_precision.set_dtype_policy("mixed_float16")
  keras.utils.set_random_seed(2)
  net = models.build_teacher() if kind == "teacher" else models.build_student()
  model = _classifier(net) if kind == "teacher" else _distiller(net)
  assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
  model.optimizer.build(net.trainable_variables)
  scale = float(model.optimizer.dynamic_scale.numpy())
  assert scale == 2.0**15

  x = normalize_images(images[:64])
  y = tf.constant(labels[:64])
  batch = (x, y) if kind == "teacher" else (x, y, tf.constant(_soft_targets(labels[:64])))
  with tf.GradientTape() as tape:  # the float16 forward pass, loss not scaled
    logits = net(x, training=True)
    if kind == "teacher":
      per_example = losses.sparse_cross_entropy(y, logits)
    else:
      per_example = losses.distillation_objective(y, logits, batch[2], model.distillation_weight,
                                                  model.temperature).total
    loss = tf.nn.compute_average_loss(per_example)
  expected = [g.numpy() for g in tape.gradient(loss, net.trainable_variables)]
  before = [v.numpy() for v in net.trainable_variables]

  tf.function(model.train_step)(batch)  # what TrainingLoop runs under strategy.run

  assert int(model.optimizer.iterations.numpy()) == 1
  assert float(model.optimizer.dynamic_scale.numpy()) == scale  # gradients were finite
  step = np.concatenate([((b - a.numpy()) / 0.05).ravel()
                         for b, a in zip(before, net.trainable_variables)])
  reference = np.concatenate([g.ravel() for g in expected])
  ratio = np.linalg.norm(step) / np.linalg.norm(reference)
  cosine = step @ reference / (np.linalg.norm(step) * np.linalg.norm(reference))
  # Not unscaled would give a ratio of 32768; float16 rounding gives a few tenths of a percent.
  assert ratio == pytest.approx(1.0, rel=0.02), ratio
  assert cosine > 0.999, cosine


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_no_loss_scaling_outside_float16(policy):
  keras.mixed_precision.set_dtype_policy(policy)
  model = _distiller(models.build_student())
  assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)


def test_auto_precision_is_float32_without_a_gpu():
  assert not tf.config.list_physical_devices("GPU")
  assert resolve_precision("auto") == "float32"
  assert resolve_precision("mixed_bfloat16") == "mixed_bfloat16"


@pytest.mark.parametrize("flags,precision,jit", [
    ([], "float32", False),
    (["--mixed_precision=mixed_bfloat16", "--jit_compile"], "mixed_bfloat16", True),
])
def test_results_record_the_mode_used(tmp_path, flags, precision, jit):
  model_dir = tmp_path / "run"
  proc = run_cli([f"--model_dir={model_dir}", f"--idx_dir={MNIST_DIR}",
                  "--max_train_examples=512", "--validation_examples=128",
                  "--max_test_examples=128", "--teacher_epochs=1", "--student_epochs=1",
                  "--batch_size=64", "--student=distilled:alpha=0.5,temperature=4", "--nolitert",
                  *flags])
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(model_dir / "results.json") as f:
    summary = json.load(f)
  assert summary["precision"] == precision and summary["jit_compile"] is jit
  assert [m["name"] for m in summary["models"]] == ["teacher", "distilled"]
  for model in summary["models"]:  # per model, in the merged report and in its own marker
    assert model["precision"] == precision and model["jit_compile"] is jit, model["name"]
    with open(model_dir / model["name"] / "result.json") as f:
      result = json.load(f)
    assert result["precision"] == precision and result["jit_compile"] is jit, model["name"]
  assert summary["flags"]["mixed_precision"] == (flags[0].split("=")[1] if flags else "auto")
