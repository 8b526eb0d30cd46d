"""Final test-set evaluation and batched inference outside the training loop.

The report's numbers come from the network itself (not a metric object), so errors are an exact
count and the predictions are at hand for confusion matrices and misclassified examples.
"""

import numpy as np
import tensorflow as tf

from trainer import batch_slices
from trainer.pipeline import normalize_images


def predict_logits(net, images: np.ndarray, batch_size: int = 1000,
                   slices: int = 1) -> np.ndarray:
  """Logits (float32 [N,10]) of `net` in inference mode, for uint8 images [N,28,28]; each batch
  run as `slices` slices side by side (trainer/batch_slices.py)."""
  forward = tf.function(
      lambda x: tf.cast(batch_slices.forward(net, normalize_images(x), False, slices), tf.float32),
      reduce_retracing=True)
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
