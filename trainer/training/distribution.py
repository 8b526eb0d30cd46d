"""Chooses the tf.distribute strategy, and splits the CPU into logical devices when asked.

auto: MultiWorkerMirroredStrategy when TF_CONFIG names several workers, MirroredStrategy over
all local GPUs (or over logical CPU devices, --num_cpu_devices > 1), else the default strategy.

Multi-worker failures: TensorFlow's coordination service (heartbeats) and gRPC already abort the
collectives of a worker whose peer died or froze, as Unavailable/DeadlineExceeded/Aborted/
Cancelled errors; peer_lost() turns those into PeerLost (exit 4). A peer that is alive but
issues other collectives (diverged progress) is caught by the check in trainer/training/loop.py
before the first step, and by trainer/training/watchdog.py as a last resort.
"""

import logging
import signal
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from trainer.errors import PeerLost, UsageError
from trainer.training import tf_config, watchdog

# The kinds of error a collective ends with when a peer worker is gone: connection reset
# (Unavailable), the coordination service's missed heartbeats (Unavailable/DeadlineExceeded),
# and the collectives that were aborted or cancelled because of it.
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                tf.errors.AbortedError, tf.errors.CancelledError)
_PEER_HINTS = ("stopped sending heartbeats", "CoordinationService", "Collective ops is aborted",
               "Connection reset by peer", "Socket closed", "failed to connect")


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
  """Number of workers (chief included) that TF_CONFIG names; 0 without TF_CONFIG. A malformed
  TF_CONFIG is a UsageError (trainer/training/tf_config.py)."""
  return tf_config.worker_count(environ)


def make_strategy(name: str, num_cpu_devices: int = 1) -> tf.distribute.Strategy:
  """Builds the strategy named by --strategy (see module docstring for 'auto')."""
  if name == "multi_worker" or (name == "auto" and tf_config_workers() > 1):
    # Must exist before any other TF op runs, so this comes first. Starting it replaces the
    # process's SIGTERM handler with one of TensorFlow's that swallows the signal: the job's
    # handler would never run, and a SIGTERM'd worker would train on until SIGKILL. So the
    # handler in place before is put back.
    watchdog.collective_timeout()  # a bad $MNIST_DISTILL_COLLECTIVE_TIMEOUT_SECONDS: exit 2 now
    previous = signal.getsignal(signal.SIGTERM)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
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


def num_workers(strategy: tf.distribute.Strategy) -> int:
  """Worker processes (chief included) that take part in the strategy's collectives."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.task_type:
    return 1
  jobs = resolver.cluster_spec().as_dict()
  return max(1, sum(len(jobs.get(job, ())) for job in ("chief", "worker")))


def task_index(strategy: tf.distribute.Strategy) -> int:
  """This worker's position in TF_CONFIG's cluster: the chief first, then the workers."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.task_type:
    return 0
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  if resolver.task_type == "chief":
    return 0
  return int(resolver.task_id) + (1 if has_chief else 0)


def _reason(message: str) -> str:
  """The line of a TensorFlow error message that says what happened to the peer."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  for hint in _PEER_HINTS:
    for line in lines:
      if hint in line:
        return line
  return lines[0] if lines else ""


def peer_lost(exc: BaseException, workers: Optional[int] = None) -> Optional[PeerLost]:
  """PeerLost for an error that a lost peer worker causes in a multi-worker run, else None.

  Off multi-worker these errors mean something else (a bug, a stuck device), so they stay
  unexpected failures. `workers` defaults to what TF_CONFIG names."""
  if isinstance(exc, PeerLost):
    return exc
  if (tf_config_workers() if workers is None else workers) <= 1:
    return None
  message = getattr(exc, "message", None) or str(exc)
  if isinstance(exc, _PEER_ERRORS) or (isinstance(exc, tf.errors.OpError)
                                       and any(h in message for h in _PEER_HINTS)):
    return PeerLost(f"a peer worker was lost ({type(exc).__name__}: {_reason(message)}); "
                    "restart all workers together: they resume from the chief's checkpoint")
  return None


def row_gatherer(strategy: tf.distribute.Strategy):
  """A function values -> every replica's copy of `values` as rows of one array, on every worker.

  One small collective per call; every worker must call it at the same point. Values must be
  exactly representable as float64 (integers below 2**53)."""

  replicas = strategy.num_replicas_in_sync

  @tf.function
  def gather(local):
    def place(row):  # this replica's row in an otherwise zero table; the sum is every row
      ctx = tf.distribute.get_replica_context()
      slot = tf.one_hot(ctx.replica_id_in_sync_group, replicas, dtype=tf.float64)
      return ctx.all_reduce(tf.distribute.ReduceOp.SUM, slot[:, None] * row[None, :])
    return strategy.run(place, args=(local,))

  def call(values: Sequence[float]) -> np.ndarray:
    local = tf.constant(np.asarray(values, dtype=np.float64))
    return strategy.experimental_local_results(gather(local))[0].numpy()

  return call
