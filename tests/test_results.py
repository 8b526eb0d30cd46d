"""The merged report: selection, intervals and deployment table, from per-model files only."""

import copy
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from trainer.data import data
from trainer.evaluation import comparison, hparams_logging, results, selection
from trainer.modeling import models
from trainer.rundir import layout
from trainer.serving import export, litert_export

from helpers import MNIST_DIR
from tb_events import events

N_VALIDATION, N_TEST = 300, 400
RUN_INFO = {"dataset": "idx:made-up", "strategy": "default", "replicas": 1, "tensorflow": "x"}
EXPORTS = {
    "litert_float32": {"path": "litert/float32.tflite", "bytes": 118_424, "test_accuracy": 0.99,
                       "test_errors": 4, "test_examples": N_TEST,
                       "latency": {"median_ms": 0.03, "p99_ms": 0.05, "runs": 1000,
                                   "warmup_runs": 50, "threads": 1}},
    "litert_int8": {"path": "litert/int8.tflite", "bytes": 37_552, "test_accuracy": 0.9875,
                    "test_errors": 5, "test_examples": N_TEST,
                    "latency": {"median_ms": 0.08, "p99_ms": 0.5, "runs": 1000,
                                "warmup_runs": 50, "threads": 1},
                    "representative_examples": 500, "representative_split": "train"},
    "saved_model": {"path": "export", "bytes": 297_262,
                    "latency": {"intra_op_threads": 0,
                                "batch_1": {"median_ms": 1.04, "p99_ms": 2.07, "runs": 1000,
                                            "per_image_median_ms": 1.04},
                                "batch_256": {"median_ms": 40.3, "p99_ms": 48.2, "runs": 20,
                                              "per_image_median_ms": 40.3 / 256}}},
    "measure": {"batch_size": 256},
}


def _logits(labels, wrong, margin):
  """Logits that favour the label by `margin`, or the next class on the `wrong` examples."""
  logits = np.zeros((len(labels), 10), np.float32)
  target = np.array(labels)
  target[list(wrong)] = (target[list(wrong)] + 1) % 10
  logits[np.arange(len(labels)), target] = margin
  return logits


def _write_model(model_dir, name, role, validation_wrong, test_wrong, margin=6.0, alpha=None,
                 exports=EXPORTS, rng_seed=0):
  rng = np.random.default_rng(rng_seed)  # the same images and labels for every model
  val_images = rng.integers(0, 256, (N_VALIDATION, 28, 28), dtype=np.uint8)
  val_labels = rng.integers(0, 10, N_VALIDATION)
  test_images = rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8)
  test_labels = rng.integers(0, 10, N_TEST)
  folder = os.path.join(model_dir, name)
  test_predictions = _logits(test_labels, test_wrong, margin).argmax(-1)
  comparison.save_predictions(folder, test_images, test_labels, test_predictions)
  comparison.save_validation_predictions(folder, val_images, val_labels,
                                         _logits(val_labels, validation_wrong, margin))
  if exports is not None:
    layout.write_json(os.path.join(folder, "exports.json"), exports)
  errors = len(set(test_wrong))
  layout.write_json(os.path.join(folder, "result.json"), {
      "name": name, "role": role, "params": 1_144_074 if role == "teacher" else 28_226,
      "test_accuracy": 1 - errors / N_TEST, "test_errors": errors, "test_loss": 0.1,
      "test_examples": N_TEST, "validation_accuracy": 1 - len(validation_wrong) / N_VALIDATION,
      "train_seconds": 1.0, "train_examples_per_second": 100.0, "alpha": alpha,
      "temperature": None if alpha is None else 4.0})


@pytest.fixture
def run_dir(tmp_path):
  root = str(tmp_path / "run")
  _write_model(root, "teacher", "teacher", range(2), range(3))
  _write_model(root, "labels_only", "student", range(6), range(9), margin=3.0, alpha=0.0)
  _write_model(root, "distilled", "student", range(4), range(5), margin=4.0, alpha=0.5)
  _write_model(root, "teacher_only", "student", range(5), range(4), margin=7.0, alpha=1.0)
  return root


def _read(root, name):
  with open(os.path.join(root, name)) as f:
    return json.load(f) if name.endswith(".json") else f.read()


def test_merge_reports_a_choice_it_cannot_make_with_confidence(run_dir):
  summary = results.merge(run_dir, RUN_INFO)
  assert _read(run_dir, "results.json") == json.loads(json.dumps(summary))
  choice = summary["selection"]
  # teacher_only has the widest margins, hence the lowest validation cross-entropy ...
  assert choice["leader"] == "teacher_only" and choice["criterion"] == "validation_cross_entropy"
  # ... but 4-6 validation errors in 300 are indistinguishable: not a win, and with equal
  # parameters and latencies the tie-break falls back to that lowest cross-entropy
  assert choice["significant"] is False
  assert choice["tie_break"] == "lowest validation cross-entropy"
  assert choice["chosen"] == "teacher_only" and choice["labels_only"] == "labels_only"
  assert choice["p_value_vs_labels_only"] == 1.0  # 1 disagreement
  assert choice["p_values"] == {"distilled": 1.0, "labels_only": 1.0}
  assert choice["test_split"]["used_for_choice"] is False
  assert choice["test_split"]["p_values"]["labels_only"] == 2 / 32  # 5 vs 0
  for model in summary["models"]:
    interval = model["test_accuracy_interval"]
    assert interval["lower"] < model["test_accuracy"] < interval["upper"] <= 1
    assert interval == selection.accuracy_interval(model["test_errors"], N_TEST)
    assert model["exports"]["litert_int8"]["bytes"] == 37_552
  markdown = _read(run_dir, "results.md")
  assert "Best student by validation accuracy" not in markdown
  assert ("Chosen student: **teacher_only**, by the tie-break (lowest validation "
          "cross-entropy): no difference between the students is significant on validation"
          ) in markdown
  assert "never used for the choice" in markdown
  assert "| **teacher_only** (chosen) | 28,226 |" in markdown  # the deployment table
  assert "| 118.4 kB | 37.6 kB | 98.75% (5) | 0.030 / 0.050 | 0.080 / 0.500 |" in markdown
  assert "| 297.3 kB | 118.4 kB |" in markdown


def test_perturbing_test_labels_does_not_move_the_choice(run_dir):
  before = results.merge(run_dir, RUN_INFO)["selection"]
  rng = np.random.default_rng(1)
  for path in glob.glob(os.path.join(run_dir, "*", "test_predictions.npz")):
    with np.load(path) as data:
      saved = {key: data[key] for key in data.files}
    labels = rng.integers(0, 10, N_TEST).astype(np.uint8)  # the test split says otherwise now
    with open(path, "wb") as f:
      np.savez_compressed(f, **dict(saved, labels=labels))
  for name in ("labels_only", "distilled", "teacher_only"):  # and so do the markers
    result = _read(run_dir, f"{name}/result.json")
    result.update(test_accuracy=0.5 if name != "labels_only" else 1.0, test_errors=200)
    layout.write_json(os.path.join(run_dir, name, "result.json"), result)
  after = results.merge(run_dir, RUN_INFO)["selection"]
  assert after["test_split"] != before["test_split"]  # the test split was read, for the report
  for key in ("chosen", "leader", "ranking", "p_values", "pairs", "why", "tie_break"):
    assert after[key] == before[key], key


def test_a_significant_validation_difference_chooses_the_leader(tmp_path):
  root = str(tmp_path / "run")
  _write_model(root, "b_better", "student", [], range(3), margin=8.0, alpha=0.5)
  _write_model(root, "a_worse", "student", range(30), range(9), margin=3.0, alpha=0.0)
  summary = results.merge(root, RUN_INFO)
  choice = summary["selection"]
  assert choice["chosen"] == "b_better" and choice["tie_break"] is None
  assert choice["significant"] and choice["p_value_vs_labels_only"] == 2 / 2**30
  assert "significantly more accurate on validation than every other student" in _read(
      root, "results.md")


def test_failed_and_missing_exports_are_reported(run_dir):
  broken = copy.deepcopy(EXPORTS)
  broken["litert_int8"] = {"error": "RuntimeError: quantizer said no"}
  layout.write_json(os.path.join(run_dir, "labels_only", "exports.json"), broken)
  os.remove(os.path.join(run_dir, "teacher_only", "exports.json"))
  os.remove(os.path.join(run_dir, "distilled", "validation_predictions.npz"))
  models = results.finished_models(run_dir)
  assert results.missing_files(run_dir, models) == {
      "distilled": ["validation_predictions.npz"], "teacher_only": ["exports.json"]}
  summary = results.merge(run_dir, RUN_INFO)
  assert summary["selection"]["missing"] == ["distilled"]  # not chosen without its outputs
  # teacher_only leads but does not beat labels_only (p = 1); latency unknown for labels_only
  assert summary["selection"]["chosen"] == "teacher_only"
  assert summary["selection"]["tie_break"] == "lowest validation cross-entropy"
  assert "latency not known for all of them" in summary["selection"]["why"]
  markdown = _read(run_dir, "results.md")
  assert "Left out (no validation outputs): distilled." in markdown
  assert "labels_only litert_int8: RuntimeError: quantizer said no" in markdown
  row = next(line for line in markdown.splitlines()
             if line.startswith("| labels_only | 28,226"))
  assert "| failed |" in row


def test_figures_are_drawn_for_the_chosen_student(run_dir):
  summary = results.merge(run_dir, RUN_INFO, figures=comparison.write_report)
  titles = [f["title"] for f in summary["figures"]]
  # teacher_only's 4 test errors, of which the teacher (wrong on 0-2) gets 1 right
  assert "teacher_only (the chosen student) wrong, teacher right: 1 test digit" in titles
  assert os.path.isfile(os.path.join(run_dir, "figures", "best_student_errors.png"))


def _scalars(run_dir):
  found = {}
  for event in events(run_dir):
    for value in event.summary.value:
      found[value.tag] = (event.step, float(tf.make_ndarray(value.tensor)))
  return found


def test_hparams_deployment_run(tmp_path):
  logs = str(tmp_path / "logs")
  interval = selection.accuracy_interval(5, N_TEST)
  written = hparams_logging.write_deployment(logs, "distilled", 15, interval, EXPORTS)
  run = os.path.join(logs, "distilled", "deployment")
  scalars = _scalars(run)
  assert set(scalars) == {tag for tag, _ in hparams_logging.DEPLOYMENT_METRICS} == set(written)
  assert scalars["test_accuracy_lower"] == (15, pytest.approx(interval["lower"]))
  assert scalars["litert_int8_bytes"] == (15, 37_552.0)
  assert scalars["saved_model_batch_256_ms_per_image"][1] == pytest.approx(40.3 / 256)
  # a report run replaces the numbers rather than adding a second set
  broken = dict(EXPORTS, litert_int8={"error": "no"})
  hparams_logging.write_deployment(logs, "distilled", 15, interval, broken)
  assert len(glob.glob(os.path.join(run, "events.out.tfevents.*"))) == 1
  assert "litert_int8_bytes" not in _scalars(run) and "litert_float32_bytes" in _scalars(run)
  metrics = {(m.name.group, m.name.tag) for m in _experiment().metric_infos}
  assert ("deployment", "test_accuracy_upper") in metrics
  assert ("deployment", "litert_int8_accuracy") in metrics


def _experiment():
  from tensorboard.plugins.hparams import metadata
  content = hparams_logging.experiment_config_pb().value[0].metadata.plugin_data.content
  return metadata.parse_experiment_plugin_data(content)


def test_smoke_run_has_selection_and_exports(smoke_run):
  """The default job on a real-MNIST subset: every new field of results.json, with sane values."""
  root = smoke_run["model_dir"]
  summary = _read(root, "results.json")
  choice = summary["selection"]
  students = [m["name"] for m in summary["models"] if m["role"] == "student"]
  assert choice["chosen"] in students and choice["criterion"] == "validation_cross_entropy"
  assert choice["validation_examples"] == 256 and choice["labels_only"] == "labels_only"
  assert set(choice["p_values"]) == set(students) - {choice["chosen"]}
  assert all(0 < p <= 1 for p in choice["p_values"].values())
  assert choice["test_split"]["examples"] == 512 and not choice["test_split"]["used_for_choice"]
  assert choice["why"] and choice["tie_break"] in (None, *selection.TIE_BREAKS)
  for model in summary["models"]:
    name = model["name"]
    interval = model["test_accuracy_interval"]
    assert interval["lower"] <= model["test_accuracy"] <= interval["upper"]
    for file in results.MODEL_FILES:
      assert os.path.isfile(os.path.join(root, name, file)), (name, file)
    exports = model["exports"]
    for kind in ("litert_float32", "litert_int8"):
      entry = exports[kind]
      assert os.path.getsize(os.path.join(root, name, entry["path"])) == entry["bytes"]
      assert entry["test_examples"] == 512 and 0 <= entry["test_accuracy"] <= 1
      assert 0 < entry["latency"]["median_ms"] <= entry["latency"]["p99_ms"]
    assert exports["litert_int8"]["bytes"] < exports["litert_float32"]["bytes"]
    assert exports["saved_model"]["latency"]["batch_1"]["median_ms"] > 0
    assert _scalars(os.path.join(root, "logs", name, "deployment"))["litert_int8_accuracy"][1] \
        == pytest.approx(exports["litert_int8"]["test_accuracy"])
  markdown = _read(root, "results.md")
  assert "## Which student to ship" in markdown and "## Deployment" in markdown
  assert f"**{choice['chosen']}** (chosen)" in markdown


def test_finish_outputs_writes_what_the_merge_reads(tmp_path):
  """What a finishing model (or --mode=report on an older run) writes from the network alone."""
  splits = data.load_splits("mnist", idx_dir=MNIST_DIR, validation_examples=200,
                            max_train_examples=300, max_test_examples=100)
  root = str(tmp_path / "run")
  net = models.build_student()  # untrained: the files, not the accuracy, are under test
  folder = os.path.join(root, "solo")
  export.export_saved_model(net, os.path.join(folder, "export"))
  measure = litert_export.MeasureConfig(latency_runs=10, warmup_runs=2, serving_runs=5,
                                        batch_runs=2, representative_examples=20)
  exports = results.finish_outputs(folder, net, splits, 90, os.path.join(root, "logs"), 3,
                                   measure)
  assert "error" not in exports["litert_int8"] and exports["litert_int8"]["test_examples"] == 100
  with np.load(os.path.join(folder, "validation_predictions.npz")) as saved:
    assert saved["correct"].shape == saved["cross_entropy"].shape == (200,)
    assert np.all(saved["cross_entropy"] > 0)
  assert _scalars(os.path.join(root, "logs", "solo", "deployment"))["test_accuracy_upper"][0] == 3
  comparison.save_predictions(folder, splits.test_images, splits.test_labels,
                              np.zeros(100, np.int64))
  layout.write_json(os.path.join(folder, "result.json"), {
      "name": "solo", "role": "student", "params": net.count_params(), "test_accuracy": 0.1,
      "test_errors": 90, "test_loss": 2.3, "test_examples": 100, "train_seconds": 1.0,
      "train_examples_per_second": 1.0, "alpha": 0.0})
  assert results.missing_files(root, results.finished_models(root)) == {}
  summary = results.merge(root, RUN_INFO)
  assert summary["selection"]["chosen"] == "solo"
  assert summary["models"][0]["exports"] == exports
