"""A teacher trained anywhere, loaded from a local `.keras` / `.h5` file or a SavedModel folder.

Such a model is checked before any training, because a wrong one would only show as a student
that learns nothing: it loads, its input takes 28x28 grayscale images ([N,28,28,1] or [N,28,28]),
its output has 10 units, and two inference calls on the same batch agree. Its output may be
logits or probabilities; probabilities are detected (non-negative rows that sum to 1) and turned
into log-probabilities, which give exactly the soft targets the logits would:
softmax(log p / T) = p^(1/T) / sum(p^(1/T)) = softmax(z / T) whenever p = softmax(z).

The job's images are float32 in [0, 1]; a teacher trained on 0..255 pixel values is told so with
`input_range="0-255"` (nothing in a model file says which scale it was trained on).
"""

import dataclasses
import hashlib
import os

import keras
import numpy as np
import tensorflow as tf

from trainer.errors import UsageError

INPUT_RANGES = {"0-1": 1.0, "0-255": 255.0}  # pixel scale the teacher was trained on
NUM_CLASSES = 10
SUM_TOLERANCE = 1e-3  # softmax rows in float16 or float32 sum to 1 well within this
REPEAT_TOLERANCE = 1e-5  # inference is repeatable to float rounding; dropout is off by O(1)
PROBE_EXAMPLES = 32
TINY = float(np.finfo(np.float32).tiny)  # log(0) -> log(tiny): finite, and no larger than
                                         # what float32 underflow already lost


@dataclasses.dataclass(frozen=True)
class OutsideTeacher:
  """A loaded, checked teacher: `model` maps float32 [N,28,28,1] in [0,1] to logits-equivalent
  float32 [N,10] (the Distiller's `teacher`)."""

  model: keras.Model
  source: str
  kind: str  # "keras", "h5" or "savedmodel"
  sha256: str  # of the file, or of every file in the SavedModel folder
  input_range: str
  output: str  # "logits" or "probabilities" (then used as log-probabilities)

  @property
  def description(self) -> str:
    used = " (used as log-probabilities)" if self.output == "probabilities" else ""
    return (f"outside teacher {self.source} ({self.kind}, sha256 {self.sha256[:12]}): "
            f"{self.model.count_params():,} params, input in {self.input_range}, "
            f"outputs {self.output}{used}")

  def record(self) -> dict:
    """What results.json and each student's settings keep about the teacher."""
    return {"trained_here": False, "source": self.source, "format": self.kind,
            "sha256": self.sha256, "input_range": self.input_range, "output": self.output,
            "params": int(self.model.count_params())}


class _TeacherAdapter(keras.Model):
  """Puts the job's images into the outside model's layout and scale and its outputs into
  logits-equivalent form. Always runs the model in inference mode: a teacher never trains."""

  def __init__(self, net, channel_axis: bool, scale: float, probabilities: bool, **kwargs):
    # float32 even under a mixed precision policy
    super().__init__(dtype="float32", name="outside_teacher", **kwargs)
    self.net = net
    self.channel_axis = channel_axis
    self.scale = scale
    self.probabilities = probabilities

  def call(self, images, training=False):
    del training  # the outside model always runs in inference mode
    x = images if self.channel_axis else tf.squeeze(images, axis=-1)
    if self.scale != 1.0:
      x = x * self.scale
    out = tf.cast(_single_output(self.net(x, training=False)), tf.float32)
    return tf.math.log(tf.maximum(out, TINY)) if self.probabilities else out


class _SeveralOutputs(ValueError):
  pass


def _single_output(out):
  """The one tensor of a model's output (SavedModel signatures return {name: tensor})."""
  if isinstance(out, dict):
    out = list(out.values())
  if isinstance(out, (list, tuple)):
    if len(out) != 1:
      raise _SeveralOutputs(f"has {len(out)} outputs, expected one")
    out = out[0]
  return out


def file_digest(path: str) -> str:
  """sha256 of a file, or of every relative path and content under a folder."""
  digest = hashlib.sha256()
  if os.path.isfile(path):
    paths = [path]
  else:
    paths = sorted(os.path.join(root, name) for root, _, files in os.walk(path) for name in files)
  for file_path in paths:
    if os.path.isdir(path):
      digest.update(os.path.relpath(file_path, path).encode() + b"\0")
    with open(file_path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  return digest.hexdigest()


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _load(path: str, fail):
  """(net, kind, declared input shape or None) for a Keras file or a SavedModel folder."""
  if os.path.isdir(path):
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
      fail("does not load: a folder without saved_model.pb is not a SavedModel")
    try:
      reloaded = tf.saved_model.load(path)
    except Exception as e:  # any parse or version error of the SavedModel
      fail(f"does not load as a SavedModel ({_first_line(e)})")
    # model.export() writes a "serve" endpoint; tf.saved_model.save a serving_default signature.
    endpoint = next((name for name in ("serve", "serving_default")
                     if hasattr(reloaded, name) or name in reloaded.signatures), None)
    if endpoint is None:
      fail(f"SavedModel has no 'serve' or 'serving_default' endpoint "
           f"(it has {sorted(reloaded.signatures)})")
    declared = None
    if endpoint in reloaded.signatures:
      specs = reloaded.signatures[endpoint].structured_input_signature
      flat = tf.nest.flatten(specs)
      if len(flat) != 1:
        fail(f"SavedModel endpoint {endpoint!r} takes {len(flat)} inputs, expected one image batch")
      declared = flat[0]
    try:
      return keras.layers.TFSMLayer(path, call_endpoint=endpoint, trainable=False), \
          "savedmodel", declared
    except Exception as e:
      fail(f"does not load as a SavedModel ({_first_line(e)})")
  kind = {".keras": "keras", ".h5": "h5", ".hdf5": "h5"}.get(os.path.splitext(path)[1].lower())
  if not os.path.isfile(path):
    fail("does not exist")
  if kind is None:
    fail("is neither a .keras or .h5 file nor a SavedModel folder")
  try:
    net = keras.models.load_model(path, compile=False)
  except Exception as e:  # corrupt zip or HDF5, unknown layers, unsafe lambdas...
    fail(f"does not load as a Keras model ({_first_line(e)})")
  inputs = getattr(net, "inputs", None) or []
  if len(inputs) > 1:
    fail(f"takes {len(inputs)} inputs, expected one image batch")
  declared = tf.TensorSpec(tuple(inputs[0].shape), inputs[0].dtype) if inputs else None
  return net, kind, declared


def _layout(declared, fail):
  """True for [N,28,28,1], False for [N,28,28], None when the model declares no shape."""
  if declared is None or declared.shape.rank is None:
    return None
  dims = list(declared.shape)[1:]
  for channel_axis, expected in ((True, [28, 28, 1]), (False, [28, 28])):
    if len(dims) == len(expected) and all(d is None or d == e for d, e in zip(dims, expected)):
      if not declared.dtype.is_floating:
        fail(f"input is {declared.dtype.name}, expected float images")
      return channel_axis
  fail(f"input is {list(declared.shape)}, expected [N,28,28,1] or [N,28,28]")


def default_probe_images() -> np.ndarray:
  """A fixed uint8 batch for the checks when no real images are at hand."""
  return np.random.default_rng(0).integers(0, 256, (PROBE_EXAMPLES, 28, 28), dtype=np.uint8)


def load_teacher(path: str, input_range: str = "0-1", probe_images=None) -> OutsideTeacher:
  """Loads and checks an outside teacher; raises UsageError with one line naming the failed
  check. `probe_images` (uint8 [N,28,28], e.g. a few test images) feed the checks."""
  def fail(reason):
    raise UsageError(f"teacher model {path}: {reason}")

  if input_range not in INPUT_RANGES:
    raise UsageError(f"teacher input range {input_range!r} is not one of {sorted(INPUT_RANGES)}")
  net, kind, declared = _load(path, fail)
  channel_axis = _layout(declared, fail)
  probe = default_probe_images() if probe_images is None else np.asarray(probe_images)
  batch = tf.constant(probe[..., None].astype(np.float32) / 255.0)

  def run(layout, probabilities=False):
    adapter = _TeacherAdapter(net, layout, INPUT_RANGES[input_range], probabilities)
    return adapter, adapter(batch).numpy()

  layouts = [channel_axis] if channel_axis is not None else [True, False]
  errors = []
  for layout in layouts:
    try:
      adapter, first = run(layout)
      break
    except _SeveralOutputs as e:
      fail(str(e))
    except Exception as e:  # shape or dtype mismatch inside the model, several outputs, ...
      errors.append(_first_line(e))
  else:
    fail(f"fails on a [N,28,28,1] / [N,28,28] float batch ({errors[-1]})")
  if first.ndim != 2 or first.shape[0] != len(probe):
    fail(f"output is {list(first.shape)}, expected [N,{NUM_CLASSES}]")
  if first.shape[1] != NUM_CLASSES:
    fail(f"output has {first.shape[1]} units, expected {NUM_CLASSES}")
  if not np.all(np.isfinite(first)):
    fail("output is not finite on the probe batch")
  second = adapter(batch).numpy()
  spread = float(np.max(np.abs(second - first)))
  if spread > REPEAT_TOLERANCE * max(1.0, float(np.max(np.abs(first)))):
    fail(f"is not deterministic in inference mode (two calls on the same batch differ by "
         f"{spread:.3g}; is dropout or noise on at inference?)")
  probabilities = bool(np.all(first >= 0.0) and
                       np.all(np.abs(first.sum(axis=-1) - 1.0) <= SUM_TOLERANCE))
  if probabilities:
    adapter, _ = run(adapter.channel_axis, probabilities=True)
  adapter.trainable = False
  return OutsideTeacher(model=adapter, source=path, kind=kind, sha256=file_digest(path),
                        input_range=input_range,
                        output="probabilities" if probabilities else "logits")
