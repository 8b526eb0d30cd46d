"""Runs the job in the test's own process, with the flags a user would type.

Faster than a subprocess (no TensorFlow start-up per run) and a failure shows its traceback.
Tests that need a fresh process (signals, thread settings, op determinism, exit codes) keep
using helpers.run_cli.
"""

from absl import logging

from trainer import flags, job


def parse(args):
  """Settings for `mnist-distill ARGS` (UsageError on bad input, as the CLI would exit 2)."""
  return flags.parse_argv(["mnist-distill", *args])


def run_job(args, **overrides):
  """Runs `mnist-distill ARGS` in-process; returns the merged summary. `overrides` go to
  trainer.job.run (strategy, storage, splits). Its log lines reach pytest's caplog."""
  settings = parse(args)
  logging.set_verbosity(logging.INFO)
  return job.run(settings, **overrides)
