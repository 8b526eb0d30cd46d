"""float32 against mixed_bfloat16 on the job's training steps, in alternation, wall and CPU time.

The teacher's step (Classifier) and a student's distillation step (Distiller on cached logits),
each built as the job builds them (FusedAdam, batch slices) under either precision policy, run
`steps` steps per timed call inside one tf.function, on a fixed batch of real MNIST images (no
input pipeline: the step alone). The four variants take turns call after call, `rounds` times
after one warm-up call each (tracing); each figure is the median. Beside images per second of
wall time it gives images per CPU second of this process (all its threads): on cores shared
with other work wall time follows the load, CPU time much less.
"""

import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from trainer.data.pipeline import normalize_images
from trainer.modeling import models
from trainer.modeling.classifier import Classifier
from trainer.modeling.distiller import Distiller
from trainer.modeling.optimizers import FusedAdam

POLICIES = ("float32", "mixed_bfloat16")
ROLES = ("teacher", "student")


def _build(role, policy, slices, learning_rate):
  keras.mixed_precision.set_dtype_policy(policy)
  try:
    keras.utils.set_random_seed(0)
    if role == "teacher":
      model = Classifier(models.build_teacher())
      model.compile(optimizer=FusedAdam(learning_rate), slices=slices)
    else:
      model = Distiller(models.build_student())
      model.compile(optimizer=FusedAdam(learning_rate), alpha=0.5, temperature=4.0,
                    slices=slices)
  finally:
    keras.mixed_precision.set_dtype_policy("float32")
  return model


def _runner(model, batch, steps):
  @tf.function
  def run():
    for _ in tf.range(steps):
      model.train_step(batch)
  return run


def measure(images, labels, batch_size, slices=1, steps=20, rounds=5,
            learning_rate=1e-3) -> dict:
  """{(role, policy): {"wall": [img/s...], "cpu": [img/CPU s...]}} at `batch_size`."""
  x = normalize_images(tf.constant(images[:batch_size]))
  y = tf.constant(labels[:batch_size].astype(np.int64))
  logits = tf.constant(np.random.default_rng(0).normal(size=(batch_size, 10)), tf.float32)
  runs = {}
  for role in ROLES:
    for policy in POLICIES:
      batch = (x, y) if role == "teacher" else (x, y, logits)
      runs[(role, policy)] = _runner(_build(role, policy, slices, learning_rate), batch, steps)
  found = {key: {"wall": [], "cpu": []} for key in runs}
  for round_ in range(rounds + 1):
    for key, run in runs.items():
      wall, cpu = time.perf_counter(), time.process_time()
      run()
      wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
      if round_:  # the first call traces
        found[key]["wall"].append(steps * batch_size / wall)
        found[key]["cpu"].append(steps * batch_size / max(cpu, 1e-9))
  return found


def summary(found) -> dict:
  """{role: {"wall": bf16/float32 of the medians, "cpu": ..., "float32": median img/s, ...}}."""
  out = {}
  for role in ROLES:
    med = {(policy, kind): statistics.median(found[(role, policy)][kind])
           for policy in POLICIES for kind in ("wall", "cpu")}
    out[role] = {"float32": med[("float32", "wall")], "mixed_bfloat16": med[("mixed_bfloat16",
                                                                             "wall")],
                 "wall": med[("mixed_bfloat16", "wall")] / med[("float32", "wall")],
                 "cpu": med[("mixed_bfloat16", "cpu")] / med[("float32", "cpu")],
                 "float32_cpu": med[("float32", "cpu")],
                 "mixed_bfloat16_cpu": med[("mixed_bfloat16", "cpu")]}
  return out


def report_lines(by_batch: dict, rounds: int, steps: int) -> list:
  lines = []
  for batch, found in by_batch.items():
    for role, s in summary(found).items():
      lines.append(f"- {role} step at batch {batch}, {steps} steps per call, median of {rounds}"
                   f" in turns: float32 {s['float32']:,.0f} img/s, mixed_bfloat16 "
                   f"{s['mixed_bfloat16']:,.0f} img/s: {s['wall']:.2f}x; per CPU second "
                   f"{s['float32_cpu']:,.0f} vs {s['mixed_bfloat16_cpu']:,.0f}: {s['cpu']:.2f}x")
  return lines
