"""Throughput of this project's training path against the notebook's, in one process.

    python -m trainer.benchmark --idx_dir=/work/shared/data/mnist [--job=full] [--notebook=full]

On the same real-MNIST subset and in the same process, it alternates runs of
  * the baseline (trainer/notebook_baseline.py): Keras `Model.fit`/`evaluate` on numpy float
    arrays, the teacher run inside every distillation step; and
  * ours: ArrayPipeline + TrainingLoop (STEPS_PER_CALL steps per tf.function call, FusedAdam,
    one-variable metrics, batches run as slices side by side as `--batch_slices` says),
    students fed the teacher logits computed once, and with `--extra_modes` also in bf16/XLA,
each at every batch size of `--batch_sizes` (the notebook's 32, then our default 256), and
prints images/second for teacher training, distillation and evaluation, each the median of
`--runs` runs after `--warmup` runs (which pay for tracing), with the ratio ours/baseline at
the same batch size (the targets), and our default batch against the notebook's 32.

Batch slices need TensorFlow's intra-op threads set for the whole process (one per slice's
share of the cores), and the baseline in this process runs with them too. That can help or
hurt it, so a partner process measures the baseline again with TensorFlow's default threads
(as the notebook ran), taking turns with this one round by round (one process idles while the
other measures, so both see the machine in the same state), and every ratio is taken against
the faster of the two baselines.

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

from trainer import batch_slices, evaluation, idx, models, notebook_baseline
from trainer.classifier import Classifier
from trainer.distiller import Distiller
from trainer.errors import UsageError
from trainer.flags import DEFAULT_STUDENTS, parse_batch_slices
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


def _baseline(batch, threads="") -> str:
  """Name of the baseline measured at `batch`: 'baseline@32' in this process, or with
  threads=DEFAULT_THREADS 'baseline@32 tf-default-threads' from the second process."""
  return f"baseline@{batch}" + (f" {threads}" if threads else "")


DEFAULT_THREADS = "tf-default-threads"


def _ours_variants(build, images, labels, batch_sizes, extras, workdir, extra_modes):
  """{variant: run} for our loop at each batch size, then each extra mode at each batch size.

  `build(batch)` returns (model, net) compiled under the current dtype policy."""
  variants = {}
  runs = [(_variant(batch), batch, "float32", False) for batch in batch_sizes]
  runs += [(_variant(batch, mode), batch, *EXTRA_MODES[mode])
           for batch in batch_sizes for mode in extra_modes]
  for name, batch, policy, jit in runs:
    keras.mixed_precision.set_dtype_policy(policy)  # layers keep the policy they were built in
    keras.utils.set_random_seed(0)
    model, net = build(batch)
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


def _child_env() -> dict:
  """Environment of the benchmark's child processes: this repo importable, TF's logs quiet."""
  return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
              TF_CPP_MIN_LOG_LEVEL="2")


class _Partner:
  """The second process: the baseline with TensorFlow's default threads (as the notebook
  runs), measured in turns with this process, one round each, so that both see the machine
  at the same time. Its rounds' images/second come back as 'baseline@B tf-default-threads'."""

  def __init__(self, argv, log_path):
    env = _child_env()
    env.pop("TF_NUM_INTRAOP_THREADS", None)
    self.log_path = log_path
    self._log = open(log_path, "w")
    self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self._log, text=True)

  def take_turn(self) -> dict:
    """Lets the partner run one round; {its variant + DEFAULT_THREADS suffix: img/s}."""
    self.proc.stdin.write("go\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the default-threads baseline process ended; see {self.log_path}")
    return {f"{name} {DEFAULT_THREADS}": value for name, value in json.loads(line).items()}

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()
    self._log.close()


class _AsPartner:
  """This process's side when it is the partner: waits for its turn, runs, reports, and is
  idle again before the main process measures."""

  def take_turn(self, variants: dict) -> dict:
    if not sys.stdin.readline():
      raise SystemExit("benchmark partner: the main process went away")
    measured = {name: run() for name, run in variants.items()}
    print(json.dumps(measured), flush=True)
    return measured


def _alternate(variants: dict, runs: int, warmup: int, turns=None) -> dict:
  """Runs every variant once per round, `warmup + runs` rounds; {variant: Timings}. With
  `turns`, each round also takes one turn with the other process (see _Partner)."""
  timings = {name: Timings(warmup=warmup) for name in variants}
  for round_ in range(warmup + runs):
    if isinstance(turns, _AsPartner):
      measured = turns.take_turn(variants)
    else:
      measured = {}
      for name, run in variants.items():
        measured[name] = run()
        print(f"round {round_ + 1}/{warmup + runs} {name}: {measured[name]:.0f} images/s",
              file=sys.stderr, flush=True)  # progress: a full run takes a while
      if turns is not None:
        measured.update(turns.take_turn())
    for name, value in measured.items():
      timings.setdefault(name, Timings(warmup=warmup)).values.append(value)
  return timings


def measure_throughput(images, labels, runs=3, warmup=1, batch_sizes=(32, DEFAULT_BATCH_SIZE),
                       workdir=None, alpha=0.5, temperature=4.0, extra_modes=(), slices=None,
                       baseline_only=False, turns=None) -> dict:
  """{phase: {variant: Timings}} for baseline and ours at each batch size; plus the time the
  one-off teacher-logits computation took. `slices[batch]`: our batch slices at that size
  (default 1); `baseline_only` skips ours (the partner process); `turns`: see _alternate."""
  slices = slices or {batch: 1 for batch in batch_sizes}
  keras.mixed_precision.set_dtype_policy("float32")
  workdir = workdir or tempfile.mkdtemp(prefix="mnist-distill-bench-")
  x, y = notebook_baseline.float_images(images), labels.astype(np.int64)
  labels = labels.astype(np.int64)
  results = {}

  def baseline_teacher():
    keras.utils.set_random_seed(0)
    return notebook_baseline.compile_teacher(models.build_teacher())

  baseline_teachers = {batch: baseline_teacher() for batch in batch_sizes}

  def build_teacher(batch):
    net = models.build_teacher()
    model = Classifier(net)
    model.compile(optimizer=FusedAdam(), slices=slices[batch])
    return model, net

  def ours(build, extras):
    if baseline_only:
      return {}
    return _ours_variants(build, images, labels, batch_sizes, extras, workdir, extra_modes)

  variants = _baseline_variants(baseline_teachers, _fit_run, x, y)
  variants.update(ours(build_teacher, None))
  results["teacher training"] = _alternate(variants, runs, warmup, turns)

  # Trained above at the notebook's batch size: the same teacher for both sides from here on.
  teacher = baseline_teachers[batch_sizes[0]]
  started = time.perf_counter()
  cached = None if baseline_only else evaluation.predict_logits(
      teacher, images, slices=slices[batch_sizes[-1]])  # only ours reads cached logits
  logits_seconds = time.perf_counter() - started

  def baseline_distiller():
    keras.utils.set_random_seed(0)
    return notebook_baseline.make_distiller(teacher, alpha, temperature)

  baseline_distillers = {batch: baseline_distiller() for batch in batch_sizes}
  built = []  # in _ours_variants' order: one per batch size first (float32, no XLA)

  def build_student(batch):
    net = models.build_student()
    distiller = Distiller(net)
    distiller.compile(optimizer=FusedAdam(), alpha=alpha, temperature=temperature,
                      slices=slices[batch])
    built.append(distiller)
    return distiller, net

  variants = _baseline_variants(baseline_distillers, _fit_run, x, y)
  variants.update(ours(build_student, cached))
  students = dict(zip(batch_sizes, built))
  results["distillation"] = _alternate(variants, runs, warmup, turns)

  variants = _baseline_variants({batch: teacher for batch in batch_sizes}, _evaluate_run, x, y)
  for batch in batch_sizes if not baseline_only else ():
    teacher_model = Classifier(teacher)
    teacher_model.compile(slices=slices[batch])
    variants[_variant(batch)] = _OursEvaluator(teacher_model, images, labels, batch).run
  results["evaluation (teacher)"] = _alternate(variants, runs, warmup, turns)

  variants = _baseline_variants(baseline_distillers, _evaluate_run, x, y)
  for batch in batch_sizes if not baseline_only else ():
    variants[_variant(batch)] = _OursEvaluator(students[batch], images, labels, batch,
                                               cached).run
  results["evaluation (student)"] = _alternate(variants, runs, warmup, turns)
  return {"phases": results, "teacher_logits_seconds": logits_seconds,
          "teacher_logits_images": int(len(labels))}


def run_subprocess(argv, workdir, name) -> dict:
  """Runs argv from the repo root; returns wall seconds, peak RSS (MiB) and exit code.

  os.wait4 gives the resource usage of exactly this child (RUSAGE_CHILDREN would fold in every
  child this process ever waited for)."""
  env = _child_env()
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


def start_partner(args, workdir) -> _Partner:
  """The default-threads baseline process, started with this run's data and batch sizes."""
  argv = [sys.executable, "-m", "trainer.benchmark", "--as_partner", "--batch_slices=1",
          f"--idx_dir={args.idx_dir}", f"--examples={args.examples}", f"--runs={args.runs}",
          f"--warmup={args.warmup}", f"--batch_sizes={args.batch_sizes}", "--job=none",
          f"--workdir={os.path.join(workdir, 'default-threads')}"]
  return _Partner(argv, os.path.join(workdir, "baseline-default-threads.log"))


def _notebook_rate(phases, phase, batch) -> float:
  """The faster of the baseline's medians at `batch`: in this process, and in the second one
  with TensorFlow's default threads. Every target is taken against this."""
  names = (_baseline(batch), _baseline(batch, DEFAULT_THREADS))
  return max(_median(phases, phase, name) for name in names if name in phases[phase])


def extrapolate_notebook(phases) -> dict:
  """Seconds the notebook's schedule would take at the measured baseline throughputs."""
  def rate(phase):
    return _notebook_rate(phases, phase, notebook_baseline.BATCH_SIZE)
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
  """One row per phase and batch size: the notebook's way with TensorFlow's default threads
  and in our process, ours, and ours over the faster of the two."""
  header = ["phase", "batch", "notebook, TF default threads (img/s)",
            "notebook, in our process (img/s)", "ours (img/s)", "ours / faster notebook"]
  lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|---:|---:|"]
  for phase in PHASES:
    for batch in batch_sizes:
      ours = _median(phases, phase, _variant(batch))
      default_threads = _median(phases, phase, _baseline(batch, DEFAULT_THREADS))
      row = [phase, str(batch), f"{default_threads:,.0f}",
             f"{_median(phases, phase, _baseline(batch)):,.0f}", f"{ours:,.0f}",
             _fmt_ratio(ours, _notebook_rate(phases, phase, batch))]
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
                 / _notebook_rate(phases, phase, batch))
        verdict = "met" if ratio >= target else "MISSED"
        lines.append(f"- {phase} at batch {batch}{label}: {ratio:.2f}x (target >= "
                     f"{target:g}x): {verdict}")
  return lines


def default_batch_lines(phases, batch_sizes) -> list:
  """Ours at each larger batch size against the notebook at its own batch 32: what changing
  the batch size adds on top (not the targets, which compare equal batch sizes)."""
  notebook = notebook_baseline.BATCH_SIZE
  lines = []
  for batch in batch_sizes[1:]:
    parts = [f"{phase} " + _fmt_ratio(_median(phases, phase, _variant(batch)),
                                      _notebook_rate(phases, phase, notebook))
             for phase in TARGETS]
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
        base = _notebook_rate(phases, phase, batch)
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
  parser.add_argument("--batch_slices", default="auto", type=_batch_slices_arg,
                      help="ours: as the job's --batch_slices (auto: one slice per core)")
  parser.add_argument("--as_partner", action="store_true",
                      help="internal: be the default-threads baseline process of another run")
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
  # First, before TensorFlow starts: threads for our default batch size's slices.
  cores = batch_slices.available_cores()
  on_gpu = bool(tf.config.list_physical_devices("GPU"))
  plans = {batch: batch_slices.plan(args.batch_slices, batch, cores, on_gpu)
           for batch in batch_sizes}
  intra_threads = batch_slices.apply_threads(plans[max(batch_sizes)])
  slices = {batch: plan.slices for batch, plan in plans.items()}
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
  if args.as_partner:
    measure_throughput(images, labels, args.runs, args.warmup, batch_sizes, workdir,
                       baseline_only=True, turns=_AsPartner())
    return 0
  # Threads changed for our slices: the notebook's own way runs in a partner process.
  partner = start_partner(args, workdir) if intra_threads else None
  try:
    measured = measure_throughput(images, labels, args.runs, args.warmup, batch_sizes, workdir,
                                  extra_modes=extra_modes, slices=slices, turns=partner)
  finally:
    if partner is not None:
      partner.close()
  phases = measured["phases"]
  if partner is None:  # this process already runs TensorFlow's default threads
    for phase in phases.values():
      phase.update({_baseline(b, DEFAULT_THREADS): phase[_baseline(b)] for b in batch_sizes})
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
        f"after {args.warmup} warm-up; runs of each variant alternate. Ours: batch slices "
        + ", ".join(f"{slices[b]} at {b}" for b in batch_sizes)
        + f", intra-op threads {intra_threads or 'TF default'}.")
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
        "warmup": args.warmup, "batch_sizes": batch_sizes, "batch_slices": slices,
        "intra_op_threads": intra_threads,
        "throughput": {p: {v: t.values for v, t in vs.items()} for p, vs in phases.items()},
        "median": {p: {v: t.median() for v, t in vs.items()} for p, vs in phases.items()},
        "teacher_logits_seconds": measured["teacher_logits_seconds"],
        "default_job": job, "notebook": notebook, "notebook_extrapolated": extrapolated,
        "default_students": list(DEFAULT_STUDENTS)}
    with open(args.json_out, "w") as f:
      json.dump(payload, f, indent=1, default=str)
  return 0


def _batch_slices_arg(raw):
  try:
    return parse_batch_slices(raw)
  except UsageError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


if __name__ == "__main__":
  sys.exit(main())
