"""Flags and bad input: one clear line, exit code 2, before training, nothing overwritten."""

import gzip
import logging
import os
import shutil

import pytest

from trainer import errors
from trainer import flags as job_flags
from trainer.errors import UsageError

from helpers import MNIST_DIR, error_lines, run_cli, tree_digest
from inprocess import run_job

ALL_FLAGS = ("model_dir", "dataset", "data_dir", "idx_dir", "mode", "teacher_dir",
             "teacher_epochs", "student_epochs", "batch_size", "learning_rate", "seed",
             "max_train_examples", "validation_examples", "student", "student_index",
             "strategy", "num_cpu_devices", "batch_slices")


def test_student_spec_parsing():
  spec = job_flags.parse_student("soft:alpha=0.25,temperature=8")
  assert (spec.name, spec.alpha, spec.temperature) == ("soft", 0.25, 8.0)
  assert job_flags.parse_student("plain").alpha == 0.5
  for bad in ("x:alpha=1.5", "x:alpha=-0.1", "x:temperature=0", "x:temperature=-2",
              "x:beta=1", "x:alpha", "Bad Name:alpha=0", "x:alpha=abc", "teacher:alpha=0"):
    with pytest.raises(UsageError):
      job_flags.parse_student(bad)
  with pytest.raises(UsageError, match="duplicate"):
    job_flags.parse_students(["a:alpha=0", "a:alpha=1"])


def test_default_students_are_the_notebook_experiments_done_right():
  settings = job_flags.parse_argv(["prog"])
  assert [(s.alpha, s.name) for s in settings.students] == [
      (0.0, "labels_only"), (1.0, "teacher_only"), (0.5, "distilled")]


def test_flagfile_and_student_index(tmp_path, monkeypatch):
  flagfile = tmp_path / "flags.txt"
  flagfile.write_text("--model_dir=gs://bucket/run\n--student=a:alpha=0\n--student=b:alpha=1\n"
                      "--batch_size=512\n")
  settings = job_flags.parse_argv(["prog", f"--flagfile={flagfile}", "--student_index=1"])
  assert settings.model_dir == "gs://bucket/run" and settings.batch_size == 512
  assert [s.name for s in settings.students] == ["b"]
  assert settings.teacher_dir == "gs://bucket/run/teacher"
  monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
  settings = job_flags.parse_argv(["prog", f"--flagfile={flagfile}"])
  assert [s.name for s in settings.students] == ["a"]
  monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
  with pytest.raises(UsageError, match="out of range"):
    job_flags.parse_argv(["prog", f"--flagfile={flagfile}"])


def test_vertex_ai_model_dir(monkeypatch):
  monkeypatch.setenv("AIP_MODEL_DIR", "gs://my-bucket/job-1/model/")
  assert job_flags.parse_argv(["prog"]).model_dir == "gs://my-bucket/job-1"


def test_helpfull_documents_every_flag():
  proc = run_cli(["--helpfull"])
  assert proc.returncode == 0
  for name in ALL_FLAGS:
    assert f"--{name}" in proc.stdout, name


@pytest.fixture
def populated_model_dir(tmp_path):
  """A model_dir holding earlier output that a failed run must leave exactly as it was."""
  model_dir = tmp_path / "run"
  (model_dir / "labels_only").mkdir(parents=True)
  (model_dir / "results.json").write_text('{"models": []}\n')
  (model_dir / "labels_only" / "result.json").write_text('{"name": "labels_only"}\n')
  return model_dir


def _corrupt_idx_dir(tmp_path):
  folder = tmp_path / "idx"
  shutil.copytree(MNIST_DIR, folder)
  os.chmod(folder, 0o755)
  path = folder / "train-labels-idx1-ubyte.gz"
  os.chmod(path, 0o644)
  with gzip.open(path, "wb") as f:
    f.write(b"\x00\x00\x08\x03" + b"\x00" * 20)
  return folder


BAD_INPUTS = {
    "alpha_out_of_range": (["--student=x:alpha=1.5"], "alpha must be in [0, 1]"),
    "temperature_not_positive": (["--student=x:alpha=0.5,temperature=0"],
                                 "temperature must be > 0"),
    "malformed_student": (["--student=x:alpha0.5"], "malformed"),
    "unknown_flag": (["--no_such_flag=1"], "no_such_flag"),
    "student_index_out_of_range": (["--student_index=3"], "out of range"),
    "unknown_dataset": (["--dataset=no_such_dataset_xyz"], "unknown dataset"),
    "missing_idx": (["--idx_dir={tmp}/nowhere"], "not found"),
    "corrupt_idx": (["--idx_dir={corrupt}"], "magic"),
    "students_without_teacher": ([f"--idx_dir={MNIST_DIR}", "--mode=students"],
                                 "needs a finished teacher"),
    "tfds_not_prepared": (["--data_dir={tmp}/empty_tfds"], "--idx_dir"),
    "batch_slices_not_a_count": (["--batch_slices=0"], "--batch_slices"),
    "batch_larger_than_data": ([f"--idx_dir={MNIST_DIR}", "--max_train_examples=10"], "batch_size"),
}


def _bad_args(case, tmp_path):
  args, message = BAD_INPUTS[case]
  corrupt = _corrupt_idx_dir(tmp_path) if case == "corrupt_idx" else None
  return [a.format(tmp=tmp_path, corrupt=corrupt) for a in args], message


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_keeps_model_dir(case, tmp_path, populated_model_dir,
                                                             caplog):
  """In-process: the error the CLI turns into exit 2 and its one line (next test)."""
  args, message = _bad_args(case, tmp_path)
  before = tree_digest(populated_model_dir)
  caplog.set_level(logging.INFO)
  with pytest.raises(errors.UsageError) as raised:
    run_job([f"--model_dir={populated_model_dir}", *args])
  assert raised.value.exit_code == 2
  assert "\n" not in str(raised.value) and message in str(raised.value)
  assert "epoch" not in caplog.text  # failed before any training
  assert tree_digest(populated_model_dir) == before


@pytest.mark.parametrize("case", ["unknown_flag", "batch_larger_than_data", "corrupt_idx"])
def test_bad_input_through_the_cli(case, tmp_path, populated_model_dir):
  """The same refusals as a user sees them: exit 2, one line, no traceback."""
  args, message = _bad_args(case, tmp_path)
  before = tree_digest(populated_model_dir)
  proc = run_cli([f"--model_dir={populated_model_dir}", *args])
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert "epoch" not in proc.stderr  # failed before any training
  assert tree_digest(populated_model_dir) == before


def test_unwritable_model_dir_exits_2(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  proc = run_cli([f"--model_dir={blocker}/run", f"--idx_dir={MNIST_DIR}"])
  assert proc.returncode == 2
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and "--model_dir" in lines[0]
  assert blocker.read_text() == "not a folder"
