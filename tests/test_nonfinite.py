"""A training loop that goes non-finite stops before saving it: the last checkpoint stays finite."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.data.pipeline import ArrayPipeline
from trainer.modeling.classifier import Classifier
from trainer.training.loop import LoopConfig, NonFiniteLoss, TrainingLoop

EXAMPLES, BATCH = 256, 32  # 8 steps per epoch: one step chunk each


class NanFrom(keras.optimizers.schedules.LearningRateSchedule):
  """0.05 until global step `first_bad` (0-based), NaN from there on."""

  def __init__(self, first_bad):
    self.first_bad = first_bad

  def __call__(self, step):
    return tf.where(step < self.first_bad, 0.05, float("nan"))


def make_loop(folder, learning_rate, epochs=3, every=None):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (EXAMPLES, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, EXAMPLES).astype(np.int64)
  keras.utils.set_random_seed(0)
  net = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                          keras.layers.Dense(10, name="logits")])
  model = Classifier(net)
  model.compile(optimizer=keras.optimizers.SGD(learning_rate))
  pipeline = ArrayPipeline(images, labels, BATCH, 1)
  events = []
  loop = TrainingLoop(model, net, tf.distribute.get_strategy(), pipeline, pipeline, str(folder),
                      LoopConfig(epochs=epochs, seed=0, checkpoint_every_steps=every),
                      on_checkpoint=lambda: events.append("checkpoint"),
                      on_epoch=lambda record: events.append(record["epoch"]))
  return loop, net, events


def checkpoint_is_finite(folder):
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(folder)))
  values = [reader.get_tensor(n) for n in reader.get_variable_to_shape_map()
            if n.endswith("VARIABLE_VALUE")]
  assert sum(v.size for v in values) > 7840  # the kernel (and bias) are among them
  return all(np.isfinite(v).all() for v in values)


def test_a_nan_learning_rate_stops_before_the_first_checkpoint(tmp_path):
  loop, _, events = make_loop(tmp_path, float("nan"))
  with pytest.raises(NonFiniteLoss, match=r"training loss nan at epoch 1, step 8: stopped "
                                          r"without saving \(no checkpoint\)") as e:
    loop.run()
  assert e.value.exit_code == 1
  assert "\n" not in str(e.value)
  assert events == [] and loop.manager.latest_checkpoint is None


def test_nan_mid_training_keeps_the_last_finite_checkpoint(tmp_path):
  loop, _, events = make_loop(tmp_path, NanFrom(first_bad=10))  # step 11 of 24 goes bad
  with pytest.raises(NonFiniteLoss, match=r"epoch 2, step 8: .*kept ckpt-8\)"):
    loop.run()
  assert events == ["checkpoint", 1]  # epoch 1 saved and reported; epoch 2 neither
  assert loop.manager.latest_checkpoint.endswith("ckpt-8")
  assert checkpoint_is_finite(tmp_path)


def test_non_finite_weights_behind_a_finite_loss_are_not_saved(tmp_path):
  # The NaN update is the epoch's last step: every loss of the epoch was computed before it.
  loop, net, events = make_loop(tmp_path, NanFrom(first_bad=7), every=4)
  with pytest.raises(NonFiniteLoss, match=r"non-finite values in .* at the end of epoch 1: .*"
                                          r"kept ckpt-4\)"):
    loop.run()
  assert not np.isfinite(net.get_layer("logits").kernel.numpy()).all()
  assert events == ["checkpoint"]  # the mid-epoch checkpoint at step 4 only
  assert loop.manager.latest_checkpoint.endswith("ckpt-4") and checkpoint_is_finite(tmp_path)


def test_finite_training_is_untouched(tmp_path):
  loop, _, events = make_loop(tmp_path, 0.05, epochs=2)
  history = loop.run()
  assert [r["epoch"] for r in history] == [1, 2]
  assert events == ["checkpoint", 1, "checkpoint", 2]
  assert checkpoint_is_finite(tmp_path)
