"""The student phase: one student, distilled from the teacher (or from labels alone when
alpha=0), on the task's training split or on a transfer set.

Every student starts from the same seeded weights, so students differ only by their settings.
"""

import logging
from typing import Callable, Optional

import numpy as np

from trainer.flags import Settings
from trainer.job import provenance, teacher_cache
from trainer.job.model_training import ModelTrainer
from trainer.job.runtime import Runtime
from trainer.modeling import models
from trainer.modeling.distiller import Distiller


class StudentPhase:
  """The students of one invocation. `data_record()` gives the splits' digests (hashed once);
  `known_teacher_sha256()` the finished teacher's digest, if there is one yet."""

  def __init__(self, settings: Settings, rt: Runtime, trainer: ModelTrainer,
               data_record: Callable[[], dict],
               known_teacher_sha256: Callable[[], Optional[str]]):
    self.settings, self.rt, self.trainer = settings, rt, trainer
    self.data_record, self.known_teacher_sha256 = data_record, known_teacher_sha256
    self._teacher_sha256 = None

  def _teacher_digest(self, teacher) -> str:
    """The digest of the teacher every student of this invocation learns from; found once
    (it may mean a bucket read and hashing the teacher's weights), not once per student."""
    if self._teacher_sha256 is None:
      self._teacher_sha256 = (self.known_teacher_sha256()
                              or teacher_cache.weights_digest(teacher))
    return self._teacher_sha256

  def train_set(self):
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

  def record(self, spec, teacher_sha256: str) -> dict:
    """The settings a finished student must have been trained with."""
    extra = {"train_set": self.train_set()[2]}
    if self.rt.outside_teacher is not None:
      extra["teacher"] = self.rt.outside_teacher.record()
    return provenance.student_settings(self.settings, spec, self.data_record(), self.rt.precision,
                                       teacher_sha256, extra)

  def teacher_logits(self, teacher):
    """Teacher logits on the students' training images and the validation split, computed
    once and kept in model_dir (--teacher_logits=cached)."""
    images, _, record = self.train_set()
    return teacher_cache.load_or_compute(teacher, images, self.rt.splits.validation_images,
                                         record["source"], self.rt.storage,
                                         write=self.rt.chief, slices=self.rt.slices)

  def run(self, spec, teacher, cached_logits):
    """Trains one student (or resumes it; a finished one is skipped)."""
    s, rt, mt = self.settings, self.rt, self.trainer
    if mt.pull(spec.name):
      logging.info("student %s already finished: skipping", spec.name)
      return
    train_extra, validation_extra = cached_logits or (None, None)
    images, labels, train_set = self.train_set()
    train = mt.pipeline(images, labels, train_extra, mixup=spec.mixup)
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
    record = self.record(spec, self._teacher_digest(teacher))
    trained = mt.train(spec.name, distiller, net, train, validation, s.student_epochs, record)
    mt.finish(spec.name, net, "student", trained, s.student_epochs, record,
              extra={"alpha": spec.alpha, "temperature": spec.temperature, "mixup": spec.mixup,
                     "teacher_logits": s.teacher_logits, "initial_weights_sha256": initial,
                     "train_set": train_set})
