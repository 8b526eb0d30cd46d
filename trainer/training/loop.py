"""The custom training loop shared by the teacher and the students.

Why not `Model.fit`: resuming mid-epoch with the same data order, checkpointing every N steps,
stopping cleanly on SIGTERM and running under MultiWorkerMirroredStrategy (keras-team/keras#20585)
all need control over the step loop. The model's own `train_step`/`test_step` still do the work;
this loop only feeds them through `strategy.run`, several steps per `tf.function` call.

Why not `tf.distribute.experimental.PreemptionCheckpointHandler` for SIGTERM: it is documented for
MultiWorkerMirroredStrategy and TPUStrategy only (the job also runs on the default and mirrored
strategies), restores from its own checkpoint folder when it is built (a worker here restores
the chief's checkpoint, pulled from the bucket), and exits the process itself once it has
saved. The job instead checks the weights before every save, uploads the checkpoint, releases
its lease and exits 143 with a line that says what was kept, all within the pod's grace period
(trainer/job/__init__.py, trainer/training/watchdog.py); the workers agree on the step to stop
at through one collective (_stop_agreed).
"""

import dataclasses
import hashlib
import logging
import os
import threading
import time
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from trainer.errors import NonFiniteLoss, Preempted, ProgressMismatch
from trainer.training import distribution, watchdog

STEPS_PER_CALL = 50  # steps per tf.function call: amortizes Python overhead, bounds SIGTERM delay


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  epochs: int
  seed: int
  checkpoint_every_steps: Optional[int] = None
  jit_compile: bool = False
  # (start, end) global steps to trace with the TensorFlow profiler into profile_dir.
  profile_steps: Optional[tuple] = None
  profile_dir: Optional[str] = None


def metric_values(model) -> dict:
  """Current metric results as floats (read in cross-replica context: summed over replicas).
  A metric whose result is a dict (trainer/modeling/metrics.py) contributes one value per key."""
  return {name: float(value) for name, value in model.get_metrics_result().items()}


def reset_metrics(model) -> None:
  for m in model.metrics:
    m.reset_state()


def release_in_background(holder: list) -> None:
  """Drops the objects in `holder` (its only references) on a daemon thread.

  Destroying a used tf.data iterator can block its caller for a long time
  (docs/design/training-loop.md has what was seen; the root cause was not found). Nothing waits
  for that destruction, so it need not hold up the next model."""
  objects = list(holder)
  holder.clear()
  threading.Thread(target=objects.clear, name="release-iterator", daemon=True).start()


def graph_step(step, jit_compile=False):
  """A model's train or test step as the loop's graphs call it: never converted by AutoGraph.

  Why: AutoGraph would transpile the step's Python and everything it calls (the Distiller, the
  losses, the metrics, batch slices), about a second of every run's first epoch on these CPUs.
  None of it branches or loops on a tensor's value (a Python `if` on a tensor fails loudly at
  tracing, so such a change cannot slip through). The loops around the step keep AutoGraph."""
  if jit_compile:
    return tf.function(step, jit_compile=True, autograph=False)
  return tf.autograph.experimental.do_not_convert(step)


class Evaluator:
  """Runs a model's test_step over a whole pipeline under the strategy."""

  def __init__(self, model, strategy, jit_compile=False):
    self._model, self._strategy = model, strategy
    step = graph_step(model.test_step, jit_compile)

    @tf.function
    def run_all(dataset):  # the whole pass in one graph: no retracing on the partial batch
      for batch in dataset:
        strategy.run(step, args=(batch,))

    self._run_all = run_all

  def __call__(self, pipeline) -> dict:
    reset_metrics(self._model)
    self._run_all(self._strategy.distribute_datasets_from_function(pipeline.eval_fn()))
    return metric_values(self._model)


class TrainingLoop:
  """Trains `model` for `config.epochs`, resuming from `checkpoint_dir` if it holds progress.

  Callbacks: `on_checkpoint()` after every checkpoint (to upload it), `on_epoch(record)` after
  every epoch with its metrics, `should_stop()` polled between step chunks (SIGTERM).

  Multi-worker: every worker restores the chief's checkpoint (restore(source_dir)) and run()
  checks that they all did before the first step; a SIGTERM on any worker stops all of them at
  the same step; a collective that fails because a peer is gone raises PeerLost, one that
  stalls ends the process (trainer/training/watchdog.py).
  """

  def __init__(self, model, net, strategy, train_pipeline, validation_pipeline, checkpoint_dir,
               config: LoopConfig, on_checkpoint: Callable[[], None] = lambda: None,
               on_epoch: Callable[[dict], None] = lambda record: None,
               should_stop: Callable[[], bool] = lambda: False):
    self.model, self.strategy, self.config = model, strategy, config
    self.train_pipeline, self.validation_pipeline = train_pipeline, validation_pipeline
    self.on_checkpoint, self.on_epoch, self.should_stop = on_checkpoint, on_epoch, should_stop
    with strategy.scope():
      model.optimizer.build(net.trainable_variables)
    # Progress counters: plain host variables, saved in the checkpoint beside the weights.
    self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")
    self.train_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False,
                                     name="train_seconds")
    checkpoint = tf.train.Checkpoint(net=net, optimizer=model.optimizer, epoch=self.epoch,
                                     step_in_epoch=self.step_in_epoch,
                                     train_seconds=self.train_seconds)
    self.manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir, max_to_keep=2)
    self._net, self._workers = net, distribution.num_workers(strategy)
    self._restored = (checkpoint_dir, None)  # (folder, checkpoint found) of restore()
    self._evaluator = Evaluator(model, strategy, config.jit_compile)
    self._gather = distribution.row_gatherer(strategy) if self._workers > 1 else None
    step = graph_step(model.train_step, config.jit_compile)

    @tf.function
    def run_steps(iterator, count):
      for _ in tf.range(count):
        strategy.run(step, args=(next(iterator),))

    self._run_steps = run_steps
    self._profiling = False

  def evaluate(self, pipeline) -> dict:
    """The model's metrics over one pass of `pipeline` (every worker takes part)."""
    return self._collective("evaluation", self._evaluator, pipeline)

  def restore(self, source_dir: Optional[str] = None) -> bool:
    """Restores the latest checkpoint in source_dir (default: where this loop saves); True
    when progress was found. Non-chief workers save into a scratch folder but restore from the
    chief's, so that every worker resumes from the same step."""
    latest = (tf.train.latest_checkpoint(source_dir) if source_dir
              else self.manager.latest_checkpoint)
    self._restored = (source_dir or self.manager.directory, latest)
    if latest:
      self.manager.checkpoint.restore(latest).assert_existing_objects_matched()
      logging.info("Resumed from %s (epoch %d, step %d)", latest, int(self.epoch),
                   int(self.step_in_epoch))
    return bool(latest)

  # ---- multi-worker: same progress everywhere, bounded collectives ----
  def _collective(self, what, fn, *args):
    """Runs fn (which issues collectives); in multi-worker runs a peer's loss raises PeerLost
    and a stall past the watchdog's timeout ends the process."""
    if self._workers <= 1:
      return fn(*args)
    with watchdog.collectives().guard(what):
      try:
        return fn(*args)
      except tf.errors.OpError as e:
        lost = distribution.peer_lost(e, self._workers)
        if lost is None:
          raise
        raise lost from e

  def _progress(self) -> list:
    """What must be equal on every worker before the first step: counters and a weights digest
    (48 bits: exact in float64)."""
    digest = hashlib.sha256()
    for variable in list(self._net.weights) + list(self.model.optimizer.variables):
      digest.update(np.asarray(variable.numpy()).tobytes())
    return [float(int(self.epoch)), float(int(self.step_in_epoch)), float(self._iterations()),
            float(int.from_bytes(digest.digest()[:6], "big"))]

  def check_same_progress(self) -> None:
    """Raises ProgressMismatch unless every worker restored the same state (one collective)."""
    if self._gather is None:
      return
    index = distribution.task_index(self.strategy)
    rows = self._collective("the progress check", self._gather, [index, *self._progress()])
    by_worker = {int(row[0]): tuple(row[1:]) for row in rows}
    if len(set(by_worker.values())) <= 1:
      logging.info("All %d workers start from epoch %d, step %d", len(by_worker),
                   int(self.epoch), int(self.step_in_epoch))
      return
    folder, found = self._restored
    described = "; ".join(
        f"worker {w}: epoch {int(p[0])}, step {int(p[1])} (global step {int(p[2])}, weights "
        f"{int(p[3]):012x})" for w, p in sorted(by_worker.items()))
    raise ProgressMismatch(
        f"the workers restored different progress ({described}); this worker found "
        f"{os.path.basename(found) if found else 'no checkpoint'} in {folder}. Every worker "
        "must see the chief's checkpoints: give all workers the same --model_dir (gs:// or one "
        "shared folder)")

  def _stop_agreed(self) -> bool:
    """should_stop(), agreed by all workers: one SIGTERM stops every worker at this step (a
    worker that went on alone would wait for the others in its next collective)."""
    stop = bool(self.should_stop())
    if self._gather is None:
      return stop
    rows = self._collective("the stop check", self._gather, [1.0 if stop else 0.0])
    return bool(rows[:, 0].max() > 0)

  def _iterations(self) -> int:
    return int(self.model.optimizer.iterations.numpy())

  # Why these checks: a NaN or inf never recovers, and a checkpoint of it would be resumed from.

  def _check_loss(self) -> None:
    """After every step chunk: the loss is a running mean since the epoch began, so one bad step
    keeps it non-finite."""
    loss = float(self.model.get_metrics_result()["loss"])
    if not np.isfinite(loss):
      raise self._non_finite(f"training loss {loss}")

  def _check_weights(self) -> None:
    """Before every save: weights and optimizer state, which also catches a last step whose loss
    was finite but whose update was not."""
    for v in list(self.model.weights) + list(self.model.optimizer.variables):
      if not np.isfinite(np.asarray(v.numpy(), dtype=np.float64)).all():
        raise self._non_finite(f"non-finite values in {getattr(v, 'path', v.name)}")

  def _non_finite(self, bad: str) -> NonFiniteLoss:
    epoch, step = int(self.epoch), int(self.step_in_epoch)
    where = f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"
    kept = self.manager.latest_checkpoint
    return NonFiniteLoss(f"{bad} at {where}: stopped without saving "
                         f"({'kept ' + os.path.basename(kept) if kept else 'no checkpoint'})")

  def _save(self):
    self._check_weights()
    path = self.manager.save(checkpoint_number=self._iterations())
    watchdog.note_checkpoint(path, int(self.epoch), int(self.step_in_epoch))
    self.on_checkpoint()

  def _steps_until_pause(self, step, steps_per_epoch):
    count = min(STEPS_PER_CALL, steps_per_epoch - step)
    every = self.config.checkpoint_every_steps
    done = self._iterations()
    if every:
      count = min(count, every - done % every)
    if self._profile_wanted():  # pause exactly at the profiled steps' boundaries
      for boundary in self.config.profile_steps:
        if done < boundary:
          count = min(count, boundary - done)
    return count

  # ---- profiler: a trace of global steps [start, end) into profile_dir ----
  def _profile_wanted(self) -> bool:
    return bool(self.config.profile_steps and self.config.profile_dir)

  def _profile_before_chunk(self):
    if self._profile_wanted() and not self._profiling:
      start, end = self.config.profile_steps
      if start <= self._iterations() < end:
        try:
          tf.profiler.experimental.start(self.config.profile_dir)
          self._profiling = True
          logging.info("Profiling steps %d-%d into %s", self._iterations(), end,
                       self.config.profile_dir)
        except Exception as e:  # pylint: disable=broad-except  # never stop training for it
          logging.warning("Could not start the profiler: %s", e)

  def _profile_after_chunk(self, force=False):
    if self._profiling and (force or self._iterations() >= self.config.profile_steps[1]):
      self._profiling = False
      try:
        tf.profiler.experimental.stop()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not write the profiler trace: %s", e)

  def _train_epoch(self, epoch, iterator):
    steps_per_epoch = self.train_pipeline.steps_per_epoch
    step = int(self.step_in_epoch)
    reset_metrics(self.model)
    started, first_step = time.perf_counter(), step
    while step < steps_per_epoch:
      count = self._steps_until_pause(step, steps_per_epoch)
      self._profile_before_chunk()
      self._collective("training steps", self._run_steps, iterator,
                       tf.constant(count, tf.int64))
      self._profile_after_chunk()
      step += count
      self.step_in_epoch.assign(step)
      self._check_loss()
      every = self.config.checkpoint_every_steps
      stop = self._stop_agreed()
      if stop or (every and self._iterations() % every == 0
                  and step < steps_per_epoch):
        self.train_seconds.assign_add(time.perf_counter() - started)
        started = time.perf_counter()
        self._save()
      if stop:
        raise Preempted(f"stopped at epoch {epoch + 1}, step {step}: checkpoint "
                        f"{os.path.basename(self.manager.latest_checkpoint)} written")
    seconds = time.perf_counter() - started
    self.train_seconds.assign_add(seconds)
    examples = (step - first_step) * self.train_pipeline.global_batch_size
    return metric_values(self.model), examples / max(seconds, 1e-9)

  def run(self) -> list:
    """Trains the remaining epochs; returns one record per epoch trained in this call."""
    history = []
    self.check_same_progress()
    try:
      self._train_epochs(history)
    finally:
      self._profile_after_chunk(force=True)  # ended (or failed) inside the profiled steps
    return history

  def _train_epochs(self, history):
    if int(self.epoch) >= self.config.epochs:
      return
    # One input pipeline for all remaining epochs (see ArrayPipeline.train_fn), held only by
    # this list so that release_in_background() drops the last reference.
    iterator = [iter(self.strategy.distribute_datasets_from_function(
        self.train_pipeline.train_fn(self.config.seed, int(self.epoch), int(self.step_in_epoch),
                                     self.config.epochs)))]
    try:
      while int(self.epoch) < self.config.epochs:
        epoch = int(self.epoch)
        train, examples_per_second = self._train_epoch(epoch, iterator[0])
        validation = self.evaluate(self.validation_pipeline)
        self.epoch.assign(epoch + 1)
        self.step_in_epoch.assign(0)
        self._save()
        record = {"epoch": epoch + 1, "train": train, "validation": validation,
                  "examples_per_second": examples_per_second,
                  "learning_rate": float(np.asarray(self.model.optimizer.learning_rate)),
                  "train_seconds": float(self.train_seconds.numpy())}
        history.append(record)
        self.on_epoch(record)
    finally:
      release_in_background(iterator)
