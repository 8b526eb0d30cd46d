"""Transfer sets: an images-only IDX folder (half of the real MNIST training images) loads without
labels; sets of another shape, with labels outside 0..9 or ambiguous folders are UsageErrors."""

import collections
import gzip
import struct

import numpy as np
import pytest

from trainer.data import idx, transfer_set
from trainer.data.transfer_set import load_transfer_set
from trainer.errors import UsageError

from helpers import MNIST_DIR

Student = collections.namedtuple("Student", "name alpha")


@pytest.fixture(scope="module")
def train():
  return idx.load_split(MNIST_DIR, "train")


def write_idx(path, array, magic, compress=True):
  """An IDX file as LeCun describes it: magic, big-endian dimensions, then the bytes."""
  array = np.ascontiguousarray(array, dtype=np.uint8)
  payload = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()
  with (gzip.GzipFile(path, "wb", compresslevel=1) if compress else open(path, "wb")) as f:
    f.write(payload)


def test_half_of_the_training_images_without_labels(tmp_path, train):
  images, _ = train
  half = images[:30000]
  write_idx(tmp_path / "unlabeled-images-idx3-ubyte.gz", half, idx.IMAGES_MAGIC)
  got, labels = load_transfer_set(idx_dir=str(tmp_path))
  assert labels is None and got.dtype == np.uint8
  np.testing.assert_array_equal(got, half)
  digest = transfer_set.images_digest(got)
  assert digest == transfer_set.images_digest(half.copy())
  assert digest != transfer_set.images_digest(images[30000:])  # the other half: another key
  assert transfer_set.record(transfer_set.source_name(idx_dir=str(tmp_path)), got, labels) == {
      "source": f"idx:{tmp_path}", "examples": 30000, "labelled": False, "images_sha256": digest}


def test_labels_file_with_the_same_prefix_is_read(tmp_path, train):
  images, labels = train
  write_idx(tmp_path / "pool.images.idx3-ubyte", images[:500], idx.IMAGES_MAGIC, compress=False)
  write_idx(tmp_path / "pool.labels.idx1-ubyte", labels[:500], idx.LABELS_MAGIC, compress=False)
  write_idx(tmp_path / "other-labels-idx1-ubyte", labels[:7], idx.LABELS_MAGIC)  # not its prefix
  got, got_labels = load_transfer_set(idx_dir=str(tmp_path))
  np.testing.assert_array_equal(got, images[:500])
  assert got_labels.dtype == np.int64
  np.testing.assert_array_equal(got_labels, labels[:500])


def test_the_mnist_folder_itself_is_ambiguous():
  with pytest.raises(UsageError, match="several IDX images files"):
    load_transfer_set(idx_dir=MNIST_DIR)


def test_images_of_another_shape_are_rejected(tmp_path):
  write_idx(tmp_path / "x-images-idx3-ubyte.gz", np.zeros((10, 32, 32)), idx.IMAGES_MAGIC)
  with pytest.raises(UsageError, match="images are 32x32, expected 28x28"):
    load_transfer_set(idx_dir=str(tmp_path))


def test_colour_images_are_rejected_by_their_header(tmp_path):
  path = tmp_path / "x-images-idx3-ubyte.gz"
  with gzip.open(path, "wb") as f:  # 4 dimensions: magic 0x804, not an idx3 images file
    f.write(struct.pack(">I4I", 0x00000804, 2, 28, 28, 3) + bytes(2 * 28 * 28 * 3))
  with pytest.raises(UsageError, match="magic 0x00000804"):
    load_transfer_set(idx_dir=str(tmp_path))


def test_labels_outside_0_to_9_are_rejected(tmp_path, train):
  images, labels = train
  bad = labels[:100].copy()
  bad[17] = 10
  write_idx(tmp_path / "x-images-idx3-ubyte.gz", images[:100], idx.IMAGES_MAGIC)
  write_idx(tmp_path / "x-labels-idx1-ubyte.gz", bad, idx.LABELS_MAGIC)
  with pytest.raises(UsageError, match="labels go from 0 to 10, expected 0..9"):
    load_transfer_set(idx_dir=str(tmp_path))


def test_label_count_must_match(tmp_path, train):
  images, labels = train
  write_idx(tmp_path / "x-images-idx3-ubyte.gz", images[:100], idx.IMAGES_MAGIC)
  write_idx(tmp_path / "x-labels-idx1-ubyte.gz", labels[:99], idx.LABELS_MAGIC)
  with pytest.raises(UsageError, match="100 images but 99 labels"):
    load_transfer_set(idx_dir=str(tmp_path))


def test_folder_without_images_and_source_choice(tmp_path):
  with pytest.raises(UsageError, match="no IDX images file"):
    load_transfer_set(idx_dir=str(tmp_path))
  with pytest.raises(UsageError, match="cannot list IDX folder"):
    load_transfer_set(idx_dir=str(tmp_path / "missing"))
  for kwargs in ({}, {"idx_dir": str(tmp_path), "tfds_name": "mnist"}):
    with pytest.raises(UsageError, match="give one"):
      load_transfer_set(**kwargs)


def test_without_labels_only_alpha_1_students():
  students = [Student("teacher_only", 1.0), Student("half", 0.5), Student("labels", 0.0)]
  with pytest.raises(UsageError, match="half, labels have alpha < 1"):
    transfer_set.require_labels(students, None, "idx:/pool")
  transfer_set.require_labels(students[:1], None, "idx:/pool")
  transfer_set.require_labels(students, np.zeros(3, np.int64), "idx:/pool")


def test_tfds_dataset_as_transfer_set(tfds_data_dir):
  images, labels = load_transfer_set(tfds_name="mnist", data_dir=tfds_data_dir, tfds_split="test")
  reference_images, reference_labels = idx.load_split(MNIST_DIR, "test")
  assert images.shape == reference_images.shape and images.dtype == np.uint8
  # tfds shuffles when it prepares: compare per-class counts and pixel sums.
  assert np.bincount(labels).tolist() == np.bincount(reference_labels).tolist()
  for k in range(10):
    assert (images[labels == k].astype(np.int64).sum() ==
            reference_images[reference_labels == k].astype(np.int64).sum()), k
