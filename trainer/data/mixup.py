"""Seeded mixup of training images in pairs, for function matching (Beyer et al. 2022).

Images at positions 2k and 2k+1 of a global batch become two mixtures of each other,
w·a + (1−w)·b and (1−w)·a + w·b, with one weight w ~ Beta(c, c) per pair. A mixed image has no
single label, so only a student taught by the teacher alone (alpha 1) trains on them: the
teacher, run online on the same batch, says what each mixture is.

Pairs never straddle replicas (per-replica batches are even) and each weight is a stateless
draw keyed by (seed, epoch, step) for the whole global batch, read at the pair's position: as
with trainer/data/augment.py, a view depends neither on the number of replicas or workers nor on
how batches are gathered, and a resumed run mixes exactly as an uninterrupted one.
"""

import tensorflow as tf

from trainer.data.augment import step_key
from trainer.data.options import MAX_MIXUP, MIN_MIXUP

_SALT = 0x313C  # keeps mixing weights apart from the augmentation draws of the same step


def check_concentration(concentration: float) -> float:
  """0 (off) or within [MIN_MIXUP, MAX_MIXUP] (trainer/data/options.py)."""
  c = float(concentration)
  if c != 0.0 and not MIN_MIXUP <= c <= MAX_MIXUP:
    raise ValueError(f"mixup must be 0 (off) or in [{MIN_MIXUP:g}, {MAX_MIXUP:g}], got {c:g}")
  return c


def pair_weights(concentration, seed, epoch, step, global_batch):
  """[global_batch // 2] weights w ~ Beta(c, c) of one global step's pairs.

  Beta from two Gamma(c) draws, in float64 so that neither underflows to 0 at small c."""
  key = tf.random.fold_in(step_key(seed, epoch, step), _SALT, alg="philox")
  gammas = tf.random.stateless_gamma([2, global_batch // 2], key, concentration,
                                     dtype=tf.float64)
  total = gammas[0] + gammas[1]
  weights = tf.where(total > 0, gammas[0] / tf.where(total > 0, total, 1.0), 0.5)
  return tf.cast(weights, tf.float32)


def mix_batches(images, concentration, seed, epochs, steps, offsets, global_batch):
  """Mixes per-replica batches `images` [rows, b, h, w, c] (b even) in pairs.

  Row r belongs to global step (epochs[r], steps[r]) and starts at position offsets[r] of that
  step's global batch (as in trainer.data.augment.augment_batches). Same shape, dtype and range."""
  count = int(images.shape[1])
  if count % 2:
    raise ValueError(f"mixup needs an even per-replica batch, got {count}")

  def weights(row):
    epoch, step, offset = row
    return pair_weights(concentration, seed, epoch, step, global_batch)[
        offset // 2:offset // 2 + count // 2]

  w = tf.map_fn(
      weights, (tf.cast(epochs, tf.int64), tf.cast(steps, tf.int64), tf.cast(offsets, tf.int32)),
      fn_output_signature=tf.TensorSpec([count // 2], tf.float32))
  shape = tf.shape(images)
  pairs = tf.reshape(images, [shape[0], count // 2, 2, *images.shape[2:]])
  first, second = pairs[:, :, 0], pairs[:, :, 1]
  w = tf.reshape(w, [shape[0], count // 2, 1, 1, 1])
  mixed = tf.stack([w * first + (1 - w) * second, (1 - w) * first + w * second], axis=2)
  return tf.reshape(mixed, shape)
