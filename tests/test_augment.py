"""Augmentation is a pure function of (seed, epoch, step, position in the global batch) that keeps
shapes, dtypes and the [0, 1] range, and each kind does the warp it says."""

import numpy as np
import pytest
import tensorflow as tf

from trainer.data import augment, idx
from trainer.data.pipeline import normalize_images

from helpers import MNIST_DIR

BATCH = 8
WARPS = ("shift", "affine", "elastic", "shift_flip")


@pytest.fixture(scope="module")
def images():
  test_images, _ = idx.load_split(MNIST_DIR, "test")
  return normalize_images(test_images[:BATCH]).numpy()


def _views(images, kind, seed=1, epoch=0, step=0, offset=0, global_batch=BATCH):
  rows = tf.constant(images)[None]
  out = augment.augment_batches(rows, kind, seed, tf.constant([epoch]), tf.constant([step]),
                                tf.constant([offset]), global_batch)
  return out[0].numpy()


@pytest.mark.parametrize("kind", WARPS)
def test_views_are_a_function_of_seed_epoch_and_step(images, kind):
  first = _views(images, kind)
  np.testing.assert_array_equal(first, _views(images, kind))
  assert first.shape == images.shape and first.dtype == np.float32
  assert first.min() >= 0.0 and first.max() <= 1.0
  for other in (dict(step=1), dict(epoch=1), dict(seed=2)):
    changed = _views(images, kind, **other)
    new = sum(np.abs(changed[i] - first[i]).max() > 0 for i in range(BATCH))
    # continuous draws never repeat; a shift is one of 25 (50 with mirrors), so some may repeat
    assert new >= (BATCH // 2 if kind.startswith("shift") else BATCH), other


@pytest.mark.parametrize("kind", WARPS)
def test_a_view_depends_on_the_position_in_the_global_batch_not_on_the_split(images, kind):
  """Two replicas' halves (offsets 0 and 4 of a global batch of 8) get the views one replica
  gets for the whole batch, also when both halves are rows of one call."""
  whole = _views(images, kind)
  halves = augment.augment_batches(
      tf.constant(images.reshape(2, BATCH // 2, 28, 28, 1)), kind, 1, tf.constant([0, 0]),
      tf.constant([0, 0]), tf.constant([0, BATCH // 2]), BATCH).numpy()
  np.testing.assert_array_equal(halves.reshape(whole.shape), whole)


def test_none_returns_the_images_unchanged(images):
  np.testing.assert_array_equal(_views(images, "none"), images)


def test_shift_moves_whole_pixels_by_at_most_two(images):
  views = _views(images, "shift", step=3)
  moved = 0
  for view, image in zip(views, images[..., 0]):
    padded = np.pad(image, 2)
    matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
               if np.array_equal(view[..., 0], padded[2 - dy:30 - dy, 2 - dx:30 - dx])]
    assert matches, "a shift view is not the image translated by whole pixels"
    moved += (0, 0) not in matches
  assert moved >= BATCH // 2


def test_shift_flip_is_the_shift_view_mirrored_left_right_for_about_half_the_images(images):
  """Same draws as `shift`, so each view is the shift view or exactly its mirror image."""
  many = np.concatenate([images] * 8)  # 64 positions of one global batch
  rows = tf.constant(many)[None]
  args = (3, tf.constant([2]), tf.constant([5]), tf.constant([0]), len(many))
  mirrored = augment.augment_batches(rows, "shift_flip", *args)[0].numpy()
  shifted = augment.augment_batches(rows, "shift", *args)[0].numpy()
  flips = 0
  for view, plain in zip(mirrored, shifted):
    if np.array_equal(view, plain):
      continue
    np.testing.assert_array_equal(view, plain[:, ::-1])
    flips += 1
  assert 16 <= flips <= 48  # Binomial(64, 1/2): outside this range p < 1e-4


def test_own_bilinear_sampler_matches_image_projective_transform(images):
  """The elastic kind resamples with its own bilinear sampler; on the affine map alone it must
  agree with TensorFlow's kernel that the affine kind uses (zero fill outside included)."""
  params = tf.random.stateless_uniform([BATCH, 4], [3, 4])
  transforms = augment._affine_transforms(params, 28, 28, shift_only=False)
  reference = tf.raw_ops.ImageProjectiveTransformV3(
      images=images, transforms=transforms, output_shape=[28, 28], fill_value=0.0,
      interpolation="BILINEAR", fill_mode="CONSTANT")
  ys, xs = tf.meshgrid(tf.range(28.0), tf.range(28.0), indexing="ij")
  t = transforms[:, :, None, None]
  mine = augment.bilinear_sample(images, t[:, 0] * xs + t[:, 1] * ys + t[:, 2],
                                 t[:, 3] * xs + t[:, 4] * ys + t[:, 5])
  assert float(tf.reduce_max(tf.abs(reference - images))) > 0.5  # the warp moved the digits
  np.testing.assert_allclose(mine.numpy(), reference.numpy(), rtol=0, atol=1e-5)


def test_affine_keeps_the_digit_near_the_centre_and_its_ink(images):
  views = _views(images, "affine", step=5)
  ink, ink_views = images.sum(axis=(1, 2, 3)), views.sum(axis=(1, 2, 3))
  # scale within [0.9, 1.1] changes the area by at most ~21%; nothing leaves the 28x28 frame
  assert np.all(np.abs(ink_views / ink - 1.0) < 0.3)
  assert not np.allclose(views, images)


def test_the_flag_offers_exactly_the_kinds_implemented():
  from trainer import flags
  assert flags.AUGMENTATIONS == augment.KINDS


def test_unknown_kind_is_rejected():
  with pytest.raises(ValueError, match="unknown augmentation"):
    augment.check_kind("mixup")


def test_the_shipped_recipe_augments_with_the_online_teacher():
  from trainer.flags import parse_argv

  from helpers import REPO
  settings = parse_argv(["mnist-distill", f"--flagfile={REPO}/configs/consistent.flags"])
  assert settings.augment != "none" and settings.teacher_logits == "online"
  assert any(s.alpha == 0 for s in settings.students)  # the augmented labels-only control
  assert any(s.alpha > 0 for s in settings.students)


def test_elastic_field_is_the_gaussian_blur_of_the_noise():
  """The blur runs as two matrix products; a depthwise convolution with the normalized
  Gaussian taps (zero padding) is the reference."""
  field = tf.random.stateless_uniform([3, 28 * 28 * 2], [5, 6])
  sigma = augment.ELASTIC_SIGMA
  radius = int(np.ceil(3 * sigma))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps = (taps / taps.sum()).astype(np.float32)
  noise = tf.reshape(field * 2.0 - 1.0, [3, 28, 28, 2])
  along_y = np.tile(taps.reshape(-1, 1, 1, 1), [1, 1, 2, 1])
  along_x = np.tile(taps.reshape(1, -1, 1, 1), [1, 1, 2, 1])
  reference = tf.nn.depthwise_conv2d(noise, along_y, [1, 1, 1, 1], "SAME")
  reference = tf.nn.depthwise_conv2d(reference, along_x, [1, 1, 1, 1], "SAME")
  got = augment._elastic_field(field, 28, 28)
  np.testing.assert_allclose(got.numpy(), reference.numpy() * augment.ELASTIC_ALPHA, atol=1e-4)
  assert 0.5 < float(tf.math.reduce_std(got)) < 5.0  # pixels: a visible, not wild, distortion
