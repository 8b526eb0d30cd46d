"""Preemption and resume with real processes and a real GCS server (tests/gcs_emulator.py).

SIGTERM: the job checkpoints, uploads that checkpoint, exits 143, and a rerun on a fresh disk
resumes from the bucket alone. SIGKILL at random moments (also in the middle of checkpoint
writes): with --deterministic the resumed run ends bit for bit where an uninterrupted one does.
"""

import glob
import json
import os
import random
import re
import signal
import time

import keras
import numpy as np

from helpers import MNIST_DIR, error_lines, read, run_cli, signal_and_wait, start_cli

# 640 training examples in batches of 32: 20 steps an epoch, a checkpoint every 3 steps.
TINY = [f"--idx_dir={MNIST_DIR}", "--max_train_examples=640", "--validation_examples=128",
        "--max_test_examples=256", "--teacher_epochs=2", "--student_epochs=2", "--batch_size=32",
        "--checkpoint_every_steps=3", "--student=d:alpha=0.5,temperature=2",
        "--nolitert", "--lease_ttl_seconds=4"]
STEPS_PER_EPOCH = 20
MODELS = ("teacher", "d")


def wait_for(condition, proc, timeout=180.0, poll=0.02):
  """Polls condition() until true; False if the process ended (or time ran out) first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if condition():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(poll)
  raise AssertionError(f"timed out after {timeout}s")


def load_weights(path):
  return [w.numpy() for w in keras.models.load_model(path, compile=False).weights]


def test_sigterm_uploads_a_checkpoint_exits_143_and_a_fresh_disk_resumes(gcs_emulator, tmp_path):
  args = [f"--model_dir={gcs_emulator.url('run')}", *TINY]
  env = {"MNIST_DISTILL_GCS_RETRY_SECONDS": "30"}
  proc = start_cli(args, tmp_path / "first.log", MNIST_DISTILL_STAGING=str(tmp_path / "disk1"),
                   **env)
  try:
    assert wait_for(lambda: "run/teacher/checkpoints/checkpoint" in gcs_emulator.objects("run/"),
                    proc), read(tmp_path / "first.log")[-3000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
  finally:
    proc.kill()
  errors = error_lines(read(tmp_path / "first.log"))
  assert len(errors) == 1, errors
  stopped = re.fullmatch(r"mnist-distill: error: (\w+): stopped at epoch (\d+), step (\d+): "
                         r"checkpoint (ckpt-(\d+)) written, uploaded to gs://test-bucket/run",
                         errors[0])
  assert stopped, errors[0]
  name, epoch, step, ckpt = stopped[1], int(stopped[2]), int(stopped[3]), stopped[4]
  assert int(stopped[5]) == (epoch - 1) * STEPS_PER_EPOCH + step  # numbered by global step
  # That very checkpoint is the bucket's latest: the upload finished before the exit.
  objects = gcs_emulator.objects("run/")
  state = gcs_emulator.read(f"run/{name}/checkpoints/checkpoint").decode()
  assert f'model_checkpoint_path: "{ckpt}"' in state
  assert f"run/{name}/checkpoints/{ckpt}.index" in objects
  assert f"run/{name}/checkpoints/{ckpt}.data-00000-of-00001" in objects
  assert f"run/{name}/result.json" not in objects and "run/results.json" not in objects

  # A new pod on a new disk: everything it resumes from comes from the bucket.
  fresh = tmp_path / "disk2"
  proc = run_cli(args, MNIST_DISTILL_STAGING=str(fresh), **env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  local_ckpt = fresh / "test-bucket" / "run" / name / "checkpoints" / ckpt
  assert f"Resumed from {local_ckpt} (epoch {epoch - 1}, step {step})" in proc.stderr
  assert f"{name} epoch {epoch}/2:" in proc.stderr
  assert f"{name} epoch {epoch - 1}/2:" not in proc.stderr  # finished epochs are not redone
  summary = json.loads(gcs_emulator.read("run/results.json"))
  assert [m["name"] for m in summary["models"]] == ["teacher", "d"]


def _uploaded_checkpoints(gcs):
  """Generations of the checkpoint state files in the bucket: they change on every upload."""
  return {n: o["generation"] for n, o in gcs.objects("run/").items()
          if n.endswith("/checkpoints/checkpoint")}


def _kill_during_checkpoint_write(proc, checkpoint_dirs):
  """SIGKILLs proc as soon as TensorFlow's temporary folder of a checkpoint write appears."""
  def writing():  # a file inside the temporary folder: the write has begun and is not done
    return any(glob.glob(os.path.join(folder, "*_temp", "*")) for folder in checkpoint_dirs)

  if wait_for(writing, proc, poll=0.001):
    proc.send_signal(signal.SIGKILL)


def _kill_at_random(proc, rng):
  """SIGKILLs proc at a random delay."""
  if proc.poll() is None:
    time.sleep(rng.uniform(0.0, 2.5))
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)


def test_sigkill_at_random_moments_then_resume_is_bit_exact(gcs_emulator, tmp_path):
  args = [*TINY, "--deterministic"]
  reference = tmp_path / "reference"
  proc = run_cli([f"--model_dir={reference}", *args])
  assert proc.returncode == 0, proc.stderr[-3000:]

  seed = int(os.environ.get("RESUME_TEST_SEED") or random.randrange(10**6))
  print(f"kill delays drawn with RESUME_TEST_SEED={seed}")
  rng = random.Random(seed)
  schedule = ["write", "random", "write", "random", None]  # None: let it finish
  retries = 3  # a "write" kill can land just after the write ended (a race): it is tried again
  log = []
  attempt = -1
  while schedule:
    how = schedule.pop(0)
    attempt += 1
    disk = tmp_path / f"disk{attempt // 2}"  # every second restart is on a fresh disk
    local = disk / "test-bucket" / "run"
    checkpoint_dirs = [str(local / m / "checkpoints") for m in MODELS]
    uploaded = _uploaded_checkpoints(gcs_emulator)
    proc = start_cli([f"--model_dir={gcs_emulator.url('run')}", *args],
                     tmp_path / f"attempt{attempt}.log", MNIST_DISTILL_STAGING=str(disk),
                     MNIST_DISTILL_GCS_RETRY_SECONDS="30")
    try:
      # Kills come after this process got a checkpoint into the bucket (what a restart resumes
      # from), so that every attempt makes progress.
      if how and wait_for(lambda before=uploaded: _uploaded_checkpoints(gcs_emulator) != before,
                          proc):
        if how == "write":
          _kill_during_checkpoint_write(proc, checkpoint_dirs)
        else:
          _kill_at_random(proc, rng)
      code = proc.wait(timeout=300)
    finally:
      proc.kill()
    mid_write = bool(glob.glob(str(local / "*" / "checkpoints" / "*_temp" / "*")))
    log.append((how, code, mid_write))
    if code == 0:
      break
    if how == "write" and not mid_write and retries:
      retries -= 1
      schedule.insert(0, "write")
    assert code == -signal.SIGKILL, read(tmp_path / f"attempt{attempt}.log")[-3000:]
  print("attempts (kill, exit code, killed mid checkpoint write):", log)
  assert log[-1][1] == 0, read(tmp_path / f"attempt{len(log) - 1}.log")[-3000:]
  assert sum(mid_write for _, _, mid_write in log) >= 2  # the "write" kills hit their target
  resumed = [i for i in range(len(log)) if "Resumed from" in read(tmp_path / f"attempt{i}.log")]
  assert 1 in resumed and len(resumed) >= 2, resumed  # restarts resumed mid-model

  objects = gcs_emulator.objects("run/")
  assert not [n for n in objects if re.search(r"_temp/|\.tmp", n)]  # no half writes uploaded
  summary = json.loads(gcs_emulator.read("run/results.json"))
  with open(reference / "results.json") as f:
    expected = json.load(f)
  for got, want in zip(summary["models"], expected["models"], strict=True):
    assert (got["name"], got["test_accuracy"], got["test_loss"]) == \
        (want["name"], want["test_accuracy"], want["test_loss"])
  for name in MODELS:
    downloaded = tmp_path / f"{name}.keras"
    downloaded.write_bytes(gcs_emulator.read(f"run/{name}/model.keras"))
    for got, want in zip(load_weights(downloaded), load_weights(reference / name / "model.keras"),
                         strict=True):
      assert got.dtype == want.dtype and np.array_equal(got, want), name  # bit for bit


def test_sigterm_with_the_bucket_down_exits_143_within_the_grace_period_and_says_what_is_lost(
    gcs_emulator, tmp_path):
  grace = 8
  args = [f"--model_dir={gcs_emulator.url('run')}", *TINY, f"--grace_period_seconds={grace}"]
  proc = start_cli(args, tmp_path / "first.log", MNIST_DISTILL_STAGING=str(tmp_path / "disk"),
                   MNIST_DISTILL_GCS_RETRY_SECONDS="120")  # retries would outlast the grace
  try:
    assert wait_for(lambda: "run/teacher/checkpoints/checkpoint" in gcs_emulator.objects("run/"),
                    proc), read(tmp_path / "first.log")[-3000:]
    uploaded = gcs_emulator.read("run/teacher/checkpoints/checkpoint").decode()
    gcs_emulator.stop()  # the upload of the SIGTERM checkpoint cannot finish
    code, took = signal_and_wait(proc, signal.SIGTERM, timeout=60)
  finally:
    proc.kill()
    if not gcs_emulator.running:
      gcs_emulator.start()
  errors = error_lines(read(tmp_path / "first.log"))
  assert code == 143, read(tmp_path / "first.log")[-3000:]
  assert took < grace, took  # before the kubelet's SIGKILL
  assert len(errors) == 1 and "grace period" in errors[0], errors
  assert re.search(r"may be missing from the bucket: teacher/checkpoints/ckpt-\d+ \(epoch 1, "
                   r"step \d+\)", errors[0]), errors[0]
  # The bucket still names the checkpoint uploaded before the outage: a rerun resumes there.
  assert gcs_emulator.read("run/teacher/checkpoints/checkpoint").decode() == uploaded
