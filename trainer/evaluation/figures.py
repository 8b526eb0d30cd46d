"""Pictures of the results: confusion matrices, misclassified digits, accuracy plots (PNG bytes).

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global backend
switch), so they work in a headless container and from any thread. The same PNG bytes go into
TensorBoard (tf.summary.image) and into files beside results.md.
"""

import functools
import io
import os
import tempfile

import numpy as np

NUM_CLASSES = 10
MAX_DIGITS = 48  # digits shown in one misclassification grid
_CAPTION_ROWS = 12  # pixel rows above each digit of the grid for its caption
_GAP = 6  # pixel columns between digits


def _config_dir_ok(path: str) -> bool:
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return False
  return os.access(path, os.W_OK)


def _ensure_matplotlib_config_dir() -> None:
  """matplotlib needs a writable config/cache folder; the image's root fs is read-only."""
  if os.environ.get("MPLCONFIGDIR"):
    return
  base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
  if not _config_dir_ok(os.path.join(base, "matplotlib")):
    os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="matplotlib-")


def _figure(width, height):
  _ensure_matplotlib_config_dir()
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _png(fig) -> bytes:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  return buffer.getvalue()


def confusion_matrix(labels, predictions, num_classes: int = NUM_CLASSES) -> np.ndarray:
  """counts[true, predicted] as int64 [num_classes, num_classes]."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
  return counts


def confusion_matrix_png(counts: np.ndarray, title: str) -> bytes:
  """Heat map of the counts, each cell labelled; the diagonal is the correct predictions.

  Remembered per (counts, title): a job draws each model's matrix for TensorBoard after its
  test and again for figures/ when it merges, the same picture."""
  counts = np.asarray(counts, np.int64)
  return _confusion_png(counts.tobytes(), counts.shape, title)


@functools.lru_cache(maxsize=16)
def _confusion_png(raw: bytes, shape, title: str) -> bytes:
  counts = np.frombuffer(raw, np.int64).reshape(shape)
  fig = _figure(5.2, 4.6)
  ax = fig.add_subplot()
  image = ax.imshow(counts, cmap="Blues")
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  n = counts.shape[0]
  ax.set_xticks(range(n))
  ax.set_yticks(range(n))
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  total, correct = int(counts.sum()), int(np.trace(counts))
  ax.set_title(f"{title}: {total - correct} errors of {total}", fontsize=10)
  threshold = counts.max() / 2 if counts.size else 0
  for true in range(n):
    for predicted in range(n):
      value = int(counts[true, predicted])
      if value:
        ax.text(predicted, true, str(value), ha="center", va="center", fontsize=7,
                color="white" if value > threshold else "black")
  fig.tight_layout()
  return _png(fig)


def digits_png(images, labels, predicted, title: str, caption: str = "") -> bytes:
  """A grid of digits, each captioned 'label->prediction'; says so when there are none.

  The digits are tiled into one image on one axes: 48 axes of their own took ~3 s of CPU per
  figure, most of a small job's reporting time."""
  count = min(len(images), MAX_DIGITS)
  columns = 8
  rows = max(1, -(-count // columns))
  fig = _figure(columns * 0.9, rows * 1.0 + 0.8)
  fig.suptitle(title, fontsize=10)
  if not count:
    fig.text(0.5, 0.4, caption or "none", ha="center", va="center", fontsize=10)
    return _png(fig)
  first = np.asarray(images[0])
  height, width = first.shape[:2]
  cell_h, cell_w = height + _CAPTION_ROWS, width + _GAP
  mosaic = np.zeros((rows * cell_h, columns * cell_w), first.dtype)  # the digits' own values
  bottom = 0.05 if caption else 0.01
  ax = fig.add_axes((0.01, bottom, 0.98, 0.93 - bottom - 0.3 / fig.get_figheight()))
  for i in range(count):
    top, left = (i // columns) * cell_h + _CAPTION_ROWS, (i % columns) * cell_w + _GAP // 2
    mosaic[top:top + height, left:left + width] = images[i]
    ax.text(left + width / 2 - 0.5, top - 1.5, f"{int(labels[i])}\u2192{int(predicted[i])}",
            ha="center", va="bottom", fontsize=8, color="firebrick")
  ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
  ax.axis("off")
  if caption:
    fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=7)
  return _png(fig)


def accuracy_png(models, key: str, xlabel: str, title: str, log_x: bool = False) -> bytes:
  """Test accuracy of each model against `key` (temperature, params); students as points.

  Models without a value for `key` (the teacher has no temperature) are drawn as a dashed
  horizontal line, so the students can be read against them.
  """
  fig = _figure(6.0, 4.0)
  ax = fig.add_subplot()
  for m in models:
    accuracy = 100 * m["test_accuracy"]
    if m.get(key) is None:
      ax.axhline(accuracy, linestyle="--", color="gray", linewidth=1)
      ax.annotate(f"{m['name']} {accuracy:.2f}%", (0.01, accuracy), xycoords=("axes fraction",
                                                                             "data"),
                  fontsize=8, color="gray", va="bottom")
      continue
    color = "tab:red" if m.get("role") == "teacher" else "tab:blue"
    ax.scatter([m[key]], [accuracy], color=color, zorder=3)
    label = m["name"] if m.get("alpha") is None else f"{m['name']} (alpha={m['alpha']:g})"
    ax.annotate(label, (m[key], accuracy), textcoords="offset points", xytext=(5, 4),
                fontsize=8)
  if log_x:
    ax.set_xscale("log")
  else:
    values = sorted({m[key] for m in models if m.get(key) is not None})
    if 0 < len(values) <= 8:  # few settings: tick exactly those
      ax.set_xticks(values)
      ax.set_xticklabels([f"{v:g}" for v in values])
  ax.margins(x=0.2, y=0.1)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title, fontsize=10)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  return _png(fig)
