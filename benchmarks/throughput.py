"""Images/second of the notebook's way and ours, phase by phase, on the same data in one process.

Ours is the job's path at the job's own defaults (read from trainer.flags, never copied): the
ArrayPipeline, the TrainingLoop (several steps per tf.function call), FusedAdam, one-variable
metrics, batch slices, and students fed the teacher logits computed once. Every variant runs
once per round, round after round, so that a change in the machine's load touches all of them
alike; each one's figure is the median of its rounds after the warm-up ones (which pay for
tracing).

Training is timed per epoch of the subset: fit's whole call (its numpy adapter included), and
our loop's training steps (its iterator is created just before, and its per-epoch validation
and checkpoint, which fit does not do, come after).
"""

import dataclasses
import functools
import statistics
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import flags

from benchmarks import notebook
from trainer.data.pipeline import ArrayPipeline
from trainer.evaluation import evaluation
from trainer.flags import StudentSpec, define_flags, parse_students
from trainer.modeling import models
from trainer.modeling.classifier import Classifier
from trainer.modeling.distiller import Distiller
from trainer.modeling.optimizers import FusedAdam
from trainer.training.loop import Evaluator, LoopConfig, TrainingLoop

PHASES = ("teacher training", "distillation", "evaluation (teacher)", "evaluation (student)")
# Extra modes of ours, measured at every batch size: (precision policy, jit_compile).
EXTRA_MODES = {"xla": ("float32", True), "bf16": ("mixed_bfloat16", False),
               "fp16": ("mixed_float16", False)}
DEFAULT_THREADS = "tf-default-threads"  # suffix of the baseline measured by the partner process


@functools.cache
def job_defaults() -> flags.FlagValues:
  """The job's flags, all at their defaults: what `mnist-distill` runs with no arguments."""
  values = flags.FlagValues()
  define_flags(values)
  values(["benchmarks"])
  return values


def timed_student() -> StudentSpec:
  """The job's default student that mixes both terms (the one closest to alpha 0.5): the
  distillation step whose cost is measured."""
  return min(parse_students(job_defaults().student), key=lambda s: abs(s.alpha - 0.5))


def variant_name(batch, mode="") -> str:
  """Name of one of our measured variants, e.g. 'ours@32' or 'ours@256 bf16'."""
  return f"ours@{batch}" + (f" {mode}" if mode else "")


def baseline_name(batch, threads="") -> str:
  """Name of the baseline measured at `batch`: 'baseline@32' in this process, or with
  threads=DEFAULT_THREADS 'baseline@32 tf-default-threads' from the partner process."""
  return f"baseline@{batch}" + (f" {threads}" if threads else "")


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
    config = self.loop.config
    self.loop.config = dataclasses.replace(config, epochs=config.epochs + 1)
    return self.loop.run()[-1]["examples_per_second"]


def _ours_variants(build, images, labels, batch_sizes, extras, workdir, extra_modes):
  """{variant: run} for our loop at each batch size, then each extra mode at each batch size.

  `build(batch)` returns (model, net) compiled under the current dtype policy."""
  variants = {}
  runs = [(variant_name(batch), batch, "float32", False) for batch in batch_sizes]
  runs += [(variant_name(batch, mode), batch, *EXTRA_MODES[mode])
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
  return {baseline_name(batch): (lambda m=model, b=batch: run(m, x, y, b))
          for batch, model in models_by_batch.items()}


def _run_each(variants: dict, label: str) -> dict:
  """One run of every variant, in order; {variant: images/s}."""
  measured = {}
  for name, run in variants.items():
    measured[name] = run()
    print(f"{label} {name}: {measured[name]:.0f} images/s",
          file=sys.stderr, flush=True)  # progress: a full run takes a while
  return measured


def run_rounds(variants: dict, runs: int, warmup: int, turns=None) -> dict:
  """Runs every variant once per round, `warmup + runs` rounds; {variant: Timings}.

  With `turns` (benchmarks.partner), each round is shared with the other process: its
  `round(run_here)` runs this process's variants and adds whatever the other one measured."""
  timings = {name: Timings(warmup=warmup) for name in variants}
  total = warmup + runs
  for round_ in range(total):
    run_here = functools.partial(_run_each, variants, f"round {round_ + 1}/{total}")
    measured = run_here() if turns is None else turns.round(run_here)
    for name, value in measured.items():
      timings.setdefault(name, Timings(warmup=warmup)).values.append(value)
  return timings


def measure_throughput(images, labels, runs=3, warmup=1, batch_sizes=None, workdir=None,
                       extra_modes=(), slices=None, baseline_only=False, turns=None) -> dict:
  """{phase: {variant: Timings}} for baseline and ours at each batch size (default: the
  notebook's, then the job's); plus the time the one-off teacher-logits computation took.
  `slices[batch]`: our batch slices at that size (default 1); `baseline_only` skips ours (the
  partner process); `turns`: see run_rounds."""
  defaults, student = job_defaults(), timed_student()
  batch_sizes = batch_sizes or (notebook.BATCH_SIZE, defaults.batch_size)
  slices = slices or {batch: 1 for batch in batch_sizes}
  keras.mixed_precision.set_dtype_policy("float32")
  workdir = workdir or tempfile.mkdtemp(prefix="mnist-distill-bench-")
  x, y = notebook.float_images(images), labels.astype(np.int64)
  labels = labels.astype(np.int64)
  results = {}

  def baseline_teacher():
    keras.utils.set_random_seed(0)
    return notebook.compile_teacher(models.build_teacher())

  baseline_teachers = {batch: baseline_teacher() for batch in batch_sizes}

  def build_teacher(batch):
    net = models.build_teacher()
    model = Classifier(net)
    model.compile(optimizer=FusedAdam(defaults.learning_rate), slices=slices[batch])
    return model, net

  def ours(build, extras):
    if baseline_only:
      return {}
    return _ours_variants(build, images, labels, batch_sizes, extras, workdir, extra_modes)

  variants = _baseline_variants(baseline_teachers, _fit_run, x, y)
  variants.update(ours(build_teacher, None))
  results["teacher training"] = run_rounds(variants, runs, warmup, turns)

  # Trained above at the notebook's batch size: the same teacher for both sides from here on.
  teacher = baseline_teachers[batch_sizes[0]]
  started = time.perf_counter()
  cached = None if baseline_only else evaluation.predict_logits(
      teacher, images, slices=slices[batch_sizes[-1]])  # only ours reads cached logits
  logits_seconds = time.perf_counter() - started

  def baseline_distiller():
    keras.utils.set_random_seed(0)
    return notebook.make_distiller(teacher, student.alpha, student.temperature)

  baseline_distillers = {batch: baseline_distiller() for batch in batch_sizes}
  built = []  # in _ours_variants' order: one per batch size first (float32, no XLA)

  def build_student(batch):
    net = models.build_student()
    distiller = Distiller(net)
    distiller.compile(optimizer=FusedAdam(defaults.student_learning_rate), alpha=student.alpha,
                      temperature=student.temperature, slices=slices[batch])
    built.append(distiller)
    return distiller, net

  variants = _baseline_variants(baseline_distillers, _fit_run, x, y)
  variants.update(ours(build_student, cached))
  students = dict(zip(batch_sizes, built))
  results["distillation"] = run_rounds(variants, runs, warmup, turns)

  variants = _baseline_variants({batch: teacher for batch in batch_sizes}, _evaluate_run, x, y)
  for batch in batch_sizes if not baseline_only else ():
    teacher_model = Classifier(teacher)
    teacher_model.compile(slices=slices[batch])
    variants[variant_name(batch)] = _OursEvaluator(teacher_model, images, labels, batch).run
  results["evaluation (teacher)"] = run_rounds(variants, runs, warmup, turns)

  variants = _baseline_variants(baseline_distillers, _evaluate_run, x, y)
  for batch in batch_sizes if not baseline_only else ():
    variants[variant_name(batch)] = _OursEvaluator(students[batch], images, labels, batch,
                                                   cached).run
  results["evaluation (student)"] = run_rounds(variants, runs, warmup, turns)
  return {"phases": results, "teacher_logits_seconds": logits_seconds,
          "teacher_logits_images": int(len(labels))}
