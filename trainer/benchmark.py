"""Throughput of this project's training path against the notebook's, in one process.

    python -m trainer.benchmark --idx_dir=/work/shared/data/mnist [--job=full] [--notebook=full]

On the same real-MNIST subset and in the same process, it alternates runs of
  * the baseline (trainer/notebook_baseline.py): Keras `Model.fit`/`evaluate` on numpy float
    arrays, the teacher run inside every distillation step; and
  * ours: ArrayPipeline + TrainingLoop (STEPS_PER_CALL steps per tf.function call, FusedAdam,
    one-variable metrics), students fed the teacher logits computed once, and with
    `--extra_modes` also in bf16/XLA,
each at every batch size of `--batch_sizes` (the notebook's 32, then our default 256), and
prints images/second for teacher training, distillation and evaluation, each the median of
`--runs` runs after `--warmup` runs (which pay for tracing), with the ratio ours/baseline at
the same batch size (the targets), and our default batch against the notebook's 32.
Training is timed per epoch of the subset: fit's whole call (its numpy adapter included); our
loop's training steps (its iterator is created just before, ~0.02 s, and its per-epoch
validation and checkpoint, which fit does not do, come after).

Then it runs the default job in a subprocess (a small subset, or `--job=full`: the real
default job on full MNIST) for its peak memory (max RSS) and wall time, and compares the full
job with the notebook's schedule (20 teacher epochs + three 5-epoch students at batch 32):
extrapolated from the measured baseline throughput unless `--notebook=full` runs it for real.
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from trainer import evaluation, idx, models, notebook_baseline
from trainer.classifier import Classifier
from trainer.distiller import Distiller
from trainer.flags import DEFAULT_STUDENTS
from trainer.loop import Evaluator, LoopConfig, TrainingLoop
from trainer.optimizers import FusedAdam
from trainer.pipeline import ArrayPipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BATCH_SIZE = 256  # the job's --batch_size default (trainer/flags.py)
NOTEBOOK_TRAIN_EXAMPLES = 60_000  # the notebook trains on the whole MNIST training split
NOTEBOOK_TEST_EXAMPLES = 10_000
# What the default job's subprocess gets for the memory measurement when not --job=full.
SUBSET_JOB_ARGS = ("--max_train_examples=8192", "--validation_examples=1024",
                   "--max_test_examples=2048", "--teacher_epochs=1", "--student_epochs=1")
PHASES = ("teacher training", "distillation", "evaluation (teacher)", "evaluation (student)")
TARGETS = {"teacher training": 1.5, "distillation": 4.0}  # ours/baseline at equal batch size


@dataclasses.dataclass
class Timings:
  """Images/second of every run of one (phase, variant), warm-up runs included."""

  values: list = dataclasses.field(default_factory=list)
  warmup: int = 1

  def median(self) -> float:
    kept = self.values[self.warmup:] or self.values
    return float(statistics.median(kept))


def _images_per_second(count, seconds):
  return count / max(seconds, 1e-9)


class _OursTrainer:
  """One model trained by our loop; each `epoch()` trains one more epoch of the subset."""

  def __init__(self, model, net, images, labels, batch_size, extras, workdir,
               jit_compile=False):
    train = ArrayPipeline(images, labels, batch_size, 1, extras)
    small = slice(0, batch_size)  # validation is not timed: keep it to one batch
    validation = ArrayPipeline(images[small], labels[small], batch_size, 1,
                               None if extras is None else extras[small])
    self.loop = TrainingLoop(model, net, tf.distribute.get_strategy(), train, validation,
                             tempfile.mkdtemp(dir=workdir),
                             LoopConfig(epochs=0, seed=0, jit_compile=jit_compile))

  def epoch(self) -> float:
    self.loop.config.epochs += 1
    return self.loop.run()[-1]["examples_per_second"]


# Extra modes of ours, measured at every batch size: (precision policy, jit_compile).
EXTRA_MODES = {"xla": ("float32", True), "bf16": ("mixed_bfloat16", False),
               "fp16": ("mixed_float16", False)}


def _variant(batch, mode="") -> str:
  """Name of one of our measured variants, e.g. 'ours@32' or 'ours@256 bf16'."""
  return f"ours@{batch}" + (f" {mode}" if mode else "")


def _baseline(batch) -> str:
  """Name of the baseline measured at `batch`, e.g. 'baseline@32'."""
  return f"baseline@{batch}"


def _ours_variants(build, images, labels, batch_sizes, extras, workdir, extra_modes):
  """{variant: run} for our loop at each batch size, then each extra mode at each batch size.

  `build()` returns (model, net) compiled under the current dtype policy."""
  variants = {}
  runs = [(_variant(batch), batch, "float32", False) for batch in batch_sizes]
  runs += [(_variant(batch, mode), batch, *EXTRA_MODES[mode])
           for batch in batch_sizes for mode in extra_modes]
  for name, batch, policy, jit in runs:
    keras.mixed_precision.set_dtype_policy(policy)  # layers keep the policy they were built in
    keras.utils.set_random_seed(0)
    model, net = build()
    variants[name] = _OursTrainer(model, net, images, labels, batch, extras, workdir, jit).epoch
    keras.mixed_precision.set_dtype_policy("float32")
  return variants


class _OursEvaluator:
  def __init__(self, model, images, labels, batch_size, extras=None):
    self.evaluate = Evaluator(model, tf.distribute.get_strategy())
    self.pipeline = ArrayPipeline(images, labels, batch_size, 1, extras)
    self.count = len(labels)

  def run(self) -> float:
    started = time.perf_counter()
    self.evaluate(self.pipeline)
    return _images_per_second(self.count, time.perf_counter() - started)


def _fit_run(model, x, y, batch_size):
  started = time.perf_counter()
  model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
  return _images_per_second(len(y), time.perf_counter() - started)


def _evaluate_run(model, x, y, batch_size):
  started = time.perf_counter()
  model.evaluate(x, y, batch_size=batch_size, verbose=0)
  return _images_per_second(len(y), time.perf_counter() - started)


def _baseline_variants(models_by_batch: dict, run, x, y) -> dict:
  """{baseline@batch: run} for the baseline's model of each batch size."""
  return {_baseline(batch): (lambda m=model, b=batch: run(m, x, y, b))
          for batch, model in models_by_batch.items()}


def _alternate(variants: dict, runs: int, warmup: int) -> dict:
  """Runs every variant once per round, `warmup + runs` rounds; {variant: Timings}."""
  timings = {name: Timings(warmup=warmup) for name in variants}
  for round_ in range(warmup + runs):
    for name, run in variants.items():
      timings[name].values.append(run())
      print(f"round {round_ + 1}/{warmup + runs} {name}: {timings[name].values[-1]:.0f} "
            "images/s", file=sys.stderr, flush=True)  # progress: a full run takes a while
  return timings


def measure_throughput(images, labels, runs=3, warmup=1, batch_sizes=(32, DEFAULT_BATCH_SIZE),
                       workdir=None, alpha=0.5, temperature=4.0, extra_modes=()) -> dict:
  """{phase: {variant: Timings}} for baseline and ours at each batch size; plus the time the
  one-off teacher-logits computation took."""
  keras.mixed_precision.set_dtype_policy("float32")
  workdir = workdir or tempfile.mkdtemp(prefix="mnist-distill-bench-")
  x, y = notebook_baseline.float_images(images), labels.astype(np.int64)
  labels = labels.astype(np.int64)
  results = {}

  def baseline_teacher():
    keras.utils.set_random_seed(0)
    return notebook_baseline.compile_teacher(models.build_teacher())

  baseline_teachers = {batch: baseline_teacher() for batch in batch_sizes}

  def build_teacher():
    net = models.build_teacher()
    model = Classifier(net)
    model.compile(optimizer=FusedAdam())
    return model, net

  variants = _baseline_variants(baseline_teachers, _fit_run, x, y)
  variants.update(_ours_variants(build_teacher, images, labels, batch_sizes, None, workdir,
                                 extra_modes))
  results["teacher training"] = _alternate(variants, runs, warmup)

  # Trained above at the notebook's batch size: the same teacher for both sides from here on.
  teacher = baseline_teachers[batch_sizes[0]]
  started = time.perf_counter()
  cached = evaluation.predict_logits(teacher, images)
  logits_seconds = time.perf_counter() - started

  def baseline_distiller():
    keras.utils.set_random_seed(0)
    return notebook_baseline.make_distiller(teacher, alpha, temperature)

  baseline_distillers = {batch: baseline_distiller() for batch in batch_sizes}
  built = []  # in _ours_variants' order: one per batch size first (float32, no XLA)

  def build_student():
    net = models.build_student()
    distiller = Distiller(net)
    distiller.compile(optimizer=FusedAdam(), alpha=alpha, temperature=temperature)
    built.append(distiller)
    return distiller, net

  variants = _baseline_variants(baseline_distillers, _fit_run, x, y)
  variants.update(_ours_variants(build_student, images, labels, batch_sizes, cached, workdir,
                                 extra_modes))
  students = dict(zip(batch_sizes, built))
  results["distillation"] = _alternate(variants, runs, warmup)

  teacher_model = Classifier(teacher)
  teacher_model.compile()
  variants = _baseline_variants({batch: teacher for batch in batch_sizes}, _evaluate_run, x, y)
  for batch in batch_sizes:
    variants[_variant(batch)] = _OursEvaluator(teacher_model, images, labels, batch).run
  results["evaluation (teacher)"] = _alternate(variants, runs, warmup)

  variants = _baseline_variants(baseline_distillers, _evaluate_run, x, y)
  for batch in batch_sizes:
    variants[_variant(batch)] = _OursEvaluator(students[batch], images, labels, batch,
                                               cached).run
  results["evaluation (student)"] = _alternate(variants, runs, warmup)
  return {"phases": results, "teacher_logits_seconds": logits_seconds,
          "teacher_logits_images": int(len(labels))}


def run_subprocess(argv, workdir, name) -> dict:
  """Runs argv from the repo root; returns wall seconds, peak RSS (MiB) and exit code.

  os.wait4 gives the resource usage of exactly this child (RUSAGE_CHILDREN would fold in every
  child this process ever waited for)."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             TF_CPP_MIN_LOG_LEVEL="2")
  log_path = os.path.join(workdir, f"{name}.log")
  out_path = os.path.join(workdir, f"{name}.out")
  started = time.perf_counter()
  with open(log_path, "w") as log, open(out_path, "w") as out:
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=log)
    _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  seconds = time.perf_counter() - started
  with open(out_path) as f:
    stdout = f.read()
  return {"wall_seconds": seconds, "max_rss_mib": usage.ru_maxrss / 1024.0,
          "returncode": proc.returncode, "stdout": stdout, "log": log_path}


def run_default_job(idx_dir, workdir, full: bool, subset_args=SUBSET_JOB_ARGS) -> dict:
  """The default job (teacher + default students) in a subprocess; adds test accuracies."""
  model_dir = os.path.join(workdir, "job-full" if full else "job-subset")
  argv = [sys.executable, "-m", "trainer", f"--idx_dir={idx_dir}", f"--model_dir={model_dir}"]
  if not full:
    argv += list(subset_args)
  report = run_subprocess(argv, workdir, "job")
  report["args"] = argv[3:]
  report["test_accuracy"] = {}
  if report["returncode"] == 0:
    with open(os.path.join(model_dir, "results.json")) as f:
      summary = json.load(f)
    report["test_accuracy"] = {m["name"]: m["test_accuracy"] for m in summary["models"]}
  return report


def run_notebook(idx_dir, workdir) -> dict:
  report = run_subprocess([sys.executable, "-m", "trainer.notebook_baseline",
                           f"--idx_dir={idx_dir}"], workdir, "notebook")
  if report["returncode"] == 0:
    report.update(json.loads(report["stdout"].strip().splitlines()[-1]))
  return report


def extrapolate_notebook(phases) -> dict:
  """Seconds the notebook's schedule would take at the measured baseline throughputs."""
  def rate(phase):
    return _median(phases, phase, _baseline(notebook_baseline.BATCH_SIZE))
  parts = {
      "teacher": notebook_baseline.TEACHER_EPOCHS * NOTEBOOK_TRAIN_EXAMPLES
                 / rate("teacher training"),
      "students": len(notebook_baseline.STUDENTS) * notebook_baseline.STUDENT_EPOCHS
                  * NOTEBOOK_TRAIN_EXAMPLES / rate("distillation"),
      "evaluation": NOTEBOOK_TEST_EXAMPLES * (1 / rate("evaluation (teacher)") + len(
          notebook_baseline.STUDENTS) / rate("evaluation (student)")),
  }
  parts["total"] = sum(parts.values())
  return parts


# ---- report ----
def _fmt_ratio(ours, base):
  return f"{ours / base:.2f}x"


def _median(phases, phase, variant) -> float:
  return phases[phase][variant].median()


def throughput_table(phases, batch_sizes) -> str:
  """One row per phase: at each batch size the notebook's way, ours, and ours/notebook."""
  header = ["phase"]
  for batch in batch_sizes:
    header += [f"notebook, batch {batch} (img/s)", f"ours, batch {batch} (img/s)",
               "ours/notebook"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for phase in PHASES:
    row = [phase]
    for batch in batch_sizes:
      base = _median(phases, phase, _baseline(batch))
      ours = _median(phases, phase, _variant(batch))
      row += [f"{base:,.0f}", f"{ours:,.0f}", _fmt_ratio(ours, base)]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def target_lines(phases, batch_sizes, extra_modes=()) -> list:
  """Each target at each batch size (ours and the baseline at that same batch size), for
  float32 and for each extra mode that was measured."""
  lines = []
  for mode in ("", *extra_modes):
    label = f" in {_mode_label(mode)}" if mode else ""
    for batch in batch_sizes:
      for phase, target in TARGETS.items():
        ratio = (_median(phases, phase, _variant(batch, mode))
                 / _median(phases, phase, _baseline(batch)))
        verdict = "met" if ratio >= target else "MISSED"
        lines.append(f"- {phase} at batch {batch}{label}: {ratio:.2f}x (target >= "
                     f"{target:g}x): {verdict}")
  return lines


def default_batch_lines(phases, batch_sizes) -> list:
  """Ours at each larger batch size against the notebook at its own batch 32: what changing
  the batch size adds on top (not the targets, which compare equal batch sizes)."""
  notebook = _baseline(notebook_baseline.BATCH_SIZE)
  lines = []
  for batch in batch_sizes[1:]:
    parts = [f"{phase} " + _fmt_ratio(_median(phases, phase, _variant(batch)),
                                      _median(phases, phase, notebook)) for phase in TARGETS]
    lines.append(f"- ours at batch {batch} vs the notebook at batch 32: " + ", ".join(parts))
  return lines


def _mode_label(mode) -> str:
  policy, jit = EXTRA_MODES[mode]
  return f"{policy}{', XLA' if jit else ''}"


def mode_lines(phases, batch_sizes, extra_modes) -> list:
  lines = []
  for mode in extra_modes:
    for batch in batch_sizes:
      parts = []
      for phase in TARGETS:
        plain = _median(phases, phase, _variant(batch))
        other = _median(phases, phase, _variant(batch, mode))
        base = _median(phases, phase, _baseline(batch))
        parts.append(f"{phase} {other:,.0f} img/s = {other / plain:.2f}x float32, "
                     f"{other / base:.2f}x notebook")
      lines.append(f"- ours at batch {batch} in {_mode_label(mode)}: " + "; ".join(parts))
  return lines


def end_to_end_lines(job, notebook, extrapolated) -> list:
  lines = []
  label = "full MNIST" if job.get("full") else "subset " + " ".join(job["args"][2:])
  ok = job["returncode"] == 0
  lines.append(f"- default job ({label}): wall {job['wall_seconds']:.0f} s, peak RSS "
               f"{job['max_rss_mib']:.0f} MiB" + ("" if ok else
                                                  f", FAILED (exit {job['returncode']})"))
  if ok and job["test_accuracy"]:
    lines.append("  test accuracy: " + ", ".join(
        f"{k} {v:.4f}" for k, v in sorted(job["test_accuracy"].items())))
  e = extrapolated
  lines.append(f"- notebook schedule, EXTRAPOLATED from the baseline throughput above: "
               f"{e['total']:.0f} s (teacher {e['teacher']:.0f} s, students {e['students']:.0f} "
               f"s, evaluation {e['evaluation']:.0f} s)")
  if notebook is not None:
    ok_nb = notebook["returncode"] == 0
    lines.append(f"- notebook schedule, MEASURED: wall {notebook['wall_seconds']:.0f} s, peak "
                 f"RSS {notebook['max_rss_mib']:.0f} MiB" + (
                     "" if ok_nb else f", FAILED (exit {notebook['returncode']})"))
    if ok_nb:
      lines.append("  test accuracy: " + ", ".join(
          f"{k} {v:.4f}" for k, v in sorted(notebook["test_accuracy"].items())))
  if job.get("full") and ok:
    reference = notebook["wall_seconds"] if notebook and notebook["returncode"] == 0 \
        else e["total"]
    kind = "measured" if notebook and notebook["returncode"] == 0 else "extrapolated"
    share = job["wall_seconds"] / reference
    lines.append(f"- ours/notebook wall time: {share:.2f} ({kind} notebook; target <= 0.33): "
                 + ("met" if share <= 1 / 3 else "MISSED"))
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--idx_dir", default=os.environ.get("MNIST_DIR"),
                      help="folder with the four MNIST IDX files (default: $MNIST_DIR)")
  parser.add_argument("--examples", type=int, default=12_800,
                      help="training images per timed run (a multiple of every batch size)")
  parser.add_argument("--runs", type=int, default=3, help="timed runs per variant (median)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (tracing)")
  parser.add_argument("--batch_sizes", default=f"32,{DEFAULT_BATCH_SIZE}",
                      help="batch sizes to run both sides at; the first must be the notebook's 32")
  parser.add_argument("--extra_modes", default="",
                      help=f"comma-separated, of {sorted(EXTRA_MODES)}: also time ours in these "
                           "modes at every batch size (xla: jit_compile; bf16/fp16: mixed "
                           "precision)")
  parser.add_argument("--job", choices=("subset", "full", "none"), default="subset",
                      help="run the default job on a subset (peak memory) or on full MNIST "
                           "(also end-to-end wall time), or not at all")
  parser.add_argument("--subset_job_args", default=" ".join(SUBSET_JOB_ARGS),
                      help="extra flags of the --job=subset run")
  parser.add_argument("--notebook", choices=("extrapolate", "full"), default="extrapolate",
                      help="full: also run the notebook's whole schedule (about 15+ minutes)")
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--json_out", default=None, help="also write every measurement here")
  args = parser.parse_args(argv)
  if not args.idx_dir:
    parser.error("--idx_dir (or $MNIST_DIR) is required")
  batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
  if batch_sizes[0] != notebook_baseline.BATCH_SIZE:
    parser.error("--batch_sizes must start with 32, the notebook's batch size")
  if any(args.examples % b for b in batch_sizes):
    parser.error("--examples must be a multiple of every batch size")
  tf.get_logger().setLevel("ERROR")  # each measured variant traces its own functions once
  workdir = args.workdir or tempfile.mkdtemp(prefix="mnist-distill-bench-")
  os.makedirs(workdir, exist_ok=True)

  images, labels = idx.load_split(args.idx_dir, "train")
  if len(labels) < args.examples:
    parser.error(f"--examples={args.examples} is more than the {len(labels)} training images")
  images, labels = images[:args.examples], labels[:args.examples]
  started = time.strftime("%Y-%m-%d %H:%M %Z")
  extra_modes = [m for m in args.extra_modes.split(",") if m]
  unknown = sorted(set(extra_modes) - set(EXTRA_MODES))
  if unknown:
    parser.error(f"--extra_modes: unknown {unknown}; choose from {sorted(EXTRA_MODES)}")
  measured = measure_throughput(images, labels, args.runs, args.warmup, batch_sizes, workdir,
                                extra_modes=extra_modes)
  phases = measured["phases"]
  job = None if args.job == "none" else run_default_job(
      args.idx_dir, workdir, args.job == "full", args.subset_job_args.split())
  if job is not None:
    job["full"] = args.job == "full"
  notebook = run_notebook(args.idx_dir, workdir) if args.notebook == "full" else None
  extrapolated = extrapolate_notebook(phases)

  cpu = os.cpu_count()
  print(f"## Benchmark: notebook baseline vs ours ({started}, {cpu} CPU cores, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__})")
  print(f"{args.examples} real MNIST training images per run; median of {args.runs} runs "
        f"after {args.warmup} warm-up; runs of each variant alternate.")
  print()
  print(throughput_table(phases, batch_sizes))
  print()
  print(f"- teacher logits cached once: {measured['teacher_logits_images']} images in "
        f"{measured['teacher_logits_seconds']:.2f} s")
  for line in target_lines(phases, batch_sizes, extra_modes):
    print(line)
  for line in default_batch_lines(phases, batch_sizes):
    print(line)
  for line in mode_lines(phases, batch_sizes, extra_modes):
    print(line)
  if job is not None:
    for line in end_to_end_lines(job, notebook, extrapolated):
      print(line)
  if args.json_out:
    payload = {
        "date": started, "cpu_count": cpu, "examples": args.examples, "runs": args.runs,
        "warmup": args.warmup, "batch_sizes": batch_sizes,
        "throughput": {p: {v: t.values for v, t in vs.items()} for p, vs in phases.items()},
        "median": {p: {v: t.median() for v, t in vs.items()} for p, vs in phases.items()},
        "teacher_logits_seconds": measured["teacher_logits_seconds"],
        "default_job": job, "notebook": notebook, "notebook_extrapolated": extrapolated,
        "default_students": list(DEFAULT_STUDENTS)}
    with open(args.json_out, "w") as f:
      json.dump(payload, f, indent=1, default=str)
  return 0


if __name__ == "__main__":
  sys.exit(main())
