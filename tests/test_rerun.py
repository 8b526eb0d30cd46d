"""A rerun reuses a model only if it was made under the same settings (trainer/job/rerun.py)."""

import json
import os

import pytest

from trainer.errors import UsageError
from trainer.job import provenance
from trainer.rundir import layout

from helpers import MNIST_DIR, tree_digest
from inprocess import run_job

COMMON = [f"--idx_dir={MNIST_DIR}", "--max_train_examples=256", "--validation_examples=64",
          "--max_test_examples=128", "--teacher_epochs=1", "--student_epochs=1",
          "--batch_size=64", "--nolitert"]
STUDENT = "--student=s:alpha=0.5,temperature=4"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished teacher and student `s`, and the digest of the whole folder."""
  model_dir = str(tmp_path_factory.mktemp("rerun") / "run")
  run_job([f"--model_dir={model_dir}", *COMMON, STUDENT])
  return model_dir


# Each class of setting that makes a model: (changed flags, the model named, what differs).
CHANGES = {
    "teacher_epochs": (["--teacher_epochs=2"], "teacher", "epochs: 1 -> 2"),
    "student_alpha": (["--student=s:alpha=1,temperature=4"], "s", "alpha: 0.5 -> 1.0"),
    "student_temperature": (["--student=s:alpha=0.5,temperature=2"], "s", "temperature"),
    "seed": (["--seed=1"], "teacher", "seed: 42 -> 1"),
    "learning_rate": (["--learning_rate=0.01"], "teacher", "learning_rate: 0.002 -> 0.01"),
    "student_learning_rate": (["--student_learning_rate=0.5"], "s", "learning_rate"),
    "batch_size": (["--batch_size=32"], "teacher", "batch_size: 64 -> 32"),
    "data_subset": (["--max_train_examples=192"], "teacher", "data.train.examples: 256 -> 192"),
    "test_subset": (["--max_test_examples=64"], "teacher", "data.test.examples"),
    "precision": (["--mixed_precision=mixed_bfloat16"], "teacher", "precision"),
    "student_epochs": (["--student_epochs=2"], "s", "epochs: 1 -> 2"),
}


def _args(model_dir, changed):
  args = [f"--model_dir={model_dir}", *COMMON]
  if not any(a.startswith("--student=") for a in changed):
    args.append(STUDENT)
  return args + changed


@pytest.mark.parametrize("case", sorted(CHANGES))
def test_changed_setting_refused_before_training(case, finished):
  changed, model, differs = CHANGES[case]
  before = tree_digest(finished)
  with pytest.raises(UsageError) as raised:
    run_job(_args(finished, changed))
  message = str(raised.value)
  assert message.startswith(f"{model}: ") and differs in message, message
  assert "--model_dir" in message and f"--retrain={model}" in message
  assert "\n" not in message
  assert tree_digest(finished) == before  # nothing in the folder changed


def test_settings_that_do_not_make_the_model_are_ignored(finished):
  before = tree_digest(os.path.join(finished, "s"))
  summary = run_job(_args(finished, ["--checkpoint_every_steps=2", "--batch_slices=1",
                                     "--teacher_logits=online", "--profile_steps=0,1"]))
  assert [m["name"] for m in summary["models"]] == ["teacher", "s"]
  assert tree_digest(os.path.join(finished, "s")) == before  # reused, not retrained


def test_each_model_records_its_own_settings(finished):
  summary = json.load(open(os.path.join(finished, layout.RESULTS_JSON)))
  teacher, student = summary["models"]
  assert teacher["settings"]["epochs"] == 1 and teacher["settings"]["role"] == "teacher"
  assert student["settings"]["alpha"] == 0.5 and student["settings"]["epochs"] == 1
  assert student["settings"]["teacher_weights_sha256"] == teacher["weights_sha256"]
  for model in (teacher, student):
    assert model["settings_sha256"] == provenance.digest(model["settings"])
    beside = layout.read_json(os.path.join(finished, model["name"], layout.CHECKPOINTS,
                                           layout.SETTINGS))
    assert beside == model["settings"]
  assert summary["merged_by"]["mode"] == "all" and summary["merged_by"]["pid"] == os.getpid()


def test_retrain_discards_exactly_one_model(tmp_path):
  model_dir = str(tmp_path / "run")
  run_job([f"--model_dir={model_dir}", *COMMON, STUDENT, "--student=other:alpha=0"])
  teacher_before = tree_digest(os.path.join(model_dir, "teacher"))
  other_before = tree_digest(os.path.join(model_dir, "other"))
  summary = run_job([f"--model_dir={model_dir}", *COMMON, "--student=s:alpha=1,temperature=4",
                     "--student=other:alpha=0", "--retrain=s"])
  by_name = {m["name"]: m for m in summary["models"]}
  assert by_name["s"]["alpha"] == 1.0 and by_name["s"]["settings"]["alpha"] == 1.0
  assert tree_digest(os.path.join(model_dir, "teacher")) == teacher_before
  assert tree_digest(os.path.join(model_dir, "other")) == other_before


def test_students_of_a_retrained_teacher_are_not_reused(tmp_path):
  model_dir = str(tmp_path / "run")
  run_job([f"--model_dir={model_dir}", *COMMON, STUDENT])
  before = tree_digest(model_dir)
  with pytest.raises(UsageError, match="s: was distilled from a teacher that this run trains"):
    run_job([f"--model_dir={model_dir}", *COMMON, STUDENT, "--retrain=teacher"])
  assert tree_digest(model_dir) == before
  summary = run_job([f"--model_dir={model_dir}", *COMMON, STUDENT, "--retrain=all",
                     "--seed=7"])
  assert all(m["settings"]["seed"] == 7 for m in summary["models"])


def test_checkpoint_from_other_settings_refused(tmp_path):
  model_dir = tmp_path / "run"
  folder = model_dir / "teacher" / "checkpoints"
  folder.mkdir(parents=True)
  (folder / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
  (folder / layout.SETTINGS).write_text(json.dumps({"batch_size": 128}))
  before = tree_digest(model_dir)
  with pytest.raises(UsageError, match=r"teacher: the checkpoint was made under other settings"):
    run_job([f"--model_dir={model_dir}", *COMMON, STUDENT])
  assert tree_digest(model_dir) == before


def test_unknown_retrain_name_refused():
  with pytest.raises(UsageError, match="no model named nobody"):
    run_job(["--model_dir=/nonexistent", *COMMON, STUDENT, "--retrain=nobody"])
