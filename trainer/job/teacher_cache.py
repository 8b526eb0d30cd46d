"""The teacher's logits on the training data, computed once and kept with the run.

Distillation then reads them from tf.data instead of running the teacher every step. The cache
lives in <model_dir>/teacher_logits/<key digest>/, keyed by the data and the teacher's weights:
pods that share a model_dir and compute the same cache write the same files, and never sync
(so never delete) another teacher's cache.
"""

import hashlib
import json
import logging
import os
import time

import numpy as np

from trainer.evaluation import evaluation
from trainer.rundir import layout

CACHE_DIR = layout.LOGITS_CACHE


def weights_digest(net) -> str:
  """sha256 of a network's weights (also shows that students started from the same point)."""
  digest = hashlib.sha256()
  for weight in net.weights:
    digest.update(np.asarray(weight.numpy()).tobytes())
  return digest.hexdigest()


def _images_digest(*arrays) -> str:
  digest = hashlib.sha256()
  for array in arrays:
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def load_or_compute(teacher, train_images, validation_images, train_source: str, run_storage,
                    write: bool, slices: int = 1):
  """(train logits, validation logits) of `teacher`, from the cache or computed and cached.

  `train_images` are what the students learn from (the training split or a transfer set,
  named by `train_source`); the cache key names them, the validation images and the teacher."""
  key = {"images_sha256": _images_digest(train_images, validation_images),
         "train_source": train_source, "teacher_params": teacher.count_params(),
         "teacher_weights_sha256": weights_digest(teacher)}
  rel = f"{CACHE_DIR}/" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  folder = os.path.join(run_storage.local_dir, rel)
  key_path = os.path.join(folder, "key.json")
  run_storage.pull(rel, exact=True)
  try:
    with open(key_path) as f:
      if json.load(f) == key:
        return (np.load(os.path.join(folder, "train.npy")),
                np.load(os.path.join(folder, "validation.npy")))
  except (OSError, ValueError):
    pass
  started = time.perf_counter()
  train = evaluation.predict_logits(teacher, train_images, slices=slices)
  validation = evaluation.predict_logits(teacher, validation_images, slices=slices)
  logging.info("Cached teacher logits for %d examples in %.1fs", len(train) + len(validation),
               time.perf_counter() - started)
  if write:
    os.makedirs(folder, exist_ok=True)
    for part, array in (("train", train), ("validation", validation)):
      with layout.atomic_path(os.path.join(folder, f"{part}.npy")) as tmp:
        np.save(tmp, array)
    layout.write_json(key_path, key)  # written last: marks the cache complete
    run_storage.sync(rel, last=("key.json",))
  return train, validation
