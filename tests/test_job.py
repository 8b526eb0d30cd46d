"""End to end on real MNIST subsets: the model_dir layout contract, exports, resume, modes."""

import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from trainer.data import idx
from trainer.modeling import batch_slices

from helpers import MNIST_DIR, REPO, SMOKE_ARGS, cli_env, tree_digest
from inprocess import run_job
from tb_events import events

MODELS = ("teacher", "labels_only", "teacher_only", "distilled")
RESULT_FIELDS = ("name", "params", "test_accuracy", "test_errors", "test_loss", "train_seconds",
                 "train_examples_per_second")


def _scalars(event_dir):
  """{tag: {step: value}} from the event files of one TensorBoard run folder."""
  found = {}
  for event in events(event_dir):
    for value in event.summary.value:
      found.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return found


def test_layout_contract(smoke_run):
  root = smoke_run["model_dir"]
  for name in MODELS:
    assert glob.glob(f"{root}/logs/{name}/train/events.out.tfevents.*"), name
    assert glob.glob(f"{root}/logs/{name}/validation/events.out.tfevents.*"), name
    assert os.path.isfile(f"{root}/{name}/checkpoints/checkpoint")
    assert os.path.isfile(f"{root}/{name}/export/saved_model.pb")
    assert os.path.isfile(f"{root}/{name}/model.keras")
    assert os.path.isfile(f"{root}/{name}/result.json")
  assert not glob.glob(f"{root}/**/*.tmp-*", recursive=True)  # no half-written artifacts


def test_results_report(smoke_run):
  root = smoke_run["model_dir"]
  with open(f"{root}/results.json") as f:
    summary = json.load(f)
  assert [m["name"] for m in summary["models"]] == ["teacher", "distilled", "labels_only",
                                                    "teacher_only"]
  assert summary["tensorflow"] == tf.__version__ and summary["replicas"] == 1
  assert summary["flags"]["batch_size"] == 64 and summary["dataset"].startswith("idx:")
  # --batch_slices=auto on this CPU-only machine: one slice per core (2 on CI), and the
  # threads that go with it, recorded for whoever reads the numbers later.
  plan = batch_slices.plan("auto", 64, batch_slices.available_cores(), on_gpu=False)
  assert (summary["batch_slices"], summary["intra_op_threads"]) == (plan.slices,
                                                                    plan.intra_op_threads)
  for model in summary["models"]:
    for field in RESULT_FIELDS:
      assert model[field] is not None, (model["name"], field)
    assert model["test_errors"] == round((1 - model["test_accuracy"]) * 512)
    if model["role"] == "student":
      assert model["params"] == 28_226 and 0 <= model["alpha"] <= 1 and model["temperature"] > 0
  assert summary["models"][0]["params"] == 1_144_074
  assert summary["models"][0]["test_accuracy"] > 0.5  # chance is 0.1: it learned
  students = [m for m in summary["models"] if m["role"] == "student"]
  assert len({m["initial_weights_sha256"] for m in students}) == 1  # identical starting points
  with open(f"{root}/results.md") as f:
    table = f.read()
  for name in MODELS:
    assert f"| {name} |" in table


def test_run_ends_with_a_summary(smoke_run):
  """The run's last lines say what it found and where to look, in agreement with results.json."""
  root = smoke_run["model_dir"]
  with open(f"{root}/results.json") as f:
    summary = json.load(f)
  lines = smoke_run["stdout"].splitlines()
  assert lines[0] == (f"mnist-distill: done: 4 model(s) in {root}, test accuracy with its 95% "
                      "interval:")
  for line, model in zip(lines[1:5], summary["models"]):
    low, high = (100 * model["test_accuracy_interval"][k] for k in ("lower", "upper"))
    assert line.split() == [model["name"], f"{100 * model['test_accuracy']:.2f}%",
                            f"[{low:.2f},", f"{high:.2f}]", str(model["test_errors"]), "errors",
                            "of", "512"]
  choice = summary["selection"]
  chosen = choice["chosen"]
  assert lines[5].startswith(f"Chosen student: {chosen}" + (
      f", by the tie-break ({choice['tie_break']})" if choice["tie_break"] else
      ": the lowest validation cross-entropy")), lines[5]
  assert lines[6] == f"Report: {root}/results.md (and results.json)"
  assert lines[7] == (f"Exported models (export/ SavedModel, model.keras, litert/*.tflite) in "
                      f"{root}/<model>/ for teacher, distilled, labels_only, teacher_only; the "
                      f"chosen student's SavedModel: {root}/{chosen}/export")
  assert lines[8] == f"TensorBoard: tensorboard --logdir {root}/logs"
  assert len(lines) == 9
  for path in (f"{root}/results.md", f"{root}/{chosen}/export/saved_model.pb",
               *(f"{root}/{m}/litert/float32.tflite" for m in MODELS), f"{root}/logs/teacher"):
    assert os.path.exists(path), path


# TensorFlow's and Keras' own lines, kept out of the log unless --verbose_tf.
TF_NOISE = ("Sharding callback duration", "Writing fingerprint", "contains input name(s)",
            "oneDNN custom operations", "Could not find cuda drivers", "cpu_feature_guard",
            "absl::InitializeLog", "XNNPACK delegate", "fully_quantize")
LOG_LINE = re.compile(r"^[IWE]\d{4} [\d:.]+ +\d+ (\w+)\.py:\d+\] ")


def _retrain_distilled(smoke_run, folder, *extra):
  """The smoke run again with one student retrained (a checkpoint, a SavedModel, LiteRT), with
  TF_CPP_MIN_LOG_LEVEL unset as a user's shell has it."""
  shutil.copytree(smoke_run["model_dir"], folder)
  env = cli_env()
  del env["TF_CPP_MIN_LOG_LEVEL"]
  proc = subprocess.run([sys.executable, "-m", "trainer", f"--model_dir={folder}",
                         *smoke_run["args"], "--retrain=distilled", *extra], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr.splitlines()


def test_tensorflow_lines_are_quiet_by_default_and_one_flag_away(smoke_run, tmp_path):
  for lines in (smoke_run["stderr"].splitlines(),
                _retrain_distilled(smoke_run, tmp_path / "quiet")):
    assert not [line for line in lines if any(text in line for text in TF_NOISE)]
    # Nothing but the job's own lines, from its own modules.
    assert [line for line in lines if not LOG_LINE.match(line)] == []
    modules = {LOG_LINE.match(line).group(1) for line in lines}
    assert all(glob.glob(os.path.join(REPO, "trainer", "**", f"{m}.py"), recursive=True)
               for m in modules), modules
  assert sum(" distilled epoch " in line for line in lines) == 2
  loud = _retrain_distilled(smoke_run, tmp_path / "loud", "--verbose_tf")
  for text in ("Sharding callback duration", "Writing fingerprint", "oneDNN custom operations",
               "XNNPACK delegate"):
    assert [line for line in loud if text in line], text
  assert len(loud) > 2 * len(lines)


def test_tensorboard_scalars_per_epoch(smoke_run):
  root = smoke_run["model_dir"]
  teacher = _scalars(f"{root}/logs/teacher/train")
  assert {"loss", "accuracy", "learning_rate", "examples_per_second"} <= set(teacher)
  assert sorted(teacher["loss"]) == [1, 2]
  student = _scalars(f"{root}/logs/distilled/train")
  assert {"loss", "accuracy", "distillation_loss", "student_loss"} <= set(student)
  validation = _scalars(f"{root}/logs/distilled/validation")
  assert sorted(validation["accuracy"]) == [1, 2]
  assert all(0 <= v <= 1 for v in validation["accuracy"].values())


def test_exports_reproduce_reported_accuracy(smoke_run):
  root = smoke_run["model_dir"]
  images, labels = idx.load_split(MNIST_DIR, "test")
  images, labels = images[:512], labels[:512]
  for name in MODELS:
    with open(f"{root}/{name}/result.json") as f:
      result = json.load(f)
    served = tf.saved_model.load(f"{root}/{name}/export").signatures["serving_default"]
    out = served(images=tf.constant(images))
    accuracy = float(np.mean(out["classes"].numpy() == labels))
    assert accuracy == pytest.approx(result["test_accuracy"], abs=1e-9), name
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)


def test_rerun_reuses_finished_models(smoke_run, caplog):
  root = smoke_run["model_dir"]
  models_before = {name: tree_digest(f"{root}/{name}") for name in MODELS}
  caplog.set_level(logging.INFO)
  run_job([f"--model_dir={root}", *SMOKE_ARGS])
  assert "epoch 1/" not in caplog.text  # nothing retrained
  assert "teacher already finished" in caplog.text
  assert {name: tree_digest(f"{root}/{name}") for name in MODELS} == models_before


def test_teacher_then_indexed_students(smoke_run, tmp_path, monkeypatch):
  """The Kubernetes flow: students run one per pod, each by JOB_COMPLETION_INDEX."""
  model_dir = tmp_path / "run"
  teacher_dir = os.path.join(smoke_run["model_dir"], "teacher")
  args = [f"--model_dir={model_dir}", f"--teacher_dir={teacher_dir}", "--mode=students",
          *SMOKE_ARGS, "--student=a:alpha=0", "--student=b:alpha=0.5,temperature=2"]
  monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
  run_job(args)
  assert not (model_dir / "a").exists() and (model_dir / "b" / "result.json").exists()
  assert not (model_dir / "teacher").exists()  # the teacher was read, not retrained
  monkeypatch.delenv("JOB_COMPLETION_INDEX")
  run_job([*args, "--student_index=0"])
  with open(model_dir / "results.json") as f:
    names = [m["name"] for m in json.load(f)["models"]]
  assert names == ["a", "b"]
  with open(model_dir / "b" / "result.json") as f:
    assert json.load(f)["temperature"] == 2.0
