"""Before any training: may this invocation reuse what the model_dir already holds?

Every model this invocation would train is compared with what its folder records (a finished
result, or the settings beside its checkpoints). A difference stops the job with exit 2, before
anything is written; `--retrain=NAME` discards exactly that model's folder and logs instead.
Students are bound to the weights of the teacher they learned from, so a teacher that will be
trained again makes every recorded student stale.
"""

import logging
import os
import shutil
from typing import Callable, Optional

from trainer.errors import UsageError
from trainer.flags import Settings
from trainer.job import provenance
from trainer.job.runtime import TEACHER, Runtime
from trainer.rundir import layout


def _recorded(rt: Runtime, name: str):
  """(finished result or None, checkpoint settings or None, whether checkpoints exist), as the
  bucket has them."""
  rt.storage.pull(layout.result_rel(name), exact=True)
  result = layout.read_json(layout.local(rt.dir, layout.result_rel(name)))
  rt.storage.pull(layout.checkpoints_rel(name), exact=True)
  folder = layout.local(rt.dir, layout.checkpoints_rel(name))
  checkpoint = layout.read_json(os.path.join(folder, layout.SETTINGS))
  has_checkpoints = os.path.exists(os.path.join(folder, "checkpoint"))
  return result, checkpoint, has_checkpoints


def _compare(name: str, rt: Runtime, expected: dict) -> Optional[dict]:
  """Raises UsageError if `name`'s recorded settings differ; returns its finished result."""
  result, checkpoint, has_checkpoints = _recorded(rt, name)
  if result is not None:
    provenance.check_same(name, "finished model", result.get("settings"), expected)
  elif has_checkpoints:
    provenance.check_same(name, "checkpoint", checkpoint, expected)
  return result


def discard(rt: Runtime, name: str) -> None:
  """Deletes model `name`'s folder and logs, locally and (by mirroring) in the bucket."""
  for rel in (name, layout.logs_rel(name)):
    shutil.rmtree(layout.local(rt.dir, rel), ignore_errors=True)
    os.makedirs(layout.local(rt.dir, rel), exist_ok=True)
    rt.storage.sync(rel)
  rt.storage.flush()
  for rel in (name, layout.logs_rel(name)):
    shutil.rmtree(layout.local(rt.dir, rel), ignore_errors=True)
  logging.info("--retrain: discarded %s", name)


def check(s: Settings, rt: Runtime, teacher_record: dict,
          student_record: Callable[[object, str], dict], teacher_sha256: Optional[str]) -> None:
  """Checks every model this invocation trains against what its folder records.

  `student_record(spec, teacher_sha256)` gives a student's expected record; `teacher_sha256` is
  the weights digest of the teacher the students learn from when it is already known (finished
  or given), None when this invocation trains it. Changes nothing: a refused run leaves the
  folder as it was (discard_retrained() runs once every check has passed)."""
  if s.mode in ("all", "teacher") and TEACHER not in s.retrain:
    _compare(TEACHER, rt, teacher_record)
  if s.mode in ("all", "students"):
    for spec in s.students:
      if spec.name in s.retrain:
        continue
      if teacher_sha256 is None:  # the teacher is trained now: nothing recorded can match
        result, _, has_checkpoints = _recorded(rt, spec.name)
        if result is not None or has_checkpoints:
          raise UsageError(
              f"{spec.name}: was distilled from a teacher that this run trains again. Use a "
              f"new --model_dir, or --retrain={spec.name} to discard that model and train it "
              "again")
      else:
        _compare(spec.name, rt, student_record(spec, teacher_sha256))
  if reports_given_teacher(s) and TEACHER not in s.retrain:
    # After the students: a student of another teacher says so first (its teacher digest).
    _compare(TEACHER, rt, teacher_record)


def reports_given_teacher(s: Settings) -> bool:
  """--mode=students with --teacher_model also writes the given teacher's row, as --mode=all
  does (a row of another teacher would sit beside students it did not teach)."""
  return s.mode == "students" and bool(s.teacher_model)


def models_trained(s: Settings) -> list:
  """The models this invocation trains (or reuses), in training order."""
  return ([TEACHER] if s.mode in ("all", "teacher") else []) + (
      [spec.name for spec in s.students] if s.mode in ("all", "students") else [])


def discard_retrained(s: Settings, rt: Runtime) -> None:
  """Discards the --retrain models that this invocation trains."""
  for name in models_trained(s):
    if name in s.retrain:
      discard(rt, name)
