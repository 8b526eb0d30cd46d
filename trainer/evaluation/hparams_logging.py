"""TensorBoard HParams: every model is one session, so all students sort in one table.

Layout (under <model_dir>/logs):
  <model>/               the session: experiment config + session start info (hyperparameters)
  <model>/train/         per-epoch scalars; train_seconds (cumulative) -> metric train_seconds
  <model>/validation/    per-epoch scalars; accuracy -> metric validation_accuracy
  <model>/test/          final test scalars; accuracy, errors -> test_accuracy, test_errors
  <model>/deployment/    written once the model is finished and exported (and again by
                         --mode=report, which replaces it): the 95% interval of the test
                         accuracy and the exports' sizes, LiteRT accuracies and latencies

Several pods (a Kubernetes Indexed Job) write different students into the same logs root, so
there is no shared experiment file to clobber: every session folder carries the *same* experiment
config, whose domains are the full ranges the flags accept rather than the values of one run.
TensorBoard takes the config of whichever session it finds first, and they are all identical.
A metric's value is the last scalar of its tag in <session>/<group>.
"""

import os

import tensorflow as tf
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.hparams import plugin_data_pb2

from trainer.data import options

ROLES = ("student", "teacher")
# Wide enough for any value the flags accept in practice; the plugin filters sessions by these
# bounds, so they are deliberately generous rather than fitted to one run.
TEMPERATURE_RANGE = (0.0, 1000.0)
HPARAMS = (
    hp.HParam("role", hp.Discrete(list(ROLES)), description="teacher or student"),
    hp.HParam("alpha", hp.RealInterval(0.0, 1.0),
              description="weight of the distillation term (0: labels only, 1: teacher only)"),
    hp.HParam("temperature", hp.RealInterval(*TEMPERATURE_RANGE),
              description="softmax temperature of the distillation term"),
    hp.HParam("params", hp.IntInterval(0, 2**31 - 1), description="trainable parameters"),
    hp.HParam("batch_size", hp.IntInterval(1, 2**31 - 1), description="global batch size"),
    hp.HParam("seed", hp.IntInterval(-2**31, 2**31 - 1),
              description="initial weights and data order"),
    hp.HParam("mixup", hp.RealInterval(0.0, options.MAX_MIXUP),
              description="Beta concentration of a student's mixup pairs (0: off)"),
)
# The hyperparameters that tell the models apart. Marked `differs` in the config, so that the
# HParams dashboard (which shows 5 columns by default, those that differ first) shows them.
VARYING = ("role", "alpha", "temperature", "params")
METRICS = (
    hp.Metric("accuracy", group="test", display_name="test_accuracy",
              description="accuracy on the test split (final)"),
    hp.Metric("errors", group="test", display_name="test_errors",
              description="misclassified test examples (final)"),
    hp.Metric("accuracy", group="validation", display_name="validation_accuracy",
              description="accuracy on the held-out validation split (last epoch)"),
    hp.Metric("train_seconds", group="train", display_name="train_seconds",
              description="training time, excluding evaluation and export"),
)
DEPLOYMENT_RUN = "deployment"
# (tag in <model>/deployment, description): each also an HParams metric under its own tag.
DEPLOYMENT_METRICS = (
    ("test_accuracy_lower", "lower end of the 95% Clopper-Pearson interval of test accuracy"),
    ("test_accuracy_upper", "upper end of the 95% Clopper-Pearson interval of test accuracy"),
    ("saved_model_bytes", "SavedModel size on disk"),
    ("litert_float32_bytes", "float32 LiteRT flatbuffer size"),
    ("litert_int8_bytes", "int8 LiteRT flatbuffer size"),
    ("litert_float32_accuracy", "test accuracy of the float32 flatbuffer, run in the interpreter"),
    ("litert_int8_accuracy", "test accuracy of the int8 flatbuffer, run in the interpreter"),
    ("litert_float32_latency_ms", "float32 flatbuffer, one image, one thread: median ms"),
    ("litert_int8_latency_ms", "int8 flatbuffer, one image, one thread: median ms"),
    ("litert_int8_latency_p99_ms", "int8 flatbuffer, one image, one thread: p99 ms"),
    ("saved_model_batch_1_ms", "SavedModel serving_default at batch 1: median ms per call"),
    ("saved_model_batch_256_ms_per_image",
     "SavedModel serving_default at batch 256: median ms per image"),
)
METRICS += tuple(hp.Metric(tag, group=DEPLOYMENT_RUN, display_name=tag, description=text)
                 for tag, text in DEPLOYMENT_METRICS)


def session_hparams(role: str, params: int, batch_size: int, seed: int, alpha=None,
                    temperature=None, mixup=None) -> dict:
  """The hyperparameters of one model; the teacher has no alpha, temperature or mixup."""
  values = {"role": role, "params": int(params), "batch_size": int(batch_size),
            "seed": int(seed)}
  if alpha is not None:
    values["alpha"] = float(alpha)
  if temperature is not None:
    values["temperature"] = float(temperature)
  if mixup is not None:
    values["mixup"] = float(mixup)
  return values


def experiment_config_pb():
  """hp.hparams_config's Summary proto, with the VARYING hyperparameters marked `differs`."""
  summary = hp.hparams_config_pb(hparams=list(HPARAMS), metrics=list(METRICS),
                                 time_created_secs=0.0)  # identical bytes in every session
  plugin_data = summary.value[0].metadata.plugin_data
  content = plugin_data_pb2.HParamsPluginData.FromString(plugin_data.content)
  for info in content.experiment.hparam_infos:
    info.differs = info.name in VARYING
  plugin_data.content = content.SerializeToString()
  return summary


def write_session(writer, name: str, values: dict) -> None:
  """Writes the (shared) experiment config and this model's session start info."""
  with writer.as_default(step=0):
    tf.summary.experimental.write_raw_pb(experiment_config_pb().SerializeToString(), step=0)
    hp.hparams(values, trial_id=name)


def deployment_values(interval, exports) -> dict:
  """The DEPLOYMENT_METRICS of one model that are known: a failed export leaves its out."""
  values = {}
  if interval:
    values["test_accuracy_lower"], values["test_accuracy_upper"] = (interval["lower"],
                                                                   interval["upper"])
  exports = exports or {}
  saved = exports.get("saved_model") or {}
  if "bytes" in saved:
    values["saved_model_bytes"] = saved["bytes"]
    served = saved.get("latency") or {}
    values["saved_model_batch_1_ms"] = (served.get("batch_1") or {}).get("median_ms")
    values["saved_model_batch_256_ms_per_image"] = (
        served.get("batch_256") or {}).get("per_image_median_ms")
  for kind in ("float32", "int8"):
    entry = exports.get(f"litert_{kind}") or {}
    if "bytes" in entry:
      values[f"litert_{kind}_bytes"] = entry["bytes"]
      values[f"litert_{kind}_accuracy"] = entry["test_accuracy"]
      values[f"litert_{kind}_latency_ms"] = entry["latency"]["median_ms"]
      if kind == "int8":
        values["litert_int8_latency_p99_ms"] = entry["latency"]["p99_ms"]
  return {tag: float(v) for tag, v in values.items() if v is not None}


def write_deployment(log_root: str, name: str, step: int, interval, exports) -> dict:
  """Replaces logs/<name>/deployment with this model's interval bounds and export metrics.

  interval: trainer.evaluation.selection.accuracy_interval of its test accuracy; exports: what
  trainer.serving.litert_export.export_and_measure returned. Returns the values written."""
  run_dir = os.path.join(log_root, name, DEPLOYMENT_RUN)
  if tf.io.gfile.isdir(run_dir):
    for old in tf.io.gfile.listdir(run_dir):
      if old.startswith("events.out.tfevents."):
        tf.io.gfile.remove(os.path.join(run_dir, old))
  values = deployment_values(interval, exports)
  descriptions = dict(DEPLOYMENT_METRICS)
  writer = tf.summary.create_file_writer(run_dir)
  with writer.as_default(step=step):
    for tag, value in values.items():
      tf.summary.scalar(tag, value, description=descriptions[tag])
  writer.close()
  return values
