"""TensorFlow's and Keras' own log lines: out of the job's log unless --verbose_tf.

Why: two thirds of the default job's log were TensorFlow internals (start-up banners about
oneDNN, CUDA and CPU instructions; 'Sharding callback duration' at every checkpoint; 'Writing
fingerprint' and 'Function `serve` contains input name(s)' at every SavedModel; the LiteRT
converter's C++ lines), which buried the job's own lines: one per epoch, one per model. They
arrive three ways, so there are three means, all switched on by quiet() (the CLI calls it unless
--verbose_tf; the job run as a library logs as its caller set up):

  * C++ lines after start-up obey TF_CPP_MIN_LOG_LEVEL, which TensorFlow reads when it loads:
    set to 2 (errors only) before the import, unless the environment chose a level itself.
  * C++ lines printed while TensorFlow and its libraries load, and by the LiteRT converter and
    interpreter, do not obey it (they are written before TensorFlow reads the variable, or
    outside its logging). stderr is captured around those moments (hidden_noise()) and every
    line that is not one of them is passed on.
  * Python lines go through absl logging, like the job's own: INFO from inside the tensorflow,
    keras and matplotlib packages is dropped (their warnings and errors stay).
"""

import contextlib
import glob
import importlib.util
import logging
import os
import re
import sys
import tempfile
import threading

_QUIET = {"on": False}
_CAPTURE = {}  # while hidden_noise() runs: the real stderr's descriptor and the capture file
_LOCK = threading.Lock()
_PACKAGES = ("tensorflow", "keras", "tf_keras", "matplotlib")
# Lines that say nothing to a user of this job (start-up banners, converter chatter).
_NOISE = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
    re.compile(r"^[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] "),  # C++ INFO and WARNING
    re.compile(r"^To enable the following instructions: .* rebuild TensorFlow"),
    re.compile(r"^fully_quantize: \d+, inference_type: "),
    re.compile(r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.$"),
)
# No NVIDIA device on this machine: CUDA's failed start is expected, not news. With a device,
# the same line is the first sign of a broken driver, so it stays.
_NO_GPU_CUINIT = re.compile(r"^E\d{4} .*\] failed call to cuInit: ")


def quiet() -> None:
  """Quiets TensorFlow's and Keras' own lines for this process; call before TensorFlow loads."""
  _QUIET["on"] = True
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  roots = []
  for name in _PACKAGES:
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
      roots += [os.path.join(os.path.realpath(p), "") for p in spec.submodule_search_locations]
  quiet_filter = _LibraryInfo(tuple(roots))
  for handler in logging.getLogger().handlers:  # absl's handler, once absl.app has run
    handler.addFilter(quiet_filter)


class _LibraryInfo(logging.Filter):
  """Drops INFO (and below) logged from inside the libraries' own files."""

  def __init__(self, roots):
    super().__init__()
    self.roots = roots

  def filter(self, record):
    return record.levelno >= logging.WARNING or not os.path.realpath(
        record.pathname).startswith(self.roots)


def _noise(line: str, gpu_devices: bool) -> bool:
  if any(pattern.match(line) for pattern in _NOISE):
    return True
  return not gpu_devices and bool(_NO_GPU_CUINIT.match(line))


@contextlib.contextmanager
def hidden_noise():
  """Captures stderr (the file descriptor: C++ writes there directly) while the block runs, then
  passes on every line that is not TensorFlow's noise. Does nothing unless quiet() was called.
  Lines that other threads log meanwhile come out when the block ends, in order."""
  if not _QUIET["on"]:
    yield
    return
  with _LOCK:
    sys.stderr.flush()
    capture = tempfile.TemporaryFile()
    _CAPTURE.update(saved=os.dup(2), file=capture)
    os.dup2(capture.fileno(), 2)
  try:
    yield
  finally:
    release_stderr()


def release_stderr() -> None:
  """Ends a capture at once (idempotent, from any thread): a watchdog about to os._exit calls
  it, so that its last line reaches the real stderr instead of the capture."""
  with _LOCK:
    saved, capture = _CAPTURE.pop("saved", None), _CAPTURE.pop("file", None)
    if saved is None:
      return
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
  with capture:
    capture.seek(0)
    gpus = bool(glob.glob("/dev/nvidia[0-9]*"))
    kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(True)
            if not _noise(line, gpus)]
  sys.stderr.write("".join(kept))
  sys.stderr.flush()
