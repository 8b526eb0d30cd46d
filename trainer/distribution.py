"""Chooses the tf.distribute strategy, and splits the CPU into logical devices when asked.

auto: MultiWorkerMirroredStrategy when TF_CONFIG names several workers, MirroredStrategy over
all local GPUs (or over logical CPU devices, --num_cpu_devices > 1), else the default strategy.
"""

import json
import logging
import os

import tensorflow as tf

from trainer.errors import UsageError


def split_cpu(num_devices: int) -> None:
  """Splits the physical CPU into `num_devices` logical devices (before TF initializes)."""
  if num_devices <= 1:
    return
  cpu = tf.config.list_physical_devices("CPU")[0]
  wanted = [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)]
  try:
    tf.config.set_logical_device_configuration(cpu, wanted)
  except RuntimeError:
    # Already initialized (tests run several jobs in one process): fine if it matches.
    have = len(tf.config.list_logical_devices("CPU"))
    if have != num_devices:
      raise UsageError(f"--num_cpu_devices={num_devices}, but TensorFlow already runs with "
                       f"{have} logical CPU devices in this process") from None


def tf_config_workers(environ=None) -> int:
  """Number of workers (chief included) that TF_CONFIG names; 0 without TF_CONFIG."""
  environ = os.environ if environ is None else environ
  raw = environ.get("TF_CONFIG")
  if not raw:
    return 0
  try:
    cluster = json.loads(raw).get("cluster", {})
  except (ValueError, AttributeError):
    raise UsageError("TF_CONFIG is not valid JSON") from None
  return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def make_strategy(name: str, num_cpu_devices: int = 1) -> tf.distribute.Strategy:
  """Builds the strategy named by --strategy (see module docstring for 'auto')."""
  if name == "multi_worker" or (name == "auto" and tf_config_workers() > 1):
    # Must exist before any other TF op runs, so this comes first.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
  else:
    split_cpu(num_cpu_devices)
    gpus = tf.config.list_logical_devices("GPU")
    cpus = tf.config.list_logical_devices("CPU")
    if name == "auto":
      name = "mirrored" if len(gpus) > 1 or len(cpus) > 1 else "default"
    if name == "mirrored":
      devices = [d.name for d in (gpus or cpus)]
      strategy = tf.distribute.MirroredStrategy(devices)
    elif name == "one_device":
      strategy = tf.distribute.OneDeviceStrategy((gpus or cpus)[0].name)
    else:
      strategy = tf.distribute.get_strategy()
  logging.info("Strategy %s with %d replica(s)", type(strategy).__name__,
               strategy.num_replicas_in_sync)
  return strategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True on the one worker that writes shared outputs (always true off multi-worker)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.task_type:
    return True
  if resolver.task_type == "chief":
    return True
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  return not has_chief and resolver.task_type == "worker" and resolver.task_id == 0


def strategy_name(strategy: tf.distribute.Strategy) -> str:
  """The --strategy value that names this strategy (class names differ from the API names)."""
  if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return "multi_worker"
  if isinstance(strategy, tf.distribute.MirroredStrategy):
    return "mirrored"
  if isinstance(strategy, tf.distribute.OneDeviceStrategy):
    return "one_device"
  return "default"
