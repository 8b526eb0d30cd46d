"""IDX reader: real MNIST parses to the published content; broken files are rejected clearly."""

import gzip
import hashlib
import os
import shutil

import numpy as np
import pytest

from trainer.data import idx
from trainer.errors import UsageError

from helpers import MNIST_DIR


def _published_sums():
  sums = {}
  with open(os.path.join(MNIST_DIR, "SHA256SUMS")) as f:
    for line in f:
      digest, name = line.split()
      sums[name] = digest
  return sums


def test_real_mnist_matches_published_checksums():
  sums = _published_sums()
  for stem in [*idx.SPLIT_FILES["train"], *idx.SPLIT_FILES["test"]]:
    raw = idx._read_bytes(os.path.join(MNIST_DIR, stem + ".gz"))
    assert hashlib.sha256(raw).hexdigest() == sums[stem]


def test_load_split_shapes_and_label_histogram():
  images, labels = idx.load_split(MNIST_DIR, "train")
  assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
  test_images, test_labels = idx.load_split(MNIST_DIR, "test")
  assert test_images.shape == (10000, 28, 28)
  # Known fact about MNIST's test set: 1135 ones, 892 fives.
  counts = np.bincount(test_labels)
  assert counts[1] == 1135 and counts[5] == 892


def test_uncompressed_files_are_accepted(tmp_path):
  for stem in idx.SPLIT_FILES["test"]:
    with gzip.open(os.path.join(MNIST_DIR, stem + ".gz")) as src:
      (tmp_path / stem).write_bytes(src.read())
  images, labels = idx.load_split(str(tmp_path), "test")
  reference, reference_labels = idx.load_split(MNIST_DIR, "test")
  np.testing.assert_array_equal(images, reference)
  np.testing.assert_array_equal(labels, reference_labels)


def _copy_test_split(tmp_path):
  for stem in idx.SPLIT_FILES["test"]:
    shutil.copy(os.path.join(MNIST_DIR, stem + ".gz"), tmp_path)


def _rewrite(path, transform):
  with gzip.open(path) as f:
    data = f.read()
  with gzip.open(path, "wb") as f:
    f.write(transform(data))


@pytest.mark.parametrize("transform, message", [
    (lambda d: b"\x00\x00\x08\x01" + d[4:], "magic"),
    (lambda d: d[:-100], "truncated"),
    (lambda d: d[:6], "truncated"),
])
def test_broken_image_file_is_rejected(tmp_path, transform, message):
  _copy_test_split(tmp_path)
  _rewrite(tmp_path / "t10k-images-idx3-ubyte.gz", transform)
  with pytest.raises(UsageError, match=message):
    idx.load_split(str(tmp_path), "test")


def test_count_mismatch_is_rejected(tmp_path):
  _copy_test_split(tmp_path)
  # A consistent labels file with one label fewer than there are images.
  _rewrite(tmp_path / "t10k-labels-idx1-ubyte.gz",
           lambda d: d[:4] + (9999).to_bytes(4, "big") + d[8:-1])
  with pytest.raises(UsageError, match="count mismatch"):
    idx.load_split(str(tmp_path), "test")


def test_missing_and_non_gzip_garbage(tmp_path):
  with pytest.raises(UsageError, match="not found"):
    idx.load_split(str(tmp_path), "train")
  _copy_test_split(tmp_path)
  (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
  with pytest.raises(UsageError, match="cannot read"):
    idx.load_split(str(tmp_path), "test")
