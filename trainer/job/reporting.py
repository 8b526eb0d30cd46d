"""The run's report: every finished model (also those other pods wrote) merged into results.json
and results.md, and, for `--mode=report` on older runs, what they lack filled in without training.

The merge reads per-model files only (trainer/evaluation/results.py), so it can run in any pod, at
any time, as often as needed.
"""

import glob
import logging
import os
import socket
import time

import keras
import tensorflow as tf

import trainer
from trainer.errors import UsageError
from trainer.evaluation import comparison, hparams_logging, results
from trainer.job import runtime
from trainer.rundir import layout
from trainer.serving import litert_export
from trainer.training import distribution


def run_info(s, rt) -> dict:
  """What results.json says about the run and the invocation that merged it."""
  return {"dataset": s.dataset if not s.idx_dir else f"idx:{s.idx_dir}",
          "strategy": distribution.strategy_name(rt.strategy), "replicas": rt.replicas,
          "tensorflow": tf.__version__, "keras": keras.__version__,
          "mnist_distill": trainer.__version__, "precision": rt.precision,
          "jit_compile": s.jit_compile, "global_batch_size": s.batch_size,
          "batch_slices": rt.slices, "intra_op_threads": rt.intra_op_threads,
          "flags": s.flag_dict(),
          "merged_by": {"host": socket.gethostname(), "pid": os.getpid(), "mode": s.mode,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}


def _finished_in_bucket(rt) -> set:
  return {p for p in rt.storage.list_remote("")
          if p.count("/") == 1 and p.endswith("/" + layout.RESULT)}


def _pull_finished(rt, markers) -> None:
  """Each finished model's marker and the per-model files the merge reads."""
  for path in sorted(markers):
    rt.storage.pull(path)
    for part in results.MODEL_FILES:
      rt.storage.pull(path.replace(layout.RESULT, part))


def merge(s, rt, sync_logs):
  """Merges every finished model into results.json; returns the summary (None off the chief).

  Pods finishing at once each upload their own results.json; the last upload wins. So each
  pod lists the markers again *after* its upload and merges again until that listing adds
  nothing: whichever upload lands last was followed by a listing equal to its content, and a
  marker uploaded after that listing would make its own pod upload later still.
  """
  if not rt.chief:
    return None
  rt.storage.flush()  # our own markers are in the bucket before we list it
  merged, summary = None, None
  while True:
    markers = _finished_in_bucket(rt)
    if markers == merged:
      return summary
    _pull_finished(rt, markers)
    if rt.storage.remote:  # the bucket is the truth: a local-only marker is not a result
      for path in glob.glob(os.path.join(rt.dir, "*", layout.RESULT)):
        if os.path.relpath(path, rt.dir).replace(os.sep, "/") not in markers:
          os.remove(path)
    summary = results.merge(rt.dir, run_info(s, rt), figures=comparison.write_report)
    rt.storage.sync(layout.FIGURES)
    sync_logs(layout.COMPARISON_RUN)
    rt.storage.sync(layout.RESULTS_MD)
    rt.storage.sync(layout.RESULTS_JSON)  # after results.md: results.json marks the run
    rt.storage.flush()
    merged = markers


def backfill(s, rt, measure) -> None:
  """--mode=report on a run made before some per-model files existed (validation outputs,
  LiteRT exports): recomputes them from the finished networks, without training. The data
  flags must give the test split the models were evaluated on (checked by digest)."""
  if not rt.chief:
    return
  _pull_finished(rt, _finished_in_bucket(rt))
  models = [m for m in results.finished_models(rt.dir) if m.get("trained_here", True)]
  lacking = {name: [f for f in files if f != litert_export.EXPORTS_FILE or measure]
             for name, files in results.missing_files(rt.dir, models).items()}
  lacking = {name: files for name, files in lacking.items() if files}
  if not lacking:
    return
  splits = runtime.load_splits(s)
  digest = comparison.images_digest(splits.test_images)
  for name in sorted(lacking):
    done = results.read_model_result(rt.dir, name)
    saved = comparison.load_predictions(rt.dir, name)
    if saved is None or str(saved["test_images_sha256"]) != digest:
      raise UsageError(f"--mode=report: {name} was tested on other data than the data flags "
                       "give; pass the run's --idx_dir/--dataset and --max_test_examples")
    for part in (layout.MODEL_FILE, layout.EXPORT):
      rt.storage.pull(layout.rel(name, part), exact=True)
    folder = layout.local(rt.dir, name)
    net = keras.models.load_model(os.path.join(folder, layout.MODEL_FILE), compile=False)
    logging.info("--mode=report: computing %s for %s", ", ".join(lacking[name]), name)
    results.finish_outputs(folder, net, splits, done["test_errors"],
                           layout.local(rt.dir, layout.LOGS),
                           (done.get("settings") or {}).get("epochs", 0), measure=measure,
                           slices=rt.slices)
    # Only what was computed: syncing <name> itself would mirror away its checkpoints.
    for part in results.MODEL_FILES + (litert_export.LITERT_DIR,):
      rt.storage.sync(layout.rel(name, part))
    rt.storage.sync(layout.rel(layout.logs_rel(name), hparams_logging.DEPLOYMENT_RUN))
