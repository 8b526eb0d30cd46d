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

from trainer.data.pipeline import normalize_images
from trainer.errors import UsageError

INPUT_RANGES = {"0-1": 1.0, "0-255": 255.0}  # pixel scale the teacher was trained on
NUM_CLASSES = 10
SUM_TOLERANCE = 1e-3  # softmax rows in float16 or float32 sum to 1 well within this
REPEAT_TOLERANCE = 1e-5  # inference is repeatable to float rounding; dropout is off by O(1)
PROBE_EXAMPLES = 32
# log(0) becomes log(tiny): finite (a -inf target makes the KL NaN), changing only probabilities
# that float32 had already flushed to zero.
TINY = float(np.finfo(np.float32).tiny)


class _Rejected(Exception):
  """A failed check; load_teacher turns it into a UsageError naming the model."""


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

  def outputs_of(self, images):
    """Every output tensor of the outside model (SavedModel signatures return a dict)."""
    x = images if self.channel_axis else tf.squeeze(images, axis=-1)
    if self.scale != 1.0:
      x = x * self.scale
    return tf.nest.flatten(self.net(x, training=False))

  def call(self, images, training=False):
    del training  # the outside model always runs in inference mode
    out = tf.cast(self.outputs_of(images)[0], tf.float32)  # load_teacher checked: only one
    return tf.math.log(tf.maximum(out, TINY)) if self.probabilities else out


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


def _load_savedmodel(path: str):
  """(TFSMLayer, declared input spec or None). model.export() writes a 'serve' endpoint,
  tf.saved_model.save a 'serving_default' signature."""
  if not os.path.isfile(os.path.join(path, "saved_model.pb")):
    raise _Rejected("does not load: a folder without saved_model.pb is not a SavedModel")
  try:
    reloaded = tf.saved_model.load(path)
  except Exception as e:  # any parse or version error of the SavedModel
    raise _Rejected(f"does not load as a SavedModel ({_first_line(e)})") from None
  endpoint = next((name for name in ("serve", "serving_default")
                   if hasattr(reloaded, name) or name in reloaded.signatures), None)
  if endpoint is None:
    raise _Rejected(f"SavedModel has no 'serve' or 'serving_default' endpoint "
                    f"(it has {sorted(reloaded.signatures)})")
  declared = None
  if endpoint in reloaded.signatures:
    specs = tf.nest.flatten(reloaded.signatures[endpoint].structured_input_signature)
    if len(specs) != 1:
      raise _Rejected(f"endpoint {endpoint!r} takes {len(specs)} inputs, expected one batch")
    declared = specs[0]
  # The layer's dtype is the signature's: under a mixed precision policy Keras would otherwise
  # cast the images to float16, which a float32 signature refuses.
  dtype = declared.dtype.name if declared is not None and declared.dtype.is_floating else "float32"
  layer = keras.layers.TFSMLayer(path, call_endpoint=endpoint, trainable=False, dtype=dtype)
  return layer, declared


def _load_keras(path: str):
  """(Keras model, declared input spec or None) from a .keras or .h5 file."""
  try:
    net = keras.models.load_model(path, compile=False)
  except Exception as e:  # corrupt zip or HDF5, unknown layers, unsafe lambdas...
    raise _Rejected(f"does not load as a Keras model ({_first_line(e)})") from None
  inputs = getattr(net, "inputs", None) or []
  if len(inputs) > 1:
    raise _Rejected(f"takes {len(inputs)} inputs, expected one image batch")
  declared = tf.TensorSpec(tuple(inputs[0].shape), inputs[0].dtype) if inputs else None
  return net, declared


def _load(path: str):
  """(net, kind, declared input spec or None)."""
  if os.path.isdir(path):
    net, declared = _load_savedmodel(path)
    return net, "savedmodel", declared
  if not os.path.isfile(path):
    raise _Rejected("does not exist")
  kind = {".keras": "keras", ".h5": "h5", ".hdf5": "h5"}.get(os.path.splitext(path)[1].lower())
  if kind is None:
    raise _Rejected("is neither a .keras or .h5 file nor a SavedModel folder")
  net, declared = _load_keras(path)
  return net, kind, declared


def _layout(declared):
  """True for [N,28,28,1], False for [N,28,28], None when the model declares no shape."""
  if declared is None or declared.shape.rank is None:
    return None
  dims = list(declared.shape)[1:]
  for channel_axis, expected in ((True, [28, 28, 1]), (False, [28, 28])):
    if len(dims) == len(expected) and all(d is None or d == e for d, e in zip(dims, expected)):
      if not declared.dtype.is_floating:
        raise _Rejected(f"input is {declared.dtype.name}, expected float images")
      return channel_axis
  raise _Rejected(f"input is {list(declared.shape)}, expected [N,28,28,1] or [N,28,28]")


def default_probe_images() -> np.ndarray:
  """A fixed uint8 batch for the checks when no real images are at hand."""
  return np.random.default_rng(0).integers(0, 256, (PROBE_EXAMPLES, 28, 28), dtype=np.uint8)


def _checked_adapter(net, channel_axis, scale: float, probe: np.ndarray):
  """(adapter, "logits" or "probabilities") after the output and determinism checks."""
  batch = normalize_images(probe)
  layouts = [channel_axis] if channel_axis is not None else [True, False]
  for layout in layouts:
    adapter = _TeacherAdapter(net, layout, scale, probabilities=False)
    try:
      outputs = adapter.outputs_of(batch)
      break
    except Exception as e:  # a shape or dtype the model's own layers refuse
      error = _first_line(e)
  else:
    raise _Rejected(f"fails on a [N,28,28,1] and on a [N,28,28] float batch ({error})")
  if len(outputs) != 1:
    raise _Rejected(f"has {len(outputs)} outputs, expected one")
  first = adapter(batch).numpy()
  if first.ndim != 2 or first.shape[0] != len(probe):
    raise _Rejected(f"output is {list(first.shape)}, expected [N,{NUM_CLASSES}]")
  if first.shape[1] != NUM_CLASSES:
    raise _Rejected(f"output has {first.shape[1]} units, expected {NUM_CLASSES}")
  if not np.all(np.isfinite(first)):
    raise _Rejected("output is not finite on the probe batch")
  spread = float(np.max(np.abs(adapter(batch).numpy() - first)))
  if spread > REPEAT_TOLERANCE * max(1.0, float(np.max(np.abs(first)))):
    raise _Rejected(f"is not deterministic in inference mode (two calls on the same batch "
                    f"differ by {spread:.3g}; is dropout or noise on at inference?)")
  if np.all(first >= 0.0) and np.all(np.abs(first.sum(axis=-1) - 1.0) <= SUM_TOLERANCE):
    return _TeacherAdapter(net, adapter.channel_axis, scale, probabilities=True), "probabilities"
  return adapter, "logits"


def load_teacher(path: str, input_range: str = "0-1", probe_images=None) -> OutsideTeacher:
  """Loads and checks an outside teacher; raises UsageError with one line naming the failed
  check. `probe_images` (uint8 [N,28,28], e.g. a few test images) feed the checks.

  Call it outside any `strategy.scope()`: a SavedModel restored there gets distributed variables
  that its restored functions cannot read outside a replica context. Loaded outside, the teacher
  runs inside the replicas' steps as it is (it is never updated)."""
  if tf.distribute.has_strategy():
    raise RuntimeError("load_teacher must run outside strategy.scope()")
  if input_range not in INPUT_RANGES:
    raise UsageError(f"teacher input range {input_range!r} is not one of {sorted(INPUT_RANGES)}")
  probe = default_probe_images() if probe_images is None else np.asarray(probe_images)
  try:
    net, kind, declared = _load(path)
    adapter, output = _checked_adapter(net, _layout(declared), INPUT_RANGES[input_range], probe)
  except _Rejected as e:
    raise UsageError(f"teacher model {path}: {e}") from None
  adapter.trainable = False
  return OutsideTeacher(model=adapter, source=path, kind=kind, sha256=file_digest(path),
                        input_range=input_range, output=output)
