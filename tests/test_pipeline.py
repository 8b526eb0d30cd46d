"""The tf.data pipeline serves exactly the batches its data order says, whatever the gathering
granularity: across epochs, from a resume step, split over replicas and workers, and in eval."""

import numpy as np
import pytest
import tensorflow as tf

from helpers import MNIST_DIR
from trainer import idx
from trainer.pipeline import ArrayPipeline, epoch_order

EXAMPLES, BATCH = 300, 32  # 9 full batches an epoch, 12 examples dropped; 18 batches > 16


@pytest.fixture(scope="module")
def arrays():
  images, labels = idx.load_split(MNIST_DIR, "test")
  extras = np.arange(EXAMPLES * 10, dtype=np.float32).reshape(EXAMPLES, 10)
  return images[:EXAMPLES], labels[:EXAMPLES].astype(np.int64), extras


def _batches(dataset_fn, context=None):
  return [tuple(t.numpy() for t in batch) for batch in dataset_fn(context)]


def _expected(arrays, indices):
  images, labels, extras = arrays
  return (images[indices].astype(np.float32)[..., None] / 255.0, labels[indices], extras[indices])


def _assert_batch(got, want):
  np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-7)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_array_equal(got[2], want[2])


def _global_order(seed, epochs):
  return np.concatenate([epoch_order(EXAMPLES, seed, e)[:9 * BATCH] for e in range(epochs)])


def test_training_batches_follow_the_epoch_orders_and_resume_mid_run(arrays):
  pipeline = ArrayPipeline(*arrays[:2], BATCH, 1, arrays[2])
  order = _global_order(seed=3, epochs=2)
  whole = _batches(pipeline.train_fn(seed=3, epoch=0, end_epoch=2))
  assert len(whole) == 18
  for step, got in enumerate(whole):
    _assert_batch(got, _expected(arrays, order[step * BATCH:(step + 1) * BATCH]))
  resumed = _batches(pipeline.train_fn(seed=3, epoch=0, start_step=5, end_epoch=2))
  assert len(resumed) == 13
  for got, want in zip(resumed, whole[5:]):
    _assert_batch(got, want)


@pytest.mark.parametrize("workers,local", [(2, 1), (1, 2)])
def test_replicas_get_their_part_of_each_global_batch(arrays, workers, local):
  """Two workers with one replica each, or one worker with two replicas (elements go to the
  local replicas in turn): replica r of step s gets the r-th half of global batch s."""
  pipeline = ArrayPipeline(*arrays[:2], BATCH, 2, arrays[2])
  order = _global_order(seed=0, epochs=1)
  half = BATCH // 2
  for worker in range(workers):
    context = tf.distribute.InputContext(num_input_pipelines=workers, input_pipeline_id=worker,
                                         num_replicas_in_sync=2)
    batches = _batches(pipeline.train_fn(seed=0, epoch=0), context)
    assert len(batches) == 9 * local
    for i, got in enumerate(batches):
      step, replica = divmod(i, local)
      replica += worker * local
      first = step * BATCH + replica * half
      _assert_batch(got, _expected(arrays, order[first:first + half]))


def test_evaluation_covers_every_example_once_in_order(arrays):
  pipeline = ArrayPipeline(*arrays[:2], BATCH, 1, arrays[2])
  batches = _batches(pipeline.eval_fn())
  assert [len(b[1]) for b in batches] == [BATCH] * 9 + [EXAMPLES - 9 * BATCH]
  _assert_batch(tuple(np.concatenate(parts) for parts in zip(*batches)),
                _expected(arrays, np.arange(EXAMPLES)))
