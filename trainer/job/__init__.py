"""Layer 4, the job: the run in order. `run(settings, strategy=, storage=, splits=)` is the
package's face, used by trainer/cli.py and by tests that run the job in process.

This module holds the job's modes: preflight, the teacher, each student, the merged report.
The phases live in trainer/job/runtime.py (preflight), trainer/job/teacher_phase.py and
trainer/job/student_phase.py (which train one model each through trainer/job/model_training.py)
and trainer/job/reporting.py (the merge); this module orders them and owns leases, storage and
SIGTERM. Uses every layer below it.

Everything that can reject the input runs before the first training step (trainer/job/runtime.py).
Finished models (a result marker) are reused, unfinished ones resume from their checkpoints; so
rerunning the same command after preemption continues where the last run stopped.

With a gs:// model_dir the bucket is the source of truth: before a model is trained its marker,
or else its checkpoints and logs, are pulled exactly as the bucket has them (so a fresh disk
resumes from the bucket alone), and each process syncs only the folders of the models it trains
(syncs mirror deletions), so Indexed-Job pods can share one model_dir.
"""

import logging
import signal
from typing import Optional

from trainer.errors import Preempted, StorageError
from trainer.flags import Settings
from trainer.job import reporting, rerun, runtime
from trainer.job.model_training import ModelTrainer
from trainer.job.runtime import TEACHER
from trainer.job.student_phase import StudentPhase
from trainer.job.teacher_phase import TeacherPhase
from trainer.modeling import models
from trainer.rundir import disk_full, lease
from trainer.training import watchdog


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
    self.teacher = TeacherPhase(self.settings, self.rt, self.trainer, self._data_record)
    self.students = StudentPhase(self.settings, self.rt, self.trainer, self._data_record,
                                 self.teacher.known_sha256)
    return self.rt

  def _data_record(self) -> dict:
    """The splits' digests, hashed once per job (every model's record names them)."""
    if self._data is None:
      self._data = self.rt.splits.record()
    return self._data

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

  def _report_given_teacher(self):
    """--mode=students with --teacher_model: the given teacher's row, as in --mode=all. Its
    lease is held only while the row is written: the Indexed-Job pods of one run all come here,
    the first writes it and the others find it finished, and none waits on another's students."""
    self._take_leases([TEACHER])
    try:
      if TEACHER in self.settings.retrain:
        rerun.discard(self.rt, TEACHER)
      return self.teacher.run()
    finally:
      held = self.trainer.leases.pop(TEACHER, None)
      if held is not None:
        held.release()

  def _run_modes(self):
    s = self.settings
    if s.mode == "report":
      reporting.backfill(s, self.rt, self.trainer.measure())
      return
    rerun.check(s, self.rt, self.teacher.record(), self.students.record,
                self.teacher.known_sha256())
    self._take_leases(rerun.models_trained(s))
    rerun.discard_retrained(s, self.rt)
    teacher = self.teacher.run() if s.mode in ("all", "teacher") else None
    if s.mode in ("all", "students"):
      if rerun.reports_given_teacher(s):
        teacher = self._report_given_teacher()
      if teacher is None:
        teacher = self.teacher.for_students()
      cached = self.students.teacher_logits(teacher) if s.teacher_logits == "cached" else None
      for spec in s.students:
        self.students.run(spec, teacher, cached)

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
      full = (disk_full.explain(e, self.settings, self.rt, models.param_counts)
              if isinstance(e, Exception) else None)
      if full is not None:  # exit 3 and one line, not a traceback
        raise full from None
      raise
    self._close_storage()
    self._release_leases()
    return summary


def run(settings: Settings, strategy=None, storage=None, splits=None):
  """Runs the job in this process; returns the merged summary (None on non-chief workers)."""
  return Job(settings, strategy=strategy, storage=storage, splits=splits).run()
