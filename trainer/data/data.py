"""Loads MNIST-like data into memory as uint8 arrays, from tensorflow-datasets or IDX files.

MNIST is 55 MB as uint8, so the whole set lives in memory once; the tf.data pipelines
(trainer/data/pipeline.py) index into it, which keeps decoding out of the training loop.
"""

import dataclasses
import hashlib
import logging
import socket

import numpy as np

from trainer.data import idx
from trainer.errors import UsageError


@dataclasses.dataclass
class Splits:
  """Train/validation/test arrays: images uint8 [N,28,28], labels int64 [N]."""

  train_images: np.ndarray
  train_labels: np.ndarray
  validation_images: np.ndarray
  validation_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  source: str

  def record(self) -> dict:
    """Where the data came from and a digest of each split as used (after the cut and any
    --max_*): two runs with equal records trained and tested on the same examples."""
    return {"source": self.source,
            **{part: _digest(getattr(self, f"{part}_images"), getattr(self, f"{part}_labels"))
               for part in ("train", "validation", "test")}}

  def summary(self) -> str:
    return (f"{self.source}: {len(self.train_labels)} train, {len(self.validation_labels)} "
            f"validation, {len(self.test_labels)} test")


def _digest(images, labels) -> dict:
  digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
  digest.update(np.ascontiguousarray(labels).astype(np.int64).tobytes())
  return {"examples": int(len(labels)), "sha256": digest.hexdigest()}


TFDS_DOWNLOAD_HOST = ("storage.googleapis.com", 443)  # where tfds fetches MNIST-like data


def _can_download(timeout: float = 5.0) -> bool:
  """Quick reachability probe: tfds itself retries for minutes before giving up offline."""
  try:
    socket.create_connection(TFDS_DOWNLOAD_HOST, timeout=timeout).close()
    return True
  except OSError:
    return False


def load_tfds_split(name: str, data_dir, split: str):
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends
    raise UsageError(f"unknown dataset {name!r} for tensorflow-datasets: "
                     f"{str(e).splitlines()[0]}") from None
  if not builder.is_prepared():
    where = data_dir or builder.data_dir_root
    hint = ("prepare it there or pass --idx_dir=<folder with the four IDX files>")
    if not _can_download():
      raise UsageError(f"dataset {name!r} is not prepared in --data_dir={where} and "
                       f"{TFDS_DOWNLOAD_HOST[0]} is unreachable; {hint}")
    try:
      builder.download_and_prepare()
    except Exception as e:
      raise UsageError(f"dataset {name!r} is not prepared in --data_dir={where} and could "
                       f"not be downloaded ({type(e).__name__}); {hint}") from None
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise UsageError(f"dataset {name!r} has no image/label features")
  shape = tuple(features["image"].shape)
  if shape != (28, 28, 1) or features["label"].num_classes != 10:
    raise UsageError(
        f"dataset {name!r} has images {shape} and {features['label'].num_classes} classes; "
        "this job needs 28x28x1 images in 10 classes")
  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  return arrays["image"][..., 0].astype(np.uint8), arrays["label"].astype(np.int64)


def load_splits(dataset: str, data_dir=None, idx_dir=None, validation_examples=0,
                max_train_examples=None, max_test_examples=None) -> Splits:
  """Loads train and test, and holds out the last `validation_examples` of train.

  Validation comes from the training split so that the test split is only ever used for the
  final report; `max_*` cut the data down for smoke runs after the hold-out.
  """
  if idx_dir:
    train_images, train_labels = idx.load_split(idx_dir, "train")
    test_images, test_labels = idx.load_split(idx_dir, "test")
    source = f"idx:{idx_dir}"
  else:
    train_images, train_labels = load_tfds_split(dataset, data_dir, "train")
    test_images, test_labels = load_tfds_split(dataset, data_dir, "test")
    source = f"tfds:{dataset}"
  if validation_examples >= len(train_labels):
    raise UsageError(f"--validation_examples={validation_examples} leaves no training data "
                     f"(the training split has {len(train_labels)} examples)")
  cut = len(train_labels) - validation_examples
  splits = Splits(
      train_images=train_images[:cut][:max_train_examples],
      train_labels=train_labels[:cut][:max_train_examples],
      validation_images=train_images[cut:],
      validation_labels=train_labels[cut:],
      test_images=test_images[:max_test_examples],
      test_labels=test_labels[:max_test_examples],
      source=source,
  )
  logging.info("Loaded %s", splits.summary())
  return splits
