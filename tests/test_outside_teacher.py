"""Outside teachers: a model trained here with plain Keras (not by the job), saved in each format
the job accepts, loads to the same predictions; probabilities distill as their logits do; and
every bad teacher is one clear UsageError."""

import hashlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.data import idx
from trainer.data.pipeline import normalize_images
from trainer.errors import UsageError
from trainer.evaluation import evaluation
from trainer.job import teacher_cache
from trainer.modeling import losses
from trainer.modeling.distiller import Distiller
from trainer.modeling.outside_teacher import load_teacher

from helpers import MNIST_DIR

T = 4.0


@pytest.fixture(scope="module")
def mnist():
  images, labels = idx.load_split(MNIST_DIR, "train")
  test_images, test_labels = idx.load_split(MNIST_DIR, "test")
  return images[:4000], labels[:4000], test_images[:1000], test_labels[:1000]


def _floats(images):
  return normalize_images(images).numpy()


@pytest.fixture(scope="module")
def trained(mnist, tmp_path_factory):
  """A small CNN trained for one epoch with Keras' own fit, saved as .keras, .h5, a SavedModel
  from model.export ('serve' endpoint) and one from tf.saved_model.save (serving_default)."""
  images, labels, _, _ = mnist
  keras.utils.set_random_seed(0)
  net = keras.Sequential([
      keras.Input((28, 28, 1)), keras.layers.Conv2D(8, 3, activation="relu"),
      keras.layers.MaxPooling2D(2), keras.layers.Flatten(),
      keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
  net.compile(optimizer="adam",
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  net.fit(_floats(images), labels, batch_size=64, epochs=1, verbose=0)
  folder = tmp_path_factory.mktemp("teachers")
  paths = {"keras": folder / "teacher.keras", "h5": folder / "teacher.h5",
           "export": folder / "exported", "tf_saved_model": folder / "tf_saved_model"}
  net.save(paths["keras"])
  net.save(paths["h5"])
  net.export(str(paths["export"]), verbose=False)
  tf.saved_model.save(net, str(paths["tf_saved_model"]))
  return net, {name: str(path) for name, path in paths.items()}


@pytest.mark.parametrize("fmt,kind", [("keras", "keras"), ("h5", "h5"),
                                      ("export", "savedmodel"), ("tf_saved_model", "savedmodel")])
def test_each_format_loads_to_the_original_predictions(mnist, trained, fmt, kind):
  _, _, test_images, test_labels = mnist
  net, paths = trained
  teacher = load_teacher(paths[fmt], probe_images=test_images[:32])
  assert (teacher.kind, teacher.output, teacher.input_range) == (kind, "logits", "0-1")
  x = _floats(test_images)
  expected = net(x, training=False).numpy()
  got = teacher.model(x).numpy()
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert (got.argmax(-1) == test_labels).mean() > 0.8  # one epoch on 4000 images learns
  # The job's own inference path (uint8 in, batched, tf.function) gives the same logits.
  np.testing.assert_allclose(evaluation.predict_logits(teacher.model, test_images), expected,
                             rtol=1e-5, atol=1e-5)
  assert teacher.model.count_params() == net.count_params()
  assert len(teacher_cache.weights_digest(teacher.model)) == 64
  if kind != "savedmodel":
    with open(paths[fmt], "rb") as f:
      assert teacher.sha256 == hashlib.sha256(f.read()).hexdigest()
  assert teacher.record()["trained_here"] is False and paths[fmt] in teacher.description


def test_formats_load_under_a_mixed_precision_policy(mnist, trained):
  """The job sets the policy before it loads the teacher; the teacher keeps its float32."""
  _, _, test_images, _ = mnist
  net, paths = trained
  x = _floats(test_images[:64])
  expected = net(x, training=False).numpy()
  keras.mixed_precision.set_dtype_policy("mixed_float16")
  try:
    for fmt in ("keras", "h5", "export", "tf_saved_model"):
      got = load_teacher(paths[fmt]).model(x)
      assert got.dtype == tf.float32, fmt
      np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5, err_msg=fmt)
  finally:
    keras.mixed_precision.set_dtype_policy("float32")


def test_outside_teacher_distills_like_its_cached_logits(mnist, trained):
  """As the Distiller's teacher it is frozen, and gives the loss its cached logits give."""
  images, labels, _, _ = mnist
  net, paths = trained
  teacher = load_teacher(paths["export"])
  x, y = _floats(images[:64]), labels[:64]
  cached = net(x, training=False).numpy()
  before = [w.numpy().copy() for w in teacher.model.weights]
  results = []
  for data in ((x, y), (x, y, cached)):
    keras.utils.set_random_seed(3)
    student = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                keras.layers.Dense(10)])
    distiller = Distiller(student, teacher.model if len(data) == 2 else None)
    distiller.compile(optimizer=keras.optimizers.SGD(0.1), distillation_weight=0.5,
                      temperature=T)
    results.append(float(distiller.train_step(data)["loss"]))
  assert results[0] == pytest.approx(results[1], rel=1e-5)
  for w, b in zip(teacher.model.weights, before):
    np.testing.assert_array_equal(w.numpy(), b)


def test_softmax_output_gives_the_same_distillation_loss_as_its_logits(mnist, trained, tmp_path):
  _, _, test_images, test_labels = mnist
  net, _ = trained
  with_softmax = keras.Model(net.inputs, keras.layers.Softmax()(net.outputs[0]))
  path = str(tmp_path / "softmax.keras")
  with_softmax.save(path)
  teacher = load_teacher(path, probe_images=test_images[:32])
  assert teacher.output == "probabilities"
  x, y = _floats(test_images[:256]), test_labels[:256]
  logits = net(x, training=False)
  log_probs = teacher.model(x)
  student_logits = tf.constant(2 * np.random.default_rng(0).normal(size=(256, 10)), tf.float32)
  for temperature in (1.0, 4.0, 8.0):
    np.testing.assert_allclose(
        losses.distillation_loss(log_probs, student_logits, temperature).numpy(),
        losses.distillation_loss(logits, student_logits, temperature).numpy(),
        rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      losses.distillation_objective(y, student_logits, log_probs, 0.5, T).total.numpy(),
      losses.distillation_objective(y, student_logits, logits, 0.5, T).total.numpy(),
      rtol=1e-4, atol=1e-5)


def test_unchannelled_input_and_0_255_scale(tmp_path):
  """A model on [N,28,28] pixel values 0..255 gets the job's [N,28,28,1] [0,1] images."""
  keras.utils.set_random_seed(1)
  net = keras.Sequential([keras.Input((28, 28)), keras.layers.Flatten(), keras.layers.Dense(10)])
  path = str(tmp_path / "bytes.keras")
  net.save(path)
  teacher = load_teacher(path, input_range="0-255")
  x = np.random.default_rng(1).random((8, 28, 28, 1)).astype(np.float32)
  np.testing.assert_allclose(teacher.model(x).numpy(), net(x[..., 0] * 255.0).numpy(),
                             rtol=1e-5, atol=1e-4)
  with pytest.raises(UsageError, match="input range"):
    load_teacher(path, input_range="0-65535")


def test_loading_inside_a_strategy_scope_is_refused(trained):
  """Restored there, a SavedModel's variables become distributed ones its functions cannot
  read on the probe batch; the job loads the teacher first."""
  _, paths = trained
  with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
    with pytest.raises(RuntimeError, match="outside strategy.scope"):
      load_teacher(paths["export"])


@keras.saving.register_keras_serializable(package="test_outside_teacher")
class AlwaysNoisy(keras.layers.Layer):
  """Random at inference too: the kind of layer that makes a teacher's targets drift."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.seeds = keras.random.SeedGenerator(0)

  def call(self, x):
    return x + keras.random.normal(keras.ops.shape(x), seed=self.seeds)


def _save_keras(tmp_path, name, layers, input_shape=(28, 28, 1)):
  keras.utils.set_random_seed(2)
  path = str(tmp_path / name)
  keras.Sequential([keras.Input(input_shape), *layers]).save(path)
  return path


def _flat_input(tmp_path):
  return _save_keras(tmp_path, "flat.keras", [keras.layers.Dense(10)], input_shape=(784,))


def _larger_images(tmp_path):
  return _save_keras(tmp_path, "32x32.keras", [
      keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)],
      input_shape=(32, 32, 1))


def _nine_outputs(tmp_path):
  return _save_keras(tmp_path, "nine.keras", [keras.layers.Flatten(), keras.layers.Dense(9)])


def _two_outputs(tmp_path):
  keras.utils.set_random_seed(2)
  inputs = keras.Input((28, 28, 1))
  flat = keras.layers.Flatten()(inputs)
  path = str(tmp_path / "two.keras")
  keras.Model(inputs, [keras.layers.Dense(10)(flat), keras.layers.Dense(10)(flat)]).save(path)
  return path


def _text_as_keras(tmp_path):
  (tmp_path / "notes.keras").write_text("not a model\n")
  return str(tmp_path / "notes.keras")


def _bytes_as_h5(tmp_path):
  (tmp_path / "noise.h5").write_bytes(np.random.default_rng(0).bytes(4096))
  return str(tmp_path / "noise.h5")


def _wrong_extension(tmp_path):
  (tmp_path / "model.txt").write_text("weights, maybe\n")
  return str(tmp_path / "model.txt")


def _folder_without_savedmodel(tmp_path):
  (tmp_path / "empty_model").mkdir()
  (tmp_path / "empty_model" / "README").write_text("nothing here\n")
  return str(tmp_path / "empty_model")


def _noisy_keras(tmp_path):
  return _save_keras(tmp_path, "noisy.keras", [keras.layers.Flatten(), AlwaysNoisy(),
                                                keras.layers.Dense(10)])


def _dropout_left_on_savedmodel(tmp_path):
  keras.utils.set_random_seed(2)
  inputs = keras.Input((28, 28, 1))
  hidden = keras.layers.Dropout(0.5)(keras.layers.Flatten()(inputs), training=True)
  path = str(tmp_path / "dropout_on")
  keras.Model(inputs, keras.layers.Dense(10)(hidden)).export(path, verbose=False)
  return path


@pytest.mark.parametrize("make,message", [
    (_flat_input, r"input is \[None, 784\], expected \[N,28,28,1\] or \[N,28,28\]"),
    (_larger_images, r"input is \[None, 32, 32, 1\]"),
    (_nine_outputs, "output has 9 units, expected 10"),
    (_two_outputs, "has 2 outputs, expected one"),
    (_text_as_keras, "does not load as a Keras model"),
    (_bytes_as_h5, "does not load as a Keras model"),
    (_folder_without_savedmodel, "does not load: a folder without saved_model.pb"),
    (lambda tmp_path: str(tmp_path / "missing.keras"), "does not exist"),
    (_wrong_extension, "neither a .keras or .h5 file nor a SavedModel folder"),
    (_noisy_keras, "not deterministic in inference mode"),
    (_dropout_left_on_savedmodel, "not deterministic in inference mode"),
])
def test_bad_teachers_are_one_usage_error_line(tmp_path, make, message):
  path = make(tmp_path)
  with pytest.raises(UsageError, match=message) as raised:
    load_teacher(path)
  assert "\n" not in str(raised.value) and str(raised.value).startswith(f"teacher model {path}:")
