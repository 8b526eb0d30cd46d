"""A multi-worker run that loses a peer ends in bounded time with exit 4 (EXIT_PEER_LOST).

The end-to-end test kills the chief, whose process also hosts TensorFlow's coordination
service; the chief's side is covered by tests/test_multi_worker.py's resume test. The watchdog
and the grace deadline are checked in-process with a stand-in for os._exit.
"""

import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf
from test_multi_worker import TINY_TEACHER, kill_one_when, read_checkpoint_step, start_workers

from trainer.errors import EXIT_PEER_LOST, EXIT_PREEMPTED, PeerLost, UsageError
from trainer.training import distribution, watchdog

from helpers import REPO, cli_env, error_lines, signal_and_wait


def test_worker_whose_chief_is_killed_exits_4_within_a_bounded_time(tmp_path):
  procs, logs = start_workers(tmp_path, [f"--model_dir={tmp_path / 'run'}", *TINY_TEACHER])
  checkpoints = tmp_path / "run" / "teacher" / "checkpoints"
  code, waited, out = kill_one_when(  # once training is under way: collectives run
      procs, logs, lambda: read_checkpoint_step(checkpoints) >= 1, killed=0, survivor=1)
  assert code == EXIT_PEER_LOST, out[-3000:]
  assert waited < 60, waited  # TensorFlow's heartbeats notice within ~10 s; exit skips teardown
  assert "mnist-distill: error: PeerLost: a peer worker was lost" in out


def test_sigterm_to_one_worker_stops_both_at_the_same_checkpoint(tmp_path):
  procs, logs = start_workers(tmp_path, [f"--model_dir={tmp_path / 'run'}", *TINY_TEACHER])
  checkpoints = tmp_path / "run" / "teacher" / "checkpoints"
  try:
    deadline = time.monotonic() + 300
    while read_checkpoint_step(checkpoints) < 1:
      assert procs[0].poll() is None and time.monotonic() < deadline, logs[0].read_text()[-3000:]
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # the non-chief only: the chief must stop with it
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    for p in procs:
      p.kill()
  outs = [log.read_text() for log in logs]
  assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], outs[0][-3000:] + outs[1][-3000:]
  stops = [re.search(r"stopped at epoch (\d+), step (\d+): checkpoint ckpt-(\d+) written",
                     "\n".join(error_lines(out))) for out in outs]
  assert all(stops), outs
  assert stops[0].groups() == stops[1].groups()  # one step for both
  assert read_checkpoint_step(checkpoints) == int(stops[0][3])  # the chief's copy is that one


def test_peer_errors_map_to_peer_lost_only_in_multi_worker_runs():
  unavailable = tf.errors.UnavailableError(None, None, "Collective ops is aborted by: "
                                           "recvmsg:Connection reset by peer\nmore")
  lost = distribution.peer_lost(unavailable, workers=2)
  assert isinstance(lost, PeerLost) and "Connection reset by peer" in str(lost)
  assert distribution.peer_lost(unavailable, workers=1) is None  # one process: a real failure
  heartbeat = tf.errors.InternalError(None, None, "The following tasks are unhealthy (stopped "
                                      "sending heartbeats):\n/job:worker/task:1")
  assert isinstance(distribution.peer_lost(heartbeat, workers=2), PeerLost)
  assert distribution.peer_lost(tf.errors.InvalidArgumentError(None, None, "bad shape"),
                                workers=2) is None
  assert distribution.peer_lost(ValueError("x"), workers=2) is None


class _Exits:
  def __init__(self):
    self.calls, self.done = [], threading.Event()

  def __call__(self, code, message):
    self.calls.append((code, message))
    self.done.set()


def test_watchdog_ends_a_stalled_collective_with_exit_4_and_spares_a_quick_one():
  exits = _Exits()
  dog = watchdog.CollectiveWatchdog(timeout=0.3, exit_fn=exits, poll=0.02)
  with dog.guard("quick steps"):
    time.sleep(0.05)
  time.sleep(0.5)  # disarmed: idle time between calls never counts
  assert exits.calls == []
  with dog.guard("training steps"):
    assert exits.done.wait(5)
  code, message = exits.calls[0]
  assert code == EXIT_PEER_LOST and message.startswith("PeerLost: training steps made no progress")


@pytest.mark.parametrize("raw", ["0", "-5", "nan", "inf", "soon"])
def test_watchdog_timeout_from_the_environment_is_range_checked(raw):
  with pytest.raises(UsageError, match=watchdog.TIMEOUT_ENV):
    watchdog.collective_timeout({watchdog.TIMEOUT_ENV: raw})
  assert watchdog.collective_timeout({}) == watchdog.DEFAULT_TIMEOUT_SECONDS
  assert watchdog.collective_timeout({watchdog.TIMEOUT_ENV: "42.5"}) == 42.5


def test_grace_deadline_exits_143_before_the_kill_and_names_what_the_bucket_lacks():
  watchdog.note_checkpoint("/disk/run/teacher/checkpoints/ckpt-140", 1, 62)
  exits = _Exits()
  deadline = watchdog.GraceDeadline(watchdog.GRACE_MARGIN_SECONDS + 0.3, exit_fn=exits)
  started = time.monotonic()
  deadline.start()
  deadline.start()  # a second SIGTERM does not restart the clock
  assert exits.done.wait(5)
  assert time.monotonic() - started < watchdog.GRACE_MARGIN_SECONDS + 0.3
  code, message = exits.calls[0]
  assert code == EXIT_PREEMPTED
  assert "bucket: teacher/checkpoints/ckpt-140 (epoch 2, step 62)" in message

  in_time = _Exits()
  finished = watchdog.GraceDeadline(watchdog.GRACE_MARGIN_SECONDS + 0.2, exit_fn=in_time,
                                    pending=lambda: ["teacher/checkpoints"])
  finished.start()
  finished.finished.set()  # the upload made it: the process exits on its own
  time.sleep(0.5)
  assert in_time.calls == []


_STUCK_UPLOAD = """
import signal, time
from trainer.training import watchdog
deadline = watchdog.GraceDeadline(3, pending=lambda: ["teacher/checkpoints/ckpt-140"])
# The job's handler stands in for a main thread stuck in TensorFlow: it never returns.
signal.signal(signal.SIGTERM, lambda *_: time.sleep(60))
deadline.install()
print("ready", flush=True)
time.sleep(60)  # an upload that will not finish in time
"""


def test_a_process_past_its_grace_period_exits_143_before_the_kill_and_says_what_is_lost():
  proc = subprocess.Popen([sys.executable, "-c", _STUCK_UPLOAD], cwd=REPO, env=cli_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "ready"
    code, took = signal_and_wait(proc, signal.SIGTERM, timeout=30)
  finally:
    proc.kill()
  assert code == EXIT_PREEMPTED
  assert 3 - watchdog.GRACE_MARGIN_SECONDS - 0.2 < took < 3  # before a SIGKILL at 3 s
  lines = error_lines(proc.stderr.read())
  assert len(lines) == 1 and "may be missing from the bucket: teacher/checkpoints/ckpt-140" \
      in lines[0], lines
