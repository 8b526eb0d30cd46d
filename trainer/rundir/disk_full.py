"""A full disk where the run writes, told in one line instead of a traceback.

Each writer fails its own way when the disk under --model_dir (or a gs:// run's staging folder)
fills up: TensorFlow's checkpoint and SavedModel writers raise an error whose message ends in
"No space left on device", Python, numpy and Keras an OSError with errno ENOSPC (EDQUOT over a
quota), and the bucket layer wraps those in its own errors. explain() recognises all of them and
gives OutputFull (exit 3, trainer/errors.py): the folder, what was being written, how much room
the run needs there (an estimate, see estimate_bytes) and how much it has.

What was written before stays usable: every file goes into place by a rename
(trainer/rundir/layout.py) and TensorFlow names a checkpoint in its `checkpoint` file only once it
is complete, so a rerun resumes from the last complete checkpoint. The half-written checkpoint is
removed here, to give its room back.
"""

import errno
import os
import re
import shutil
from typing import Optional

from trainer.errors import OutputFull
from trainer.rundir import downloads, layout, locations, storage

_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_MESSAGES = ("No space left on device", "Disk quota exceeded")
# TensorFlow names the file it failed on: ".../ckpt-16_temp/part-...tempstate123; No space ..."
_TF_PATH_RE = re.compile(r"(/[^\s;]+);?\s*(?:" + "|".join(_MESSAGES) + ")")
_TMP_NAME_RE = re.compile(re.escape(layout.TMP_PREFIX) + r"\d+-[0-9a-f]+-")

# What one finished model leaves, in bytes per parameter (float32 variables, measured on this
# job's teacher and student: trainer/modeling/models.py): a checkpoint holds the weights and Adam's
# two
# moments (12); the SavedModel 8, model.keras 4, the LiteRT float32 and int8 flatbuffers 4 + 1.
CHECKPOINT_BYTES_PER_PARAM = 12
# trainer/training/loop.py's max_to_keep; one more exists while the next is written
KEPT_CHECKPOINTS = 2
EXPORT_BYTES_PER_PARAM = 8 + 4
LITERT_BYTES_PER_PARAM = 4 + 1
# Per model: TensorBoard events, graphs, predictions, result (measured 0.2-0.3 MB in the default
# job); once per run: results, figures and the comparison's logs (0.3 MB there).
MODEL_FIXED_BYTES = 500_000
RUN_FIXED_BYTES = 500_000
LOGIT_BYTES = 10 * 4  # a cached teacher logit row: 10 float32


def disk_full_error(exc: BaseException) -> Optional[BaseException]:
  """The error in exc's chain (exc, its cause, its context...) that says the disk is full."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in _ERRNOS:
      return exc
    message = getattr(exc, "message", None) or str(exc)
    if any(text in message for text in _MESSAGES) and not isinstance(exc, OutputFull):
      return exc
    exc = exc.__cause__ or exc.__context__
  return None


def _failed_path(exc: BaseException) -> Optional[str]:
  if isinstance(exc, OSError) and exc.filename:
    return os.fspath(exc.filename)
  match = _TF_PATH_RE.search(getattr(exc, "message", None) or str(exc))
  return match.group(1) if match else None


def _plain(part: str) -> str:
  """A path part without the temporary naming of layout.atomic_path or TensorFlow's savers."""
  part = _TMP_NAME_RE.sub("", part)
  return part[:-len("_temp")] if part.endswith("_temp") else part


def describe(rel: str) -> str:
  """What the file at `rel` (relative to the run's folder) is, in the model_dir layout."""
  parts = [_plain(p) for p in rel.split("/") if p]
  head, rest = parts[0], parts[1:]
  if head.startswith(layout.TMP_PREFIX):  # trainer/job/runtime.py's probe, before anything else
    return "a test file (the check that the folder can be written)"
  if head == layout.LOGS:
    return f"the TensorBoard logs of {rest[0]}" if rest else "the TensorBoard logs"
  others = {layout.LOGITS_CACHE: "the teacher's cached logits", layout.FIGURES: "the figures",
            layout.RESULTS_JSON: "the merged report", layout.RESULTS_MD: "the merged report",
            layout.LEASES: "a model's lease"}
  if head in others or not rest:
    return others.get(head, head)
  model, what = head, rest[0]
  if what == layout.CHECKPOINTS:
    name = rest[1].split(".")[0] if len(rest) > 1 else ""
    return (f"{model}'s checkpoint {name}" if name.startswith("ckpt-")
            else f"{model}'s checkpoints")
  known = {layout.EXPORT: "SavedModel", layout.MODEL_FILE: "Keras file",
           "litert": "LiteRT flatbuffers", layout.RESULT: "result",
           layout.PREDICTIONS: "test predictions"}
  return f"{model}'s {known.get(what, what)}"


def _shown(rel: str) -> str:
  """`rel` as a person knows it: without temporary names or a saver's internal part files."""
  parts = [_plain(p) for p in rel.split("/") if p]
  keep = 3 if len(parts) > 2 and parts[1] == layout.CHECKPOINTS else 2
  if keep == 3 and parts[2].startswith("ckpt-"):
    parts[2] = parts[2].split(".")[0]
  return "/".join(parts[:keep])


def _remove_half_checkpoint(path: Optional[str]) -> None:
  """TensorFlow leaves the checkpoint it could not finish in <prefix>_temp/: its room goes
  back (the folder is never named in the `checkpoint` file, so nothing refers to it)."""
  if not path:
    return
  parts = path.split(os.sep)
  for i, part in enumerate(parts):
    if part.endswith("_temp") and i > 0 and layout.CHECKPOINTS in parts[:i]:
      shutil.rmtree(os.sep.join(parts[:i + 1]), ignore_errors=True)
      return


def _last_checkpoint(root: str, rel: str) -> str:
  """'<model>'s last complete checkpoint ckpt-N is kept' for a failed checkpoint write."""
  parts = rel.split("/")
  if len(parts) < 2 or parts[1] != layout.CHECKPOINTS:
    return ""
  state = os.path.join(root, parts[0], layout.CHECKPOINTS, "checkpoint")
  try:
    with open(state) as f:
      match = re.search(r'^model_checkpoint_path: "([^"]+)"', f.read(), re.MULTILINE)
  except OSError:
    match = None
  if not match:
    return f"{parts[0]} had no complete checkpoint yet. "
  return f"{parts[0]}'s last complete checkpoint {os.path.basename(match.group(1))} is kept. "


def estimate_bytes(s, model_params: tuple, train_examples: int = 0,
                   validation_examples: int = 0) -> int:
  """About how many bytes this invocation's models take in the run's folder at the most;
  `model_params`: the teacher's and a student's parameter counts.

  An estimate, from bytes per parameter measured on this job's models (see above): the models
  are trained one after another, each leaving two checkpoints, its exports and logs, and having
  three checkpoints at once while it writes one; the most is the larger of the end and any such
  moment. Added: the cached teacher logits and the report. A --teacher_model teacher leaves only
  its logs and predictions. Not counted: what other invocations wrote into the same folder."""
  teacher, student = model_params
  finished = (KEPT_CHECKPOINTS * CHECKPOINT_BYTES_PER_PARAM + EXPORT_BYTES_PER_PARAM
              + (LITERT_BYTES_PER_PARAM if s.litert else 0))
  trained = []
  if s.mode in ("all", "teacher") and not s.teacher_model:
    trained.append(teacher)
  if s.mode in ("all", "students"):
    trained += [student] * len(s.students)
  done = RUN_FIXED_BYTES
  if s.teacher_model and s.mode in ("all", "students"):
    done += MODEL_FIXED_BYTES
  if s.mode in ("all", "students") and s.teacher_logits == "cached":
    done += (train_examples + validation_examples) * LOGIT_BYTES
  most = done
  for params in trained:
    writing = (KEPT_CHECKPOINTS + 1) * CHECKPOINT_BYTES_PER_PARAM * params
    most = max(most, done + writing + MODEL_FIXED_BYTES)
    done += finished * params + MODEL_FIXED_BYTES
  return max(most, done)


def _folder_bytes(root: str) -> int:
  total = 0
  for folder, _, files in os.walk(root):
    for name in files:
      try:
        total += os.lstat(os.path.join(folder, name)).st_size
      except OSError:
        pass
  return total


def _mb(count: int) -> str:
  return f"{count / 1e6:.1f} MB" if count < 1e7 else f"{count / 1e6:.0f} MB"


def explain(exc: BaseException, s, rt=None, model_params=None) -> Optional[OutputFull]:
  """OutputFull (one line) if `exc` comes from a full disk, else None. `rt` (the Runtime, None
  before the preflight built it) says where the run's folder is and what data it uses;
  `model_params` (called only here, as it builds the models) gives the teacher's and a
  student's parameter counts for the estimate of the room needed (none without it)."""
  cause = disk_full_error(exc)
  if cause is None:
    return None
  path = _failed_path(cause)
  _remove_half_checkpoint(path)
  remote = rt.storage.remote if rt is not None else (
      s.model_dir if locations.is_remote(s.model_dir) else None)
  root = rt.dir if rt is not None else storage.local_folder(s.model_dir)
  absolute = os.path.abspath(root)
  inside = path and os.path.abspath(path).startswith(absolute + os.sep)
  rel = os.path.relpath(os.path.abspath(path), absolute).replace(os.sep, "/") if inside else ""
  what = describe(rel) if rel else (path or "a file (the error names none)")
  if rel and not _shown(rel).startswith(layout.TMP_PREFIX):
    what += f" ({_shown(rel)})"
  if not inside and path:  # e.g. a download of an input beside the staging folder
    root = os.path.dirname(path)
  if not inside:
    where = root
  elif remote:
    where = f"the staging folder {root} of {remote} (${downloads.STAGING_ENV})"
  else:
    where = f"--model_dir {root}"
  need = ""
  if model_params is not None:
    try:
      splits = rt.splits if rt is not None else None
      needed = estimate_bytes(s, model_params(), len(splits.train_labels) if splits else 0,
                              len(splits.validation_labels) if splits else 0)
      need = f"this run needs about {_mb(needed)} there (an estimate from its models' sizes); "
    except Exception:  # pylint: disable=broad-except  # the line matters more than the figure
      pass
  try:
    usage = shutil.disk_usage(root)
    room = (f"{need}the folder holds {_mb(_folder_bytes(root))}, and {_mb(usage.free)} of "
            f"{_mb(usage.total)} are free")
  except OSError:
    room = need.rstrip("; ")
  again = ("free space there (or point $MNIST_DISTILL_STAGING at a larger disk) and rerun the "
           "same command: it resumes from what the bucket holds" if remote else
           "free space (or use another --model_dir) and rerun the same command: it resumes")
  return OutputFull(f"no space left on the disk of {where} while writing {what}: {room}. "
                    f"{_last_checkpoint(root, rel) if rel else ''}{again[0].upper()}{again[1:]}")
