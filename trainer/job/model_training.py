"""One model's life: pulled from the bucket, trained or resumed, finished and uploaded.

The teacher and every student go through the same steps, so a fix to any of them (what is
synced when, what marks a model finished) holds for all models at once.
"""

import dataclasses
import logging
import os
import shutil
import tempfile
from typing import Callable, Optional

import keras

from trainer.data.pipeline import ArrayPipeline
from trainer.errors import Preempted
from trainer.evaluation import (
  comparison,
  evaluation,
  hparams_logging,
  results,
  summaries,
)
from trainer.evaluation.summaries import ModelLogs
from trainer.flags import Settings
from trainer.job import provenance
from trainer.job.runtime import TEACHER, Runtime
from trainer.modeling import optimizers
from trainer.modeling.optimizers import FusedAdam
from trainer.rundir import layout
from trainer.serving import export as exports
from trainer.serving import litert_export
from trainer.training.loop import LoopConfig, NonFiniteLoss, TrainingLoop


@dataclasses.dataclass(frozen=True)
class Trained:
  """What training one model produced, for its result."""

  seconds: float  # training time, summed over resumed runs
  validation: dict  # validation metrics of the final weights
  examples: int  # examples seen over all epochs


class ModelTrainer:
  """Trains and finishes models of one run; `should_stop` is polled between step chunks."""

  def __init__(self, rt: Runtime, settings: Settings, should_stop: Callable[[], bool]):
    self.rt = rt
    self.settings = settings
    self.should_stop = should_stop
    self.leases = {}  # name -> trainer.rundir.lease.Lease, held by the chief while the job runs

  # ---- inputs ----
  def pipeline(self, images, labels, extras=None, mixup=0.0) -> ArrayPipeline:
    """Batches of the run's global size; --augment and a student's mixup apply to training
    batches only (the pipeline never augments or mixes evaluation), and not with cached
    logits (validation's cached logits belong to the plain images)."""
    augment = self.settings.augment if extras is None else "none"
    return ArrayPipeline(images, labels, self.settings.batch_size, self.rt.replicas, extras,
                         augment=augment, mixup=mixup)

  def optimizer(self, learning_rate: float, epochs: int, steps_per_epoch: int,
                weight_decay: float = 0.0) -> FusedAdam:
    """Adam with the learning rate cosine-decayed to 0 over the model's whole training."""
    return optimizers.cosine_adam(learning_rate, epochs * steps_per_epoch, weight_decay)

  def seeded(self, build):
    """Builds a network from the run's seed, so that every student starts from the same
    weights. The seed goes to the builder itself (trainer/modeling/models.py): Keras' default draws
    initializer seeds from Python's global `random`, which the bucket's threads also draw from
    (lease renewals, upload boundaries, retry jitter), so a resumed bucket run once started its
    student from other weights than an uninterrupted one."""
    keras.utils.set_random_seed(self.settings.seed)
    with self.rt.strategy.scope():
      return build(seed=self.settings.seed)

  def check_stop(self, name: str) -> None:
    if self.should_stop():
      raise Preempted(f"stopped before training {name}: nothing left to checkpoint")

  def measure(self) -> Optional[litert_export.MeasureConfig]:
    """How the LiteRT exports are measured; None with --nolitert."""
    if not self.settings.litert:
      return None
    runs = self.settings.latency_runs
    return litert_export.MeasureConfig(latency_runs=runs, warmup_runs=min(50, runs),
                                       serving_runs=min(300, runs), batch_runs=min(20, runs))

  def _ensure_lease(self, name: str) -> None:
    held = self.leases.get(name)
    if held is not None:
      held.ensure_held()

  # ---- the bucket ----
  def sync_logs(self, name: str) -> None:
    self.rt.storage.sync(layout.logs_rel(name))
    if self.rt.log_mirror is not None:
      self.rt.log_mirror.sync(name)

  def pull(self, name: str, finished_needs=()) -> Optional[dict]:
    """Brings model `name` from the bucket as it is there: its result marker (plus the files
    in `finished_needs`) if finished, else its checkpoints and TensorBoard logs. Local copies
    the bucket lacks are dropped. Returns the finished result or None."""
    run_storage = self.rt.storage
    run_storage.pull(layout.result_rel(name), exact=True)
    if results.read_model_result(self.rt.dir, name):
      for part in finished_needs:
        run_storage.pull(layout.rel(name, part))
    else:
      run_storage.pull(layout.checkpoints_rel(name), exact=True)
      run_storage.pull(layout.logs_rel(name), exact=True)
    return results.read_model_result(self.rt.dir, name)

  # ---- training ----
  def train(self, name: str, model, net, train: ArrayPipeline, validation: ArrayPipeline,
            epochs: int, record: dict) -> Trained:
    """Runs (or resumes) the loop for one model; returns what its result needs. `record` (the
    settings that make the model, trainer/job/provenance.py) goes beside its checkpoints."""
    rt, s = self.rt, self.settings
    checkpoints = layout.local(rt.dir, layout.checkpoints_rel(name))
    resume_from = checkpoints  # every worker resumes from the chief's (pulled or shared)
    if rt.chief:
      layout.write_json(os.path.join(checkpoints, layout.SETTINGS), record)
    else:  # every worker must save (MultiWorkerMirroredStrategy); only the chief's is kept
      checkpoints = tempfile.mkdtemp(prefix=f"mnist-distill-{name}-worker-")
    logs = ModelLogs(layout.local(rt.dir, layout.LOGS), name, enabled=rt.chief)
    logs.write_session(hparams_logging.session_hparams(
        "teacher" if name == TEACHER else "student", net.count_params(), s.batch_size, s.seed,
        getattr(model, "distillation_weight", None), getattr(model, "temperature", None),
        None if name == TEACHER else train.mixup))
    logs.write_graph(net)

    def on_checkpoint():
      self._ensure_lease(name)  # another writer took over: stop before mixing checkpoints
      rt.storage.raise_if_failed()  # the bucket is gone for good: stop, don't train unsaved
      if rt.chief:
        rt.storage.sync(layout.checkpoints_rel(name), last=("checkpoint",))
        if rt.checkpoint_mirror is not None:
          rt.checkpoint_mirror.sync(layout.checkpoints_rel(name), last=("checkpoint",))

    def on_epoch(record):
      logs.write_epoch(record)
      if rt.chief:
        self.sync_logs(name)
      t, v = record["train"], record["validation"]
      logging.info("%s epoch %d/%d: loss %.4f accuracy %.4f | validation loss %.4f accuracy "
                   "%.4f | %.0f examples/s", name, record["epoch"], epochs, t["loss"],
                   t["accuracy"], v["loss"], v["accuracy"], record["examples_per_second"])

    loop = TrainingLoop(model, net, rt.strategy, train, validation, checkpoints,
                        LoopConfig(epochs=epochs, seed=s.seed,
                                   checkpoint_every_steps=s.checkpoint_every_steps,
                                   jit_compile=s.jit_compile, profile_steps=s.profile_steps,
                                   profile_dir=logs.train_dir if rt.chief else None),
                        on_checkpoint=on_checkpoint, on_epoch=on_epoch,
                        should_stop=self.should_stop)
    loop.restore(resume_from)
    try:
      history = loop.run()
    except (Preempted, NonFiniteLoss) as e:
      raise type(e)(f"{name}: {e}") from None
    finally:
      if not rt.chief:
        shutil.rmtree(checkpoints, ignore_errors=True)
    logs.close()  # its last events go up with the model's folder in finish()
    # The last epoch was validated on these very weights: evaluate only when this process
    # trained no epoch (a restart after the last one).
    return Trained(seconds=float(loop.train_seconds.numpy()),
                   validation=history[-1]["validation"] if history
                   else loop.evaluate(validation),
                   examples=epochs * train.steps_per_epoch * s.batch_size)

  # ---- finishing ----
  def finish(self, name: str, net, role: str, trained: Trained, epochs: int, record: dict,
             extra: Optional[dict] = None, export: bool = True) -> dict:
    """Evaluates on the test split, exports (unless `export` is False: a teacher given by
    --teacher_model is the user's own file), and writes the result marker last (with
    `record`, the settings that made the model)."""
    rt = self.rt
    splits = rt.splits
    logits = evaluation.predict_logits(net, splits.test_images, slices=rt.slices)
    report = evaluation.test_report(logits, splits.test_labels)
    result = dict(name=name, role=role, params=int(net.count_params()), **report,
                  validation_accuracy=trained.validation["accuracy"],
                  validation_loss=trained.validation["loss"], train_seconds=trained.seconds,
                  train_examples_per_second=trained.examples / max(trained.seconds, 1e-9),
                  alpha=None, temperature=None, precision=rt.precision,
                  jit_compile=self.settings.jit_compile, settings=record,
                  settings_sha256=provenance.digest(record))
    result.update(extra or {})
    if rt.chief:
      folder = layout.local(rt.dir, name)
      layout.remove_temporaries(folder)  # what a killed process left behind
      predictions = logits.argmax(axis=-1)
      comparison.save_predictions(folder, splits.test_images, splits.test_labels, predictions)
      summaries.write_test(layout.local(rt.dir, layout.LOGS), name, epochs, report,
                           splits.test_labels, predictions)
      if export:
        exports.export_saved_model(net, os.path.join(folder, layout.EXPORT))
        exports.save_keras(net, os.path.join(folder, layout.MODEL_FILE))
        results.finish_outputs(folder, net, splits, report["test_errors"],
                               layout.local(rt.dir, layout.LOGS), epochs,
                               measure=self.measure(), slices=rt.slices)
      self._ensure_lease(name)
      layout.write_json(os.path.join(folder, layout.RESULT), result)
      self.sync_logs(name)
      rt.storage.sync(name, last=(layout.RESULT,))
    logging.info("%s: test accuracy %.4f (%d errors), test loss %.4f", name,
                 result["test_accuracy"], result["test_errors"], result["test_loss"])
    return result
