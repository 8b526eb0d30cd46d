"""The tf.data pipeline serves exactly the batches its data order says, whatever the gathering
granularity: across epochs, from a resume step, split over replicas and workers, and in eval."""

import numpy as np
import pytest
import tensorflow as tf

from trainer.data import idx
from trainer.data.pipeline import ArrayPipeline, epoch_order
from trainer.errors import UsageError

from helpers import MNIST_DIR

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


# ---- augmentation: training batches only, a pure function of (seed, epoch, step) ----

def _images_of(batches):
  return np.stack([b[0] for b in batches])


@pytest.fixture(scope="module")
def augmented(arrays):
  """Two epochs of affine-augmented batches from one pipeline, and the same unaugmented."""
  pipeline = ArrayPipeline(*arrays[:2], BATCH, 1, augment="affine")
  plain = ArrayPipeline(*arrays[:2], BATCH, 1)
  return (pipeline, _batches(pipeline.train_fn(seed=3, epoch=0, end_epoch=2)),
          _batches(plain.train_fn(seed=3, epoch=0, end_epoch=2)))


def test_augmented_batches_keep_order_labels_shapes_and_range(augmented):
  _, views, plain = augmented
  assert len(views) == len(plain) == 18
  for got, want in zip(views, plain):
    np.testing.assert_array_equal(got[1], want[1])  # same examples, same order
    assert got[0].shape == want[0].shape and got[0].dtype == np.float32
    assert 0.0 <= got[0].min() and got[0].max() <= 1.0
    assert np.abs(got[0] - want[0]).max() > 0.5  # and really warped


def test_augmented_training_is_deterministic_and_resumes_bit_identically(arrays, augmented):
  pipeline, views, _ = augmented
  again = ArrayPipeline(*arrays[:2], BATCH, 1, augment="affine")
  np.testing.assert_array_equal(_images_of(_batches(again.train_fn(seed=3, epoch=0,
                                                                    end_epoch=2))),
                                _images_of(views))
  # resumed mid-epoch 0, and from epoch 1 (what a restart after the first epoch does)
  for epoch, start_step, first in ((0, 5, 5), (1, 0, 9), (1, 4, 13)):
    resumed = _batches(pipeline.train_fn(seed=3, epoch=epoch, start_step=start_step,
                                         end_epoch=2))
    np.testing.assert_array_equal(_images_of(resumed), _images_of(views[first:]))


def test_augmented_views_do_not_depend_on_the_gathering_granularity(arrays, augmented,
                                                                     monkeypatch):
  from trainer.data import pipeline as pipeline_module
  monkeypatch.setattr(pipeline_module, "GATHER_BATCHES", 3)
  pipeline = ArrayPipeline(*arrays[:2], BATCH, 1, augment="affine")
  np.testing.assert_array_equal(
      _images_of(_batches(pipeline.train_fn(seed=3, epoch=0, end_epoch=2))),
      _images_of(augmented[1]))


def test_an_example_gets_a_new_view_every_epoch(arrays, augmented):
  _, views, _ = augmented
  order = _global_order(seed=3, epochs=2)
  flat = _images_of(views).reshape(-1, 28, 28, 1)
  example = order[0]
  second = int(np.flatnonzero(order[9 * BATCH:] == example)[0]) + 9 * BATCH
  assert np.abs(flat[0] - flat[second]).max() > 0.1


@pytest.mark.parametrize("workers,local", [(2, 1), (1, 2)])
def test_replicas_get_their_part_of_the_augmented_global_batch(arrays, augmented, workers,
                                                               local):
  _, views, _ = augmented
  pipeline = ArrayPipeline(*arrays[:2], BATCH, 2, augment="affine")
  half = BATCH // 2
  for worker in range(workers):
    context = tf.distribute.InputContext(num_input_pipelines=workers, input_pipeline_id=worker,
                                         num_replicas_in_sync=2)
    for i, got in enumerate(_batches(pipeline.train_fn(seed=3, epoch=0, end_epoch=2),
                                     context)):
      step, replica = divmod(i, local)
      replica += worker * local
      np.testing.assert_array_equal(got[0], views[step][0][replica * half:(replica + 1) * half])


def test_evaluation_is_never_augmented(arrays):
  images, labels, _ = arrays
  augmented_eval = _batches(ArrayPipeline(images, labels, BATCH, 1, augment="elastic").eval_fn())
  plain_eval = _batches(ArrayPipeline(images, labels, BATCH, 1).eval_fn())
  for got, want in zip(augmented_eval, plain_eval):
    np.testing.assert_array_equal(got[0], want[0])


def test_cached_teacher_logits_cannot_be_augmented(arrays):
  with pytest.raises(UsageError, match="teacher_logits=online"):
    ArrayPipeline(*arrays[:2], BATCH, 1, arrays[2], augment="shift")


def test_online_teacher_and_student_see_the_same_augmented_view(arrays):
  """One distillation step on an augmented batch: the logits the loss gets from the teacher and
  the student are those of the batch's augmented images, not of the originals."""
  import keras

  from trainer.modeling import models
  from trainer.modeling.distiller import Distiller
  keras.utils.set_random_seed(0)
  teacher, student = models.build_teacher(), models.build_student()
  seen = {"teacher": tf.Variable(tf.zeros([BATCH, 10])),
          "student": tf.Variable(tf.zeros([BATCH, 10]))}

  def recording_loss(teacher_logits, student_logits, temperature):
    seen["teacher"].assign(teacher_logits)
    seen["student"].assign(student_logits)
    return tf.reduce_sum(tf.square(teacher_logits - student_logits), axis=-1) / temperature

  distiller = Distiller(student, teacher=teacher)
  distiller.compile(optimizer=keras.optimizers.SGD(0.0), distillation_loss_fn=recording_loss)
  pipeline = ArrayPipeline(*arrays[:2], BATCH, 1, augment="elastic")
  images, labels = next(iter(pipeline.train_fn(seed=3, epoch=0)()))
  tf.function(distiller.train_step)((images, labels))
  np.testing.assert_allclose(seen["teacher"].numpy(), teacher(images).numpy(), atol=1e-5)
  np.testing.assert_allclose(seen["student"].numpy(), student(images).numpy(), atol=1e-5)
  original = _expected(arrays, _global_order(seed=3, epochs=1)[:BATCH])[0]
  assert np.abs(teacher(original).numpy() - seen["teacher"].numpy()).max() > 1e-3
