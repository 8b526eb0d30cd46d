"""Final test-set evaluation and batched inference outside the training loop.

The report's numbers come from the network itself (not a metric object), so errors are an exact
count and the predictions are at hand for confusion matrices and misclassified examples.
"""

import numpy as np
import tensorflow as tf

from trainer.data.pipeline import normalize_images
from trainer.modeling import batch_slices


def predict_logits(net, images: np.ndarray, batch_size: int = 1000,
                   slices: int = 1) -> np.ndarray:
  """Logits (float32 [N,10]) of `net` in inference mode, for uint8 images [N,28,28]; each batch
  run as `slices` slices side by side (trainer/modeling/batch_slices.py)."""
  forward = tf.function(
      lambda x: tf.cast(batch_slices.forward(net, normalize_images(x), False, slices), tf.float32),
      reduce_retracing=True, autograph=False)  # no tensor-dependent Python: tracing is faster
  chunks = [forward(tf.constant(images[i:i + batch_size]))
            for i in range(0, len(images), batch_size)]
  return np.concatenate([c.numpy() for c in chunks]) if chunks else np.zeros((0, 10), np.float32)


def test_report(logits: np.ndarray, labels: np.ndarray) -> dict:
  """Accuracy, exact error count and mean cross-entropy of logits against labels."""
  predictions = logits.argmax(axis=-1)
  errors = int((predictions != labels).sum())
  log_probs = tf.nn.log_softmax(logits).numpy()
  loss = float(-log_probs[np.arange(len(labels)), labels].mean()) if len(labels) else 0.0
  return {"test_accuracy": 1.0 - errors / max(len(labels), 1), "test_errors": errors,
          "test_loss": loss, "test_examples": int(len(labels))}


def per_example(logits: np.ndarray, labels: np.ndarray) -> dict:
  """Per-example correctness and cross-entropy with the labels: what paired tests between
  models need (trainer/evaluation/selection.py). Computed in float64 from float32 logits, so equal
  logits give equal values whatever ran them."""
  logits = np.asarray(logits, dtype=np.float64)
  labels = np.asarray(labels).astype(np.int64)
  if logits.ndim != 2 or len(logits) != len(labels):
    raise ValueError(f"logits {logits.shape} do not match labels {labels.shape}")
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_norm = np.log(np.exp(shifted).sum(axis=-1))
  cross_entropy = log_norm - shifted[np.arange(len(labels)), labels]
  return {"correct": logits.argmax(axis=-1) == labels,
          "cross_entropy": cross_entropy.astype(np.float32)}
