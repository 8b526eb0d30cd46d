"""The job: check inputs, train (or resume) the teacher, distill each student, merge the report.

Everything that can reject the input runs before the first training step. Finished models
(a result.json marker) are reused, unfinished ones resume from their checkpoints; so rerunning
the same command after preemption continues where the last run stopped.

With a gs:// model_dir the bucket is the source of truth: before a model is trained its marker,
or else its checkpoints and logs, are pulled exactly as the bucket has them (so a fresh disk
resumes from the bucket alone), and each process syncs only the folders of the models it trains
(syncs mirror deletions), so Indexed-Job pods can share one model_dir.
"""

import glob
import logging
import os
import shutil
import signal
import tempfile

import keras
import tensorflow as tf

import trainer
from trainer import (batch_slices, comparison, data, distribution, evaluation, export,
                     hparams_logging, models, results, storage, summaries, teacher_cache)
from trainer.classifier import Classifier
from trainer.distiller import Distiller
from trainer.errors import Preempted, StorageError, UsageError
from trainer.flags import Settings
from trainer.loop import LoopConfig, TrainingLoop
from trainer.optimizers import FusedAdam
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
    # Vertex AI TensorBoard streams from $AIP_TENSORBOARD_LOG_DIR; $AIP_CHECKPOINT_DIR gets
    # <model>/checkpoints of every model.
    self.log_mirror = self._open_mirror("AIP_TENSORBOARD_LOG_DIR",
                                        os.path.join(self.dir, "logs"), f"{s.model_dir}/logs")
    self.checkpoint_mirror = self._open_mirror("AIP_CHECKPOINT_DIR", self.dir, s.model_dir)
    self._plan_cpu_threads()  # before make_strategy: TensorFlow fixes its threads on start
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

  def _plan_cpu_threads(self):
    s = self.settings
    cores = batch_slices.available_cores()
    workers = max(1, distribution.tf_config_workers())
    chosen = batch_slices.plan(s.batch_slices, s.batch_size // workers, cores,
                               on_gpu=bool(tf.config.list_physical_devices("GPU")),
                               cpu_devices=s.num_cpu_devices)
    self.slices = chosen.slices
    self.intra_op_threads = batch_slices.apply_threads(chosen)
    logging.info("Batch slices per replica: %d; intra-op threads: %s (%d cores available)",
                 self.slices, self.intra_op_threads or "TensorFlow default", cores)

  def _open_mirror(self, variable, local_dir, same_as):
    """Vertex AI: a copy of part of the run also goes where $variable points (gs:// only),
    unless that is already where it lands. The run itself keeps the model_dir layout, so
    resume always reads <model_dir>; the mirror is written, never read."""
    target = os.environ.get(variable, "").strip().rstrip("/")
    if not target or target == same_as:
      return None
    if not storage.is_remote(target):
      logging.warning("%s=%s is not a gs:// URL: not mirrored", variable, target)
      return None
    mirror = storage.RunStorage(local_dir, remote=target)
    mirror.check()
    logging.info("%s: mirrored to %s", variable, target)
    return mirror

  def _sync_logs(self, name):
    self.storage.sync(f"logs/{name}")
    if self.log_mirror is not None:
      self.log_mirror.sync(name)

  def _pull_model(self, name, finished_needs=()):
    """Brings model `name` from the bucket as it is there: its result.json marker (plus the
    files in `finished_needs`) if finished, else its checkpoints and TensorBoard logs. Local
    copies the bucket lacks are dropped. Returns the finished result or None."""
    self.storage.pull(f"{name}/result.json", exact=True)
    if results.read_model_result(self.dir, name):
      for rel in finished_needs:
        self.storage.pull(f"{name}/{rel}")
    else:
      self.storage.pull(f"{name}/checkpoints", exact=True)
      self.storage.pull(f"logs/{name}", exact=True)
    return results.read_model_result(self.dir, name)

  def _check_stop(self, name):
    if self.stop.requested:
      raise Preempted(f"stopped before training {name}: nothing left to checkpoint")

  def _locate_teacher(self) -> str:
    s = self.settings
    if s.teacher_dir == f"{s.model_dir}/teacher":
      local = os.path.join(self.dir, TEACHER)
      self.storage.pull(f"{TEACHER}/result.json", exact=True)
      self.storage.pull(f"{TEACHER}/model.keras", exact=True)
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
        learning_rate, decay_steps=max(1, epochs * steps_per_epoch))
    return FusedAdam(schedule)

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
      self.storage.raise_if_failed()  # the bucket is gone for good: stop, don't train unsaved
      if self.chief:
        self.storage.sync(f"{name}/checkpoints", last=("checkpoint",))
        if self.checkpoint_mirror is not None:
          self.checkpoint_mirror.sync(f"{name}/checkpoints", last=("checkpoint",))

    def on_epoch(record):
      logs.write_epoch(record)
      if self.chief:
        self._sync_logs(name)
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
    try:
      history = loop.run()
    except Preempted as e:
      raise Preempted(f"{name}: {e}") from None
    logs.close()  # its last events go up with the model's folder in _finish
    validation_metrics = loop.evaluate(validation)
    return history, float(loop.train_seconds.numpy()), validation_metrics, train.steps_per_epoch

  def _finish(self, name, net, role, seconds, validation_metrics, examples_trained, extra=None):
    """Evaluates on the test split, exports, and writes the result.json marker last."""
    logits = evaluation.predict_logits(net, self.splits.test_images, slices=self.slices)
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
      for stale in glob.glob(os.path.join(folder, "*.tmp-*")):  # left by a killed process
        if os.path.isdir(stale):
          shutil.rmtree(stale)
        else:
          os.remove(stale)
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
      self._sync_logs(name)
      self.storage.sync(name, last=("result.json",))
    logging.info("%s: test accuracy %.4f (%d errors), test loss %.4f", name,
                 result["test_accuracy"], result["test_errors"], result["test_loss"])
    return result

  def _seeded(self, build):
    # Uploads draw from Python's global `random` (google-cloud-storage's multipart boundaries):
    # let the upload threads go idle first, or initial weights would depend on network timing.
    for target in self._uploaders():
      target.flush()
    keras.utils.set_random_seed(self.settings.seed)
    with self.strategy.scope():
      return build()

  def run_teacher(self):
    s = self.settings
    done = self._pull_model(TEACHER, finished_needs=("model.keras",))
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
                                            train.steps_per_epoch), slices=self.slices)
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
    return teacher_cache.load_or_compute(teacher, self.splits, self.storage, write=self.chief,
                                         slices=self.slices)

  def run_student(self, spec, teacher, cached_logits):
    s = self.settings
    done = self._pull_model(spec.name)
    if done:
      logging.info("student %s already finished: skipping", spec.name)
      return
    train_extra, validation_extra = cached_logits or (None, None)
    train = self._pipeline(self.splits.train_images, self.splits.train_labels, train_extra)
    validation = self._pipeline(self.splits.validation_images, self.splits.validation_labels,
                                validation_extra)
    net = self._seeded(models.build_student)  # same seed: every student starts identical
    initial = teacher_cache.weights_digest(net)
    self._check_stop(spec.name)
    with self.strategy.scope():
      distiller = Distiller(net, teacher=None if cached_logits else teacher)
      distiller.compile(optimizer=self._optimizer(s.student_learning_rate, s.student_epochs,
                                                 train.steps_per_epoch),
                        alpha=spec.alpha, temperature=spec.temperature, slices=self.slices)
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
            "batch_slices": self.slices, "intra_op_threads": self.intra_op_threads,
            "flags": s.flag_dict()}

  def _finished_in_bucket(self) -> set:
    return {p for p in self.storage.list_remote("")
            if p.count("/") == 1 and p.endswith("/result.json")}

  def merge_results(self):
    """Merges every finished model (also those other pods wrote) into results.json.

    Pods finishing at once each upload their own results.json; the last upload wins. So each
    pod lists the markers again *after* its upload and merges again until that listing adds
    nothing: whichever upload lands last was followed by a listing equal to its content, and a
    marker uploaded after that listing would make its own pod upload later still.
    """
    if not self.chief:
      return None
    self.storage.flush()  # our own markers are in the bucket before we list it
    merged, summary = None, None
    while True:
      markers = self._finished_in_bucket()
      if markers == merged:
        return summary
      for path in sorted(markers):
        self.storage.pull(path)
        self.storage.pull(path.replace("result.json", comparison.PREDICTIONS_FILE))
      if self.storage.remote:  # the bucket is the truth: a local-only marker is not a result
        for path in glob.glob(os.path.join(self.dir, "*", "result.json")):
          if os.path.relpath(path, self.dir).replace(os.sep, "/") not in markers:
            os.remove(path)
      summary = results.merge(self.dir, self.run_info(), figures=comparison.write_report)
      self.storage.sync(comparison.FIGURES_DIR)
      self._sync_logs(comparison.COMPARISON_RUN)
      self.storage.sync("results.md")
      self.storage.sync("results.json")  # after results.md: results.json is the run's marker
      self.storage.flush()
      merged = markers

  def _uploaders(self) -> list:
    """The run's storage and its Vertex AI mirrors: whichever prepare() got to open."""
    return [target for target in (getattr(self, "storage", None),
                                  getattr(self, "log_mirror", None),
                                  getattr(self, "checkpoint_mirror", None))
            if target is not None]

  def _close_storage(self, quiet=False) -> bool:
    """Uploads everything queued and stops the upload threads; False if that failed (quiet)."""
    ok = True
    for target in self._uploaders():
      try:
        target.close()
      except StorageError as e:
        if not quiet:
          raise
        logging.error("%s", e)
        ok = False
    return ok

  def run(self):
    self.stop.install()
    try:
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
    except BaseException as e:
      # Upload what is queued (e.g. the SIGTERM checkpoint) before the process exits; the
      # original error stays the one reported.
      uploaded = self._close_storage(quiet=True)
      if isinstance(e, Preempted) and uploaded and getattr(self, "storage", None) \
          and self.storage.remote:
        raise Preempted(f"{e}, uploaded to {self.storage.remote}") from None
      raise
    self._close_storage()
    return summary
