"""MultiWorkerMirroredStrategy for real: two worker processes on 127.0.0.1 with real ports.

They must end with the weights one process reaches on the same global batch; after a worker is
killed, the survivor exits 4 and a rerun of both resumes to the weights of an uninterrupted run.
"""

import json
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np

from helpers import MNIST_DIR, REPO, cli_env, free_ports, run_cli, signal_and_wait

ARGS = [f"--idx_dir={MNIST_DIR}", "--max_train_examples=512", "--validation_examples=128",
        "--max_test_examples=256", "--teacher_epochs=1", "--student_epochs=1", "--batch_size=64",
        "--student=only:alpha=0.5,temperature=4", "--deterministic",
        "--nolitert", "--lease_ttl_seconds=4"]


# The resume tests: the teacher alone, 24 steps an epoch, a checkpoint every 8 steps.
TINY_TEACHER = [f"--idx_dir={MNIST_DIR}", "--mode=teacher", "--max_train_examples=1536",
                "--validation_examples=128", "--max_test_examples=256", "--teacher_epochs=3",
                "--batch_size=64", "--checkpoint_every_steps=8", "--deterministic",
                "--nolitert", "--lease_ttl_seconds=4"]
STEPS_PER_EPOCH = 24


def _weights(path):
  return [np.asarray(w) for w in keras.models.load_model(path, compile=False).get_weights()]


def test_two_workers_match_one_process(tmp_path):
  workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
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
    ours = _weights(chief / name / "model.keras")
    reference = _weights(single / name / "model.keras")
    for a, b in zip(ours, reference):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
  with open(single / "results.json") as f:
    single_summary = json.load(f)
  for ours, theirs in zip(summary["models"], single_summary["models"]):
    assert abs(ours["test_accuracy"] - theirs["test_accuracy"]) <= 2 / 256


def start_workers(tmp_path, args, model_dirs=(), tag="run"):
  """Two workers of one cluster (`model_dirs`: one --model_dir each); output in <tag>-N.log.
  Each has a staging disk of its own, <tag>-disk-N, as each pod has (gs:// model_dirs)."""
  workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
  procs, logs = [], []
  for index in range(2):
    tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    own = [f"--model_dir={model_dirs[index]}"] if model_dirs else []
    logs.append(tmp_path / f"{tag}-{index}.log")
    with open(logs[-1], "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "trainer", "--strategy=auto", *own, *args], cwd=REPO,
          env=cli_env(TF_CONFIG=json.dumps(tf_config),
                      MNIST_DISTILL_STAGING=str(tmp_path / f"{tag}-disk-{index}"),
                      MNIST_DISTILL_GCS_RETRY_SECONDS="30"),
          stdout=log, stderr=subprocess.STDOUT))
  return procs, logs


def kill_one_when(procs, logs, ready, killed, survivor, timeout=300):
  """Once `ready()` (the survivor still running), SIGKILLs worker `killed` and waits for worker
  `survivor`; kills every worker after. Returns (its exit code, seconds it took, its log)."""
  try:
    deadline = time.monotonic() + timeout
    while not ready():
      assert procs[survivor].poll() is None and time.monotonic() < deadline, \
          logs[survivor].read_text()[-3000:]
      time.sleep(0.05)
    code, waited = signal_and_wait(procs[killed], signal.SIGKILL, waiter=procs[survivor])
  finally:
    for p in procs:
      p.kill()
  return code, waited, logs[survivor].read_text()


def read_checkpoint_step(folder, state=None):
  """Global step of the latest checkpoint in folder (they are numbered by it), or in the text
  of a `checkpoint` state file; 0 if none."""
  try:
    state = (folder / "checkpoint").read_text() if state is None else state
  except FileNotFoundError:
    return 0
  found = re.search(r'model_checkpoint_path: "ckpt-(\d+)"', state)
  return int(found[1]) if found else 0


def _wait_all(procs, logs, timeout=300):
  try:
    codes = [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  return codes, [log.read_text() for log in logs]


def test_killed_worker_then_rerun_ends_with_the_weights_of_an_uninterrupted_run(gcs_emulator,
                                                                              tmp_path):
  reference = tmp_path / "reference"
  codes, outs = _wait_all(*start_workers(tmp_path, [f"--model_dir={reference}", *TINY_TEACHER],
                                         tag="reference"))
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]

  # Both workers on the bucket, each pod with a disk of its own (as on a cluster).
  run = [f"--model_dir={gcs_emulator.url('run')}", *TINY_TEACHER]
  state = "run/teacher/checkpoints/checkpoint"

  def uploaded_step():
    return read_checkpoint_step(None, gcs_emulator.read(state).decode()) \
        if state in gcs_emulator.objects("run/") else 0

  procs, logs = start_workers(tmp_path, run, tag="killed")
  code, waited, out = kill_one_when(procs, logs, lambda: uploaded_step() > STEPS_PER_EPOCH,
                                    killed=1, survivor=0)  # in the second epoch
  assert code == 4 and "mnist-distill: error: PeerLost:" in out, out[-3000:]
  assert waited < 60, waited
  step = uploaded_step()  # the chief uploaded what it had before exiting
  assert STEPS_PER_EPOCH < step < 3 * STEPS_PER_EPOCH

  # The layout of the report: worker 1 with a local folder of its own finds no progress. Both
  # stop, with one clear line, before the first step, instead of hanging in their first
  # collective.
  codes, outs = _wait_all(*start_workers(tmp_path, TINY_TEACHER, tag="apart", model_dirs=(
      gcs_emulator.url("run"), tmp_path / "apart")), timeout=180)
  assert codes == [2, 2], outs[0][-3000:] + outs[1][-3000:]
  for out in outs:
    assert "mnist-distill: error: the workers restored different progress (worker 0: epoch 1, " \
        f"step {step - STEPS_PER_EPOCH} (global step {step}" in out, out[-3000:]
  assert uploaded_step() == step  # nothing trained, nothing saved

  # New pods, new disks: both resume from the chief's checkpoint in the bucket.
  codes, outs = _wait_all(*start_workers(tmp_path, run, tag="rerun"))
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  for index, out in enumerate(outs):
    local = tmp_path / f"rerun-disk-{index}" / "test-bucket" / "run" / "teacher" / "checkpoints"
    assert f"Resumed from {local}/ckpt-{step} (epoch 1, step {step - STEPS_PER_EPOCH})" in out, \
        out[-3000:]
  downloaded = tmp_path / "teacher.keras"
  downloaded.write_bytes(gcs_emulator.read("run/teacher/model.keras"))
  for got, want in zip(_weights(downloaded), _weights(reference / "teacher" / "model.keras"),
                       strict=True):
    assert got.dtype == want.dtype and np.array_equal(got, want)  # bit for bit
