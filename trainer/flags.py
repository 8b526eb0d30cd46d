"""Command-line flags: definitions, validation and the student spec parser.

Kept apart from the training code (as tensorflow/models `official/` does) so that manifests and
tests can parse a container's args with exactly the parser the job uses.
"""

import dataclasses
import math
import os
import re
from typing import List, Optional, Sequence

from absl import flags

from trainer.data.options import AUGMENTATIONS, MAX_MIXUP, MIN_MIXUP
from trainer.errors import UsageError
from trainer.rundir import locations
from trainer.training import tf_config

DEFAULT_TEMPERATURE = 4.0
DEFAULT_STUDENTS = (
    f"labels_only:alpha=0,temperature={DEFAULT_TEMPERATURE:g}",
    f"teacher_only:alpha=1,temperature={DEFAULT_TEMPERATURE:g}",
    f"distilled:alpha=0.5,temperature={DEFAULT_TEMPERATURE:g}",
)
MODES = ("all", "teacher", "students", "report")
MAX_SEED = 2**31 - 1  # TensorFlow's and NumPy's seeds both accept this range
MAX_COUNT = 10**9  # epochs, batch sizes, example counts: anything larger is a typo
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclasses.dataclass(frozen=True)
class StudentSpec:
  """One student experiment: alpha weighs the distillation term, temperature softens logits,
  mixup (a Beta concentration, 0: off) mixes its training images in pairs
  (trainer/data/mixup.py)."""

  name: str
  alpha: float
  temperature: float
  mixup: float = 0.0


def parse_student(spec: str) -> StudentSpec:
  """Parses 'NAME:alpha=A,temperature=T,mixup=M' (any key may be omitted)."""
  name, sep, rest = spec.partition(":")
  name = name.strip()
  if not _NAME_RE.match(name):
    raise UsageError(
        f"--student={spec!r}: name must be lower-case letters, digits, '_' or '-' "
        "(expected NAME:alpha=A,temperature=T[,mixup=M])")
  if name == "teacher":
    raise UsageError(f"--student={spec!r}: 'teacher' is reserved for the teacher model")
  values = {"alpha": 0.5, "temperature": DEFAULT_TEMPERATURE, "mixup": 0.0}
  if sep and rest.strip():
    for item in rest.split(","):
      key, eq, raw = item.partition("=")
      key = key.strip()
      if not eq or key not in values:
        raise UsageError(
            f"--student={spec!r}: unknown or malformed setting {item!r} "
            "(expected NAME:alpha=A,temperature=T[,mixup=M])")
      try:
        values[key] = float(raw)
      except ValueError:
        raise UsageError(f"--student={spec!r}: {key} must be a number, got {raw!r}") from None
  if not 0.0 <= values["alpha"] <= 1.0:
    raise UsageError(f"--student={spec!r}: alpha must be in [0, 1], got {values['alpha']:g}")
  if not (math.isfinite(values["temperature"]) and values["temperature"] > 0.0):
    raise UsageError(
        f"--student={spec!r}: temperature must be > 0 and finite, got {values['temperature']:g}")
  mixup = values["mixup"]
  if mixup != 0.0 and not (MIN_MIXUP <= mixup <= MAX_MIXUP):  # also rejects nan and inf
    raise UsageError(f"--student={spec!r}: mixup must be 0 (off) or in [{MIN_MIXUP:g}, "
                     f"{MAX_MIXUP:g}], got {mixup:g}")
  if mixup and values["alpha"] != 1.0:
    raise UsageError(f"--student={spec!r}: mixup needs alpha=1: a mixed image has no single "
                     "label, only the teacher's answer")
  return StudentSpec(name=name, **values)


def parse_students(specs: Sequence[str]) -> List[StudentSpec]:
  """Parses every --student value and rejects duplicate names."""
  students = [parse_student(s) for s in specs]
  names = [s.name for s in students]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise UsageError(f"--student: duplicate student name(s): {', '.join(duplicates)}")
  return students


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines every flag of the job on `flag_values` (idempotent per FlagValues)."""
  if "model_dir" in flag_values:
    return
  fv = flag_values
  # Where things go and come from.
  flags.DEFINE_string(
      "model_dir", None,
      "Output folder, local or gs://bucket/prefix. Defaults to $AIP_MODEL_DIR's parent when "
      "running on Vertex AI, else ./runs/default.", flag_values=fv)
  flags.DEFINE_string("dataset", "mnist",
                      "tensorflow-datasets name (mnist, fashion_mnist, ...).", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "tensorflow-datasets data dir (local or gs://).",
                      flag_values=fv)
  flags.DEFINE_string(
      "idx_dir", None,
      "Folder (local or gs://) with the four standard IDX files, .gz or not. When set, "
      "tensorflow-datasets is not used.", flag_values=fv)
  flags.DEFINE_string("teacher_dir", None,
                      "Where --mode=students finds the trained teacher. Default "
                      "<model_dir>/teacher.", flag_values=fv)
  flags.DEFINE_string(
      "teacher_model", None,
      "A teacher trained elsewhere (local or gs://): a .keras or .h5 file or a SavedModel "
      "folder mapping 28x28 grayscale images to 10 logits or probabilities. Replaces the "
      "teacher trained here in --mode=all and --mode=students.", flag_values=fv)
  flags.DEFINE_enum("teacher_input_range", "0-1", ("0-1", "0-255"),
                    "Pixel scale --teacher_model expects: 0-1 floats (as this job's models) or "
                    "0-255.", flag_values=fv)
  flags.DEFINE_string(
      "transfer_idx_dir", None,
      "Distill the students on this transfer set instead of the teacher's training split: a "
      "folder (local or gs://) with one IDX images file and optionally its labels file.",
      flag_values=fv)
  flags.DEFINE_string(
      "transfer_dataset", None,
      "Like --transfer_idx_dir, from a tensorflow-datasets name (its train split, read from "
      "--data_dir).", flag_values=fv)
  # What to run.
  flags.DEFINE_enum("mode", "all", MODES,
                    "all: teacher then students; teacher; students (reuses the teacher); "
                    "report: merge finished results only.", flag_values=fv)
  flags.DEFINE_multi_string(
      "student", list(DEFAULT_STUDENTS),
      "Student experiment NAME:alpha=A,temperature=T[,mixup=M], repeatable. alpha weighs the "
      "distillation term: 0 = labels only, 1 = teacher only. mixup=M (alpha=1 and "
      "--teacher_logits=online only) mixes training images in pairs with weights "
      "~ Beta(M, M), M in [0.1, 100]; 0 = off.", flag_values=fv)
  flags.DEFINE_integer(
      "student_index", None,
      "Run only the K-th --student (0-based). Default: $JOB_COMPLETION_INDEX when set.",
      lower_bound=0, flag_values=fv)
  flags.DEFINE_string(
      "retrain", None,
      "NAME[,NAME...] or all: discard these models' folders in --model_dir (checkpoints, "
      "logs, result) and train them again; other models are never touched. Without it, a "
      "model recorded under other settings stops the job (exit 2).", flag_values=fv)
  flags.DEFINE_float(
      "lease_wait_seconds", 120.0,
      "How long to wait for another process's lease on a model (a restarted pod overlapping "
      "the old one's SIGTERM checkpoint) before exiting 5.", lower_bound=0.0,
      upper_bound=86400.0, flag_values=fv)
  flags.DEFINE_float(
      "lease_ttl_seconds", 60.0,
      "gs:// runs: how long a model's lease outlives its holder (renewed every third of it); a "
      "SIGKILLed holder blocks the model this long.", lower_bound=3.0, upper_bound=3600.0,
      flag_values=fv)
  # Training.
  flags.DEFINE_integer("teacher_epochs", 10, "Teacher training epochs.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("student_epochs", 15, "Epochs per student.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", 256,
                       "Global batch size (per-replica batch = global / replicas).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_float("learning_rate", 2e-3,
                     "Teacher's Adam learning rate (cosine-decayed to 0 over its epochs).",
                     flag_values=fv)
  flags.DEFINE_float("student_learning_rate", 1e-2,
                     "Students' Adam learning rate (cosine-decayed to 0): the 28k-parameter "
                     "students train best with a larger step than the teacher.",
                     flag_values=fv)
  flags.DEFINE_integer("seed", 42, "Seed for initial weights and data order.", lower_bound=0,
                       upper_bound=MAX_SEED, flag_values=fv)
  flags.DEFINE_integer("max_train_examples", None,
                       "Use at most this many training examples (smoke runs).", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("max_test_examples", None,
                       "Evaluate on at most this many test examples (smoke runs).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer(
      "validation_examples", 5000,
      "Examples held out from the end of the training split for validation; the test split "
      "is only used for the final report.", flag_values=fv)
  flags.DEFINE_integer("checkpoint_every_steps", None,
                       "Also checkpoint every N steps (a checkpoint is written every epoch).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_enum(
      "augment", "none", AUGMENTATIONS,
      "Augmentation of training batches, seeded by (seed, epoch, step); validation and test "
      "never. shift: whole-pixel shifts up to 2 px; affine: rotation up to 12 degrees, scale "
      "0.9-1.1 and shifts up to 2 px; elastic: affine plus elastic distortion; shift_flip: "
      "shifts plus a left-right mirror of half the images (for clothes, not digits). Students need "
      "--teacher_logits=online (the teacher then sees each student's augmented batch).",
      flag_values=fv)
  flags.DEFINE_float(
      "teacher_weight_decay", 0.0,
      "Decoupled weight decay (AdamW-style, times the learning rate) of the teacher's kernels; "
      "0: none.", lower_bound=0.0, flag_values=fv)
  flags.DEFINE_integer(
      "grace_period_seconds", 15,
      "Seconds from SIGTERM to SIGKILL: the smaller of the pod's terminationGracePeriodSeconds "
      "and, on Spot VMs, GKE's node-shutdown grace for pods (15 by default). The SIGTERM "
      "checkpoint and upload must end within it, else the job says what the bucket lacks and "
      "exits 143 before the kill.", lower_bound=3, upper_bound=3600, flag_values=fv)
  flags.DEFINE_bool("deterministic", False,
                    "Bit-reproducible training on CPU (op determinism; resume gives the same "
                    "weights as an uninterrupted run).", flag_values=fv)
  # Speed.
  flags.DEFINE_enum("teacher_logits", "cached", ("cached", "online"),
                    "cached: compute the teacher's logits on the training set once; online: run "
                    "the teacher every distillation step.", flag_values=fv)
  flags.DEFINE_bool("jit_compile", False, "Compile train and test steps with XLA.",
                    flag_values=fv)
  flags.DEFINE_enum("mixed_precision", "auto", PRECISIONS,
                    "auto: mixed_float16 on GPUs with compute capability >= 7, else float32.",
                    flag_values=fv)
  flags.DEFINE_string(
      "batch_slices", "auto",
      "CPU only: run each replica's batch as N slices side by side, each on single-threaded "
      "kernels (small kernels spread over all cores waste them on synchronisation). auto: one "
      "slice per available core, at least 16 images each; 1: TensorFlow's default threading.",
      flag_values=fv)
  # Deployment.
  flags.DEFINE_bool("litert", True,
                    "Also export every model as LiteRT float32 and int8 flatbuffers, measured in "
                    "the interpreter (accuracy, size, latency).", flag_values=fv)
  flags.DEFINE_integer("latency_runs", 1000,
                       "Timed single-image runs per LiteRT flatbuffer (p99 needs about 100).",
                       lower_bound=10, upper_bound=100000, flag_values=fv)
  # Distribution.
  flags.DEFINE_enum("strategy", "auto", STRATEGIES,
                    "auto: multi_worker when TF_CONFIG names several workers, mirrored with "
                    "several GPUs (or --num_cpu_devices > 1), else default.", flag_values=fv)
  flags.DEFINE_integer("num_cpu_devices", 1,
                       "Split the CPU into N logical devices (MirroredStrategy without GPUs).",
                       lower_bound=1, flag_values=fv)
  # Observability.
  flags.DEFINE_bool(
      "verbose_tf", False,
      "Also log TensorFlow's and Keras' own lines: start-up banners (oneDNN, CUDA, CPU "
      "instructions), checkpoint and SavedModel internals, the LiteRT converter's, C++ "
      "warnings. Off: the job's own lines, Python warnings and every error.", flag_values=fv)
  flags.DEFINE_string("profile_steps", None,
                      "START,END: write a profiler trace for these global steps of each model.",
                      flag_values=fv)

  flags.register_validator(
      "student", lambda specs: bool(specs),
      message="at least one --student is required", flag_values=fv)
  flags.register_validator(
      "validation_examples", lambda n: n is not None and n > 0,
      message="--validation_examples must be > 0: validation drives model selection",
      flag_values=fv)
  for name in ("learning_rate", "student_learning_rate"):
    flags.register_validator(name, lambda v: v is not None and math.isfinite(v) and v > 0,
                             message=f"--{name} must be finite and > 0", flag_values=fv)
  _check_ranges(fv)


def _check_ranges(fv: flags.FlagValues) -> None:
  """Every number a user can pass is finite and within what its consumer accepts: floats must be
  finite, integers at most MAX_COUNT (absl's lower bounds are set per flag)."""
  for name in list(fv):
    flag = fv[name]
    if isinstance(flag.parser, flags.FloatParser):
      flags.register_validator(name, lambda v: v is None or math.isfinite(v),
                               message=f"--{name} must be a finite number", flag_values=fv)
    elif isinstance(flag.parser, flags.IntegerParser) and flag.parser.upper_bound is None:
      flags.register_validator(name, lambda v: v is None or v <= MAX_COUNT,
                               message=f"--{name} must be at most {MAX_COUNT}", flag_values=fv)


def _job_flag_names() -> tuple:
  """The names define_flags defines, read off a scratch FlagValues."""
  scratch = flags.FlagValues()
  define_flags(scratch)
  return tuple(scratch)


class _SettingsMethods:

  def replace(self, **changes) -> "Settings":
    return dataclasses.replace(self, **changes)

  def flag_dict(self) -> dict:
    """Plain dict of the settings, for results.json."""
    d = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
    d["students"] = [dataclasses.asdict(s) for s in self.students]
    return d


# One field per flag defined above, so a new flag needs no second declaration: --student's
# values become `students` (only the selected ones kept) and --student_index is used up.
Settings = dataclasses.make_dataclass(
    "Settings", sorted({*_job_flag_names(), "students"} - {"student", "student_index"}),
    bases=(_SettingsMethods,), frozen=True,
    namespace={"__module__": __name__, "__doc__": """Validated, read-only view of the job's
flags, with defaults resolved, `students` parsed and `batch_slices`/`profile_steps`
normalized."""})


def _selected_students(all_students, index, environ):
  if index is None and environ.get("JOB_COMPLETION_INDEX", "").strip():
    raw = environ["JOB_COMPLETION_INDEX"].strip()
    if not raw.isdigit():
      raise UsageError(f"JOB_COMPLETION_INDEX must be a non-negative integer, got {raw!r}")
    index = int(raw)
  if index is None:
    return tuple(all_students)
  if index >= len(all_students):
    raise UsageError(
        f"--student_index={index} is out of range: there are {len(all_students)} students "
        f"(0..{len(all_students) - 1})")
  return (all_students[index],)


def _parse_profile_steps(raw):
  if not raw:
    return None
  try:
    start, end = (int(v) for v in raw.split(","))
  except ValueError:
    raise UsageError(f"--profile_steps={raw!r}: expected START,END (two integers)") from None
  if not 0 <= start < end:
    raise UsageError(f"--profile_steps={raw!r}: need 0 <= START < END")
  return (start, end)


def _parse_retrain(raw, students) -> tuple:
  """--retrain -> the model names it discards ('all': the teacher and every student)."""
  if not raw or not raw.strip():
    return ()
  known = ["teacher", *(spec.name for spec in students)]
  names = [n.strip() for n in raw.split(",") if n.strip()]
  if names == ["all"]:
    return tuple(known)
  unknown = [n for n in names if n not in known]
  if unknown:
    raise UsageError(f"--retrain={raw!r}: no model named {', '.join(unknown)} "
                     f"(models: {', '.join(known)}, or all)")
  return tuple(dict.fromkeys(names))


def parse_batch_slices(raw: str) -> str:
  """'auto' or a positive integer (as text); UsageError otherwise."""
  raw = raw.strip()
  if raw == "auto" or (raw.isdigit() and int(raw) >= 1):
    return raw if raw == "auto" else str(int(raw))
  raise UsageError(f"--batch_slices={raw!r}: expected 'auto' or a positive integer")


LOCATION_FLAGS = ("model_dir", "teacher_dir", "idx_dir", "data_dir", "teacher_model",
                  "transfer_idx_dir")
LOCATION_VARIABLES = ("AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR", "AIP_TENSORBOARD_LOG_DIR")


def _check_locations(fv: flags.FlagValues, environ) -> None:
  """One URL grammar for every place the job reads or writes (trainer/rundir/locations.py): a value
  that looks like a URL is a valid gs://BUCKET[/PREFIX] or exit 2, never a local folder."""
  for name in LOCATION_FLAGS:
    if fv[name].value:
      locations.parse_location(fv[name].value, f"--{name}")
  for name in LOCATION_VARIABLES:
    if environ.get(name, "").strip():
      locations.parse_location(environ[name].strip(), f"${name}")


def _check_combinations(fv: flags.FlagValues, students, environ) -> None:
  """Every rule that ties flags together, in one place (absl checks each flag alone)."""
  trains_students = fv.mode in ("all", "students")
  if fv.strategy == "multi_worker" and not environ.get("TF_CONFIG"):
    raise UsageError("--strategy=multi_worker needs TF_CONFIG in the environment")
  if fv.transfer_idx_dir and fv.transfer_dataset:
    raise UsageError("--transfer_idx_dir and --transfer_dataset: give one transfer set, not both")
  if fv.teacher_model and fv.mode == "teacher":
    raise UsageError("--mode=teacher with --teacher_model: the teacher is given, nothing to "
                     "train (use --mode=all or --mode=students)")
  if fv.augment != "none" and trains_students and fv.teacher_logits != "online":
    raise UsageError("--augment needs --teacher_logits=online: cached teacher logits belong to "
                     "the unaugmented images")
  mixed = [spec.name for spec in students if spec.mixup]
  if mixed and trains_students and fv.teacher_logits != "online":
    raise UsageError(f"--student {', '.join(mixed)}: mixup needs --teacher_logits=online "
                     "(cached teacher logits belong to the unmixed images)")
  if mixed and fv.batch_size % 2:
    raise UsageError(f"--student {', '.join(mixed)}: mixup pairs images, so --batch_size must "
                     f"be even, got {fv.batch_size}")


def _default_model_dir(environ) -> str:
  # Vertex AI sets AIP_MODEL_DIR to <base>/model; the run's root is its parent.
  aip = environ.get("AIP_MODEL_DIR", "").rstrip("/")
  if aip:
    return aip.rsplit("/", 1)[0] if aip.endswith("/model") else aip
  return "runs/default"


def settings_from_flags(fv: flags.FlagValues = flags.FLAGS, environ=None) -> Settings:
  """Cross-checks the parsed flags and returns Settings; raises UsageError on bad input."""
  environ = os.environ if environ is None else environ
  tf_config.parse(environ)  # a malformed cluster is bad input, found before anything is written
  _check_locations(fv, environ)
  values = {name: fv[name].value for name in _job_flag_names()}
  students = parse_students(values.pop("student"))
  _check_combinations(fv, students, environ)
  index = values.pop("student_index")
  model_dir = (fv.model_dir or _default_model_dir(environ)).rstrip("/") or "/"
  values.update(
      model_dir=model_dir,
      dataset=fv.dataset.strip(),
      teacher_dir=(fv.teacher_dir or f"{model_dir}/teacher").rstrip("/"),
      students=_selected_students(students, index, environ)
      if fv.mode in ("all", "students") else tuple(students),
      batch_slices=parse_batch_slices(fv.batch_slices),
      retrain=_parse_retrain(fv.retrain, students),
      profile_steps=_parse_profile_steps(fv.profile_steps),
  )
  return Settings(**values)


def parse_argv(argv: Sequence[str], flag_values: Optional[flags.FlagValues] = None) -> Settings:
  """Parses a full argv (argv[0] is the program) into Settings, for tests and manifests.

  Raises UsageError with a one-line message for anything absl rejects.
  """
  fv = flag_values if flag_values is not None else flags.FlagValues()
  define_flags(fv)
  try:
    fv(list(argv))
  except flags.Error as e:
    raise UsageError(str(e).splitlines()[0]) from None
  return settings_from_flags(fv)
