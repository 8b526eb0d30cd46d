"""Seeded, in-graph augmentation of training batches: a pure function of (seed, epoch, step).

Every random number comes from stateless Philox draws keyed by (seed, epoch, step) and taken for
the whole global batch, each image reading the row of its position in that batch. So a view
depends neither on how many replicas or workers share the batch nor on how many batches one
tf.data call gathers, and a run resumed at any step sees exactly the views an uninterrupted
run sees. No random state lives anywhere, so nothing needs checkpointing.

Kinds (`KINDS`); shift, affine and elastic each a superset of the one before:
  shift    whole-pixel translations of up to MAX_SHIFT pixels (Hinton et al.'s "jittered"
           MNIST); nearest-neighbour, so pixel values are copied, never blended.
  shift_flip  the shift, then a left-right mirror of half the images: the usual augmentation
           of Fashion-MNIST's clothes, whose mirror images are clothes of the same class;
           never for digits, whose mirror images are other symbols.
  affine   one warp per image: rotation, isotropic scaling and sub-pixel translation about the
           centre, bilinear, zero outside the image.
  elastic  the affine warp plus Simard et al.'s (2003) elastic distortion: a uniform random
           displacement field smoothed by a Gaussian and scaled; one bilinear resampling of
           the composed map, so the image is interpolated once, not twice.
"""

import math

import tensorflow as tf

from trainer.data import options

KINDS = options.AUGMENTATIONS
MAX_SHIFT = 2.0  # pixels, in x and in y
MAX_ROTATION = math.radians(12.0)
MAX_SCALE_CHANGE = 0.1  # scale in [0.9, 1.1]
ELASTIC_ALPHA = 34.0  # Simard et al.'s values for 28x28 digits
ELASTIC_SIGMA = 4.0
_ALG = "philox"  # fixed: 'auto_select' may pick a different generator on another device
_SALT = 0x5EED  # keeps augmentation keys apart from any other use of the same seed
_PARAMS = 4  # uniform draws per image: dx, dy, rotation (or mirror), scale


def check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"unknown augmentation {kind!r}: expected one of {', '.join(KINDS)}")
  return kind


def step_key(seed, epoch, step):
  """The stateless RNG key of one global training step."""
  key = tf.stack([tf.cast(seed, tf.int64), tf.constant(_SALT, tf.int64)])
  key = tf.random.fold_in(key, tf.cast(epoch, tf.int64), alg=_ALG)
  return tf.random.fold_in(key, tf.cast(step, tf.int64), alg=_ALG)


def _step_draws(key, global_batch, offset, count, image_shape, elastic):
  """Uniform [0, 1) draws of `count` images from position `offset` of one global batch."""
  params = tf.random.stateless_uniform([global_batch, _PARAMS], key, alg=_ALG)
  params = params[offset:offset + count]
  if not elastic:
    return params, tf.zeros([count, 0], tf.float32)
  field_key = tf.random.fold_in(key, 1, alg=_ALG)
  field = tf.random.stateless_uniform([global_batch, image_shape[0] * image_shape[1] * 2],
                                      field_key, alg=_ALG)
  return params, field[offset:offset + count]


def _affine_transforms(params, height, width, shift_only, mirror=False):
  """[n, 8] ImageProjectiveTransform rows mapping each output pixel to its input point."""
  u = params * 2.0 - 1.0  # [-1, 1)
  dx, dy = u[:, 0] * MAX_SHIFT, u[:, 1] * MAX_SHIFT
  if shift_only:
    dx, dy = tf.round(dx), tf.round(dy)
    one, zero = tf.ones_like(dx), tf.zeros_like(dx)
    if not mirror:
      return tf.stack([one, zero, -dx, zero, one, -dy, zero, zero], axis=1)
    # Mirrored after the shift: output x reads input (width - 1 - x) - dx. The rotation draw,
    # unused by shifts, decides, so plain shift views keep their draws.
    flip = u[:, 2] < 0.0
    ax = tf.where(flip, -one, one)
    bx = tf.where(flip, (width - 1) - dx, -dx)
    return tf.stack([ax, zero, bx, zero, one, -dy, zero, zero], axis=1)
  angle = u[:, 2] * MAX_ROTATION
  scale = 1.0 + u[:, 3] * MAX_SCALE_CHANGE
  # Output point p = s R(angle) (q - c) + c + d for input point q, hence
  # q = A (p - c - d) + c with A = R(-angle) / s.
  cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
  cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
  px, py = cx + dx, cy + dy
  a0, a1, b0, b1 = cos, sin, -sin, cos
  a2 = cx - (a0 * px + a1 * py)
  b2 = cy - (b0 * px + b1 * py)
  zero = tf.zeros_like(dx)
  return tf.stack([a0, a1, a2, b0, b1, b2, zero, zero], axis=1)


def _blur_matrix(size, sigma):
  """[size, size] matrix whose product with a signal is its Gaussian blur with zero padding.
  Two small matmuls blur a batch of fields several times faster than a depthwise convolution
  with the same 25 taps on CPUs."""
  offsets = tf.range(size, dtype=tf.float32)
  distance = offsets[:, None] - offsets[None, :]
  radius = math.ceil(3 * sigma)
  taps = tf.exp(-0.5 * (tf.range(-radius, radius + 1, dtype=tf.float32) / sigma) ** 2)
  weights = tf.exp(-0.5 * (distance / sigma) ** 2) / tf.reduce_sum(taps)
  return tf.where(tf.abs(distance) <= radius, weights, 0.0)


def _elastic_field(field, height, width):
  """[n, h*w*2] uniform [0, 1) draws -> [n, h, w, 2] smooth (dx, dy) displacements."""
  noise = tf.reshape(field * 2.0 - 1.0, [-1, height, width, 2])
  smooth = tf.einsum("ij,njwc->niwc", _blur_matrix(height, ELASTIC_SIGMA), noise)
  smooth = tf.einsum("vw,nhwc->nhvc", _blur_matrix(width, ELASTIC_SIGMA), smooth)
  return smooth * ELASTIC_ALPHA


def bilinear_sample(images, x, y):
  """images [n, h, w, 1] read at input points (x, y) [n, h, w] bilinearly, zero outside."""
  shape = tf.shape(images)
  n, height, width = shape[0], shape[1], shape[2]
  flat = tf.reshape(images, [n, height * width])
  x0, y0 = tf.floor(x), tf.floor(y)
  wx, wy = x - x0, y - y0

  def tap(xi, yi):
    inside = ((xi >= 0) & (xi <= tf.cast(width - 1, tf.float32))
              & (yi >= 0) & (yi <= tf.cast(height - 1, tf.float32)))
    index = (tf.clip_by_value(tf.cast(yi, tf.int32), 0, height - 1) * width
             + tf.clip_by_value(tf.cast(xi, tf.int32), 0, width - 1))
    values = tf.gather(flat, tf.reshape(index, [n, -1]), batch_dims=1)
    return tf.where(inside, tf.reshape(values, tf.shape(x)), 0.0)

  out = ((1 - wx) * (1 - wy) * tap(x0, y0) + wx * (1 - wy) * tap(x0 + 1, y0)
         + (1 - wx) * wy * tap(x0, y0 + 1) + wx * wy * tap(x0 + 1, y0 + 1))
  return out[..., None]


def warp(images, params, field, kind):
  """Applies `kind` to float images [n, h, w, 1] given their draws (see _step_draws)."""
  height, width = int(images.shape[1]), int(images.shape[2])
  whole_pixels = kind in ("shift", "shift_flip")
  transforms = _affine_transforms(params, height, width, shift_only=whole_pixels,
                                  mirror=kind == "shift_flip")
  if kind in ("shift", "shift_flip", "affine"):
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=[height, width],
        fill_value=0.0, interpolation="NEAREST" if whole_pixels else "BILINEAR",
        fill_mode="CONSTANT")
  # elastic: input point = affine(output point + displacement)
  ys, xs = tf.meshgrid(tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32),
                       indexing="ij")
  shift = _elastic_field(field, height, width)
  px, py = xs[None] + shift[..., 0], ys[None] + shift[..., 1]
  t = transforms[:, :, None, None]
  return bilinear_sample(images, t[:, 0] * px + t[:, 1] * py + t[:, 2],
                         t[:, 3] * px + t[:, 4] * py + t[:, 5])


def augment_batches(images, kind, seed, epochs, steps, offsets, global_batch):
  """Augments per-replica batches `images` [rows, b, h, w, 1] (float, [0, 1]).

  Row r belongs to global step (epochs[r], steps[r]) and starts at position offsets[r] of that
  step's global batch. Returns a tensor of the same shape, dtype and value range."""
  check_kind(kind)
  if kind == "none":
    return images
  count = int(images.shape[1])
  image_shape = (int(images.shape[2]), int(images.shape[3]))
  elastic = kind == "elastic"

  def draws(row):
    epoch, step, offset = row
    return _step_draws(step_key(seed, epoch, step), global_batch, offset, count, image_shape,
                       elastic)

  field_width = image_shape[0] * image_shape[1] * 2 if elastic else 0
  params, field = tf.map_fn(
      draws, (tf.cast(epochs, tf.int64), tf.cast(steps, tf.int64), tf.cast(offsets, tf.int32)),
      fn_output_signature=(tf.TensorSpec([count, _PARAMS], tf.float32),
                           tf.TensorSpec([count, field_width], tf.float32)))
  flat = tf.reshape(images, [-1, *image_shape, int(images.shape[4])])
  views = warp(flat, tf.reshape(params, [-1, _PARAMS]), tf.reshape(field, [-1, field_width]),
               kind)
  return tf.reshape(views, tf.shape(images))
