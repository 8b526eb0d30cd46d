"""Entry point of `mnist-distill` and `python -m trainer`: flags in, exit code out.

Every failure ends as one line on stderr and a documented exit code (trainer/errors.py):
0 done, 1 unexpected failure, 2 bad input (before any training), 3 the output location failed
(bucket unreachable, disk full), 4 a multi-worker peer was lost, 5 a model's lease is held
elsewhere, 143 stopped by SIGTERM after a checkpoint. A finished run ends with a short summary
on stdout (trainer/evaluation/run_summary.py).
"""

import logging as std_logging
import os
import sys

from absl import app, flags, logging

from trainer import errors, tf_logs
from trainer.flags import define_flags, settings_from_flags

define_flags()
FLAGS = flags.FLAGS
_HELP_FLAGS = ("-?", "-h", "--help", "--helpfull", "--helpshort", "--helpxml")


def _fail(code: int, message: str):
  print(f"mnist-distill: error: {message}", file=sys.stderr, flush=True)
  if code == errors.EXIT_PEER_LOST:
    # TensorFlow's teardown waits for the lost peer (its shutdown barrier): leave at once, so
    # the group restarts sooner. Queued uploads were flushed by the job before this point.
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def _exit_multi_worker(code: int) -> None:
  """A multi-worker process leaves without interpreter teardown: TensorFlow's collective
  runtime sometimes aborts while being destroyed after a finished run (exit 134 in a pod,
  counted as a failure). Everything the job writes was uploaded and closed by then."""
  from trainer.training import distribution  # pylint: disable=import-outside-toplevel
  if distribution.tf_config_workers() > 1:
    std_logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access


def _peer_lost(e: Exception):
  """PeerLost for a TensorFlow error that a lost multi-worker peer caused, else None."""
  if "tensorflow" not in sys.modules:
    return None
  from trainer.training import distribution  # pylint: disable=import-outside-toplevel
  return distribution.peer_lost(e)


def parse_flags_or_exit(argv):
  """absl parser that exits with EXIT_USAGE (absl's own exits with 1) and one line."""
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    _fail(errors.EXIT_USAGE, str(e).splitlines()[0])
  except SystemExit:  # absl's --help/--helpfull print and exit 1; asking for help is success
    if any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:]):
      sys.exit(errors.EXIT_OK)
    raise
  if len(rest) > 1:
    _fail(errors.EXIT_USAGE, f"unexpected positional arguments: {' '.join(rest[1:])}")
  return rest


def _start_tensorflow():
  """Imports the job (TensorFlow, Keras, the LiteRT interpreter) and lists the GPUs once, so that
  their start-up banners are printed here, where tf_logs hides them."""
  with tf_logs.hidden_noise():
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from trainer import job  # pylint: disable=import-outside-toplevel
    tf.config.list_physical_devices("GPU")
  return job.Job


def _print_summary(summary, settings) -> None:
  if summary is None:  # a multi-worker run's other workers: the chief reports
    return
  from trainer.evaluation import run_summary  # pylint: disable=import-outside-toplevel
  for handler in std_logging.getLogger().handlers:  # the log's last lines come first
    handler.flush()
  print("\n".join(run_summary.lines(summary, settings.model_dir)), flush=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  std_logging.getLogger("tensorflow").setLevel(std_logging.ERROR)
  if not FLAGS.verbose_tf:
    tf_logs.quiet()  # before TensorFlow loads: it reads TF_CPP_MIN_LOG_LEVEL once
  try:
    settings = settings_from_flags(FLAGS)
    job_class = _start_tensorflow()  # only after the flags are good
    _print_summary(job_class(settings).run(), settings)
    _exit_multi_worker(errors.EXIT_OK)
  except (errors.UsageError, errors.StorageError, errors.Preempted, errors.PeerLost) as e:
    _fail(e.exit_code, str(e) if not isinstance(e, errors.PeerLost) else f"PeerLost: {e}")
  except KeyboardInterrupt:
    _fail(errors.EXIT_FAILURE, "interrupted")
  except errors.JOB_ERRORS as e:  # the job's own refusals: their message is the one line
    _fail(e.exit_code, str(e))
  except Exception as e:  # pylint: disable=broad-except
    lost = _peer_lost(e)
    if lost is not None:
      logging.error("%s: %s", type(e).__name__, e)
      _fail(lost.exit_code, f"PeerLost: {lost}")
    logging.exception("mnist-distill failed")
    _fail(errors.EXIT_FAILURE, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def run():
  """Console-script entry point."""
  app.run(main, flags_parser=parse_flags_or_exit)
