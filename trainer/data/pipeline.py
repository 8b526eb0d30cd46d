"""tf.data input pipelines over in-memory arrays, sharded by hand for tf.distribute.

Each epoch's order is a seeded permutation of example indices; the pipeline slices it into global
batches and each replica gathers its own contiguous part. That makes the data order a pure
function of (seed, epoch, step), which is what exact resume after preemption needs, and makes N
replicas see exactly the global batch one device would see. Images stay uint8 until after the
gather, then are normalized as a whole batch.

Training elements are gathered GATHER_BATCHES batches at a time and unbatched: tf.data's fixed
cost per element of a parallel map (a function call, a thread handoff, autotune bookkeeping)
is then paid once per 16 batches. At the student's batch 32 that cost was 13% of the step.

Training batches may be augmented (trainer/data/augment.py) inside the same map call, keyed by
(seed, epoch, step) and each image's position in its global batch, so resume stays exact. The
augmented batch is the one element every consumer of a step reads: a teacher run online on
data[0] sees exactly the student's view. A student may also have its training images mixed
in pairs (trainer/data/mixup.py), after augmentation, keyed the same way. Evaluation batches are
never augmented or mixed.
"""

import numpy as np
import tensorflow as tf

from trainer.data import augment as augmentation
from trainer.data import mixup as mixing
from trainer.errors import UsageError

GATHER_BATCHES = 16  # per-replica batches gathered by one training map call
# The map functions below branch on Python values only: tf.data need not run AutoGraph on them
# (it would transpile them and the augmentation they call at every run's start).
_unconverted = tf.autograph.experimental.do_not_convert


def normalize_images(images):
  """uint8 [...,28,28] -> float32 [...,28,28,1] in [0, 1]."""
  return tf.expand_dims(tf.cast(images, tf.float32) * (1.0 / 255.0), -1)


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of one epoch: depends only on the seed and the epoch number."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int32)


class ArrayPipeline:
  """Serves (image, label[, teacher_logits]) batches of in-memory arrays to a strategy."""

  def __init__(self, images, labels, global_batch_size, num_replicas, extras=None,
               augment="none", mixup=0.0):
    """`augment`: a trainer.data.augment kind applied to training batches (train_fn) only; `mixup`:
    the Beta concentration of trainer.data.mixup's pairs (0: off), training batches only."""
    if global_batch_size % num_replicas:
      raise UsageError(f"--batch_size={global_batch_size} must be a multiple of the "
                       f"{num_replicas} replicas")
    if mixup and (global_batch_size // num_replicas) % 2:
      raise UsageError(f"mixup pairs the images of each replica's batch: --batch_size="
                       f"{global_batch_size} over {num_replicas} replicas gives an odd "
                       f"{global_batch_size // num_replicas}")
    self.num_examples = len(labels)
    self.global_batch_size = global_batch_size
    self.per_replica_batch_size = global_batch_size // num_replicas
    self.augment = augmentation.check_kind(augment)
    self.mixup = mixing.check_concentration(mixup)
    if augment != "none" and extras is not None:
      raise UsageError(f"--augment={augment} needs --teacher_logits=online: cached teacher "
                       "logits belong to the unaugmented images")
    if mixup and extras is not None:
      raise UsageError("mixup needs --teacher_logits=online: cached teacher logits belong to "
                       "the unmixed images")
    self._tensors = [tf.constant(images), tf.constant(labels)]
    if extras is not None:
      self._tensors.append(tf.constant(extras, tf.float32))

  @property
  def steps_per_epoch(self) -> int:
    """Training steps per epoch: partial batches are dropped so every step has one shape."""
    return self.num_examples // self.global_batch_size

  def train_fn(self, seed: int, epoch: int, start_step: int = 0, end_epoch: int = None):
    """dataset_fn for `distribute_datasets_from_function`: epochs [epoch, end_epoch) back to
    back, starting at `start_step` of the first. One iterator then serves a whole training run:
    creating and destroying one per epoch costs up to a second each on a busy CPU."""
    usable = self.steps_per_epoch * self.global_batch_size
    end_epoch = epoch + 1 if end_epoch is None else end_epoch
    order = np.concatenate([epoch_order(self.num_examples, seed, e)[:usable]
                            for e in range(epoch, end_epoch)])
    order = order[start_step * self.global_batch_size:]
    return self._dataset_fn(order, GATHER_BATCHES, augment_from=(seed, epoch, start_step))

  def eval_fn(self):
    """dataset_fn covering every example once, in order; the last batch may be partial."""
    return self._dataset_fn(np.arange(self.num_examples, dtype=np.int32), 1)

  def _dataset_fn(self, order: np.ndarray, batches_per_gather: int, augment_from=None):
    """Per-replica batches of `order`, `batches_per_gather` gathered at once (> 1 only when
    every batch is full, as in training). `augment_from` = (seed, epoch, step) of the first
    batch: augment the batches with self.augment and mix them by self.mixup (training only)."""
    kind = self.augment if augment_from is not None else "none"
    mixup = self.mixup if augment_from is not None else 0.0
    if (kind != "none" or mixup) and batches_per_gather == 1:
      raise ValueError("augmentation needs full batches gathered by gather_full_batches")
    seed, first_epoch, first_step = augment_from or (0, 0, 0)
    steps_per_epoch = self.steps_per_epoch
    order = tf.constant(order, tf.int32)
    total = int(order.shape[0])
    global_batch, per_replica = self.global_batch_size, self.per_replica_batch_size
    steps = -(-total // global_batch)
    tensors = self._tensors

    def dataset_fn(input_context: tf.distribute.InputContext = None):
      workers = input_context.num_input_pipelines if input_context else 1
      worker = input_context.input_pipeline_id if input_context else 0
      replicas = input_context.num_replicas_in_sync if input_context else 1
      local = replicas // workers

      def first_example(row):  # row: this worker's (step, local replica) in sequence
        step, local_replica = row // local, row % local
        return step * global_batch + (worker * local + local_replica) * per_replica

      def gather(row):
        start = tf.minimum(first_example(row), total)
        end = tf.minimum(start + per_replica, total)
        index = order[start:end]
        batch = [tf.gather(t, index) for t in tensors]
        batch[0] = normalize_images(batch[0])
        return tuple(batch)

      def positions(rows):  # (epoch, step, offset in the global batch) of each row
        absolute = first_step + rows // local  # steps since the start of first_epoch
        offsets = (worker * local + rows % local) * per_replica
        return (first_epoch + absolute // steps_per_epoch, absolute % steps_per_epoch,
                offsets)

      def gather_full_batches(first_row):
        rows = tf.range(first_row, tf.minimum(first_row + batches_per_gather, steps * local))
        index = tf.gather(order, first_example(rows)[:, None]
                          + tf.range(per_replica, dtype=tf.int64)[None, :])
        batches = [tf.gather(t, index) for t in tensors]  # [rows, per_replica, ...]
        batches[0] = normalize_images(batches[0])
        if kind != "none":  # images [rows, per_replica, 28, 28, 1]
          batches[0] = augmentation.augment_batches(batches[0], kind, seed, *positions(rows),
                                                    global_batch)
        if mixup:
          batches[0] = mixing.mix_batches(batches[0], mixup, seed, *positions(rows),
                                          global_batch)
        return tuple(batches)

      if batches_per_gather > 1:
        ds = tf.data.Dataset.range(0, steps * local, batches_per_gather)
        ds = ds.map(_unconverted(gather_full_batches), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
        ds = ds.unbatch()
      else:
        ds = tf.data.Dataset.range(steps * local)
        ds = ds.map(_unconverted(gather), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      options = tf.data.Options()
      options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
      return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

    return dataset_fn
