"""Runs a network over a batch as independent slices, so that CPU cores each take one.

On a CPU, TensorFlow normally spreads every kernel over all cores; for this project's small
tensors that costs more in synchronisation than it gains (docs/design/training-loop.md, "Batch
slices", has the figures). Cutting each
replica's batch into one slice per core instead gives the graph independent chains of
single-threaded kernels (forward, and by the chain rule backward too) that TensorFlow's
inter-op pool runs side by side. The result is the same function of the batch: per-example
outputs are concatenated back in order, and the slices' weight gradients add up to the whole
batch's (equal up to float rounding; tests/test_batch_slices.py).

The kernels only run single-threaded if TensorFlow's intra-op pool is set to one thread per
slice's share of the cores before TensorFlow starts; `plan` decides both numbers.
"""

import dataclasses
import logging
import math
import os

import tensorflow as tf

MIN_SLICE_EXAMPLES = 16  # smaller slices leave too little work per kernel to pay for a core


def forward(net, images, training: bool, slices: int = 1):
  """net(images) computed as `slices` near-equal slices of the batch, concatenated.

  A batch with fewer examples than slices (a last partial batch) runs whole: oneDNN kernels
  fail on empty slices. Training batches have a static size, so the choice costs them nothing;
  other batches choose in the graph."""
  if slices <= 1:
    return net(images, training=training)

  def whole():
    return net(images, training=training)

  def sliced():
    count = tf.shape(images)[0]
    base = count // slices
    sizes = tf.concat([tf.fill([slices - 1], base), [count - base * (slices - 1)]], axis=0)
    parts = tf.split(images, sizes, num=slices, axis=0)
    return tf.concat([net(part, training=training) for part in parts], axis=0)

  static_count = images.shape[0]
  if static_count is not None:
    return sliced() if static_count >= slices else whole()
  return tf.cond(tf.shape(images)[0] >= slices, sliced, whole)


def _cgroup_cpu_limit(root: str):
  """CPUs the container may use by its cgroup quota (v2 cpu.max or v1 CFS), or None."""
  try:
    with open(os.path.join(root, "cpu.max")) as f:
      quota, period = f.read().split()[:2]
    if quota != "max":
      return float(quota) / float(period)
    return None
  except (OSError, ValueError):
    pass
  try:
    with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
      quota = float(f.read())
    with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
      period = float(f.read())
    return quota / period if quota > 0 and period > 0 else None
  except (OSError, ValueError):
    return None


def available_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
  """Cores this process may run on: its CPU affinity, capped by a Kubernetes CPU limit."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  limit = _cgroup_cpu_limit(cgroup_root)
  if limit is not None:
    cores = min(cores, max(1, math.ceil(limit)))
  return max(1, cores or 1)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How each replica's batch is sliced, and the intra-op threads that makes worthwhile."""

  slices: int
  intra_op_threads: int  # 0: TensorFlow's default (all cores)


def plan(setting, per_replica_batch: int, cores: int, on_gpu: bool,
         cpu_devices: int = 1) -> Plan:
  """--batch_slices ('auto' or a count) -> Plan. GPUs never slice (their kernels are wide).

  auto on a CPU-only host with one device: one slice per core, each of at least
  MIN_SLICE_EXAMPLES images; with logical CPU devices (which already split the work), none.
  Cores left over (more cores than slices) go to each slice's kernels."""
  if on_gpu:
    return Plan(1, 0)
  if setting == "auto":
    if cpu_devices > 1:
      return Plan(1, 0)
    slices = max(1, min(cores, per_replica_batch // MIN_SLICE_EXAMPLES))
  else:
    slices = int(setting)
  if slices <= 1:
    return Plan(1, 0)
  return Plan(slices, max(1, cores // slices))


def apply_threads(chosen: Plan, environ=None) -> int:
  """Sets TensorFlow's intra-op threads for `chosen` (before TensorFlow starts); returns the
  value in force. TF_NUM_INTRAOP_THREADS, when set, wins: the operator asked for it."""
  environ = os.environ if environ is None else environ
  if not chosen.intra_op_threads or environ.get("TF_NUM_INTRAOP_THREADS"):
    return tf.config.threading.get_intra_op_parallelism_threads()
  try:
    tf.config.threading.set_intra_op_parallelism_threads(chosen.intra_op_threads)
  except RuntimeError:  # TensorFlow already running (several jobs in one process, tests)
    have = tf.config.threading.get_intra_op_parallelism_threads()
    if have != chosen.intra_op_threads:
      logging.warning("TensorFlow already runs with %s intra-op threads; batch slices still "
                      "run, but side by side only if that is %d", have or "default",
                      chosen.intra_op_threads)
  return tf.config.threading.get_intra_op_parallelism_threads()
