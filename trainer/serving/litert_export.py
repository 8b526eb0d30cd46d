"""LiteRT (TensorFlow Lite) flatbuffers of a trained network, measured by running them.

Two files per model, in <model>/litert/:
  float32.tflite  the network as it was trained. Its `serving_default` signature is the
                  SavedModel's: raw uint8 pixels [N,28,28] in, logits, probabilities and classes
                  out (normalization is inside, as in the SavedModel).
  int8.tflite     full-integer post-training quantization: weights and activations int8, and
                  integer tensors at both ends, so it runs on integer-only accelerators and
                  microcontrollers that reject float tensors. Its input is still the raw uint8
                  pixels: the quantizer sees pixel values 0..255, so the input's scale is 1 and
                  its zero point 0, and a pixel goes in exactly as it comes. Outputs: int8 logits
                  and int8 probabilities (dequantize with each tensor's scale and zero point;
                  the class is the argmax of the int8 logits, since dequantizing is monotone).
                  The quantizer's ranges come from training images only, never from the test
                  split that then measures it.
The job's model folder also gets exports.json: for each file its size, its test accuracy and
errors (measured by running the flatbuffer in the interpreter, not assumed from the Keras
network), single-image latency (one thread, after warm-up, median and p99) and the SavedModel's
serving latency at batch 1 and 256. A converter or interpreter failure is logged and recorded
in exports.json (an "error" field) and never fails the job.

The interpreter is TensorFlow's own tf.lite.Interpreter (no new dependency); ai-edge-litert's
Interpreter takes the same calls, should TensorFlow drop it.
"""

import dataclasses
import logging
import os
import tempfile
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from trainer import tf_logs
from trainer.rundir import disk_full, layout
from trainer.serving import export

LITERT_DIR = "litert"
FLOAT_FILE = "float32.tflite"
INT8_FILE = "int8.tflite"
EXPORTS_FILE = "exports.json"
SIGNATURE = "serving_default"


@dataclasses.dataclass(frozen=True)
class MeasureConfig:
  """How much to measure: CI runs few iterations, the job enough for a stable p99."""

  latency_runs: int = 1000  # timed single-image LiteRT runs (p99 needs at least ~100)
  warmup_runs: int = 50
  serving_runs: int = 300  # timed SavedModel calls at batch 1 (each pays TensorFlow's overhead)
  batch_runs: int = 20  # timed SavedModel calls at the large batch size
  batch_size: int = 256
  representative_examples: int = 500  # training images the int8 quantizer calibrates on
  seed: int = 0  # which training images those are
  eval_batch_size: int = 500  # flatbuffer batch when measuring test accuracy


def representative_images(train_images: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
  """A seeded sample of training images (uint8 [count,28,28]) for int8 calibration."""
  count = min(int(count), len(train_images))
  chosen = np.random.default_rng(seed).choice(len(train_images), size=count, replace=False)
  return np.asarray(train_images)[np.sort(chosen)]


# ---- conversion ----
def _without_policy(config):
  """A layer config tree with every dtype policy replaced by float32."""
  if isinstance(config, dict):
    return {k: ("float32" if k == "dtype" else _without_policy(v)) for k, v in config.items()}
  if isinstance(config, list):
    return [_without_policy(v) for v in config]
  return config


def float32_network(net: keras.Model) -> keras.Model:
  """`net` itself, or for a mixed-precision network its float32 twin with the same weights.

  The weights of a mixed-precision network are float32 already, only its compute is not; the
  converters and the int8 quantizer take float32 graphs, and the flatbuffers are meant to be the
  same function whatever precision trained the network."""
  if all(layer.dtype_policy.compute_dtype == "float32" for layer in net.layers):
    return net
  twin = net.__class__.from_config(_without_policy(net.get_config()))
  twin.set_weights(net.get_weights())
  return twin


def _pixels_archive(net: keras.Model, path: str) -> None:
  """A SavedModel whose signature takes float32 pixel values 0..255 [N,28,28]: what the int8
  converter quantizes, so that its uint8 input means raw pixels (scale 1, zero point 0)."""
  archive = keras.export.ExportArchive()
  archive.track(net)

  def serve(images):
    logits = tf.cast(net(tf.expand_dims(images * (1.0 / 255.0), -1), training=False),
                     tf.float32)
    return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

  archive.add_endpoint(SIGNATURE, serve,
                       input_signature=[tf.TensorSpec([None, 28, 28], tf.float32, name="images")])
  archive.write_out(path, verbose=False)


def convert_float32(net: keras.Model, saved_model_dir=None) -> bytes:
  """The float32 flatbuffer, converted from a SavedModel with the job's serving contract:
  `saved_model_dir` when given (the model's own export of this same float32 `net`: written
  once, not twice), else one written here.

  From a SavedModel rather than a concrete function: the converter freezes the weights on that
  path (from_concrete_functions with a trackable object keeps them as variables it never
  fills)."""
  if saved_model_dir is not None:
    return tf.lite.TFLiteConverter.from_saved_model(saved_model_dir).convert()
  with tempfile.TemporaryDirectory(prefix="mnist-distill-litert-") as tmp:
    export.export_saved_model(net, os.path.join(tmp, "float"))
    converter = tf.lite.TFLiteConverter.from_saved_model(os.path.join(tmp, "float"))
    return converter.convert()


def convert_int8(net: keras.Model, calibration_images: np.ndarray) -> bytes:
  """The full-integer int8 flatbuffer, calibrated on `calibration_images` (uint8 pixels)."""
  samples = np.asarray(calibration_images, dtype=np.float32)

  def representative_dataset():
    for i in range(len(samples)):
      yield [samples[i:i + 1]]

  with tempfile.TemporaryDirectory(prefix="mnist-distill-litert-") as tmp:
    _pixels_archive(net, os.path.join(tmp, "pixels"))
    converter = tf.lite.TFLiteConverter.from_saved_model(os.path.join(tmp, "pixels"))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.int8
    return converter.convert()


# ---- running a flatbuffer ----
def interpreter(model, threads: int = 1):
  """A tf.lite.Interpreter over a flatbuffer (bytes) or a .tflite path, tensors allocated."""
  with warnings.catch_warnings():  # its deprecation notice names ai-edge-litert, see above
    warnings.simplefilter("ignore")
    if isinstance(model, (bytes, bytearray)):
      found = tf.lite.Interpreter(model_content=bytes(model), num_threads=threads)
    else:
      found = tf.lite.Interpreter(model_path=str(model), num_threads=threads)
  found.allocate_tensors()
  return found


def input_quantization(model) -> dict:
  """dtype, scale and zero point of a flatbuffer's input (scale 0: not quantized)."""
  detail = interpreter(model).get_input_details()[0]
  scale, zero_point = detail["quantization"]
  return {"dtype": np.dtype(detail["dtype"]).name, "scale": float(scale),
          "zero_point": int(zero_point), "shape": [int(d) for d in detail["shape_signature"]]}


def predict_classes(model, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
  """Classes a flatbuffer predicts for uint8 images [N,28,28], run `batch_size` at a time."""
  runner = interpreter(model).get_signature_runner(SIGNATURE)
  images = np.asarray(images, dtype=np.uint8)
  classes = []
  for i in range(0, len(images), batch_size):
    logits = runner(images=images[i:i + batch_size])["logits"]
    classes.append(np.asarray(logits).argmax(axis=-1))
  return np.concatenate(classes) if classes else np.zeros((0,), np.int64)


def _summary_ms(seconds) -> dict:
  ms = np.asarray(seconds, dtype=np.float64) * 1000.0
  return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
          "runs": int(len(ms))}


def litert_latency(model, image: np.ndarray, runs: int, warmup_runs: int) -> dict:
  """Single-image latency of a flatbuffer on one thread: the time of invoke() alone, the
  input set once (what an app pays per frame once the pixels are in the input tensor)."""
  found = interpreter(model, threads=1)
  index = found.get_input_details()[0]["index"]
  found.set_tensor(index, np.asarray(image, dtype=np.uint8).reshape(1, 28, 28))
  for _ in range(warmup_runs):
    found.invoke()
  times = []
  for _ in range(max(1, runs)):
    start = time.perf_counter()
    found.invoke()
    times.append(time.perf_counter() - start)
  return dict(_summary_ms(times), warmup_runs=int(warmup_runs), threads=1)


def saved_model_latency(export_dir: str, images: np.ndarray, config: MeasureConfig) -> dict:
  """Serving latency of the SavedModel's `serving_default` at batch 1 (serving_runs calls) and
  at config.batch_size (batch_runs calls).

  Each timed call includes the copy of the input into TensorFlow and of `classes` out, as a
  server pays; it runs on the process' TensorFlow threads (recorded as intra_op_threads, 0 for
  TensorFlow's default)."""
  serve = tf.saved_model.load(export_dir).signatures[SIGNATURE]
  images = np.asarray(images, dtype=np.uint8)
  found = {"intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads()}
  for batch, runs in ((1, config.serving_runs), (config.batch_size, config.batch_runs)):
    batch_images = images[:batch]
    if len(batch_images) < batch:  # fewer test images than the batch: repeat them
      batch_images = np.resize(images, (batch, 28, 28))
    inputs = tf.constant(batch_images)
    for _ in range(max(1, min(config.warmup_runs, runs // 4))):  # the first calls pay setup
      serve(images=inputs)["classes"].numpy()
    times = []
    for _ in range(max(1, runs)):
      start = time.perf_counter()
      serve(images=inputs)["classes"].numpy()
      times.append(time.perf_counter() - start)
    stats = _summary_ms(times)
    stats["per_image_median_ms"] = stats["median_ms"] / batch
    found[f"batch_{batch}"] = stats
  return found


def folder_bytes(path: str) -> int:
  """Total size of the files under a folder (a SavedModel), or of one file."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, files in os.walk(path) for name in files)


# ---- one model ----
def _measure_flatbuffer(kind, convert, folder, test_images, test_labels, config):
  """Converts, writes, reloads and measures one flatbuffer; an "error" entry if that fails."""
  rel = f"{LITERT_DIR}/{FLOAT_FILE if kind == 'float32' else INT8_FILE}"
  path = os.path.join(folder, *rel.split("/"))
  try:
    with tf_logs.hidden_noise():  # the converter's and the interpreter's own C++ lines
      start = time.perf_counter()
      content = convert()
      convert_seconds = time.perf_counter() - start
      layout.write_bytes(path, content)
      classes = predict_classes(path, test_images, config.eval_batch_size)  # as written
    errors = int(np.sum(classes != np.asarray(test_labels)))
    entry = {"path": rel, "bytes": os.path.getsize(path), "convert_seconds": convert_seconds,
             "test_accuracy": 1.0 - errors / max(len(test_labels), 1), "test_errors": errors,
             "test_examples": int(len(test_labels)), "input": input_quantization(path)}
    entry["latency"] = litert_latency(path, test_images[0], config.latency_runs,
                                      config.warmup_runs)
    return entry
  except Exception as e:  # pylint: disable=broad-except  # an export must not fail the job
    if disk_full.disk_full_error(e) is not None:
      raise  # a full disk is not the converter's failure: the job stops, the rerun redoes it
    logging.warning("LiteRT %s export failed for %s: %s: %s", kind, os.path.basename(folder),
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    if os.path.exists(path):
      os.remove(path)
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]}


def export_and_measure(net: keras.Model, folder: str, train_images: np.ndarray,
                       test_images: np.ndarray, test_labels: np.ndarray,
                       config: MeasureConfig = MeasureConfig(),
                       saved_model_dir=None) -> dict:
  """Writes <folder>/litert/{float32,int8}.tflite and <folder>/exports.json; returns the dict.

  saved_model_dir: the model's SavedModel (default <folder>/export), whose size and serving
  latency are measured beside the flatbuffers. Never raises for a failed conversion.
  """
  if len(test_images) == 0:
    raise ValueError("measuring exports needs test images")
  calibration = representative_images(train_images, config.representative_examples,
                                      config.seed)
  saved_model_dir = saved_model_dir or os.path.join(folder, layout.EXPORT)
  trained = net
  try:
    net = float32_network(net)
  except Exception as e:  # pylint: disable=broad-except  # the converters may still cope
    logging.warning("%s: no float32 twin of the network (%s): converting it as it is",
                    os.path.basename(folder), e)
  # A float32 network's own SavedModel is what convert_float32 would write again.
  reuse = saved_model_dir if net is trained and os.path.isdir(saved_model_dir) else None
  exports = {"litert_float32": _measure_flatbuffer(
                 "float32", lambda: convert_float32(net, reuse), folder, test_images,
                 test_labels, config),
             "litert_int8": _measure_flatbuffer(
                 "int8", lambda: convert_int8(net, calibration), folder, test_images,
                 test_labels, config)}
  if "error" not in exports["litert_int8"]:
    exports["litert_int8"]["representative_examples"] = int(len(calibration))
    exports["litert_int8"]["representative_split"] = "train"
  try:
    exports["saved_model"] = {"path": os.path.relpath(saved_model_dir, folder),
                              "bytes": folder_bytes(saved_model_dir),
                              "latency": saved_model_latency(saved_model_dir, test_images,
                                                             config)}
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("SavedModel latency failed for %s: %s: %s", os.path.basename(folder),
                    type(e).__name__, e)
    exports["saved_model"] = {"error": f"{type(e).__name__}: {e}"[:500]}
  exports["measure"] = dataclasses.asdict(config)
  exports["tensorflow"] = tf.__version__
  layout.write_json(os.path.join(folder, EXPORTS_FILE), exports)
  return exports


def read_exports(model_dir: str, name: str):
  """A model's exports.json, or None if it has none (not exported yet, or an older run)."""
  return layout.read_json(os.path.join(model_dir, name, EXPORTS_FILE))
