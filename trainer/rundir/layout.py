"""The model_dir layout contract in one place: every path the job writes, and how it writes.

Readers (a resumed pod, the merge, `--mode=students`, a person in a bucket browser) rely on
these names, so they are spelled once here. Every file is written under a temporary name in its
own folder and renamed into place, so nobody ever sees half a file; temporary names all start
with TMP_PREFIX, so one rule finds what a killed process left behind, and uploads skip them.
"""

import contextlib
import json
import os
import shutil
import uuid

# The run's root.
RESULTS_JSON = "results.json"  # the merged report; written last, it marks the run merged
RESULTS_MD = "results.md"
LOGS = "logs"  # TensorBoard: logs/<model>/{train,validation,test}
FIGURES = "figures"
COMPARISON_RUN = "_comparison"  # logs/_comparison: no model name can start with '_'
LOGITS_CACHE = "teacher_logits"  # teacher_logits/<key digest>/{key.json,train.npy,...}
LEASES = "_leases"  # _leases/<model>.lease: one writer per model (trainer/rundir/lease.py)

# Inside <model_dir>/<model>/.
RESULT = "result.json"  # the model's result; written last, it marks the model finished
MODEL_FILE = "model.keras"
CHECKPOINTS = "checkpoints"
EXPORT = "export"  # SavedModel
PREDICTIONS = "test_predictions.npz"
SETTINGS = "settings.json"  # inside checkpoints/: what the checkpoints were trained under

TMP_PREFIX = ".tmp-"


def rel(*parts: str) -> str:
  """A path relative to the run's root, '/'-separated as bucket object names are."""
  return "/".join(p.strip("/") for p in parts if p)


def result_rel(name: str) -> str:
  return rel(name, RESULT)


def logs_rel(name: str) -> str:
  return rel(LOGS, name)


def checkpoints_rel(name: str) -> str:
  return rel(name, CHECKPOINTS)


def local(root: str, relpath: str) -> str:
  """The local path of `relpath` under the staging folder `root`."""
  return os.path.join(root, *relpath.split("/")) if relpath else root


def is_temporary(name: str) -> bool:
  """True for a file or folder name (or any part of a path) written by atomic_path."""
  return any(part.startswith(TMP_PREFIX) for part in name.replace(os.sep, "/").split("/"))


@contextlib.contextmanager
def atomic_path(final: str):
  """Yields a temporary path beside `final`; moves it onto `final` if the block succeeds.

  The temporary name ends with final's own name, so writers that insist on a suffix (Keras'
  `.keras`, numpy's `.npy`) accept it. Works for files and for folders (a SavedModel)."""
  folder = os.path.dirname(final) or "."
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-"
                             f"{os.path.basename(final)}")
  try:
    yield tmp
    if os.path.isdir(tmp):
      if os.path.isdir(final):
        shutil.rmtree(final)
      elif os.path.exists(final):
        os.remove(final)
    os.replace(tmp, final)
  except OSError as e:
    if e.filename is None and e.errno is not None:
      # A failed write() names no file (a full disk, say): name the one that failed.
      raise OSError(e.errno, e.strerror, final) from e
    raise
  finally:
    _remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def write_json(path: str, payload) -> None:
  """Canonical JSON (sorted keys, 2-space indent): equal payloads give equal bytes."""
  write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: str):
  """The JSON document at `path`, or None when it is missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def remove_temporaries(folder: str) -> None:
  """Deletes what killed writers left below `folder` (dot-named temporaries included)."""
  for root, dirs, files in os.walk(folder):
    for name in [d for d in dirs if d.startswith(TMP_PREFIX)]:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)
      dirs.remove(name)
    for name in files:
      if name.startswith(TMP_PREFIX):
        _remove(os.path.join(root, name))


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)
