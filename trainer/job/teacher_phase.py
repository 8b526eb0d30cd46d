"""The teacher phase: train the notebook's teacher, or evaluate the one given by --teacher_model.

It also names the teacher the students learn from: its weights digest goes into every student's
record, so a rerun against another teacher is refused rather than silently mixed.
"""

import logging
import os
from typing import Callable, Optional

import keras

from trainer.evaluation import evaluation
from trainer.flags import Settings
from trainer.job import model_training, provenance, teacher_cache
from trainer.job.model_training import ModelTrainer
from trainer.job.runtime import TEACHER, Runtime
from trainer.modeling import models
from trainer.modeling.classifier import Classifier
from trainer.rundir import layout


class TeacherPhase:
  """The teacher of one invocation; `data_record()` gives the splits' digests (hashed once)."""

  def __init__(self, settings: Settings, rt: Runtime, trainer: ModelTrainer,
               data_record: Callable[[], dict]):
    self.settings, self.rt, self.trainer, self.data_record = settings, rt, trainer, data_record

  def record(self) -> dict:
    """The settings a finished teacher must have been trained with (or the given teacher's)."""
    given = self.rt.outside_teacher
    if given is not None:
      return {"role": "teacher", "data": self.data_record(), **given.record()}
    return provenance.teacher_settings(self.settings, self.data_record(), self.rt.precision)

  def run(self):
    """Trains the teacher (or resumes it, or reuses a finished one); returns its network."""
    s, rt, mt = self.settings, self.rt, self.trainer
    if rt.outside_teacher is not None:
      return self._report_given()
    done = mt.pull(TEACHER, finished_needs=(layout.MODEL_FILE,))
    if done:
      logging.info("teacher already finished (%.4f test accuracy): reusing it",
                   done["test_accuracy"])
      return self.load(layout.local(rt.dir, TEACHER))
    train = mt.pipeline(rt.splits.train_images, rt.splits.train_labels)
    validation = mt.pipeline(rt.splits.validation_images, rt.splits.validation_labels)
    net = mt.seeded(models.build_teacher)
    with rt.strategy.scope():
      model = Classifier(net)
      model.compile(optimizer=mt.optimizer(s.learning_rate, s.teacher_epochs,
                                           train.steps_per_epoch, s.teacher_weight_decay),
                    slices=rt.slices)
    mt.check_stop(TEACHER)
    record = self.record()
    trained = mt.train(TEACHER, model, net, train, validation, s.teacher_epochs, record)
    mt.finish(TEACHER, net, "teacher", trained, s.teacher_epochs, record,
              extra={"weights_sha256": teacher_cache.weights_digest(net)})
    return net

  def _report_given(self):
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
      mt.finish(TEACHER, given.model, "teacher", trained, 0, self.record(),
                extra={"weights_sha256": given.sha256, **given.record()}, export=False)
    return given.model

  def for_students(self):
    """The teacher of --mode=students: the given one, or the finished one in teacher_dir."""
    if self.rt.outside_teacher is not None:
      return self.rt.outside_teacher.model
    return self.load(self.rt.teacher_dir)

  def known_sha256(self) -> Optional[str]:
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
    return done.get("weights_sha256") or teacher_cache.weights_digest(self.load(folder))

  def load(self, folder: str):
    with self.rt.strategy.scope():
      return keras.models.load_model(os.path.join(folder, layout.MODEL_FILE), compile=False)
