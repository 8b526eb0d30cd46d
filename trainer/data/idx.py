"""Reader for the IDX files MNIST ships as (LeCun's format), strict enough to reject bad files.

A wrong file must fail before training with a message naming the file, not as a shape error
three layers down, so the header, dimensions and length are all checked.
"""

import gzip
import os
import re
import struct

import numpy as np

from trainer.errors import UsageError

IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(folder: str, stem: str) -> str:
  for name in (stem, stem + ".gz"):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  raise UsageError(f"IDX file {stem}[.gz] not found in {folder}")


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      raw = f.read()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise UsageError(f"cannot read IDX file {path}: {e}") from None


def parse_idx(data: bytes, expected_magic: int, path: str = "<bytes>") -> np.ndarray:
  """Parses one IDX payload into a uint8 array, checking magic, dimensions and length."""
  if len(data) < 4:
    raise UsageError(f"IDX file {path} is truncated (no header)")
  (magic,) = struct.unpack(">I", data[:4])
  if magic != expected_magic:
    raise UsageError(
        f"IDX file {path} has magic 0x{magic:08x}, expected 0x{expected_magic:08x}")
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(data) < header:
    raise UsageError(f"IDX file {path} is truncated (incomplete header)")
  dims = struct.unpack(f">{ndim}I", data[4:header])
  expected = int(np.prod(dims, dtype=np.int64))
  body = len(data) - header
  if body != expected:
    raise UsageError(
        f"IDX file {path} is truncated or padded: dims {dims} need {expected} bytes, has {body}")
  return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_split(folder: str, split: str):
  """Returns (images uint8 [N,28,28], labels int64 [N]) for 'train' or 'test'."""
  image_stem, label_stem = SPLIT_FILES[split]
  image_path, label_path = _find(folder, image_stem), _find(folder, label_stem)
  images = parse_idx(_read_bytes(image_path), IMAGES_MAGIC, image_path)
  labels = parse_idx(_read_bytes(label_path), LABELS_MAGIC, label_path)
  if images.shape[0] != labels.shape[0]:
    raise UsageError(
        f"IDX count mismatch in {folder} ({split}): {images.shape[0]} images, "
        f"{labels.shape[0]} labels")
  if images.shape[1:] != (28, 28):
    raise UsageError(f"IDX images in {image_path} are {images.shape[1:]}, expected (28, 28)")
  if labels.size and labels.max() > 9:
    raise UsageError(f"IDX labels in {label_path} go up to {labels.max()}, expected 0..9")
  return images, labels.astype(np.int64)


# A folder of one unsplit set (e.g. a transfer set): `<prefix>images-idx3-ubyte[.gz]` and,
# optionally, `<prefix>labels-idx1-ubyte[.gz]` with the same prefix ("-" or "." before "idx").
_UNSPLIT_IMAGES = re.compile(r"^(?P<prefix>.*)images(?P<sep>[-.])idx3-ubyte(\.gz)?$")


def find_unsplit(folder: str):
  """(images path, labels path or None) of the one IDX image set in `folder`."""
  try:
    names = sorted(os.listdir(folder))
  except OSError as e:
    raise UsageError(f"cannot list IDX folder {folder}: {e.strerror}") from None
  matches = [m for m in map(_UNSPLIT_IMAGES.match, names) if m]
  if not matches:
    raise UsageError(f"no IDX images file (*images-idx3-ubyte[.gz]) in {folder}")
  if len(matches) > 1:
    found = ", ".join(m.string for m in matches)
    raise UsageError(f"several IDX images files in {folder} ({found}); keep one set per folder")
  match = matches[0]
  label_stem = f"{match['prefix']}labels{match['sep']}idx1-ubyte"
  labels = [os.path.join(folder, n) for n in (label_stem, label_stem + ".gz") if n in names]
  return os.path.join(folder, match.string), (labels[0] if labels else None)


def read_file(path: str, expected_magic: int) -> np.ndarray:
  """One IDX file (gzipped or not) as a checked uint8 array."""
  return parse_idx(_read_bytes(path), expected_magic, path)
