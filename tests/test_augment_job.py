"""Augmentation (and a student's mixup) through the whole job: exact resume after a kill."""

import os
import signal
import time

import keras
import numpy as np
import pytest

from helpers import MNIST_DIR, run_cli, start_cli
from tb_events import session_hparams

# 384 examples in batches of 32: 12 steps an epoch, a checkpoint every 3 steps.
ARGS = [f"--idx_dir={MNIST_DIR}", "--max_train_examples=384", "--validation_examples=128",
        "--max_test_examples=128", "--teacher_epochs=1", "--student_epochs=2",
        "--batch_size=32", "--checkpoint_every_steps=3", "--augment=affine",
        "--teacher_logits=online", "--teacher_weight_decay=1e-4", "--deterministic",
        "--nolitert"]


def _weights(path):
  return keras.models.load_model(path, compile=False).get_weights()


@pytest.mark.parametrize("student", ["d:alpha=0.5,temperature=2",
                                     "d:alpha=1,temperature=2,mixup=1"])
def test_kill_and_resume_with_augmentation_is_bit_exact(tmp_path, student):
  args = [*ARGS, f"--student={student}"]
  reference = tmp_path / "reference"
  proc = run_cli([f"--model_dir={reference}", *args])
  assert proc.returncode == 0, proc.stderr[-3000:]
  mixup = 1.0 if "mixup" in student else 0.0  # TensorBoard's HParams table shows it
  assert session_hparams(str(reference / "logs" / "d"))["mixup"] == mixup
  assert "mixup" not in session_hparams(str(reference / "logs" / "teacher"))

  killed = tmp_path / "killed"
  proc = start_cli([f"--model_dir={killed}", *args], tmp_path / "first.log")
  state = killed / "d" / "checkpoints" / "checkpoint"
  deadline = time.monotonic() + 300
  while not state.exists():  # the student is under way, past its first checkpoint
    assert proc.poll() is None and time.monotonic() < deadline, \
        (tmp_path / "first.log").read_text()[-3000:]
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert not (killed / "d" / "result.json").exists()
  proc = run_cli([f"--model_dir={killed}", *args])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Resumed from" in proc.stderr
  for name in ("teacher", "d"):
    for ours, theirs in zip(_weights(killed / name / "model.keras"),
                            _weights(reference / name / "model.keras"), strict=True):
      np.testing.assert_array_equal(ours, theirs, err_msg=name)
  assert os.path.exists(killed / "results.json")
