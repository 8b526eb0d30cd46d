"""--teacher_model and transfer sets through the whole job (issue: bring your own teacher)."""

import gzip
import hashlib
import os
import struct

import keras
import numpy as np
import pytest

from trainer.data import idx
from trainer.data.pipeline import normalize_images
from trainer.errors import UsageError
from trainer.rundir import layout

from helpers import MNIST_DIR, tree_digest
from inprocess import run_job

SMALL = [f"--idx_dir={MNIST_DIR}", "--max_train_examples=2048", "--validation_examples=256",
         "--max_test_examples=512", "--student_epochs=2", "--batch_size=64", "--nolitert"]


def _write_idx(path, array, magic):
  array = np.ascontiguousarray(array, dtype=np.uint8)
  with gzip.GzipFile(path, "wb", compresslevel=1) as f:
    f.write(struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes())


@pytest.fixture(scope="module")
def keras_teacher(tmp_path_factory):
  """A teacher trained by plain Keras (not by the job), saved as .keras and as a SavedModel,
  with the test accuracy this test itself measures on the job's test subset."""
  images, labels = idx.load_split(MNIST_DIR, "train")
  test_images, test_labels = idx.load_split(MNIST_DIR, "test")
  keras.utils.set_random_seed(3)
  net = keras.Sequential([
      keras.Input((28, 28, 1)), keras.layers.Conv2D(16, 3, activation="relu"),
      keras.layers.MaxPooling2D(2), keras.layers.Flatten(), keras.layers.Dense(10)])
  net.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  net.fit(normalize_images(images[:8000]).numpy(), labels[:8000], batch_size=128, epochs=1,
          verbose=0)
  predictions = net.predict(normalize_images(test_images[:512]).numpy(), verbose=0).argmax(-1)
  folder = tmp_path_factory.mktemp("teacher")
  net.save(folder / "teacher.keras")
  net.export(str(folder / "savedmodel"), verbose=False)
  return {"keras": str(folder / "teacher.keras"), "savedmodel": str(folder / "savedmodel"),
          "accuracy": float(np.mean(predictions == test_labels[:512]))}


@pytest.mark.parametrize("fmt", ["keras", "savedmodel"])
def test_outside_teacher_distills_a_student_and_is_the_teacher_row(fmt, keras_teacher, tmp_path):
  summary = run_job([f"--model_dir={tmp_path}/run", *SMALL,
                     f"--teacher_model={keras_teacher[fmt]}", "--student=d:alpha=0.5"])
  teacher, student = summary["models"]
  assert teacher["name"] == "teacher" and teacher["trained_here"] is False
  assert teacher["source"] == keras_teacher[fmt] and len(teacher["sha256"]) == 64
  assert teacher["test_accuracy"] == pytest.approx(keras_teacher["accuracy"], abs=1e-9)
  assert teacher["train_seconds"] == 0
  assert not os.path.exists(f"{tmp_path}/run/teacher/{layout.MODEL_FILE}")  # not ours to export
  assert student["name"] == "d" and student["test_accuracy"] > 0.8
  assert student["settings"]["teacher_weights_sha256"] == teacher["sha256"]
  assert student["settings"]["teacher"]["source"] == keras_teacher[fmt]


def _teacher_row(report):
  return {m["name"]: m for m in report["models"]}["teacher"]


@pytest.mark.parametrize("mode", ["all", "students"])
def test_outside_teacher_has_its_row_in_both_modes(mode, keras_teacher, tmp_path):
  """results.json and results.md give the given teacher's test accuracy, interval, origin and
  digest whichever mode distilled from it; Indexed-Job pods (--mode=students, one student
  each) write that row once and reuse it."""
  run_dir = tmp_path / "run"
  path = keras_teacher["keras"]
  with open(path, "rb") as f:
    sha256 = hashlib.sha256(f.read()).hexdigest()
  args = [f"--model_dir={run_dir}", *SMALL, "--student_epochs=1", f"--mode={mode}",
          f"--teacher_model={path}", "--student=d:alpha=1", "--student=e:alpha=0.5"]
  summary = run_job([*args, "--student_index=0"])
  for report in (summary, layout.read_json(str(run_dir / layout.RESULTS_JSON))):
    assert [m["name"] for m in report["models"]] == ["teacher", "d"]
    teacher = _teacher_row(report)
    assert (teacher["trained_here"], teacher["source"], teacher["sha256"]) == (False, path, sha256)
    assert teacher["test_accuracy"] == pytest.approx(keras_teacher["accuracy"], abs=1e-9)
    interval = teacher["test_accuracy_interval"]
    assert interval["lower"] < teacher["test_accuracy"] < interval["upper"]
  markdown = (run_dir / layout.RESULTS_MD).read_text()
  assert f"| teacher | teacher | {teacher['params']:,} |" in markdown
  assert (f"teacher was not trained here: `{path}` (keras, sha256 `{sha256}`), test accuracy "
          f"{100 * teacher['test_accuracy']:.2f}% [{100 * interval['lower']:.2f}, "
          f"{100 * interval['upper']:.2f}] (95% CI)") in markdown
  written = tree_digest(run_dir / "teacher")
  summary = run_job([*args, "--student_index=1"])  # the next pod: the row is there already
  assert [m["name"] for m in summary["models"]] == ["teacher", "d", "e"]
  assert _teacher_row(summary) == teacher and tree_digest(run_dir / "teacher") == written


def test_students_mode_with_outside_teacher_and_a_changed_teacher_refused(keras_teacher,
                                                                          tmp_path):
  args = [f"--model_dir={tmp_path}/run", *SMALL, "--student_epochs=1", "--mode=students",
          "--student=d:alpha=1"]
  run_job([*args, f"--teacher_model={keras_teacher['keras']}"])
  before = tree_digest(f"{tmp_path}/run")
  with pytest.raises(UsageError, match="d: the finished model was made under other settings"):
    run_job([*args, f"--teacher_model={keras_teacher['savedmodel']}"])
  assert tree_digest(f"{tmp_path}/run") == before


def test_students_mode_keeps_no_row_of_another_teacher(keras_teacher, tmp_path):
  """A row of teacher X is not left beside students of teacher Y: refused (exit 2, nothing
  changed), and --retrain=teacher replaces the row."""
  args = [f"--model_dir={tmp_path}/run", *SMALL, "--student_epochs=1", "--mode=students"]
  run_job([*args, f"--teacher_model={keras_teacher['keras']}", "--student=d:alpha=1"])
  before = tree_digest(f"{tmp_path}/run")
  other = [*args, f"--teacher_model={keras_teacher['savedmodel']}", "--student=f:alpha=1"]
  with pytest.raises(UsageError, match="teacher: the finished model was made under other "
                                       "settings: format: "):
    run_job(other)
  assert tree_digest(f"{tmp_path}/run") == before
  summary = run_job([*other, "--retrain=teacher"])
  assert _teacher_row(summary)["source"] == keras_teacher["savedmodel"]


def _bad_teachers(folder):
  def save(net, name):
    path = str(folder / name)
    net.save(path)
    return path
  wrong_shape = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Flatten(),
                                  keras.layers.Dense(10)])
  nine = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                           keras.layers.Dense(9)])
  (folder / "junk.keras").write_bytes(b"this is not a model")
  return {"input is [None, 32, 32, 1]": save(wrong_shape, "wrong.keras"),
          "9": save(nine, "nine.keras"),
          "load": str(folder / "junk.keras")}


def test_bad_teachers_exit_2_with_nothing_written(tmp_path):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / "keep.txt").write_text("earlier output")
  before = tree_digest(model_dir)
  for problem, path in _bad_teachers(tmp_path).items():
    with pytest.raises(UsageError) as raised:
      run_job([f"--model_dir={model_dir}", *SMALL, f"--teacher_model={path}"])
    assert raised.value.exit_code == 2
    message = str(raised.value)
    assert message.startswith(f"teacher model {path}: ") and problem in message, message
    assert "\n" not in message
    assert tree_digest(model_dir) == before


@pytest.fixture(scope="module")
def half_unlabeled(tmp_path_factory):
  """Half of the first 8,000 MNIST training images (CI-sized; docs/results/transfer-sets.md
  measures a half of the whole split), written as an images-only IDX transfer set."""
  images, _ = idx.load_split(MNIST_DIR, "train")
  folder = tmp_path_factory.mktemp("transfer")
  _write_idx(folder / "half-images-idx3-ubyte.gz", images[:4000], idx.IMAGES_MAGIC)
  return str(folder)


def test_unlabeled_transfer_set_trains_an_alpha_1_student(keras_teacher, half_unlabeled,
                                                          tmp_path):
  summary = run_job([f"--model_dir={tmp_path}/run", *SMALL,
                     f"--teacher_model={keras_teacher['keras']}",
                     f"--transfer_idx_dir={half_unlabeled}", "--student=t:alpha=1"])
  student = summary["models"][1]
  assert student["train_set"] == {"source": f"idx:{half_unlabeled}", "examples": 4000,
                                  "labelled": False,
                                  "images_sha256": student["train_set"]["images_sha256"]}
  assert student["test_accuracy"] > 0.8  # learned from the teacher alone
  assert student["settings"]["train_set"]["examples"] == 4000
  caches = os.listdir(f"{tmp_path}/run/{layout.LOGITS_CACHE}")
  key = layout.read_json(f"{tmp_path}/run/{layout.LOGITS_CACHE}/{caches[0]}/key.json")
  assert key["train_source"] == f"idx:{half_unlabeled}"


def test_unlabeled_transfer_set_refuses_students_that_need_labels(half_unlabeled, tmp_path):
  with pytest.raises(UsageError, match=r"only alpha=1 students.*d has alpha < 1"):
    run_job([f"--model_dir={tmp_path}/run", *SMALL, f"--transfer_idx_dir={half_unlabeled}",
             "--student=t:alpha=1", "--student=d:alpha=0.5"])
  assert not os.path.exists(tmp_path / "run" / "teacher")  # refused before the teacher trained


def test_transfer_sets_of_another_shape_or_with_bad_labels_refused(tmp_path):
  other = tmp_path / "other"
  other.mkdir()
  _write_idx(other / "x-images-idx3-ubyte.gz", np.zeros((100, 32, 32), np.uint8),
             idx.IMAGES_MAGIC)
  labelled = tmp_path / "labelled"
  labelled.mkdir()
  _write_idx(labelled / "x-images-idx3-ubyte.gz", np.zeros((100, 28, 28), np.uint8),
             idx.IMAGES_MAGIC)
  _write_idx(labelled / "x-labels-idx1-ubyte.gz", np.full(100, 12, np.uint8), idx.LABELS_MAGIC)
  for folder, message in ((other, "expected 28x28"), (labelled, "expected 0..9")):
    with pytest.raises(UsageError, match=message):
      run_job([f"--model_dir={tmp_path}/run", *SMALL, f"--transfer_idx_dir={folder}"])
  assert not os.path.exists(tmp_path / "run" / "teacher")
