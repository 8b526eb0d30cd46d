"""--mode=report re-reports finished models without training, filling in what older runs lack."""

import logging
import os

import pytest

from trainer.errors import UsageError
from trainer.rundir import layout

from helpers import MNIST_DIR
from inprocess import run_job

DATA = [f"--idx_dir={MNIST_DIR}", "--max_train_examples=512", "--validation_examples=128",
        "--max_test_examples=256"]
TRAIN = [*DATA, "--teacher_epochs=1", "--student_epochs=1", "--batch_size=64",
         "--student=a:alpha=0", "--student=b:alpha=1"]


def test_report_mode_computes_missing_exports_and_validation_outputs(tmp_path, caplog):
  model_dir = tmp_path / "run"
  first = run_job([f"--model_dir={model_dir}", *TRAIN, "--nolitert"])
  assert all(not m.get("exports") for m in first["models"])
  os.remove(model_dir / "a" / "validation_predictions.npz")  # as a run made before it existed
  caplog.set_level(logging.INFO)
  summary = run_job([f"--model_dir={model_dir}", *DATA, "--mode=report", "--latency_runs=10"])
  assert "epoch 1/" not in caplog.text  # nothing trained
  for name in ("teacher", "a", "b"):
    assert (model_dir / name / "exports.json").is_file(), name
    assert (model_dir / name / "litert" / "int8.tflite").is_file(), name
  assert (model_dir / "a" / "validation_predictions.npz").is_file()
  by_name = {m["name"]: m for m in summary["models"]}
  assert by_name["a"]["exports"]["litert_int8"]["test_examples"] == 256
  assert summary["selection"]["chosen"] in ("a", "b")
  assert os.path.isdir(model_dir / layout.LOGS / "a" / "deployment")


def test_report_mode_refuses_other_test_data(tmp_path):
  model_dir = tmp_path / "run"
  run_job([f"--model_dir={model_dir}", *TRAIN, "--nolitert"])
  with pytest.raises(UsageError, match="tested on other data"):
    run_job([f"--model_dir={model_dir}", f"--idx_dir={MNIST_DIR}", "--max_test_examples=128",
             "--mode=report"])
