"""Throughput of this project's training path against the notebook's, in one process.

    python -m benchmarks --idx_dir=/work/shared/data/mnist [--job=full] [--notebook=full]

On the same real-MNIST subset it alternates runs of the notebook's way (benchmarks/notebook.py)
and ours (benchmarks/throughput.py), each at every batch size of `--batch_sizes` (the
notebook's, then the job's default), and prints images/second for teacher training,
distillation and evaluation with the ratio ours/baseline at the same batch size (the targets),
and our default batch against the notebook's. When batch slices change TensorFlow's threads, a
partner process (benchmarks/partner.py) measures the baseline again with the default threads,
and every ratio is taken against the faster of the two.

Then the short run as a whole process (benchmarks/whole_process.py): `mnist-distill
--mode=students` distilling one student for 3 epochs at batch 32 from an existing teacher,
against the notebook's Distiller doing the same, each in a process of its own, in turns.

Where the local Kubernetes cluster is up (scripts/local_cluster.sh) and --cluster_image names
the CPU image loaded into it: `kubectl apply` to the first epoch line and to `Complete`
(benchmarks/cluster.py).

Then it runs the default job in a child process (a small subset, or `--job=full`: the real
default job on full MNIST) for its peak memory and wall time, and compares the full job with
the notebook's schedule: extrapolated from the measured baseline unless `--notebook=full` runs
it for real (benchmarks/end_to_end.py, benchmarks/report.py).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import tensorflow as tf

from benchmarks import cluster as cluster_bench
from benchmarks import end_to_end, notebook, partner, precision, report, whole_process
from benchmarks.throughput import (
  DEFAULT_THREADS,
  EXTRA_MODES,
  baseline_name,
  job_defaults,
  measure_throughput,
)
from trainer.data import idx
from trainer.errors import UsageError
from trainer.flags import parse_batch_slices
from trainer.modeling import batch_slices


def _batch_slices_arg(raw):
  try:
    return parse_batch_slices(raw)
  except UsageError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--idx_dir", default=os.environ.get("MNIST_DIR"),
                      help="folder with the four MNIST IDX files (default: $MNIST_DIR)")
  parser.add_argument("--examples", type=int, default=12_800,
                      help="training images per timed run (a multiple of every batch size)")
  parser.add_argument("--runs", type=int, default=3, help="timed runs per variant (median)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (tracing)")
  batch_sizes = f"{notebook.BATCH_SIZE},{job_defaults().batch_size}"
  parser.add_argument("--batch_sizes", default=batch_sizes,
                      help="batch sizes to run both sides at; the first must be the notebook's "
                           f"{notebook.BATCH_SIZE}")
  parser.add_argument("--extra_modes", default="bf16",
                      help=f"comma-separated, of {sorted(EXTRA_MODES)}: also time ours in these "
                           "modes at every batch size (xla: jit_compile; bf16/fp16: mixed "
                           "precision)")
  parser.add_argument("--job", choices=("subset", "full", "none"), default="subset",
                      help="run the default job on a subset (peak memory) or on full MNIST "
                           "(also end-to-end wall time), or not at all")
  parser.add_argument("--subset_job_args", default=" ".join(end_to_end.SUBSET_JOB_ARGS),
                      help="extra flags of the --job=subset run")
  parser.add_argument("--notebook", choices=("extrapolate", "full"), default="extrapolate",
                      help="full: also run the notebook's whole schedule (slow: "
                           f"{notebook.TEACHER_EPOCHS} teacher and {notebook.STUDENT_EPOCHS} "
                           "epochs per student on full MNIST)")
  parser.add_argument("--precision_rounds", type=int, default=5,
                      help="float32 vs mixed_bfloat16 on the teacher and student steps alone "
                           "(benchmarks/precision.py): timed calls per variant (0: skip)")
  parser.add_argument("--precision_steps", type=int, default=20, help="steps per timed call")
  parser.add_argument("--whole_process_runs", type=int, default=3,
                      help="turns of the short run as a whole process, ours and the "
                           "notebook's (0: skip it)")
  parser.add_argument("--whole_process_subset", default="", type=whole_process.parse_subset,
                      help="TRAIN,TEST: the short run on that many training and test images "
                           "(smoke runs); default the full splits")
  parser.add_argument("--teacher_dir", default=None,
                      help="the short run's teacher (a finished <model_dir>/teacher); default: "
                           "a 1-epoch teacher trained first")
  parser.add_argument("--cluster_image", default="",
                      help="the CPU image loaded into the local cluster (local_cluster.sh load): "
                           "measure apply -> first epoch and -> Complete there, if it is up")
  parser.add_argument("--cluster_overlays", default="cpu-smoke",
                      help="of cpu-smoke,base (base: the default job, about ten minutes)")
  parser.add_argument("--cluster_runs", type=int, default=3, help="cpu-smoke runs (median)")
  parser.add_argument("--batch_slices", default="auto", type=_batch_slices_arg,
                      help="ours: as the job's --batch_slices (auto: one slice per core)")
  parser.add_argument("--as_partner", action="store_true",
                      help="internal: be the default-threads baseline process of another run")
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--json_out", default=None, help="also write every measurement here")
  return parser


def _cluster(args, workdir):
  """The cluster rows' figures, or why there are none."""
  if not cluster_bench.cluster_up():
    return {"skipped": "no local cluster is up: bash scripts/local_cluster.sh up"}
  if not args.cluster_image:
    return {"skipped": "the cluster is up; pass --cluster_image (an image loaded with "
                       "local_cluster.sh load)"}
  overlays = [o for o in args.cluster_overlays.split(",") if o]
  return cluster_bench.measure(args.cluster_image, args.idx_dir, workdir, overlays,
                               args.cluster_runs)


def main(argv=None):
  parser = _parser()
  args = parser.parse_args(argv)
  if not args.idx_dir:
    parser.error("--idx_dir (or $MNIST_DIR) is required")
  batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
  if batch_sizes[0] != notebook.BATCH_SIZE:
    parser.error(f"--batch_sizes must start with {notebook.BATCH_SIZE}, the notebook's batch "
                 "size")
  if any(args.examples % b for b in batch_sizes):
    parser.error("--examples must be a multiple of every batch size")
  extra_modes = [m for m in args.extra_modes.split(",") if m]
  unknown = sorted(set(extra_modes) - set(EXTRA_MODES))
  if unknown:
    parser.error(f"--extra_modes: unknown {unknown}; choose from {sorted(EXTRA_MODES)}")
  if set(args.cluster_overlays.split(",")) - set(cluster_bench.OVERLAYS) or args.cluster_runs < 1:
    parser.error(f"--cluster_overlays must be of {cluster_bench.OVERLAYS}, --cluster_runs >= 1")
  # First, before TensorFlow starts: threads for our largest batch size's slices.
  cores = batch_slices.available_cores()
  on_gpu = bool(tf.config.list_physical_devices("GPU"))
  plans = {batch: batch_slices.plan(args.batch_slices, batch, cores, on_gpu)
           for batch in batch_sizes}
  intra_threads = batch_slices.apply_threads(plans[max(batch_sizes)])
  slices = {batch: plan.slices for batch, plan in plans.items()}
  tf.get_logger().setLevel("ERROR")  # each measured variant traces its own functions once
  workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="mnist-distill-bench-"))
  os.makedirs(workdir, exist_ok=True)

  images, labels = idx.load_split(args.idx_dir, "train")
  if len(labels) < args.examples:
    parser.error(f"--examples={args.examples} is more than the {len(labels)} training images")
  images, labels = images[:args.examples], labels[:args.examples]
  started = time.strftime("%Y-%m-%d %H:%M %Z")
  if args.as_partner:
    measure_throughput(images, labels, args.runs, args.warmup, batch_sizes, workdir,
                       baseline_only=True, turns=partner.AsPartner())
    return 0
  # Threads changed for our slices: the notebook's own way runs in a partner process.
  other = partner.start(args, workdir) if intra_threads else None
  try:
    measured = measure_throughput(images, labels, args.runs, args.warmup, batch_sizes, workdir,
                                  extra_modes=extra_modes, slices=slices, turns=other)
  finally:
    if other is not None:
      other.close()
  if other is None:  # this process already runs TensorFlow's default threads
    for phase in measured["phases"].values():
      phase.update({baseline_name(b, DEFAULT_THREADS): phase[baseline_name(b)]
                    for b in batch_sizes})
  steps = None
  if args.precision_rounds:
    steps = {batch: precision.measure(images, labels, batch, slices[batch], args.precision_steps,
                                      args.precision_rounds) for batch in batch_sizes}
  job = None if args.job == "none" else end_to_end.run_default_job(
      args.idx_dir, workdir, args.job == "full", args.subset_job_args.split())
  notebook_run = None
  if args.notebook == "full":
    notebook_run = end_to_end.run_notebook(args.idx_dir, workdir)
  whole = None if not args.whole_process_runs else whole_process.measure(
      args.idx_dir, workdir, args.whole_process_runs, args.teacher_dir,
      args.whole_process_subset)

  cluster = _cluster(args, workdir)

  run = {"date": started, "cpu_count": os.cpu_count(), "examples": args.examples,
         "runs": args.runs, "warmup": args.warmup, "batch_sizes": batch_sizes,
         "batch_slices": slices, "intra_op_threads": intra_threads, "extra_modes": extra_modes,
         "cpu_flags": report.cpu_flags(), "load_average": os.getloadavg(),
         "precision_rounds": args.precision_rounds, "precision_steps": args.precision_steps}
  report.print_report(run, measured, job, notebook_run, whole, steps, cluster)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(report.json_report(run, measured, job, notebook_run, job_defaults().student,
                                   whole, steps, cluster),
                f, indent=1, default=str)
  return 0


if __name__ == "__main__":
  sys.exit(main())
