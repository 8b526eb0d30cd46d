"""Job-level guards of a run folder: one writer per model; non-finite training never finishes."""

import glob
import os
import time

import numpy as np
import pytest
import tensorflow as tf

from trainer.errors import NonFiniteLoss
from trainer.rundir import layout

from helpers import MNIST_DIR, error_lines, run_cli, start_cli
from inprocess import run_job

TINY = [f"--idx_dir={MNIST_DIR}", "--max_train_examples=512", "--validation_examples=64",
        "--max_test_examples=128", "--batch_size=64", "--student=s:alpha=0.5", "--nolitert"]


def test_second_process_on_a_model_exits_5_and_the_first_finishes(tmp_path):
  model_dir = tmp_path / "run"
  args = [f"--model_dir={model_dir}", *TINY, "--teacher_epochs=6", "--student_epochs=1"]
  first = start_cli(args, tmp_path / "first.log")
  try:
    lease_file = model_dir / layout.LEASES / "teacher.lease"
    deadline = time.time() + 240
    while not glob.glob(str(model_dir / "logs" / "teacher" / "train" / "events.*")):
      assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()
      time.sleep(0.5)
    assert lease_file.exists()
    second = run_cli([*args, "--lease_wait_seconds=0"])
    assert second.returncode == 5, second.stderr[-2000:]
    lines = error_lines(second.stderr)
    assert len(lines) == 1 and "teacher is busy" in lines[0], second.stderr[-2000:]
    assert "epoch 1/" not in second.stderr  # it never trained
    assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
  finally:
    if first.poll() is None:
      first.kill()
  assert (model_dir / "teacher" / layout.RESULT).exists()
  # The lease is free again: a rerun reuses everything without waiting.
  again = run_cli([*args, "--lease_wait_seconds=0"])
  assert again.returncode == 0, again.stderr[-2000:]


def test_non_finite_training_stops_without_a_result(tmp_path):
  """A learning rate that is finite but diverges: the student's loss overflows mid-training."""
  model_dir = tmp_path / "run"
  with pytest.raises(NonFiniteLoss) as raised:
    run_job([f"--model_dir={model_dir}", *TINY, "--teacher_epochs=1", "--student_epochs=3",
             "--student_learning_rate=1e30", "--checkpoint_every_steps=1"])
  message = str(raised.value)
  assert message.startswith("s: ") and "epoch" in message and "step" in message, message
  assert raised.value.exit_code == 1
  assert (model_dir / "teacher" / layout.RESULT).exists()  # the teacher was fine
  assert not (model_dir / "s" / layout.RESULT).exists()
  assert not (model_dir / "s" / layout.EXPORT).exists()
  latest = tf.train.latest_checkpoint(str(model_dir / "s" / layout.CHECKPOINTS))
  if latest is not None:  # whatever was saved is finite
    reader = tf.train.load_checkpoint(latest)
    for name in reader.get_variable_to_shape_map():
      value = reader.get_tensor(name)
      if np.issubdtype(np.asarray(value).dtype, np.floating):
        assert np.all(np.isfinite(value)), name
  assert not os.path.exists(model_dir / layout.RESULTS_JSON)
