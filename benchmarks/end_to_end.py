"""Whole runs in child processes: the default job and the notebook's schedule, each timed wall
to wall with its peak memory, which only a process of its own can show."""

import json
import os
import subprocess
import sys
import time

import benchmarks
import trainer
from trainer.rundir import layout

# What the default job's child gets for the memory measurement when not --job=full.
SUBSET_JOB_ARGS = ("--max_train_examples=8192", "--validation_examples=1024",
                   "--max_test_examples=2048", "--teacher_epochs=1", "--student_epochs=1")


def _import_root(package) -> str:
  """The sys.path folder `package` was imported from."""
  return os.path.dirname(os.path.dirname(os.path.abspath(package.__file__)))


def child_env() -> dict:
  """Environment of the benchmark's child processes: they import trainer and benchmarks from
  where this process did (so they run the same code), and TensorFlow's logs are quiet."""
  roots = [_import_root(p) for p in (benchmarks, trainer)]
  inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  path = os.pathsep.join(dict.fromkeys(roots + inherited))
  return dict(os.environ, PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="2")


def run_subprocess(argv, workdir, name, env=None, cwd=None) -> dict:
  """Runs argv (in child_env(), or `env`; in `cwd`); returns wall seconds, CPU seconds (user +
  system), peak RSS (MiB), exit code, stdout and the log's path.

  os.wait4 gives the resource usage of exactly this child (RUSAGE_CHILDREN would fold in every
  child this process ever waited for)."""
  log_path = os.path.join(workdir, f"{name}.log")
  out_path = os.path.join(workdir, f"{name}.out")
  started = time.perf_counter()
  with open(log_path, "w") as log, open(out_path, "w") as out:
    proc = subprocess.Popen(argv, env=env or child_env(), stdout=out, stderr=log, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  seconds = time.perf_counter() - started
  with open(out_path) as f:
    stdout = f.read()
  return {"wall_seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
          "max_rss_mib": usage.ru_maxrss / 1024.0,
          "returncode": proc.returncode, "stdout": stdout, "log": log_path}


def run_default_job(idx_dir, workdir, full: bool, subset_args=SUBSET_JOB_ARGS) -> dict:
  """The default job (teacher + default students) in a child; adds test accuracies."""
  model_dir = os.path.join(workdir, "job-full" if full else "job-subset")
  argv = [sys.executable, "-m", "trainer", f"--idx_dir={idx_dir}", f"--model_dir={model_dir}"]
  if not full:
    argv += list(subset_args)
  report = run_subprocess(argv, workdir, "job")
  report["args"] = argv[3:]
  report["full"] = full
  report["test_accuracy"] = {}
  if report["returncode"] == 0:
    with open(os.path.join(model_dir, layout.RESULTS_JSON)) as f:
      summary = json.load(f)
    report["test_accuracy"] = {m["name"]: m["test_accuracy"] for m in summary["models"]}
  return report


def run_notebook(idx_dir, workdir) -> dict:
  """The notebook's whole schedule (benchmarks.notebook) in a child; adds its own report."""
  report = run_subprocess([sys.executable, "-m", "benchmarks.notebook",
                           f"--idx_dir={idx_dir}"], workdir, "notebook")
  if report["returncode"] == 0:
    report.update(json.loads(report["stdout"].strip().splitlines()[-1]))
  return report
