"""LiteRT exports of a student trained briefly on real MNIST: files, accuracy, sizes, latency."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.data import idx
from trainer.modeling import models
from trainer.serving import export, litert_export

from helpers import MNIST_DIR

TEST_EXAMPLES = 500
CONFIG = litert_export.MeasureConfig(latency_runs=60, warmup_runs=5, serving_runs=20,
                                     batch_runs=3, representative_examples=100)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  train_images, train_labels = idx.load_split(MNIST_DIR, "train")
  test_images, test_labels = idx.load_split(MNIST_DIR, "test")
  train_images, train_labels = train_images[:4096], train_labels[:4096]
  test_images, test_labels = test_images[:TEST_EXAMPLES], test_labels[:TEST_EXAMPLES]
  keras.utils.set_random_seed(0)
  net = models.build_student()
  net.compile(optimizer=keras.optimizers.Adam(3e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  net.fit(train_images[..., None].astype(np.float32) / 255.0, train_labels, epochs=2,
          batch_size=64, verbose=0)
  keras_logits = net.predict(test_images[..., None].astype(np.float32) / 255.0, verbose=0)
  folder = str(tmp_path_factory.mktemp("litert") / "student")
  export.export_saved_model(net, os.path.join(folder, "export"))
  exports = litert_export.export_and_measure(net, folder, train_images, test_images,
                                             test_labels, CONFIG)
  return {"folder": folder, "exports": exports, "net": net, "test_images": test_images,
          "test_labels": test_labels, "keras_accuracy": float(np.mean(
              keras_logits.argmax(-1) == test_labels))}


def _one_at_a_time(path, images):
  """Classes from a freshly loaded flatbuffer, one image per call (not the batched path)."""
  runner = litert_export.interpreter(path).get_signature_runner("serving_default")
  return np.array([int(runner(images=image[None])["logits"].argmax()) for image in images])


def test_int8_file_reproduces_its_reported_accuracy(exported):
  entry = exported["exports"]["litert_int8"]
  path = os.path.join(exported["folder"], entry["path"])
  classes = _one_at_a_time(path, exported["test_images"])
  errors = int(np.sum(classes != exported["test_labels"]))
  assert errors == entry["test_errors"]
  assert 1 - errors / TEST_EXAMPLES == entry["test_accuracy"]
  assert entry["test_examples"] == TEST_EXAMPLES
  # what runs is quantized: int8 tensors throughout, the input taking raw pixels exactly
  interpreter = litert_export.interpreter(path)
  assert entry["input"] == {"dtype": "uint8", "scale": 1.0, "zero_point": 0,
                            "shape": [-1, 28, 28]}
  assert all(np.dtype(d["dtype"]) == np.int8 for d in interpreter.get_output_details())
  assert entry["representative_examples"] == 100 and entry["representative_split"] == "train"


def test_accuracies_agree_with_the_keras_network(exported):
  float_entry = exported["exports"]["litert_float32"]
  int8_entry = exported["exports"]["litert_int8"]
  assert exported["keras_accuracy"] > 0.85  # it learned; chance is 0.1
  assert abs(float_entry["test_accuracy"] - exported["keras_accuracy"]) <= 1 / TEST_EXAMPLES
  assert abs(int8_entry["test_accuracy"] - float_entry["test_accuracy"]) <= 0.02
  served = litert_export.interpreter(os.path.join(exported["folder"], float_entry["path"]))
  out = served.get_signature_runner("serving_default")(images=exported["test_images"][:8])
  assert set(out) == {"logits", "probabilities", "classes"}  # the SavedModel's contract
  np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)


def test_sizes_and_latencies_are_sane(exported):
  exports = exported["exports"]
  params = exported["net"].count_params()
  float_bytes, int8_bytes = exports["litert_float32"]["bytes"], exports["litert_int8"]["bytes"]
  assert float_bytes == os.path.getsize(os.path.join(exported["folder"], "litert",
                                                     "float32.tflite"))
  assert 4 * params < float_bytes < 4 * params + 64_000  # float32 weights plus the graph
  assert params < int8_bytes < float_bytes / 2.5  # one byte a weight, int32 biases
  assert exports["saved_model"]["bytes"] > float_bytes
  for entry in (exports["litert_float32"], exports["litert_int8"]):
    latency = entry["latency"]
    assert latency["runs"] == CONFIG.latency_runs and latency["threads"] == 1
    assert 0 < latency["median_ms"] <= latency["p99_ms"] < 100
  served = exports["saved_model"]["latency"]
  assert served["batch_1"]["runs"] == CONFIG.serving_runs
  assert served["batch_256"]["runs"] == CONFIG.batch_runs
  assert 0 < served["batch_1"]["median_ms"] <= served["batch_1"]["p99_ms"] < 1000
  assert served["batch_256"]["per_image_median_ms"] == pytest.approx(
      served["batch_256"]["median_ms"] / 256)
  # a batch of 256 costs less per image than 256 single calls
  assert served["batch_256"]["median_ms"] < 256 * served["batch_1"]["median_ms"]
  with open(os.path.join(exported["folder"], "exports.json")) as f:
    assert json.load(f) == exports


def test_a_mixed_precision_network_exports_as_its_float32_self(exported, tmp_path):
  keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
  try:
    mixed = models.build_student()
  finally:
    keras.mixed_precision.set_dtype_policy("float32")
  mixed.set_weights(exported["net"].get_weights())
  twin = litert_export.float32_network(mixed)
  assert twin is not mixed and all(layer.dtype_policy.name == "float32" for layer in twin.layers)
  assert litert_export.float32_network(exported["net"]) is exported["net"]
  images = exported["test_images"][:100]
  float_model = litert_export.convert_float32(twin)
  keras_classes = exported["net"].predict(images[..., None] / 255.0, verbose=0).argmax(-1)
  np.testing.assert_array_equal(litert_export.predict_classes(float_model, images), keras_classes)


def test_the_float32_flatbuffer_reuses_the_models_own_savedmodel(exported):
  """export_and_measure converts a float32 network from its export/ SavedModel (written once,
  not twice): the file is byte for byte what a fresh SavedModel of the network gives."""
  with open(os.path.join(exported["folder"], "litert", "float32.tflite"), "rb") as f:
    assert f.read() == litert_export.convert_float32(exported["net"])


def test_a_failing_conversion_is_recorded_not_raised(tmp_path, caplog):
  """A network the converters cannot take (wrong input shape for the 28x28 contract)."""
  net = keras.Sequential([keras.Input((28, 28, 3)), keras.layers.Flatten(),
                          keras.layers.Dense(10)])
  images = np.zeros((4, 28, 28), np.uint8)
  folder = str(tmp_path / "broken")
  exports = litert_export.export_and_measure(net, folder, images, images, np.zeros(4, np.int64),
                                             CONFIG)
  for kind in ("litert_float32", "litert_int8", "saved_model"):
    assert exports[kind]["error"], kind
  assert not os.path.exists(os.path.join(folder, "litert", "int8.tflite"))
  assert "LiteRT int8 export failed for broken" in caplog.text
  assert litert_export.read_exports(str(tmp_path), "broken") == exports
  assert tf.io.gfile.listdir(folder)  # exports.json written all the same
