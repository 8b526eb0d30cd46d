"""The job: check inputs, train (or resume) the teacher, distill each student, merge the report.

Everything that can reject the input runs before the first training step. Finished models
(a result.json marker) are reused, unfinished ones resume from their checkpoints; so rerunning
the same command after preemption continues where the last run stopped.
"""

import dataclasses
import hashlib
import json
import logging
import os
import signal
import time

import keras
import numpy as np
import tensorflow as tf

import trainer
import tempfile
from trainer import (comparison, data, distribution, evaluation, export, hparams_logging, models,
                     results, storage, summaries)
from trainer.classifier import Classifier
from trainer.distiller import Distiller
from trainer.errors import UsageError
from trainer.flags import Settings
from trainer.loop import LoopConfig, TrainingLoop
from trainer.pipeline import ArrayPipeline
from trainer.summaries import ModelLogs

TEACHER = "teacher"


class _StopFlag:
  """Set by SIGTERM (the pod's grace period): the loop checkpoints and exits."""

  def __init__(self):
    self.requested = False

  def install(self):
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: checkpointing and exiting")
    self.requested = True


def resolve_precision(setting: str) -> str:
  """'auto' -> mixed_float16 on GPUs with compute capability >= 7, else float32."""
  if setting != "auto":
    return setting
  for gpu in tf.config.list_physical_devices("GPU"):
    capability = tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
    if capability >= (7, 0):
      return "mixed_float16"
  return "float32"


def _ensure_writable(folder: str) -> None:
  try:
    os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, f".write-probe-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UsageError(f"--model_dir {folder} is not writable: {e.strerror or e}") from None


def weights_digest(net) -> str:
  """sha256 of a network's weights: shows that students started from the same point."""
  digest = hashlib.sha256()
  for weight in net.weights:
    digest.update(np.asarray(weight.numpy()).tobytes())
  return digest.hexdigest()


def _images_key(splits: data.Splits) -> str:
  digest = hashlib.sha256()
  for array in (splits.train_images, splits.validation_images):
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


class Job:
  """One invocation of mnist-distill with validated settings."""

  def __init__(self, settings: Settings):
    self.settings = settings
    self.stop = _StopFlag()

  # ---- preflight: everything that can fail on bad input, before any training ----
  def prepare(self):
    s = self.settings
    self.storage = storage.open_storage(s.model_dir)
    self.storage.check()
    self.dir = self.storage.local_dir
    _ensure_writable(self.dir)
    self.strategy = distribution.make_strategy(s.strategy, s.num_cpu_devices)
    self.chief = distribution.is_chief(self.strategy)
    self.replicas = self.strategy.num_replicas_in_sync
    if s.batch_size % self.replicas:
      raise UsageError(f"--batch_size={s.batch_size} must be a multiple of the "
                       f"{self.replicas} replicas")
    self.precision = resolve_precision(s.mixed_precision)
    keras.mixed_precision.set_dtype_policy(self.precision)
    if s.deterministic:
      tf.config.experimental.enable_op_determinism()
    self.storage.pull()
    if s.mode == "report":
      return
    if s.mode == "students":
      self.teacher_dir = self._locate_teacher()
    self.splits = data.load_splits(
        s.dataset, data_dir=storage.fetch_to_local(s.data_dir) if s.data_dir else None,
        idx_dir=storage.fetch_to_local(s.idx_dir) if s.idx_dir else None,
        validation_examples=s.validation_examples, max_train_examples=s.max_train_examples,
        max_test_examples=s.max_test_examples)
    if len(self.splits.train_labels) < s.batch_size:
      raise UsageError(f"--batch_size={s.batch_size} is larger than the "
                       f"{len(self.splits.train_labels)} training examples")
    if s.validation_examples == 0:
      raise UsageError("--validation_examples must be > 0: validation drives model selection")

  def _locate_teacher(self) -> str:
    s = self.settings
    if s.teacher_dir == f"{s.model_dir}/teacher":
      local = os.path.join(self.dir, TEACHER)
    else:
      local = storage.fetch_to_local(s.teacher_dir)
    if not (os.path.isfile(os.path.join(local, "result.json"))
            and os.path.isfile(os.path.join(local, "model.keras"))):
      raise UsageError(f"--mode=students needs a finished teacher in {s.teacher_dir} "
                       "(run --mode=teacher first or set --teacher_dir)")
    return local

  # ---- training ----
  def _pipeline(self, images, labels, extras=None):
    return ArrayPipeline(images, labels, self.settings.batch_size, self.replicas, extras)

  def _optimizer(self, learning_rate, epochs, steps_per_epoch):
    schedule = keras.optimizers.schedules.CosineDecay(
        self.settings.learning_rate, decay_steps=max(1, epochs * steps_per_epoch))
    return keras.optimizers.Adam(schedule)

  def _train(self, name, model, net, train, validation, epochs):
    """Runs (or resumes) the loop for one model; returns (history, train seconds)."""
    s = self.settings
    checkpoints = os.path.join(self.dir, name, "checkpoints")
    if not self.chief:  # every worker must save; only the chief's copy is kept
      checkpoints = tempfile.mkdtemp(prefix=f"mnist-distill-{name}-worker-")
    logs = ModelLogs(os.path.join(self.dir, "logs"), name, enabled=self.chief)
    logs.write_session(hparams_logging.session_hparams(
        "teacher" if name == TEACHER else "student", net.count_params(), s.batch_size, s.seed,
        getattr(model, "alpha", None), getattr(model, "temperature", None)))
    logs.write_graph(net)

    def on_checkpoint():
      if self.chief:
        self.storage.sync(f"{name}/checkpoints", last=("checkpoint",))
        logs.flush()
        self.storage.sync(f"logs/{name}")

    def on_epoch(record):
      logs.write_epoch(record)
      t, v = record["train"], record["validation"]
      logging.info("%s epoch %d/%d: loss %.4f accuracy %.4f | validation loss %.4f accuracy "
                   "%.4f | %.0f examples/s", name, record["epoch"], epochs, t["loss"],
                   t["accuracy"], v["loss"], v["accuracy"], record["examples_per_second"])

    loop = TrainingLoop(model, net, self.strategy, train, validation, checkpoints,
                        LoopConfig(epochs=epochs, seed=s.seed,
                                   checkpoint_every_steps=s.checkpoint_every_steps,
                                   jit_compile=s.jit_compile, profile_steps=s.profile_steps,
                                   profile_dir=logs.train_dir if self.chief else None),
                        on_checkpoint=on_checkpoint, on_epoch=on_epoch,
                        should_stop=lambda: self.stop.requested)
    loop.restore()
    history = loop.run()
    logs.close()
    validation_metrics = loop.evaluate(validation)
    return history, float(loop.train_seconds.numpy()), validation_metrics, train.steps_per_epoch

  def _finish(self, name, net, role, seconds, validation_metrics, examples_trained, extra=None):
    """Evaluates on the test split, exports, and writes the result.json marker last."""
    logits = evaluation.predict_logits(net, self.splits.test_images)
    report = evaluation.test_report(logits, self.splits.test_labels)
    result = dict(name=name, role=role, params=int(net.count_params()), **report,
                  validation_accuracy=validation_metrics["accuracy"],
                  validation_loss=validation_metrics["loss"], train_seconds=seconds,
                  train_examples_per_second=examples_trained / max(seconds, 1e-9),
                  alpha=None, temperature=None, precision=self.precision,
                  jit_compile=self.settings.jit_compile)
    result.update(extra or {})
    if self.chief:
      folder = os.path.join(self.dir, name)
      predictions = logits.argmax(axis=-1)
      comparison.save_predictions(folder, self.splits.test_images, self.splits.test_labels,
                                  predictions)
      summaries.write_test(os.path.join(self.dir, "logs"), name,
                           self.settings.teacher_epochs if role == "teacher"
                           else self.settings.student_epochs, report, self.splits.test_labels,
                           predictions)
      export.export_saved_model(net, os.path.join(folder, "export"))
      export.save_keras(net, os.path.join(folder, "model.keras"))
      results.write_json_atomic(os.path.join(folder, "result.json"), result)
      self.storage.sync(f"logs/{name}")  # the test run and its confusion matrix
      self.storage.sync(name, last=("result.json",))
    logging.info("%s: test accuracy %.4f (%d errors), test loss %.4f", name,
                 result["test_accuracy"], result["test_errors"], result["test_loss"])
    return result

  def _seeded(self, build):
    keras.utils.set_random_seed(self.settings.seed)
    with self.strategy.scope():
      return build()

  def run_teacher(self):
    s = self.settings
    done = results.read_model_result(self.dir, TEACHER)
    if done:
      logging.info("teacher already finished (%.4f test accuracy): reusing it",
                   done["test_accuracy"])
      return self._load_teacher(os.path.join(self.dir, TEACHER))
    train = self._pipeline(self.splits.train_images, self.splits.train_labels)
    validation = self._pipeline(self.splits.validation_images, self.splits.validation_labels)
    net = self._seeded(models.build_teacher)
    with self.strategy.scope():
      model = Classifier(net)
      model.compile(optimizer=self._optimizer(s.learning_rate, s.teacher_epochs,
                                            train.steps_per_epoch))
    self._check_stop(TEACHER)
    _, seconds, val, steps = self._train(TEACHER, model, net, train, validation,
                                         s.teacher_epochs)
    self._finish(TEACHER, net, "teacher", seconds, val,
                 s.teacher_epochs * steps * s.batch_size)
    return net

  def _load_teacher(self, folder):
    with self.strategy.scope():
      return keras.models.load_model(os.path.join(folder, "model.keras"), compile=False)

  def teacher_logits(self, teacher):
    """Teacher logits on train and validation, computed once and kept in model_dir."""
    folder = os.path.join(self.dir, "teacher_logits")
    key = {"images_sha256": _images_key(self.splits), "teacher_params": teacher.count_params()}
    key_path = os.path.join(folder, "key.json")
    try:
      with open(key_path) as f:
        if json.load(f) == key:
          return (np.load(os.path.join(folder, "train.npy")),
                  np.load(os.path.join(folder, "validation.npy")))
    except (OSError, ValueError):
      pass
    started = time.perf_counter()
    train = evaluation.predict_logits(teacher, self.splits.train_images)
    validation = evaluation.predict_logits(teacher, self.splits.validation_images)
    logging.info("Cached teacher logits for %d examples in %.1fs", len(train) + len(validation),
                 time.perf_counter() - started)
    if self.chief:
      os.makedirs(folder, exist_ok=True)
      for part, array in (("train", train), ("validation", validation)):
        np.save(os.path.join(folder, f"{part}.tmp.npy"), array)
        os.replace(os.path.join(folder, f"{part}.tmp.npy"), os.path.join(folder, f"{part}.npy"))
      results.write_json_atomic(key_path, key)
      self.storage.sync("teacher_logits", last=("key.json",))
    return train, validation

  def run_student(self, spec, teacher, cached_logits):
    s = self.settings
    done = results.read_model_result(self.dir, spec.name)
    if done:
      logging.info("student %s already finished: skipping", spec.name)
      return
    train_extra, validation_extra = cached_logits or (None, None)
    train = self._pipeline(self.splits.train_images, self.splits.train_labels, train_extra)
    validation = self._pipeline(self.splits.validation_images, self.splits.validation_labels,
                                validation_extra)
    net = self._seeded(models.build_student)  # same seed: every student starts identical
    initial = weights_digest(net)
    with self.strategy.scope():
      distiller = Distiller(net, teacher=None if cached_logits else teacher)
      distiller.compile(optimizer=self._optimizer(s.student_learning_rate, s.student_epochs,
                                                 train.steps_per_epoch),
                        alpha=spec.alpha, temperature=spec.temperature)
    _, seconds, val, steps = self._train(spec.name, distiller, net, train, validation,
                                         s.student_epochs)
    self._finish(spec.name, net, "student", seconds, val,
                 s.student_epochs * steps * s.batch_size,
                 extra={"alpha": spec.alpha, "temperature": spec.temperature,
                        "teacher_logits": s.teacher_logits, "initial_weights_sha256": initial})

  def run_info(self) -> dict:
    s = self.settings
    return {"dataset": s.dataset if not s.idx_dir else f"idx:{s.idx_dir}",
            "strategy": distribution.strategy_name(self.strategy), "replicas": self.replicas,
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "mnist_distill": trainer.__version__, "precision": self.precision,
            "jit_compile": s.jit_compile, "global_batch_size": s.batch_size,
            "flags": s.flag_dict()}

  def merge_results(self):
    """Merges every finished model (also those other pods wrote) into results.json."""
    if not self.chief:
      return None
    seen = None
    while True:
      remote = {p for p in self.storage.list_remote("")
                if p.count("/") == 1 and p.endswith("/result.json")}
      for path in remote:
        if not os.path.isfile(os.path.join(self.dir, path)):
          self.storage.pull(path)
          self.storage.pull(path.replace("result.json", comparison.PREDICTIONS_FILE))
      summary = results.merge(self.dir, self.run_info(), figures=comparison.write_report)
      self.storage.sync(comparison.FIGURES_DIR)
      self.storage.sync(f"logs/{comparison.COMPARISON_RUN}")
      self.storage.sync("results.md")
      self.storage.sync("results.json")
      self.storage.flush()
      if remote == seen:  # nothing new appeared while merging: done
        return summary
      seen = remote

  def run(self):
    self.stop.install()
    self.prepare()
    s = self.settings
    if s.mode != "report":
      teacher = None
      if s.mode in ("all", "teacher"):
        teacher = self.run_teacher()
      if s.mode in ("all", "students"):
        teacher = teacher or self._load_teacher(self.teacher_dir)
        cached = self.teacher_logits(teacher) if s.teacher_logits == "cached" else None
        for spec in s.students:
          self.run_student(spec, teacher, cached)
    summary = self.merge_results()
    self.storage.close()
    return summary
