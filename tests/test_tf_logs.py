"""Quieting TensorFlow's noise never swallows a line that matters: the capture passes on every
line that is not a known banner, and a watchdog's last words reach stderr even when it ends the
process (os._exit) in the middle of a capture. The whole job's log: tests/test_job.py."""

import subprocess
import sys
import textwrap

from helpers import REPO, cli_env

SCRIPT = textwrap.dedent("""
    import sys, threading, time
    from trainer import tf_logs
    from trainer.training import watchdog
    tf_logs.quiet()
    with tf_logs.hidden_noise():
      for line in (
          "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
          "I0000 00:00:1796529016.524315   10780 port.cc:153] oneDNN custom operations are on.",
          "W0000 00:00:1796528787.496066   13470 flatbuffer_export.cc:3851] Skipping metadata",
          "fully_quantize: 0, inference_type: 6, input_inference_type: UINT8",
          "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
          "E0000 00:00:1796528787.5   13470 some_op.cc:12] a real C++ error",
          "a line of the job's own"):
        print(line, file=sys.stderr, flush=True)
      if sys.argv[1] == "die":
        threading.Thread(target=watchdog._die, args=(143, "last words")).start()
        time.sleep(30)
    print("after", file=sys.stderr)
""")


def _run(mode):
  return subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, env=cli_env(),
                        capture_output=True, text=True, timeout=60)


def test_noise_is_dropped_and_everything_else_kept_in_order():
  proc = _run("end")
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr.splitlines() == [
      "E0000 00:00:1796528787.5   13470 some_op.cc:12] a real C++ error",
      "a line of the job's own", "after"]


def test_a_watchdog_that_ends_the_process_inside_a_capture_is_heard():
  proc = _run("die")
  assert proc.returncode == 143
  lines = proc.stderr.splitlines()
  assert lines[:2] == ["E0000 00:00:1796528787.5   13470 some_op.cc:12] a real C++ error",
                       "a line of the job's own"]
  assert lines[-1] == "mnist-distill: error: last words" and "after" not in lines
