"""The partner process: the notebook's way measured again with TensorFlow's default threads.

Batch slices set TensorFlow's intra-op threads for the whole process, and the baseline in that
process runs with them too, which can help or hurt it. So a second process (this benchmark run
with --as_partner) measures the baseline as the notebook runs it, taking turns with the main
process round by round: one process idles while the other measures, so both see the machine in
the same state. Its figures come back named 'baseline@B tf-default-threads'.
"""

import json
import os
import subprocess
import sys

from benchmarks.end_to_end import child_env
from benchmarks.throughput import DEFAULT_THREADS


class Partner:
  """The main process's handle on the partner: each round, runs here, then lets it run."""

  def __init__(self, argv, log_path):
    env = child_env()
    env.pop("TF_NUM_INTRAOP_THREADS", None)
    self.log_path = log_path
    self._log = open(log_path, "w")
    self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self._log, text=True)

  def round(self, run_here) -> dict:
    measured = run_here()
    measured.update(self.take_turn())
    return measured

  def take_turn(self) -> dict:
    """Lets the partner run one round; {its variant + DEFAULT_THREADS suffix: img/s}."""
    self.proc.stdin.write("go\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the default-threads baseline process ended; see {self.log_path}")
    return {f"{name} {DEFAULT_THREADS}": value for name, value in json.loads(line).items()}

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()
    self._log.close()


class AsPartner:
  """This process's side when it is the partner: waits for its turn, runs, reports, and is
  idle again before the main process measures."""

  def round(self, run_here) -> dict:
    if not sys.stdin.readline():
      raise SystemExit("benchmark partner: the main process went away")
    measured = run_here()
    print(json.dumps(measured), flush=True)
    return measured


def start(args, workdir) -> Partner:
  """The partner process, started with this run's data, batch sizes and rounds."""
  argv = [sys.executable, "-m", "benchmarks", "--as_partner", "--batch_slices=1",
          f"--idx_dir={args.idx_dir}", f"--examples={args.examples}", f"--runs={args.runs}",
          f"--warmup={args.warmup}", f"--batch_sizes={args.batch_sizes}", "--job=none",
          f"--workdir={os.path.join(workdir, 'default-threads')}"]
  return Partner(argv, os.path.join(workdir, "baseline-default-threads.log"))
