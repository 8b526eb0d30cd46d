"""The production data path: tensorflow-datasets, prepared offline from the canonical files."""

import json

import numpy as np

from trainer.data import data, idx

from helpers import FASHION_MNIST_DIR, MNIST_DIR
from inprocess import run_job


def _fingerprint(images, labels):
  """Order-free summary: tfds shuffles examples when it prepares a dataset."""
  per_class = [int(images[labels == k].astype(np.int64).sum()) for k in range(10)]
  return np.bincount(labels, minlength=10).tolist(), per_class


def test_tfds_mnist_has_the_same_content_as_the_idx_files(tfds_data_dir):
  splits = data.load_splits("mnist", data_dir=tfds_data_dir, validation_examples=0)
  for split, images, labels in (("train", splits.train_images, splits.train_labels),
                                ("test", splits.test_images, splits.test_labels)):
    reference = idx.load_split(MNIST_DIR, split)
    assert images.shape == reference[0].shape and images.dtype == np.uint8
    assert _fingerprint(images, labels) == _fingerprint(*reference)


def test_tfds_fashion_mnist_loads(tfds_data_dir):
  splits = data.load_splits("fashion_mnist", data_dir=tfds_data_dir, validation_examples=1000)
  assert len(splits.train_labels) == 59000 and len(splits.validation_labels) == 1000
  reference = idx.load_split(FASHION_MNIST_DIR, "test")
  assert _fingerprint(splits.test_images, splits.test_labels) == _fingerprint(*reference)


def test_job_runs_on_tfds_fashion_mnist(tfds_data_dir, tmp_path):
  run_job([f"--model_dir={tmp_path}/run", "--dataset=fashion_mnist",
           f"--data_dir={tfds_data_dir}", "--max_train_examples=2048",
           "--validation_examples=128", "--max_test_examples=256", "--teacher_epochs=2",
           "--student_epochs=1", "--batch_size=64", "--student=only:alpha=0.5", "--nolitert"])
  with open(tmp_path / "run" / "results.json") as f:
    summary = json.load(f)
  assert summary["dataset"] == "fashion_mnist"
  assert [m["name"] for m in summary["models"]] == ["teacher", "only"]
  assert summary["models"][0]["test_accuracy"] > 0.4  # chance is 0.1: it learned
