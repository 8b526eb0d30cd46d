"""Preflight: everything that can reject the input, run before any training, into a Runtime.

The Runtime is frozen: the phases after it (trainer/job/model_training.py, trainer/job/__init__.py)
read it and never add to it. Tests and embedding callers may inject the strategy, the storage and
the data splits (as tensorflow/models' `run(flags, strategy_override, datasets_override)` does),
so a job-level test runs in-process on data it built itself.
"""

import dataclasses
import logging
import os
from typing import Optional

import keras
import tensorflow as tf

from trainer.data import data, transfer_set
from trainer.errors import UsageError
from trainer.flags import Settings
from trainer.modeling import batch_slices
from trainer.modeling.outside_teacher import OutsideTeacher, load_teacher
from trainer.rundir import disk_full, downloads, layout, locations, storage
from trainer.training import distribution

TEACHER = "teacher"


@dataclasses.dataclass(frozen=True)
class Runtime:
  """What the preflight found out: where the run lives and what it runs on."""

  storage: storage.RunStorage
  log_mirror: Optional[storage.RunStorage]  # $AIP_TENSORBOARD_LOG_DIR, when it is elsewhere
  checkpoint_mirror: Optional[storage.RunStorage]  # $AIP_CHECKPOINT_DIR, likewise
  strategy: tf.distribute.Strategy
  chief: bool
  replicas: int
  precision: str
  slices: int
  intra_op_threads: int
  splits: Optional[data.Splits]  # None in --mode=report
  teacher_dir: Optional[str]  # local folder of the finished teacher, in --mode=students
  outside_teacher: Optional[OutsideTeacher] = None  # --teacher_model
  transfer: Optional["TransferSet"] = None  # --transfer_idx_dir / --transfer_dataset

  @property
  def dir(self) -> str:
    """The local folder the run is staged in (the model_dir itself when it is local)."""
    return self.storage.local_dir

  def uploaders(self) -> list:
    """The run's storage and its Vertex AI mirrors."""
    return [t for t in (self.storage, self.log_mirror, self.checkpoint_mirror) if t is not None]


@dataclasses.dataclass(frozen=True)
class TransferSet:
  """The images the students distill on instead of the training split (labels optional)."""

  images: object  # uint8 [N,28,28]
  labels: object  # int64 [N] or None
  record: dict  # source, examples, labelled, images digest (trainer/data/transfer_set.py)


def resolve_precision(setting: str) -> str:
  """'auto' -> mixed_float16 on GPUs with compute capability >= 7, else float32."""
  if setting != "auto":
    return setting
  for gpu in tf.config.list_physical_devices("GPU"):
    capability = tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
    if capability >= (7, 0):
      return "mixed_float16"
  return "float32"


def _ensure_writable(folder: str) -> None:
  try:
    probe = os.path.join(folder, f"{layout.TMP_PREFIX}write-probe-{os.getpid()}")
    layout.write_text(probe, "ok")
    os.remove(probe)
  except OSError as e:
    if disk_full.disk_full_error(e) is not None:
      raise  # the output location failed, not the input: exit 3 (trainer/job/__init__.py)
    raise UsageError(f"--model_dir {folder} is not writable: {e.strerror or e}") from None


def _open_mirror(variable: str, local_dir: str, same_as: str) -> Optional[storage.RunStorage]:
  """Vertex AI: a copy of part of the run also goes where $variable points (gs:// only),
  unless that is already where it lands. The run itself keeps the model_dir layout, so
  resume always reads <model_dir>; the mirror is written, never read."""
  target = os.environ.get(variable, "").strip().rstrip("/")
  if not target or target == same_as:
    return None
  if not locations.is_remote(target):
    logging.warning("%s=%s is not a gs:// URL: not mirrored", variable, target)
    return None
  mirror = storage.RunStorage(local_dir, remote=target)
  mirror.check()
  logging.info("%s: mirrored to %s", variable, target)
  return mirror


def _plan_cpu_threads(s: Settings) -> batch_slices.Plan:
  """Before the strategy exists: TensorFlow fixes its thread pools when it starts."""
  cores = batch_slices.available_cores()
  workers = max(1, distribution.tf_config_workers())
  chosen = batch_slices.plan(s.batch_slices, s.batch_size // workers, cores,
                             on_gpu=bool(tf.config.list_physical_devices("GPU")),
                             cpu_devices=s.num_cpu_devices)
  threads = batch_slices.apply_threads(chosen)
  logging.info("Batch slices per replica: %d; intra-op threads: %s (%d cores available)",
               chosen.slices, threads or "TensorFlow default", cores)
  return dataclasses.replace(chosen, intra_op_threads=threads)


def _locate_teacher(s: Settings, run_storage: storage.RunStorage) -> str:
  if s.teacher_dir == f"{s.model_dir}/{TEACHER}":
    local = os.path.join(run_storage.local_dir, TEACHER)
    run_storage.pull(layout.result_rel(TEACHER), exact=True)
    run_storage.pull(layout.rel(TEACHER, layout.MODEL_FILE), exact=True)
  else:
    local = downloads.fetch_to_local(s.teacher_dir)
  if not (os.path.isfile(os.path.join(local, layout.RESULT))
          and os.path.isfile(os.path.join(local, layout.MODEL_FILE))):
    raise UsageError(f"--mode=students needs a finished teacher in {s.teacher_dir} "
                     "(run --mode=teacher first or set --teacher_dir)")
  return local


def load_splits(s: Settings) -> data.Splits:
  """The task's splits; their source names the flag's location (a bucket URL, not the staging
  copy it was fetched to), so that reruns on another disk record the same data."""
  splits = data.load_splits(
      s.dataset, data_dir=downloads.fetch_to_local(s.data_dir) if s.data_dir else None,
      idx_dir=downloads.fetch_to_local(s.idx_dir) if s.idx_dir else None,
      validation_examples=s.validation_examples, max_train_examples=s.max_train_examples,
      max_test_examples=s.max_test_examples)
  return dataclasses.replace(splits, source=f"idx:{s.idx_dir}") if s.idx_dir else splits


def prepare(s: Settings, strategy: Optional[tf.distribute.Strategy] = None,
            run_storage: Optional[storage.RunStorage] = None,
            splits: Optional[data.Splits] = None) -> Runtime:
  """Checks the input and sets TensorFlow up; raises UsageError before any training.

  `strategy`, `run_storage` and `splits` replace what the flags would build (tests)."""
  if run_storage is None:
    run_storage = storage.open_storage(s.model_dir)
  run_storage.check()
  local_dir = run_storage.local_dir
  _ensure_writable(local_dir)
  # Vertex AI TensorBoard streams from $AIP_TENSORBOARD_LOG_DIR; $AIP_CHECKPOINT_DIR gets
  # <model>/checkpoints of every model.
  log_mirror = _open_mirror("AIP_TENSORBOARD_LOG_DIR", layout.local(local_dir, layout.LOGS),
                            f"{s.model_dir}/{layout.LOGS}")
  checkpoint_mirror = _open_mirror("AIP_CHECKPOINT_DIR", local_dir, s.model_dir)
  threads = _plan_cpu_threads(s)
  if strategy is None:
    strategy = distribution.make_strategy(s.strategy, s.num_cpu_devices)
  replicas = strategy.num_replicas_in_sync
  if s.batch_size % replicas:
    raise UsageError(f"--batch_size={s.batch_size} must be a multiple of the "
                     f"{replicas} replicas")
  precision = resolve_precision(s.mixed_precision)
  keras.mixed_precision.set_dtype_policy(precision)
  if s.deterministic:
    tf.config.experimental.enable_op_determinism()
  teacher_dir = None
  if s.mode == "students" and not s.teacher_model:
    teacher_dir = _locate_teacher(s, run_storage)
  if s.mode != "report" and splits is None:
    splits = load_splits(s)
  if splits is not None and len(splits.train_labels) < s.batch_size:
    raise UsageError(f"--batch_size={s.batch_size} is larger than the "
                     f"{len(splits.train_labels)} training examples")
  given_teacher = transfer = None
  if s.mode in ("all", "students"):
    if s.teacher_model:
      given_teacher = dataclasses.replace(load_teacher(
          downloads.fetch_to_local(s.teacher_model, flag_name="--teacher_model"),
          s.teacher_input_range, probe_images=splits.validation_images[:32]),
          source=s.teacher_model)  # the user's location, not the staging copy
      logging.info("Teacher: %s", given_teacher.description)
    transfer = _load_transfer(s)
  return Runtime(storage=run_storage, log_mirror=log_mirror, checkpoint_mirror=checkpoint_mirror,
                 strategy=strategy, chief=distribution.is_chief(strategy), replicas=replicas,
                 precision=precision, slices=threads.slices,
                 intra_op_threads=threads.intra_op_threads,
                 splits=splits if s.mode != "report" else None, teacher_dir=teacher_dir,
                 outside_teacher=given_teacher, transfer=transfer)


def _load_transfer(s: Settings) -> Optional[TransferSet]:
  if not (s.transfer_idx_dir or s.transfer_dataset):
    return None
  idx_dir = (downloads.fetch_to_local(s.transfer_idx_dir, flag_name="--transfer_idx_dir")
             if s.transfer_idx_dir else None)
  data_dir = downloads.fetch_to_local(s.data_dir) if s.data_dir else None
  images, labels = transfer_set.load_transfer_set(idx_dir=idx_dir, tfds_name=s.transfer_dataset,
                                                  data_dir=data_dir)
  source = transfer_set.source_name(idx_dir=s.transfer_idx_dir, tfds_name=s.transfer_dataset)
  transfer_set.require_labels(s.students, labels, source)
  if len(images) < s.batch_size:
    raise UsageError(f"--batch_size={s.batch_size} is larger than the {len(images)} images of "
                     f"the transfer set {source}")
  logging.info("Transfer set %s: %d images, %s", source, len(images),
               "labelled" if labels is not None else "no labels")
  return TransferSet(images=images, labels=labels,
                     record=transfer_set.record(source, images, labels))
