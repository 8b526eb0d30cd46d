"""Mixup for function matching (trainer/data/mixup.py): pairs of one global batch, seeded by
(seed, epoch, step), training batches only, the same view for an online teacher and the student."""

import numpy as np
import pytest
import tensorflow as tf

from trainer.data import idx, mixup
from trainer.data.pipeline import ArrayPipeline
from trainer.errors import UsageError
from trainer.job import provenance

from helpers import MNIST_DIR
from inprocess import parse

EXAMPLES, BATCH = 300, 32  # 9 full batches an epoch; 18 over two epochs (> 16 per gather)


@pytest.fixture(scope="module")
def arrays():
  images, labels = idx.load_split(MNIST_DIR, "test")
  return images[:EXAMPLES], labels[:EXAMPLES].astype(np.int64)


def _images(dataset_fn, context=None):
  return np.stack([batch[0].numpy() for batch in dataset_fn(context)])


@pytest.fixture(scope="module")
def views(arrays):
  """Two epochs of affine-augmented then mixed batches, and the same batches unmixed."""
  mixed = ArrayPipeline(*arrays, BATCH, 1, augment="affine", mixup=1.0)
  plain = ArrayPipeline(*arrays, BATCH, 1, augment="affine")
  return (_images(mixed.train_fn(seed=3, epoch=0, end_epoch=2)),
          _images(plain.train_fn(seed=3, epoch=0, end_epoch=2)))


def _pair_weights(mixed, plain):
  """The weight w of each pair (a, b) -> (w a + (1-w) b, (1-w) a + w b), by least squares,
  and the largest residual of both mixtures under it."""
  a, b = plain[..., 0::2, :, :, :], plain[..., 1::2, :, :, :]
  first, second = mixed[..., 0::2, :, :, :], mixed[..., 1::2, :, :, :]
  d = (a - b).reshape(*a.shape[:-3], -1)
  w = ((first - b).reshape(d.shape) * d).sum(-1) / (d * d).sum(-1)
  ww = w[..., None, None, None]
  residual = max(np.abs(ww * a + (1 - ww) * b - first).max(),
                 np.abs((1 - ww) * a + ww * b - second).max())
  return w, residual


def test_each_pair_becomes_two_mirrored_mixtures_of_its_augmented_images(views):
  mixed, plain = views
  w, residual = _pair_weights(mixed, plain)
  assert residual < 1e-5  # exactly the two mixtures of the augmented pair, nothing else
  assert w.shape == (18, BATCH // 2)
  assert 0.0 <= w.min() and w.max() <= 1.0
  assert len(np.unique(np.round(w, 4))) > 0.9 * w.size  # one weight per pair, not per batch
  assert 0.0 <= mixed.min() and mixed.max() <= 1.0


def test_the_concentration_shapes_the_weights():
  """Beta(c, c): near 0 or 1 at small c, near 1/2 at large c, uniform-like at 1."""
  def weights(c):
    return np.concatenate([mixup.pair_weights(c, 7, 0, step, 256).numpy() for step in range(8)])
  small, one, large = weights(0.1), weights(1.0), weights(100.0)
  spread = lambda w: np.mean(np.abs(w - 0.5))
  assert spread(small) > 0.35 and spread(large) < 0.05
  assert 0.2 < spread(one) < 0.3  # uniform on [0, 1]: 0.25
  assert np.all(np.isfinite(small))


def test_mixing_is_a_function_of_seed_epoch_and_step():
  base = mixup.pair_weights(1.0, 3, 0, 5, 64).numpy()
  np.testing.assert_array_equal(base, mixup.pair_weights(1.0, 3, 0, 5, 64).numpy())
  for other in ((4, 0, 5), (3, 1, 5), (3, 0, 6)):
    assert np.abs(mixup.pair_weights(1.0, *other, 64).numpy() - base).max() > 0.1


def test_resumed_and_regathered_runs_mix_exactly_as_an_uninterrupted_one(arrays, views,
                                                                         monkeypatch):
  mixed, _ = views
  pipeline = ArrayPipeline(*arrays, BATCH, 1, augment="affine", mixup=1.0)
  for epoch, start_step, first in ((0, 5, 5), (1, 0, 9), (1, 4, 13)):
    np.testing.assert_array_equal(
        _images(pipeline.train_fn(seed=3, epoch=epoch, start_step=start_step, end_epoch=2)),
        mixed[first:])
  from trainer.data import pipeline as pipeline_module
  monkeypatch.setattr(pipeline_module, "GATHER_BATCHES", 3)
  regathered = ArrayPipeline(*arrays, BATCH, 1, augment="affine", mixup=1.0)
  np.testing.assert_array_equal(_images(regathered.train_fn(seed=3, epoch=0, end_epoch=2)),
                                mixed)


@pytest.mark.parametrize("workers,local", [(2, 1), (1, 2)])
def test_replicas_get_their_part_of_the_mixed_global_batch(arrays, views, workers, local):
  mixed, _ = views
  pipeline = ArrayPipeline(*arrays, BATCH, 2, augment="affine", mixup=1.0)
  half = BATCH // 2
  for worker in range(workers):
    context = tf.distribute.InputContext(num_input_pipelines=workers, input_pipeline_id=worker,
                                         num_replicas_in_sync=2)
    got = _images(pipeline.train_fn(seed=3, epoch=0, end_epoch=2), context)
    for i, batch in enumerate(got):
      step, replica = divmod(i, local)
      replica += worker * local
      np.testing.assert_array_equal(batch, mixed[step][replica * half:(replica + 1) * half])


def test_evaluation_is_never_mixed(arrays):
  mixed = ArrayPipeline(*arrays, BATCH, 1, mixup=1.0).eval_fn()
  plain = ArrayPipeline(*arrays, BATCH, 1).eval_fn()
  for got, want in zip(mixed(None), plain(None), strict=True):
    np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())


def test_the_online_teacher_sees_the_students_mixed_batch(arrays):
  """One step of an alpha=1 student: the teacher logits in its loss are the teacher's on the
  batch's mixed images, and differ from those on the unmixed ones."""
  import keras

  from trainer.modeling import models
  from trainer.modeling.distiller import Distiller
  teacher, student = models.build_teacher(seed=0), models.build_student(seed=0)
  seen = tf.Variable(tf.zeros([BATCH, 10]))

  def recording_loss(teacher_logits, student_logits, temperature):
    seen.assign(teacher_logits)
    return tf.reduce_sum(tf.square(teacher_logits - student_logits), axis=-1) / temperature

  distiller = Distiller(student, teacher=teacher)
  distiller.compile(optimizer=keras.optimizers.SGD(0.0), distillation_weight=1.0,
                    distillation_loss_fn=recording_loss)
  images, labels = next(iter(ArrayPipeline(*arrays, BATCH, 1, mixup=1.0).train_fn(seed=3,
                                                                                  epoch=0)()))
  plain, _ = next(iter(ArrayPipeline(*arrays, BATCH, 1).train_fn(seed=3, epoch=0)()))
  tf.function(distiller.train_step)((images, labels))
  np.testing.assert_allclose(seen.numpy(), teacher(images).numpy(), atol=1e-5)
  assert np.abs(teacher(plain).numpy() - seen.numpy()).max() > 1e-3


def test_pipelines_refuse_what_cannot_be_mixed(arrays):
  with pytest.raises(UsageError, match="odd 5"):
    ArrayPipeline(*arrays, 10, 2, mixup=1.0)
  with pytest.raises(UsageError, match="teacher_logits=online"):
    ArrayPipeline(*arrays, BATCH, 1, np.zeros([EXAMPLES, 10], np.float32), mixup=1.0)


@pytest.mark.parametrize("args,message", [
    (["--student=m:alpha=1,mixup=1"], "mixup needs --teacher_logits=online"),
    (["--student=m:alpha=1,mixup=1", "--teacher_logits=online", "--batch_size=33"],
     "--batch_size must be even"),
])
def test_the_cli_refuses_mixup_it_cannot_honour(args, message):
  with pytest.raises(UsageError, match=message):
    parse(args)


def test_mixup_is_recorded_only_when_on():
  """A student's record (and so its settings digest) names mixup only when it is on: runs
  recorded before mixup existed are not refused as changed."""
  on = parse(["--student=m:alpha=1,temperature=1,mixup=0.5", "--teacher_logits=online"])
  off = parse(["--student=m:alpha=1,temperature=1", "--teacher_logits=online"])
  assert on.students[0].mixup == 0.5 and off.students[0].mixup == 0.0
  record_on = provenance.student_settings(on, on.students[0], {}, "float32", "abc")
  record_off = provenance.student_settings(off, off.students[0], {}, "float32", "abc")
  assert record_on["mixup"] == 0.5 and "mixup" not in record_off
  assert {k: v for k, v in record_on.items() if k != "mixup"} == record_off
