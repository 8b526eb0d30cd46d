"""The job: preflight, the teacher, each student, the merged report.

Everything that can reject the input runs before the first training step (trainer/runtime.py).
Finished models (a result marker) are reused, unfinished ones resume from their checkpoints; so
rerunning the same command after preemption continues where the last run stopped.

With a gs:// model_dir the bucket is the source of truth: before a model is trained its marker,
or else its checkpoints and logs, are pulled exactly as the bucket has them (so a fresh disk
resumes from the bucket alone), and each process syncs only the folders of the models it trains
(syncs mirror deletions), so Indexed-Job pods can share one model_dir.
"""

import logging
import os
import signal
from typing import Optional

import keras
import numpy as np

from trainer import (
  evaluation,
  layout,
  lease,
  model_training,
  models,
  provenance,
  reporting,
  rerun,
  runtime,
  teacher_cache,
  watchdog,
)
from trainer.classifier import Classifier
from trainer.distiller import Distiller
from trainer.errors import Preempted, StorageError
from trainer.flags import Settings
from trainer.model_training import ModelTrainer
from trainer.runtime import TEACHER


class _StopFlag:
  """Set by SIGTERM (the pod's grace period): the loop checkpoints and exits, and a deadline
  makes sure the process says what is lost and exits 143 before the kubelet's SIGKILL."""

  def __init__(self, grace_period_seconds: float):
    self.requested = False
    self.deadline = watchdog.GraceDeadline(grace_period_seconds)

  def install(self):
    signal.signal(signal.SIGTERM, self._handle)
    self.deadline.install()

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: checkpointing and exiting")
    self.requested = True


class Job:
  """One invocation of mnist-distill with validated settings.

  `strategy`, `storage` and `splits` replace what the flags would build (tests, embedding)."""

  def __init__(self, settings: Settings, strategy=None, storage=None, splits=None):
    self.settings = settings
    self.stop = _StopFlag(settings.grace_period_seconds)
    self._overrides = dict(strategy=strategy, run_storage=storage, splits=splits)
    self.rt: Optional[runtime.Runtime] = None
    self.trainer: Optional[ModelTrainer] = None
    self._data = None

  def prepare(self) -> runtime.Runtime:
    self.rt = runtime.prepare(self.settings, **self._overrides)
    self.trainer = ModelTrainer(self.rt, self.settings, lambda: self.stop.requested)
    return self.rt

  # ---- the teacher ----
  def run_teacher(self):
    s, rt, mt = self.settings, self.rt, self.trainer
    if rt.outside_teacher is not None:
      return self._report_given_teacher()
    done = mt.pull(TEACHER, finished_needs=(layout.MODEL_FILE,))
    if done:
      logging.info("teacher already finished (%.4f test accuracy): reusing it",
                   done["test_accuracy"])
      return self._load_teacher(layout.local(rt.dir, TEACHER))
    train = mt.pipeline(rt.splits.train_images, rt.splits.train_labels)
    validation = mt.pipeline(rt.splits.validation_images, rt.splits.validation_labels)
    net = mt.seeded(models.build_teacher)
    with rt.strategy.scope():
      model = Classifier(net)
      model.compile(optimizer=mt.optimizer(s.learning_rate, s.teacher_epochs,
                                           train.steps_per_epoch, s.teacher_weight_decay),
                    slices=rt.slices)
    mt.check_stop(TEACHER)
    record = self.teacher_record()
    trained = mt.train(TEACHER, model, net, train, validation, s.teacher_epochs, record)
    mt.finish(TEACHER, net, "teacher", trained, s.teacher_epochs, record,
              extra={"weights_sha256": teacher_cache.weights_digest(net)})
    return net

  def _report_given_teacher(self):
    """--teacher_model: no teacher is trained; the given one is evaluated on the validation
    and test splits and reported as the teacher row, marked as not trained here."""
    rt, mt, given = self.rt, self.trainer, self.rt.outside_teacher
    if not mt.pull(TEACHER):
      validation = evaluation.test_report(
          evaluation.predict_logits(given.model, rt.splits.validation_images, slices=rt.slices),
          rt.splits.validation_labels)
      trained = model_training.Trained(
          seconds=0.0, examples=0, validation={"accuracy": validation["test_accuracy"],
                                               "loss": validation["test_loss"]})
      mt.finish(TEACHER, given.model, "teacher", trained, 0, self.teacher_record(),
                extra={"weights_sha256": given.sha256, **given.record()}, export=False)
    return given.model

  def _data_record(self) -> dict:
    """The splits' digests, hashed once per job (every model's record names them)."""
    if self._data is None:
      self._data = self.rt.splits.record()
    return self._data

  def teacher_record(self) -> dict:
    rt = self.rt
    if rt.outside_teacher is not None:
      return {"role": "teacher", "data": self._data_record(), **rt.outside_teacher.record()}
    return provenance.teacher_settings(self.settings, self._data_record(), rt.precision)

  def student_record(self, spec, teacher_sha256: str) -> dict:
    rt = self.rt
    extra = {"train_set": self._train_set()[2]}
    if rt.outside_teacher is not None:
      extra["teacher"] = rt.outside_teacher.record()
    return provenance.student_settings(self.settings, spec, self._data_record(), rt.precision,
                                       teacher_sha256, extra)

  def _train_set(self):
    """(images, labels, record) the students learn from: the transfer set when one is given
    (placeholder labels when it has none: only alpha=1 students train there), else the task's
    training split."""
    rt = self.rt
    if rt.transfer is None:
      return (rt.splits.train_images, rt.splits.train_labels,
              {"source": "training split", "examples": int(len(rt.splits.train_labels)),
               "labelled": True})
    labels = rt.transfer.labels
    if labels is None:
      labels = np.zeros(len(rt.transfer.images), np.int64)
    return rt.transfer.images, labels, rt.transfer.record

  def _known_teacher_sha256(self):
    """The weights digest of the teacher students will learn from, if it exists already."""
    s, rt = self.settings, self.rt
    if rt.outside_teacher is not None:
      return rt.outside_teacher.sha256
    if s.mode == "students":
      folder = rt.teacher_dir
    elif s.mode == "all" and "teacher" not in s.retrain:
      rt.storage.pull(layout.result_rel(TEACHER), exact=True)  # a fresh disk: ask the bucket
      folder = layout.local(rt.dir, TEACHER)
    else:
      return None
    done = layout.read_json(os.path.join(folder, layout.RESULT))
    if done is None:
      return None
    return done.get("weights_sha256") or teacher_cache.weights_digest(self._load_teacher(folder))

  def _load_teacher(self, folder):
    with self.rt.strategy.scope():
      return keras.models.load_model(os.path.join(folder, layout.MODEL_FILE), compile=False)

  def teacher_logits(self, teacher):
    """Teacher logits on the students' training images and the validation split, computed
    once and kept in model_dir."""
    images, _, record = self._train_set()
    return teacher_cache.load_or_compute(teacher, images, self.rt.splits.validation_images,
                                         record["source"], self.rt.storage,
                                         write=self.rt.chief, slices=self.rt.slices)

  # ---- the students ----
  def run_student(self, spec, teacher, cached_logits):
    s, rt, mt = self.settings, self.rt, self.trainer
    if mt.pull(spec.name):
      logging.info("student %s already finished: skipping", spec.name)
      return
    train_extra, validation_extra = cached_logits or (None, None)
    images, labels, train_set = self._train_set()
    train = mt.pipeline(images, labels, train_extra)
    validation = mt.pipeline(rt.splits.validation_images, rt.splits.validation_labels,
                             validation_extra)
    net = mt.seeded(models.build_student)  # same seed: every student starts identical
    initial = teacher_cache.weights_digest(net)
    mt.check_stop(spec.name)
    with rt.strategy.scope():
      # A labels-only student needs no teacher forward when it runs online.
      online = None if cached_logits or spec.alpha == 0 else teacher
      distiller = Distiller(net, teacher=online)
      distiller.compile(optimizer=mt.optimizer(s.student_learning_rate, s.student_epochs,
                                               train.steps_per_epoch),
                        distillation_weight=spec.alpha, temperature=spec.temperature,
                        slices=rt.slices)
    record = self.student_record(spec, self._known_teacher_sha256()
                                 or teacher_cache.weights_digest(teacher))
    trained = mt.train(spec.name, distiller, net, train, validation, s.student_epochs, record)
    mt.finish(spec.name, net, "student", trained, s.student_epochs, record,
              extra={"alpha": spec.alpha, "temperature": spec.temperature,
                     "teacher_logits": s.teacher_logits, "initial_weights_sha256": initial,
                     "train_set": train_set})

  # ---- the whole invocation ----
  def _take_leases(self, names):
    """One writer per model: the chief holds each model's lease until the job ends (workers
    of a multi-worker group never write the run folder)."""
    if not self.rt.chief:
      return
    for name in names:
      self.trainer.leases[name] = lease.acquire(self.rt.storage, name,
                                                wait_seconds=self.settings.lease_wait_seconds,
                                                ttl_seconds=self.settings.lease_ttl_seconds)

  def _release_leases(self):
    for held in self.trainer.leases.values() if self.trainer else ():
      held.release()

  def _close_storage(self, quiet=False) -> bool:
    """Uploads everything queued and stops the upload threads; False if that failed (quiet)."""
    ok = True
    for target in self.rt.uploaders() if self.rt else ():
      try:
        target.close()
      except StorageError as e:
        if not quiet:
          raise
        logging.error("%s", e)
        ok = False
    return ok

  def _run_modes(self):
    s = self.settings
    if s.mode == "report":
      reporting.backfill(s, self.rt, self.trainer.measure())
      return
    rerun.check(s, self.rt, self.teacher_record(), self.student_record,
                self._known_teacher_sha256())
    self._take_leases(rerun.models_trained(s))
    rerun.discard_retrained(s, self.rt)
    teacher = None
    if s.mode in ("all", "teacher"):
      teacher = self.run_teacher()
    if s.mode in ("all", "students"):
      if teacher is None:
        teacher = (self.rt.outside_teacher.model if self.rt.outside_teacher is not None
                   else self._load_teacher(self.rt.teacher_dir))
      cached = self.teacher_logits(teacher) if s.teacher_logits == "cached" else None
      for spec in s.students:
        self.run_student(spec, teacher, cached)

  def run(self):
    self.stop.install()
    try:
      self.prepare()
      self._run_modes()
      summary = reporting.merge(self.settings, self.rt, self.trainer.sync_logs)
    except BaseException as e:
      # Upload what is queued (e.g. the SIGTERM checkpoint) before the process exits; the
      # original error stays the one reported.
      uploaded = self._close_storage(quiet=True)
      self._release_leases()
      if isinstance(e, Preempted) and uploaded and self.rt and self.rt.storage.remote:
        raise Preempted(f"{e}, uploaded to {self.rt.storage.remote}") from None
      raise
    self._close_storage()
    self._release_leases()
    return summary


def run(settings: Settings, strategy=None, storage=None, splits=None):
  """Runs the job in this process; returns the merged summary (None on non-chief workers)."""
  return Job(settings, strategy=strategy, storage=storage, splits=splits).run()
