"""The transfer set (Hinton et al. 2015): the images students distill on, when these are not the
teacher's own training split, e.g. a pool of unlabeled in-domain images.

Only the form can be checked (28x28 uint8 images, labels in 0..9 when there are any), not that
the images show the task the teacher learned. Without labels the students can only learn from
the teacher (distillation weight 1); `require_labels` says which students cannot.
"""

import hashlib

import numpy as np

from trainer.data import data, idx
from trainer.errors import UsageError

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


def load_transfer_set(idx_dir=None, tfds_name=None, data_dir=None, tfds_split="train"):
  """(images uint8 [N,28,28], labels int64 [N] or None) from an IDX folder or a tfds dataset.

  The IDX folder holds one `*images-idx3-ubyte[.gz]` file and optionally the
  `*labels-idx1-ubyte[.gz]` file with the same prefix (trainer/data/idx.py `find_unsplit`)."""
  if (idx_dir is None) == (tfds_name is None):
    raise UsageError("a transfer set comes from an IDX folder or a tfds dataset: give one")
  if tfds_name is not None:
    images, labels = data.load_tfds_split(tfds_name, data_dir, tfds_split)
    where = f"transfer dataset {tfds_name!r} ({tfds_split})"
  else:
    image_path, label_path = idx.find_unsplit(idx_dir)
    images = idx.read_file(image_path, idx.IMAGES_MAGIC)
    labels = None if label_path is None else idx.read_file(label_path, idx.LABELS_MAGIC)
    where = f"transfer set {image_path}"
  if images.shape[1:] != IMAGE_SHAPE:
    raise UsageError(f"{where}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
  if len(images) == 0:
    raise UsageError(f"{where}: no images")
  if labels is not None:
    if len(labels) != len(images):
      raise UsageError(f"{where}: {len(images)} images but {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
      raise UsageError(f"{where}: labels go from {labels.min()} to {labels.max()}, "
                       f"expected 0..{NUM_CLASSES - 1}")
    labels = labels.astype(np.int64)
  return images, labels


def source_name(idx_dir=None, tfds_name=None, tfds_split="train") -> str:
  """How results and settings name the set (like trainer/data/data.py's Splits.source)."""
  return f"idx:{idx_dir}" if idx_dir is not None else f"tfds:{tfds_name}[{tfds_split}]"


def images_digest(images: np.ndarray) -> str:
  """sha256 of the images' shape and bytes: the transfer set's part of the teacher-logits
  cache key (the logits depend on the images only, not on labels)."""
  digest = hashlib.sha256(repr(tuple(images.shape)).encode())
  digest.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
  return digest.hexdigest()


def record(source: str, images: np.ndarray, labels) -> dict:
  """What results.json and each student's settings keep about the set."""
  return {"source": source, "examples": int(len(images)), "labelled": labels is not None,
          "images_sha256": images_digest(images)}


def require_labels(students, labels, source: str):
  """Without labels only distillation weight 1 (the CLI's alpha=1) can train: UsageError
  naming every other student. `students` have `.name` and `.alpha`."""
  if labels is not None:
    return
  need = [s.name for s in students if s.alpha < 1.0]
  if need:
    raise UsageError(f"transfer set {source} has no labels, so only alpha=1 students can learn "
                     f"on it; {', '.join(need)} {'has' if len(need) == 1 else 'have'} alpha < 1")
