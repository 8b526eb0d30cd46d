"""MultiWorkerMirroredStrategy for real: two worker processes on 127.0.0.1 with real ports.

They must end with the weights one process reaches on the same global batch.
"""

import json
import socket
import subprocess
import sys

import keras
import numpy as np

from helpers import MNIST_DIR, REPO, cli_env, run_cli

ARGS = [f"--idx_dir={MNIST_DIR}", "--max_train_examples=512", "--validation_examples=128",
        "--max_test_examples=256", "--teacher_epochs=1", "--student_epochs=1", "--batch_size=64",
        "--student=only:alpha=0.5,temperature=4", "--deterministic"]


def _free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def _weights(path):
  return [np.asarray(w) for w in keras.models.load_model(path, compile=False).get_weights()]


def test_two_workers_match_one_process(tmp_path):
  workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
  procs = []
  for index in range(2):
    tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    model_dir = tmp_path / f"worker{index}"
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "trainer", f"--model_dir={model_dir}", "--strategy=auto", *ARGS],
        cwd=REPO, env=cli_env(TF_CONFIG=json.dumps(tf_config)), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True))
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  chief = tmp_path / "worker0"
  with open(chief / "results.json") as f:
    summary = json.load(f)
  assert summary["strategy"] == "multi_worker" and summary["replicas"] == 2
  assert not (tmp_path / "worker1" / "results.json").exists()  # only the chief writes

  single = tmp_path / "single"
  proc = run_cli([f"--model_dir={single}", "--strategy=default", *ARGS])
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("teacher", "only"):
    ours, reference = _weights(chief / name / "model.keras"), _weights(single / name / "model.keras")
    for a, b in zip(ours, reference):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
  with open(single / "results.json") as f:
    single_summary = json.load(f)
  for ours, theirs in zip(summary["models"], single_summary["models"]):
    assert abs(ours["test_accuracy"] - theirs["test_accuracy"]) <= 2 / 256
