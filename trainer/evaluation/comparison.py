"""Per-model prediction files, and the pictures that compare models, drawn when results merge.

Each finished model leaves <model>/test_predictions.npz (its test predictions, and the test
digits it got wrong) and <model>/validation_predictions.npz (per-example correctness and
cross-entropy on the validation split, which the choice of student is made from). The merge,
which sees every model (also those other pods trained), turns them into PNGs in
<model_dir>/figures/ (linked from results.md) and into TensorBoard images in logs/_comparison
(a name no model can have: model names start with a letter or digit).

The student in the error figure is the one the merge chose (trainer/evaluation/selection.py) from
validation data: the test split only reports, it does not choose.
"""

import hashlib
import logging
import os

import numpy as np
import tensorflow as tf

from trainer.evaluation import evaluation, figures
from trainer.evaluation.summaries import png_summary_image
from trainer.rundir import layout

PREDICTIONS_FILE = layout.PREDICTIONS
FIGURES_DIR = layout.FIGURES
COMPARISON_RUN = layout.COMPARISON_RUN
VALIDATION_PREDICTIONS_FILE = "validation_predictions.npz"


def images_digest(images) -> str:
  return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def save_predictions(folder: str, images, labels, predictions) -> None:
  """<folder>/test_predictions.npz: predictions on the test split and the digits it got wrong."""
  labels = np.asarray(labels)
  predictions = np.asarray(predictions)
  wrong = np.flatnonzero(predictions != labels).astype(np.int32)
  os.makedirs(folder, exist_ok=True)
  with layout.atomic_path(os.path.join(folder, PREDICTIONS_FILE)) as tmp:
    with open(tmp, "wb") as f:
      np.savez_compressed(f, labels=labels.astype(np.uint8),
                          predictions=predictions.astype(np.uint8), error_indices=wrong,
                          error_images=np.asarray(images)[wrong],
                          test_images_sha256=np.array(images_digest(images)))


def _load_npz(model_dir: str, name: str, filename: str):
  try:
    with np.load(os.path.join(model_dir, name, filename)) as data:
      return {key: data[key] for key in data.files}
  except (OSError, ValueError, KeyError):
    return None


def load_predictions(model_dir: str, name: str):
  """The saved test predictions of a model as a dict of arrays, or None if it has none."""
  return _load_npz(model_dir, name, PREDICTIONS_FILE)


def save_validation_predictions(folder: str, images, labels, logits) -> None:
  """<folder>/validation_predictions.npz: per-example correctness and cross-entropy on the
  validation split (from the network's logits), with a digest of the images, so that paired
  tests only ever pair models that saw the same examples."""
  labels = np.asarray(labels)
  outputs = evaluation.per_example(logits, labels)
  with layout.atomic_path(os.path.join(folder, VALIDATION_PREDICTIONS_FILE)) as tmp:
    with open(tmp, "wb") as f:
      np.savez_compressed(f, labels=labels.astype(np.uint8),
                          predictions=np.asarray(logits).argmax(axis=-1).astype(np.uint8),
                          correct=outputs["correct"], cross_entropy=outputs["cross_entropy"],
                          validation_images_sha256=np.array(images_digest(images)))


def load_validation_predictions(model_dir: str, name: str):
  """A model's validation_predictions.npz as a dict of arrays, or None if it has none."""
  return _load_npz(model_dir, name, VALIDATION_PREDICTIONS_FILE)


def _write_png(folder: str, name: str, png: bytes) -> str:
  layout.write_bytes(os.path.join(folder, name), png)
  return f"{FIGURES_DIR}/{name}"


def _student_errors_figure(model_dir, models, chosen):
  """Digits the chosen student gets wrong and the teacher gets right: (title, png) or None."""
  student = next((m for m in models if m["name"] == chosen and m.get("role") == "student"), None)
  teacher = next((m for m in models if m.get("role") == "teacher"), None)
  if student is None or teacher is None:
    return None
  s, t = load_predictions(model_dir, student["name"]), load_predictions(model_dir, teacher["name"])
  if s is None or t is None:
    return None
  if str(s["test_images_sha256"]) != str(t["test_images_sha256"]):
    logging.warning("%s and %s were tested on different test sets: no error comparison",
                    student["name"], teacher["name"])
    return None
  teacher_right = t["predictions"][s["error_indices"]] == s["labels"][s["error_indices"]]
  wrong = s["error_indices"][teacher_right]
  images = s["error_images"][teacher_right]
  title = (f"{student['name']} (the chosen student) wrong, "
           f"{teacher['name']} right: {len(wrong)} test digit{'' if len(wrong) == 1 else 's'}")
  caption = "label\u2192student's prediction"
  if len(wrong) > figures.MAX_DIGITS:
    caption += f"; first {figures.MAX_DIGITS} shown"
  png = figures.digits_png(images, s["labels"][wrong], s["predictions"][wrong], title,
                           caption if len(wrong) else "none: the teacher misses them all too")
  return title, png


def write_report(model_dir: str, models, chosen=None) -> list:
  """Draws every comparison picture; returns [{"title", "path"}] for results.md.

  `chosen` names the student the merge chose (trainer/evaluation/selection.py): its test errors get
  a figure (file and tag keep the name best_student_errors, which readers already know).

  Writes <model_dir>/figures/*.png (stale ones removed) and logs/_comparison (replaced).
  """
  folder = os.path.join(model_dir, FIGURES_DIR)
  os.makedirs(folder, exist_ok=True)
  made, tensorboard_images = [], []

  def add(title, filename, png, tag=None):
    made.append({"title": title, "path": _write_png(folder, filename, png)})
    if tag:
      tensorboard_images.append((tag, title, png))

  students = [m for m in models if m.get("role") == "student"]
  if students:
    # alpha=0 ignores the teacher, so its temperature means nothing: a line, like the teacher
    by_temperature = [dict(m, temperature=None) if m.get("alpha") == 0 else m for m in models]
    add("Test accuracy against distillation temperature", "accuracy_vs_temperature.png",
        figures.accuracy_png(by_temperature, "temperature", "temperature T",
                             "test accuracy against temperature (dashed: no temperature)"),
        "accuracy_vs_temperature")
    add("Test accuracy against parameter count", "accuracy_vs_params.png",
        figures.accuracy_png(models, "params", "parameters (log scale)",
                             "test accuracy against parameter count", log_x=True),
        "accuracy_vs_params")
  errors = _student_errors_figure(model_dir, models, chosen)
  if errors:
    add(errors[0], "best_student_errors.png", errors[1], "best_student_errors")
  for m in models:
    data = load_predictions(model_dir, m["name"])
    if data is not None:
      counts = figures.confusion_matrix(data["labels"], data["predictions"])
      add(f"Confusion matrix: {m['name']}", f"confusion_{m['name']}.png",
          figures.confusion_matrix_png(counts, m["name"]))
  keep = {os.path.basename(f["path"]) for f in made}
  for name in os.listdir(folder):
    if name not in keep:
      os.remove(os.path.join(folder, name))
  _write_tensorboard(os.path.join(model_dir, "logs", COMPARISON_RUN), tensorboard_images)
  return made


def _write_tensorboard(run_dir: str, images) -> None:
  """Replaces the comparison run: a newer merge knows at least as many models."""
  if os.path.isdir(run_dir):
    for name in os.listdir(run_dir):
      if name.startswith("events.out.tfevents."):
        os.remove(os.path.join(run_dir, name))
  if not images:
    return
  writer = tf.summary.create_file_writer(run_dir)
  with writer.as_default(step=0):
    for tag, title, png in images:
      tf.summary.image(tag, png_summary_image(png), description=title)
  writer.close()
