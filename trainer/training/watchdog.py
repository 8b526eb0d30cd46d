"""Bounded waits: a stalled collective ends the process (exit 4); SIGTERM ends it before SIGKILL.

Why threads that call os._exit: a worker blocked in a collective holds the main thread inside
TensorFlow's C++ code, where neither Python exceptions nor Python signal handlers run (two
workers with diverged progress once waited in their first collective for 14 minutes and
ignored SIGTERM). A daemon thread still runs then, and os._exit needs nothing from the main one.

TensorFlow itself aborts the collectives of a worker whose peer died or froze (gRPC connection
reset, the coordination service's missed heartbeats): that surfaces as an exception within
seconds and becomes PeerLost in trainer/training/distribution.py. The collective watchdog is the
backstop for a peer that is alive but never joins (diverged progress, a bug, a stuck device), so its
timeout is generous: it must exceed the longest legitimate wait in one call, the first call of
each model (tracing, XLA compilation) and the wait for the chief to finish exporting a model.
"""

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Callable, List, Optional

from trainer import tf_logs
from trainer.errors import EXIT_PEER_LOST, EXIT_PREEMPTED, UsageError

TIMEOUT_ENV = "MNIST_DISTILL_COLLECTIVE_TIMEOUT_SECONDS"
DEFAULT_TIMEOUT_SECONDS = 300.0
# The grace deadline exits this long before the kubelet's SIGKILL: time to print the report.
GRACE_MARGIN_SECONDS = 2.0


def _die(code: int, message: str) -> None:
  """Last words on stderr (the one-line error format of trainer/cli.py), then exit at once."""
  try:
    tf_logs.release_stderr()  # not into a capture of TensorFlow's noise, which dies with us
    logging.error("%s", message)
    print(f"mnist-distill: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
  finally:
    os._exit(code)  # pylint: disable=protected-access


def collective_timeout(environ=None) -> float:
  """Seconds one guarded call may take ($MNIST_DISTILL_COLLECTIVE_TIMEOUT_SECONDS)."""
  environ = os.environ if environ is None else environ
  raw = environ.get(TIMEOUT_ENV, "").strip()
  if not raw:
    return DEFAULT_TIMEOUT_SECONDS
  try:
    value = float(raw)
  except ValueError:
    value = float("nan")
  if not (math.isfinite(value) and value > 0):
    raise UsageError(f"{TIMEOUT_ENV} must be a finite number of seconds > 0, got {raw!r}")
  return value


class CollectiveWatchdog:
  """Exits with EXIT_PEER_LOST when a guarded call runs longer than `timeout` seconds."""

  def __init__(self, timeout: float, exit_fn: Callable[[int, str], None] = _die,
               poll: Optional[float] = None):
    self.timeout = timeout
    self._exit = exit_fn
    self._poll = poll if poll is not None else min(1.0, timeout / 10)
    self._lock = threading.Lock()
    self._armed = None  # (what, started) of the call in progress
    self._thread = None

  @contextlib.contextmanager
  def guard(self, what: str):
    """Arms the watchdog for the calls in the block (not reentrant: one main thread)."""
    with self._lock:
      self._armed = (what, time.monotonic())
      if self._thread is None:
        self._thread = threading.Thread(target=self._watch, name="collective-watchdog",
                                        daemon=True)
        self._thread.start()
    try:
      yield
    finally:
      with self._lock:
        self._armed = None

  def _watch(self):
    while True:
      time.sleep(self._poll)
      with self._lock:
        armed = self._armed
      if armed and time.monotonic() - armed[1] > self.timeout:
        what, started = armed
        self._exit(EXIT_PEER_LOST,
                   f"PeerLost: {what} made no progress for {time.monotonic() - started:.0f} s "
                   f"(limit {self.timeout:g} s, ${TIMEOUT_ENV}): a peer worker is stuck or "
                   "runs other collectives; restart all workers together")
        return


_shared = {}


def collectives() -> CollectiveWatchdog:
  """The process's one collective watchdog, with the timeout from the environment."""
  if "watchdog" not in _shared:
    _shared["watchdog"] = CollectiveWatchdog(collective_timeout())
  return _shared["watchdog"]


# ---- the SIGTERM grace period ----
_checkpoints = []  # the last checkpoint written: [(path, where in training)]


def note_checkpoint(path: str, epochs_done: int, step_in_epoch: int) -> None:
  """Records the latest checkpoint written (by trainer/training/loop.py), for GraceDeadline's
  report. One model trains at a time, so only the latest one matters."""
  where = (f"epoch {epochs_done + 1}, step {step_in_epoch}" if step_in_epoch
           else f"end of epoch {epochs_done}")
  _checkpoints[:] = [(path, where)]


def _default_lost() -> List[str]:
  # <model>/checkpoints/ckpt-N: the part of the path that is the same in the bucket
  return [f"{'/'.join(path.split(os.sep)[-3:])} ({where})" for path, where in _checkpoints]


class GraceDeadline:
  """After SIGTERM, exits with EXIT_PREEMPTED at `seconds` - GRACE_MARGIN_SECONDS at the latest.

  The kubelet sends SIGKILL a grace period after SIGTERM (on Spot VMs GKE gives pods only part
  of the notice: docs/operations/buckets-and-resume.md); a process still uploading then would
  die without a word. This one says instead what may be missing from the bucket, so the
  operator knows which steps the rerun will repeat. `pending()` names the uploads still queued
  when it is known; otherwise the report names the last checkpoint written locally, whose upload
  may not have finished.
  """

  def __init__(self, seconds: float, pending: Optional[Callable[[], List[str]]] = None,
               exit_fn: Callable[[int, str], None] = _die):
    self.seconds = seconds
    self.pending = pending  # may be set later, once the storage exists
    self._exit = exit_fn
    self._started = None
    self.finished = threading.Event()  # set by the main thread when it exits in time

  def install(self, signum: int = signal.SIGTERM) -> None:
    """Starts the clock the moment `signum` arrives, from a thread of its own.

    Python runs signal handlers only between bytecodes of the main thread, so a main thread
    blocked in TensorFlow (a collective that never completes) never runs the job's handler;
    the interpreter's C-level handler still writes the signal number to the wakeup fd at once.
    Call from the main thread, after the job's own handler for `signum` is installed (without
    a Python handler nothing is written)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch():
      while True:
        if signum in os.read(read_fd, 64):
          self.start()
          return

    threading.Thread(target=watch, name="grace-signal", daemon=True).start()

  def start(self) -> None:
    """Starts the clock (install() calls it); later calls do nothing: the first signal counts."""
    if self._started is not None:
      return
    self._started = time.monotonic()
    threading.Thread(target=self._wait, name="grace-deadline", daemon=True).start()

  def _wait(self):
    budget = max(0.0, self.seconds - GRACE_MARGIN_SECONDS)
    if self.finished.wait(budget):
      return
    try:
      lost = self.pending() if self.pending else _default_lost()
    except Exception as e:  # pylint: disable=broad-except  # the exit must happen regardless
      lost = [f"(could not list the pending uploads: {e})"]
    what = ("; may be missing from the bucket: " + ", ".join(lost)) if lost else ""
    self._exit(EXIT_PREEMPTED,
               f"Preempted: the {self.seconds:g} s grace period (--grace_period_seconds) ran out "
               f"before the checkpoint upload finished{what}. A rerun resumes from the latest "
               "checkpoint in the bucket and repeats the steps after it")
