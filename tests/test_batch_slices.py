"""Batch slices: the same outputs and the same training update as the whole batch, and the
slice/thread plan for the cores a container may use."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.data import idx
from trainer.data.pipeline import normalize_images
from trainer.modeling import batch_slices, models
from trainer.modeling.batch_slices import Plan
from trainer.modeling.classifier import Classifier
from trainer.modeling.distiller import Distiller

from helpers import MNIST_DIR


@pytest.fixture(scope="module")
def batch():
  images, labels = idx.load_split(MNIST_DIR, "test")
  return normalize_images(images[:37]), tf.constant(labels[:37].astype(np.int64))


@pytest.mark.parametrize("static", [True, False], ids=["static_batch", "dynamic_batch"])
@pytest.mark.parametrize("count,slices", [(37, 2), (37, 3), (2, 3), (1, 2)])
def test_sliced_forward_equals_whole_batch(batch, count, slices, static):
  """Uneven slices, and batches smaller than the number of slices (run whole), with the batch
  size known when tracing (training) or only at run time (evaluation's last batch)."""
  keras.utils.set_random_seed(0)
  net = models.build_teacher()
  images = batch[0][:count]
  whole = net(images, training=False).numpy()
  signature = None if static else [tf.TensorSpec([None, 28, 28, 1], tf.float32)]
  forward = tf.function(lambda x: batch_slices.forward(net, x, False, slices),
                        input_signature=signature)
  sliced = forward(images).numpy()
  assert sliced.shape == whole.shape
  np.testing.assert_allclose(sliced, whole, rtol=1e-5, atol=1e-5)


def _one_step(kind, net, data, slices):
  """Weights and metrics after one SGD step of the teacher's or a student's training model."""
  if kind == "teacher":
    model = Classifier(net)
    model.compile(optimizer=keras.optimizers.SGD(0.5), slices=slices)
  else:
    model = Distiller(net)
    model.compile(optimizer=keras.optimizers.SGD(0.5), alpha=0.5, temperature=4.0,
                  slices=slices)
  metrics = tf.function(model.train_step)(data)
  return [w.numpy() for w in net.trainable_weights], {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_sliced_training_step_gives_the_whole_batch_update(batch, kind):
  """One SGD step from the same weights: the sliced step's weights and metrics match the
  unsliced step's (a missing slice, a double-counted one or a per-slice mean would not)."""
  images, labels = batch
  keras.utils.set_random_seed(1)
  build_net = models.build_teacher if kind == "teacher" else models.build_student
  start = build_net().get_weights()
  data = (images, labels)
  if kind == "student":  # cached teacher logits as the third element
    data += (tf.random.stateless_normal((37, 10), seed=(1, 2)) * 4.0,)
  results = {}
  for slices in (1, 3):
    net = build_net()
    net.set_weights(start)
    results[slices] = _one_step(kind, net, data, slices)
  (whole, whole_metrics), (sliced, sliced_metrics) = results[1], results[3]
  moved = max(float(np.abs(a - b).max()) for a, b in zip(whole, start))
  assert moved > 1e-3  # the step did something, so matching it means something
  for a, b in zip(sliced, whole):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert sliced_metrics == pytest.approx(whole_metrics, rel=1e-5)


@pytest.mark.parametrize("setting,batch_size,cores,on_gpu,cpu_devices,expected", [
    ("auto", 256, 2, False, 1, Plan(2, 1)),    # this machine: one slice per core
    ("auto", 32, 2, False, 1, Plan(2, 1)),
    ("auto", 16, 2, False, 1, Plan(1, 0)),     # too small to slice: TensorFlow's threads
    ("auto", 32, 8, False, 1, Plan(2, 4)),     # slices of >= 16 images, spare cores per slice
    ("auto", 256, 8, False, 1, Plan(8, 1)),
    ("auto", 256, 1, False, 1, Plan(1, 0)),
    ("auto", 256, 8, True, 1, Plan(1, 0)),     # GPUs: never
    ("4", 256, 8, True, 1, Plan(1, 0)),
    ("auto", 256, 2, False, 2, Plan(1, 0)),    # logical CPU devices already split the work
    ("3", 256, 2, False, 1, Plan(3, 1)),       # asked for: as asked
    ("1", 256, 8, False, 1, Plan(1, 0)),
])
def test_plan(setting, batch_size, cores, on_gpu, cpu_devices, expected):
  assert batch_slices.plan(setting, batch_size, cores, on_gpu, cpu_devices) == expected


def _affinity():
  return len(os.sched_getaffinity(0))


@pytest.mark.parametrize("files,limit", [
    ({"cpu.max": "50000 100000\n"}, 1),                      # cgroup v2, half a CPU
    ({"cpu.max": "150000 100000\n"}, 2),                     # 1.5 CPUs: round up
    ({"cpu.max": "max 100000\n"}, None),                     # no limit
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_available_cores_follow_a_kubernetes_cpu_limit(tmp_path, files, limit):
  for name, text in files.items():
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  expected = _affinity() if limit is None else min(_affinity(), limit)
  assert batch_slices.available_cores(str(tmp_path)) == expected
