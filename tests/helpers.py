"""Shared test helpers: where the real data is, and how to run the CLI as a user would."""

import hashlib
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_DIR = os.environ.get("MNIST_DIR") or os.path.join(os.path.dirname(REPO), "shared", "data",
                                                         "mnist")
FASHION_MNIST_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")

# A real-MNIST subset small enough for CI: every model trains for one or two short epochs.
SMOKE_ARGS = [
    f"--idx_dir={MNIST_DIR}", "--max_train_examples=1024", "--validation_examples=256",
    "--max_test_examples=512", "--teacher_epochs=2", "--student_epochs=2", "--batch_size=64",
    "--latency_runs=20",
]


def cli_env(**extra):
  env = dict(os.environ)
  env.update({"PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""),
              "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})
  env.pop("JOB_COMPLETION_INDEX", None)
  env.pop("TF_CONFIG", None)
  env.update({k: v for k, v in extra.items() if v is not None})
  return env


def run_cli(args, timeout=600, **env):
  """Runs `python -m trainer ARGS` in a subprocess; returns the CompletedProcess."""
  return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=cli_env(**env),
                        capture_output=True, text=True, timeout=timeout)


def tree_digest(folder):
  """Digest of every file's path and content under folder: shows that nothing changed."""
  digest = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(folder)):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      digest.update(os.path.relpath(path, folder).encode())
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("mnist-distill: error:")]


def start_cli(args, log_path, **env):
  """`python -m trainer ARGS` as a child process (to kill or interrupt), stderr to log_path."""
  with open(log_path, "w") as log:
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=REPO,
                            env=cli_env(**env), stdout=subprocess.DEVNULL, stderr=log)


def read(path):
  with open(path) as f:
    return f.read()


def free_ports(count):
  """`count` TCP ports on 127.0.0.1 that were free a moment ago (for worker processes)."""
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def signal_and_wait(target, sig, waiter=None, timeout=120):
  """Sends `sig` to process `target` and waits for `waiter` (default: `target`) to exit;
  returns (exit code, seconds it took)."""
  waiter = target if waiter is None else waiter
  target.send_signal(sig)
  sent = time.monotonic()
  code = waiter.wait(timeout=timeout)
  return code, time.monotonic() - sent
