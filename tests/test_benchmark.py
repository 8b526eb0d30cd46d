"""The benchmark and its notebook baseline: it runs and reports every row (no timing asserted),
the baseline computes the project's loss, and the accuracy table aggregates over seeds."""

import json
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.data import idx
from trainer.data.pipeline import normalize_images
from trainer.modeling import losses, models
from trainer.modeling.distiller import Distiller

from helpers import MNIST_DIR, REPO, cli_env

sys.path[:0] = [REPO, f"{REPO}/scripts"]  # benchmarks/ and scripts/ run from the checkout
import accuracy_table  # noqa: E402

from benchmarks import notebook, report, throughput  # noqa: E402


def test_benchmark_smoke_prints_every_row(tmp_path):
  json_out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks", f"--idx_dir={MNIST_DIR}", "--examples=256",
       "--runs=1", "--warmup=1", "--batch_sizes=32,128", "--extra_modes=bf16",
       f"--workdir={tmp_path / 'work'}",
       f"--json_out={json_out}",
       "--subset_job_args=--max_train_examples=256 --validation_examples=64 "
       "--max_test_examples=64 --teacher_epochs=1 --student_epochs=1 --batch_size=64 "
       "--student=distilled:alpha=0.5", "--whole_process_runs=1",
       "--whole_process_subset=256,64", "--precision_rounds=1", "--precision_steps=2"],
      cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = proc.stdout
  assert ("| phase | batch | notebook, TF default threads (img/s) | notebook, in our process "
          "(img/s) | ours (img/s) | ours / faster notebook |") in out
  for phase in throughput.PHASES:
    for batch in (32, 128):
      row = re.search(rf"^\| {re.escape(phase)} \| {batch} \|(.*)\|$", out, re.M)
      assert row, (phase, batch)
      cells = [c.strip() for c in row.group(1).split("|")]
      assert len(cells) == 4 and all(re.fullmatch(r"[\d,]+", c) for c in cells[:3]), cells
      assert re.fullmatch(r"\d+\.\d\dx", cells[3]), cells
  for batch in (32, 128):  # each target against the baseline at the same batch size
    assert re.search(rf"^- distillation at batch {batch}: \d+\.\d\dx \(target >= 4x\): "
                     r"(met|MISSED)$", out, re.M)
    assert re.search(rf"^- teacher training at batch {batch}: \d+\.\d\dx \(target >= 1.5x\)",
                     out, re.M)
    assert re.search(rf"^- distillation at batch {batch} in mixed_bfloat16: \d+\.\d\dx "
                     r"\(target >= 4x\)", out, re.M)
  assert re.search(r"^- ours at batch 128 vs the notebook at batch 32: teacher training "
                   r"\d+\.\d\dx, distillation \d+\.\d\dx$", out, re.M), out
  for batch in (32, 128):
    assert re.search(rf"^- ours at batch {batch} in mixed_bfloat16: teacher training "
                     r"[\d,]+ img/s = \d+\.\d\dx float32, \d+\.\d\dx notebook; "
                     r"distillation", out, re.M), out
  rss = re.search(r"^- default job \(subset .*\): wall \d+ s, peak RSS (\d+) MiB$", out, re.M)
  assert rss and int(rss.group(1)) > 100, out  # a TensorFlow process: hundreds of MiB
  assert "EXTRAPOLATED" in out
  assert re.search(r"^- mixed_bfloat16 / float32 on this CPU \(.*; avx512_bf16 (yes|no), "
                   r"amx_bf16 (yes|no), amx_tile (yes|no)\): teacher step at batch 32 "
                   r"\d+\.\d\dx, teacher step at batch 128 \d+\.\d\dx, student step at batch 32 "
                   r"\d+\.\d\dx, student step at batch 128 \d+\.\d\dx: ", out, re.M), out
  for role in ("teacher", "student"):
    for batch in (32, 128):
      assert re.search(rf"^- {role} step at batch {batch}, 2 steps per call, median of 1 in "
                       r"turns: float32 [\d,]+ img/s, mixed_bfloat16 [\d,]+ img/s: \d+\.\d\dx; "
                       r"per CPU second [\d,]+ vs [\d,]+: \d+\.\d\dx$", out, re.M), out
  # The cluster rows need a cluster and an image (tests/cluster/test_cluster_3_smoke.py runs
  # them); without --cluster_image the report says why they are missing.
  assert re.search(r"^- cluster rows: not measured \((no local cluster is up|the cluster is up; "
                   r"pass --cluster_image)", out, re.M), out
  assert re.search(r"^- whole process, short run \(subset: 256 training, 64 test images\): "
                   r"`mnist-distill --mode=students --teacher_dir=TEACHER "
                   r"--student=s:alpha=0.5,temperature=4 --student_epochs=3 --batch_size=32 ", out,
                   re.M), out
  assert re.search(r"^  ours \d+\.\d s, the notebook's Distiller \d+\.\d s \(median of 1, in "
                   r"turns; load [\d.]+-[\d.]+\): \d+\.\d\dx \(target >= 4x\): (met|MISSED)$",
                   out, re.M), out
  assert re.search(r"^  CPU seconds \(user \+ system\): ours \d+\.\d, the notebook's \d+\.\d: "
                   r"\d+\.\d\dx$", out, re.M), out
  assert re.search(r"^  ours, median seconds: start-up \d+\.\d, teacher logits \d+\.\d, "
                   r"training \d+\.\d, report and exit \d+\.\d, the rest \d+\.\d; "
                   r"`python -c 'import tensorflow, keras'` alone \d+\.\d$", out, re.M), out
  assert re.search(r"^  floor: import \+ teacher logits \+ training = \d+\.\d s, so at most "
                   r"\d+\.\d\dx with everything else free$", out, re.M), out
  assert re.search(r"^  test accuracy: ours \d\.\d{4}, the notebook's \d\.\d{4}$", out, re.M), out
  assert "FAILED" not in out
  saved = json.loads(json_out.read_text())
  assert set(saved["median"]) == set(throughput.PHASES)
  baselines = {"baseline@32", "baseline@128"}
  assert set(saved["median"]["distillation"]) == {
      *baselines, *(f"{b} tf-default-threads" for b in baselines),
      "ours@32", "ours@128", "ours@32 bf16", "ours@128 bf16"}
  assert all(len(v) == 2 for v in saved["throughput"]["distillation"].values())  # warm-up + 1
  assert saved["default_job"]["returncode"] == 0
  assert set(saved["precision_steps"]["32"]) == {
      "teacher float32", "teacher mixed_bfloat16", "student float32", "student mixed_bfloat16"}
  whole = saved["whole_process"]
  assert len(whole["ours"]) == len(whole["notebook"]) == len(whole["floor"]) == 1
  assert not whole["failed"] and saved["cpu_flags"]["avx512_bf16"] in (True, False)


def test_baseline_distiller_computes_the_project_loss():
  """Same teacher, student and batch: the notebook-style loss (teacher run inside the step)
  equals our Distiller's loss on cached logits, for several alpha and T."""
  images, labels = idx.load_split(MNIST_DIR, "test")
  x, y = normalize_images(images[:32]), tf.constant(labels[:32].astype(np.int64))
  keras.utils.set_random_seed(0)
  teacher = models.build_teacher()
  logits = teacher(x, training=False)
  for alpha, temperature in ((0.0, 4.0), (0.5, 2.0), (0.9, 8.0), (1.0, 4.0)):
    baseline = notebook.make_distiller(teacher, alpha, temperature)
    ours = Distiller(baseline.student)
    ours.compile(optimizer="adam", alpha=alpha, temperature=temperature)
    student_logits = baseline.student(x, training=True)
    expected = tf.nn.compute_average_loss(
        losses.distillation_objective(y, student_logits, logits, ours.distillation_weight,
                                      ours.temperature).total)
    got = baseline.compute_distillation_loss(x, y, student_logits)
    # rel 1e-3: Keras' KLDivergence clips probabilities at 1e-7, ours uses exact log-softmaxes
    # (0.03% apart at alpha=1 here); a missing T^2 or a per-replica mean would be 16x or 2x off.
    assert float(got) == pytest.approx(float(expected), rel=1e-3), (alpha, temperature)


def _timings(rate):
  return throughput.Timings(values=[1.0, rate, rate], warmup=1)


def test_notebook_extrapolation_adds_up_its_schedule():
  # Only the notebook's batch 32 counts, and of its two measurements (this process, default
  # threads) the faster: a faster baseline at another batch size must not.
  phases = {"teacher training": {"baseline@32": _timings(2000.0),
                                 "baseline@32 tf-default-threads": _timings(1500.0),
                                 "baseline@256": _timings(9000.0)},
            "distillation": {"baseline@32": _timings(800.0),
                             "baseline@32 tf-default-threads": _timings(1000.0)},
            "evaluation (teacher)": {"baseline@32": _timings(10_000.0)},
            "evaluation (student)": {"baseline@32": _timings(20_000.0)}}
  parts = report.extrapolate_notebook(phases)
  assert parts["teacher"] == pytest.approx(20 * 60_000 / 2000)
  assert parts["students"] == pytest.approx(3 * 5 * 60_000 / 1000)
  assert parts["evaluation"] == pytest.approx(1.0 + 3 * 0.5)
  assert parts["total"] == pytest.approx(600 + 900 + 2.5)


def test_targets_are_taken_against_the_faster_baseline():
  """The baseline in our process runs with our threads; with TensorFlow's default threads
  it may be faster, and then that is what ours must beat."""
  phases = {"teacher training": {"baseline@32": _timings(3000.0),
                                 "baseline@32 tf-default-threads": _timings(2000.0),
                                 "ours@32": _timings(4200.0)},
            "distillation": {"baseline@32": _timings(4000.0),
                             "baseline@32 tf-default-threads": _timings(5000.0),
                             "ours@32": _timings(19_000.0)}}
  assert report.target_lines(phases, (32,)) == [
      "- teacher training at batch 32: 1.40x (target >= 1.5x): MISSED",
      "- distillation at batch 32: 3.80x (target >= 4x): MISSED"]


def _summary(seed, accuracies, batch_size=256):
  models_ = [{"name": "teacher", "role": "teacher", "alpha": None, "temperature": None,
              "test_accuracy": accuracies[0], "test_errors": round((1 - accuracies[0]) * 1e4)}]
  for (name, alpha, temperature), accuracy in zip(
      (("labels_only", 0.0, 4.0), ("a05_t4", 0.5, 4.0)), accuracies[1:]):
    models_.append({"name": name, "role": "student", "alpha": alpha,
                    "temperature": temperature, "test_accuracy": accuracy,
                    "test_errors": round((1 - accuracy) * 1e4)})
  return {"dataset": "idx:mnist", "precision": "float32", "tensorflow": "2", "keras": "3",
          "flags": {"seed": seed, "model_dir": f"/tmp/s{seed}", "batch_size": batch_size},
          "models": models_}


def test_accuracy_table_mean_and_sd_over_seeds(tmp_path, capsys):
  runs = []
  for seed, accuracies in ((1, (0.99, 0.98, 0.985)), (2, (0.992, 0.982, 0.987)),
                           (3, (0.994, 0.984, 0.989))):
    folder = tmp_path / f"s{seed}"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(_summary(seed, accuracies)))
    runs.append(str(folder))
  assert accuracy_table.main([*runs, "--command", "mnist-distill --seed=S"]) == 0
  out = capsys.readouterr().out
  lines = out.splitlines()
  assert lines[2] == "| teacher | teacher |  |  | 99.20 ± 0.20 | 80.0 | 3 |"
  assert lines[3] == "| labels_only | student | 0 |  | 98.20 ± 0.20 | 180.0 | 3 |"
  assert lines[4] == "| a05_t4 | student | 0.5 | 4 | 98.70 ± 0.20 | 130.0 | 3 |"
  assert "seeds 1, 2, 3" in out and "Command: `mnist-distill --seed=S`" in out

  other = tmp_path / "other"
  other.mkdir()
  (other / "results.json").write_text(json.dumps(_summary(4, (0.99, 0.98, 0.98), 128)))
  assert accuracy_table.main([runs[0], str(other)]) == 1  # not replicas of one experiment
  assert "batch_size" in capsys.readouterr().err
