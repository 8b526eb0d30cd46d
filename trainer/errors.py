"""Exit codes and the error types that map onto them.

Operators script against these codes (Kubernetes podFailurePolicy in particular), so they are a
contract: never renumber them.
"""

EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected failure: worth a retry
EXIT_USAGE = 2  # bad flags, data or model_dir: a retry cannot help
EXIT_STORAGE = 3  # the output location failed mid-run (bucket unreachable after retries, or
#                  the disk under the run's folder full): what was written stays usable, and
#                  a rerun resumes once the location works again
EXIT_PEER_LOST = 4  # multi-worker: a peer worker is gone or stuck; restart the whole group
EXIT_BUSY = 5  # another process holds the model's lease (trainer/rundir/lease.py): retry later
EXIT_PREEMPTED = 143  # SIGTERM received; a checkpoint was written; retry resumes


class UsageError(Exception):
  """Bad input detected before training: exits with EXIT_USAGE and one line."""

  exit_code = EXIT_USAGE


class StorageError(Exception):
  """The bucket could not be reached even after retries: exits with EXIT_STORAGE."""

  exit_code = EXIT_STORAGE


class OutputFull(Exception):
  """The disk under the run's folder (--model_dir, or a gs:// run's staging folder) is full:
  exits with EXIT_STORAGE, like an unreachable bucket, because it is the same failure for an
  operator (the output location, not the input; the last checkpoint is kept and the rerun
  resumes once there is room) and the same Kubernetes policy (retry). See
  trainer/rundir/disk_full.py."""

  exit_code = EXIT_STORAGE


class ProgressMismatch(UsageError):
  """Multi-worker: the workers restored different progress of one model (they do not share the
  chief's checkpoints). Exits with EXIT_USAGE: restarting the same group cannot fix it."""


class PeerLost(Exception):
  """Multi-worker: a collective failed or stalled because a peer worker died, froze or diverged.
  Exits with EXIT_PEER_LOST so a failure policy restarts every worker together (they resume from
  the chief's last checkpoint) without counting it as a bug."""

  exit_code = EXIT_PEER_LOST


class Preempted(Exception):
  """Raised after a SIGTERM checkpoint so the process exits with EXIT_PREEMPTED."""

  exit_code = EXIT_PREEMPTED


class NonFiniteLoss(Exception):
  """Training produced a non-finite loss or weights: stopped before saving them (exit 1, a
  bug or a diverging setting, not bad input: the flags were valid)."""

  exit_code = EXIT_FAILURE


class ModelBusy(Exception):
  """Another process holds this model's lease: exits with EXIT_BUSY and one line."""

  exit_code = EXIT_BUSY


# Errors the CLI reports as their one-line message and exit code.
JOB_ERRORS = (NonFiniteLoss, ModelBusy, OutputFull)
