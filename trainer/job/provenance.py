"""What made a model: the settings that decide what it is, recorded with it and compared on rerun.

A rerun of the same model_dir reuses finished models and resumes unfinished ones; that is only
honest if they were made under the settings this invocation would use. So every model records a
canonical dict of those settings (and its digest) in its result and beside its checkpoints, and
a rerun whose settings differ stops before any training, naming what differs.

Settings that change only how fast a model trains or the order of floating-point sums (the
strategy and replica count at the same global batch, batch slices, XLA, op determinism,
checkpoint frequency, profiling, cached or online teacher logits) are not recorded: they do not
change what the model is.
"""

import hashlib
import json
from typing import Optional

from trainer.errors import UsageError
from trainer.flags import Settings

SCHEDULE = "adam, cosine decay to 0"  # the one schedule the job trains with


def digest(record: dict) -> str:
  """sha256 of the canonical JSON of `record`."""
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _common(s: Settings, data: dict, precision: str) -> dict:
  return {"data": data, "seed": s.seed, "batch_size": s.batch_size, "precision": precision,
          "schedule": SCHEDULE, "augment": s.augment}


def teacher_settings(s: Settings, data: dict, precision: str, extra: Optional[dict] = None) -> dict:
  """The teacher's record; `extra` carries settings that later features add (augmentation...)."""
  return {**_common(s, data, precision), "role": "teacher", "epochs": s.teacher_epochs,
          "learning_rate": s.learning_rate, "weight_decay": s.teacher_weight_decay,
          **(extra or {})}


def student_settings(s: Settings, spec, data: dict, precision: str, teacher_sha256: str,
                     extra: Optional[dict] = None) -> dict:
  """A student's record: its own settings and the weights digest of the teacher it learns from."""
  return {**_common(s, data, precision), "role": "student", "epochs": s.student_epochs,
          "learning_rate": s.student_learning_rate, "alpha": spec.alpha,
          "temperature": spec.temperature, "teacher_weights_sha256": teacher_sha256,
          # only when on: runs recorded before mixup existed keep their digest
          **({"mixup": spec.mixup} if spec.mixup else {}), **(extra or {})}


def differences(old: dict, new: dict, prefix: str = "") -> list:
  """'key: old -> new' for every setting that differs (nested dicts by dotted key)."""
  found = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
    if isinstance(a, dict) and isinstance(b, dict):
      found += differences(a, b, f"{prefix}{key}.")
    elif a != b:
      found.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
  return found


def _short(value) -> str:
  """A value as the one-line refusal shows it: digests cut to 12 characters."""
  text = json.dumps(value, sort_keys=True)
  if len(text) > 60:
    return text[:12] + "…" if isinstance(value, str) and " " not in value else text[:57] + "…"
  return text


def check_same(name: str, what: str, recorded: Optional[dict], expected: dict) -> None:
  """Raises UsageError (exit 2) when `recorded` (a finished model's or a checkpoint's record,
  None if it has none) differs from `expected`, with both ways out."""
  if recorded == expected:
    return
  if recorded is None:
    why = "records no settings (made by an older version or by hand)"
  else:
    why = "was made under other settings: " + "; ".join(differences(recorded, expected))
  raise UsageError(f"{name}: the {what} {why}. Use a new --model_dir, or --retrain={name} "
                   "to discard that model and train it again")
