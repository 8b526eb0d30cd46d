"""TensorBoard: the event files read back, then a real `tensorboard` server in headless Chromium.

Over the finished smoke run (tests/conftest.py): HParams sessions and metrics, per-epoch scalars
side by side, confusion matrices and comparison images, model graphs, the PNGs that results.md
links; a small teacher run for --profile_steps. The browser test serves the smoke run's logs on
127.0.0.1, checks TensorBoard's data API and the rendered HParams, Time Series and Images pages,
and keeps screenshots in test-artifacts/ (look at them). It needs Debian's chromium
(scripts/install_system_deps.sh): without it that test skips, except under CI=true.
"""

import glob
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.plugins.hparams import metadata as hparams_metadata

from trainer.evaluation.hparams_logging import DEPLOYMENT_METRICS

from headless_chromium import Chromium, find_chromium
from helpers import MNIST_DIR, REPO, run_cli
from tb_events import events as _events
from tb_events import session_hparams

EPOCHS = 2  # SMOKE_ARGS: --teacher_epochs=2 --student_epochs=2
ARTIFACTS = os.path.join(REPO, "test-artifacts")
EXPERIMENT_TAG = hparams_metadata.EXPERIMENT_TAG
SESSION_TAG = hparams_metadata.SESSION_START_INFO_TAG


# ---- reading event files ----
def _values(run_dir):
  """{tag: [(step, value proto, metadata proto of the tag's first value)]} of one run."""
  found, first_metadata = {}, {}
  for event in _events(run_dir):
    for value in event.summary.value:
      if value.HasField("metadata"):
        first_metadata.setdefault(value.tag, value.metadata)
      found.setdefault(value.tag, []).append((event.step, value, first_metadata.get(value.tag)))
  return found


def _scalars(run_dir):
  """{tag: {step: float}} of one run."""
  return {tag: {step: float(tf.make_ndarray(v.tensor)) for step, v, _ in entries}
          for tag, entries in _values(run_dir).items()
          if all(v.tensor.dtype != tf.string.as_datatype_enum for _, v, _ in entries)}


def _images(run_dir):
  """{tag: [(step, decoded uint8 array, width, height)]}: image summaries of one run."""
  found = {}
  for tag, entries in _values(run_dir).items():
    for step, value, meta in entries:
      if meta is not None and meta.plugin_data.plugin_name == "images":
        parts = tf.make_ndarray(value.tensor)  # [width, height, png...]
        image = tf.io.decode_png(parts[2]).numpy()
        found.setdefault(tag, []).append((step, image, int(parts[0]), int(parts[1])))
  return found


def _summary(model_dir):
  with open(os.path.join(model_dir, "results.json")) as f:
    return json.load(f)


def _models(model_dir):
  return {m["name"]: m for m in _summary(model_dir)["models"]}


# ---- HParams ----
def test_every_model_is_an_hparams_session(smoke_run):
  root = smoke_run["model_dir"]
  models = _models(root)
  assert set(models) == {"teacher", "labels_only", "teacher_only", "distilled"}
  configs = set()
  for name, result in models.items():
    values = _values(f"{root}/logs/{name}")
    assert set(values) == {EXPERIMENT_TAG, SESSION_TAG}, name
    (_, _, experiment_meta), = values[EXPERIMENT_TAG]
    configs.add(experiment_meta.plugin_data.content)
    (step, _, session_meta), = values[SESSION_TAG]
    assert step == 0
    start = hparams_metadata.parse_session_start_info_plugin_data(
        session_meta.plugin_data.content)
    assert start.group_name == name
    hparams = session_hparams(f"{root}/logs/{name}")
    expected = {"role": result["role"], "params": result["params"], "batch_size": 64, "seed": 42}
    if result["role"] == "student":
      expected.update(alpha=result["alpha"], temperature=result["temperature"],
                      mixup=result["mixup"])
    assert hparams == expected, name
  # One config, byte for byte, in every session: pods writing other students cannot clobber it.
  assert len(configs) == 1
  experiment = hparams_metadata.parse_experiment_plugin_data(configs.pop())
  assert [h.name for h in experiment.hparam_infos] == ["role", "alpha", "temperature", "params",
                                                      "batch_size", "seed", "mixup"]
  assert {h.name for h in experiment.hparam_infos if h.differs} == {"role", "alpha",
                                                                    "temperature", "params"}
  metrics = {m.display_name: (m.name.group, m.name.tag) for m in experiment.metric_infos}
  assert metrics == {"test_accuracy": ("test", "accuracy"), "test_errors": ("test", "errors"),
                     "validation_accuracy": ("validation", "accuracy"),
                     "train_seconds": ("train", "train_seconds"),
                     **{tag: ("deployment", tag) for tag, _ in DEPLOYMENT_METRICS}}


def test_hparams_metrics_equal_the_results(smoke_run):
  """Each metric is the last scalar of its tag in <session>/<group>: the numbers of result.json."""
  root = smoke_run["model_dir"]
  for name, result in _models(root).items():
    test = _scalars(f"{root}/logs/{name}/test")
    assert test["accuracy"] == {EPOCHS: pytest.approx(result["test_accuracy"], abs=1e-7)}
    assert test["errors"] == {EPOCHS: result["test_errors"]}
    assert test["cross_entropy"] == {EPOCHS: pytest.approx(result["test_loss"], rel=1e-6)}
    validation = _scalars(f"{root}/logs/{name}/validation")["accuracy"]
    assert validation[max(validation)] == pytest.approx(result["validation_accuracy"], abs=1e-7)
    seconds = _scalars(f"{root}/logs/{name}/train")["train_seconds"]
    assert sorted(seconds) == [1, EPOCHS] and seconds[1] < seconds[EPOCHS]
    assert seconds[EPOCHS] == pytest.approx(result["train_seconds"], rel=1e-6)


# ---- scalars ----
def test_teacher_and_students_share_scalar_tags(smoke_run):
  """Same tag in the same run kind for every model: one chart holds the teacher and students."""
  root = smoke_run["model_dir"]
  common = {"train": {"loss", "accuracy", "cross_entropy", "learning_rate",
                      "examples_per_second", "train_seconds"},
            "validation": {"loss", "accuracy", "cross_entropy"},
            "test": {"accuracy", "errors", "cross_entropy"}}
  for name, result in _models(root).items():
    for run, tags in common.items():
      scalars = _scalars(f"{root}/logs/{name}/{run}")
      assert tags <= set(scalars), (name, run)
      steps = {EPOCHS} if run == "test" else set(range(1, EPOCHS + 1))
      assert all(set(scalars[t]) == steps for t in tags), (name, run)
    train = _scalars(f"{root}/logs/{name}/train")
    distillation = {"distillation_loss", "student_loss"}
    assert (distillation <= set(train)) == (result["role"] == "student"), name
    # cross_entropy: the labels' cross-entropy for everyone (a student's loss adds distillation)
    for run in ("train", "validation"):
      scalars = _scalars(f"{root}/logs/{name}/{run}")
      same = scalars["student_loss" if result["role"] == "student" else "loss"]
      assert scalars["cross_entropy"] == pytest.approx(same, rel=1e-6), (name, run)
    learning_rate = train["learning_rate"]
    assert learning_rate[2] < learning_rate[1]  # cosine decay


# ---- images and figures ----
def test_confusion_matrix_per_model(smoke_run):
  root = smoke_run["model_dir"]
  for name, result in _models(root).items():
    images = _images(f"{root}/logs/{name}/test")
    assert set(images) == {"confusion_matrix"}
    (step, image, width, height), = images["confusion_matrix"]
    assert step == EPOCHS and image.dtype == np.uint8
    assert image.shape[:2] == (height, width) and image.shape[2] in (3, 4)
    assert width >= 300 and height >= 300 and image.std() > 10  # a picture, not a blank
    with np.load(f"{root}/{name}/test_predictions.npz") as saved:
      errors = saved["error_indices"]
      assert len(saved["labels"]) == 512 and len(errors) == result["test_errors"]
      assert np.all(saved["predictions"][errors] != saved["labels"][errors])
      assert saved["error_images"].shape == (len(errors), 28, 28)
    with open(f"{root}/figures/confusion_{name}.png", "rb") as f:
      assert tf.io.decode_png(f.read()).shape == image.shape


def test_comparison_images_and_figures(smoke_run):
  root = smoke_run["model_dir"]
  summary = _summary(root)
  best = next(m for m in summary["models"] if m["name"] == summary["selection"]["chosen"])
  with np.load(f"{root}/{best['name']}/test_predictions.npz") as s, \
      np.load(f"{root}/teacher/test_predictions.npz") as t:
    wrong = s["error_indices"]
    expected = int(np.sum(t["predictions"][wrong] == t["labels"][wrong]))
  images = _images(f"{root}/logs/_comparison")
  assert set(images) == {"best_student_errors", "accuracy_vs_temperature", "accuracy_vs_params"}
  for tag, entries in images.items():
    (step, image, width, height), = entries  # a newer merge replaces the run, never adds to it
    assert step == 0 and image.shape[:2] == (height, width) and width >= 400, tag
  titles = [f["title"] for f in summary["figures"]]
  assert (f"{best['name']} (the chosen student) wrong, teacher right: "
          f"{expected} test digit{'' if expected == 1 else 's'}") in titles
  with open(f"{root}/results.md") as f:
    markdown = f.read()
  assert f"Chosen student: **{best['name']}**" in markdown
  linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
  assert linked == [f["path"] for f in summary["figures"]]
  assert sorted(linked) == sorted(
      os.path.relpath(p, root) for p in glob.glob(f"{root}/figures/*"))  # no stale pictures
  assert len(linked) == 3 + len(summary["models"])
  for path in linked:
    with open(os.path.join(root, path), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", path


# ---- graphs and the profiler ----
def test_model_graph_per_model(smoke_run):
  root = smoke_run["model_dir"]
  for name, result in _models(root).items():
    graphs = [e.graph_def for e in _events(f"{root}/logs/{name}/train") if e.graph_def]
    assert len(graphs) == 1, name
    graph = tf.compat.v1.GraphDef.FromString(graphs[0])
    ops = [node.op for node in graph.node]
    convolutions = 3 if result["role"] == "teacher" else 2
    assert ops.count("Conv2D") == convolutions and ops.count("MatMul") == 3, name
    assert not glob.glob(f"{root}/logs/{name}/train/plugins/profile")  # not asked for


def test_profile_steps_write_a_trace(tmp_path):
  model_dir = tmp_path / "run"
  proc = run_cli([f"--model_dir={model_dir}", f"--idx_dir={MNIST_DIR}", "--mode=teacher",
                  "--max_train_examples=704", "--validation_examples=64",
                  "--max_test_examples=64", "--teacher_epochs=1", "--batch_size=64",
                  "--profile_steps=3,6", "--nolitert"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Profiling steps 3-6 into" in proc.stderr
  traces = glob.glob(f"{model_dir}/logs/teacher/train/plugins/profile/*/*.xplane.pb")
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000


# ---- a real TensorBoard in a real browser ----
def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(url, body=None):
  data = None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=30) as response:
    return json.loads(response.read())


class _Server:
  """A command serving TensorBoard on `port`, in its own process group (stopped as a whole)."""

  def __init__(self, cmd, port, log_path, env=None):
    self.url, self.log_path = f"http://127.0.0.1:{port}", log_path
    self._log = open(log_path, "wb")
    self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, env=env)

  def wait_for_runs(self, wanted, timeout=120):
    deadline, runs = time.monotonic() + timeout, []
    while time.monotonic() < deadline and self.proc.poll() is None:
      try:
        runs = _get(f"{self.url}/data/runs")
      except OSError:
        runs = []
      if set(wanted) <= set(runs):
        return runs
      time.sleep(0.5)
    with open(self.log_path, errors="replace") as f:
      raise AssertionError(f"runs {sorted(wanted)} not served (got {runs}); log:\n"
                           f"{f.read()[-3000:]}")

  def stop(self):
    try:
      os.killpg(self.proc.pid, 15)  # the group this test started, nothing else
      self.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      os.killpg(self.proc.pid, 9)
      self.proc.wait()
    except ProcessLookupError:
      pass
    self._log.close()


def _tensorboard_cmd(logdir, port):
  return [os.path.join(os.path.dirname(sys.executable), "tensorboard"), f"--logdir={logdir}",
          "--host=127.0.0.1", f"--port={port}", "--reload_interval=2"]


@pytest.fixture(scope="module")
def tensorboard_server(smoke_run, tmp_path_factory):
  """`tensorboard --logdir <smoke run>/logs` on a free 127.0.0.1 port; yields its base URL."""
  port = _free_port()
  server = _Server(_tensorboard_cmd(f"{smoke_run['model_dir']}/logs", port), port,
                   tmp_path_factory.mktemp("tensorboard") / "tensorboard.log")
  try:
    server.wait_for_runs(["_comparison", "distilled/test"])
    yield server.url
  finally:
    server.stop()


def test_tensorboard_serves_the_run(smoke_run, tensorboard_server):
  url, models = tensorboard_server, _models(smoke_run["model_dir"])
  runs = set(_get(f"{url}/data/runs"))
  for name in models:
    assert {name, f"{name}/train", f"{name}/validation", f"{name}/test"} <= runs
  experiment = _get(f"{url}/data/plugin/hparams/experiment", {"experimentName": ""})
  assert {h["name"] for h in experiment["hparamInfos"]} == {
      "role", "alpha", "temperature", "params", "batch_size", "seed", "mixup"}
  assert {m["displayName"] for m in experiment["metricInfos"]} == {
      "test_accuracy", "test_errors", "validation_accuracy", "train_seconds",
      *(tag for tag, _ in DEPLOYMENT_METRICS)}
  groups = _get(f"{url}/data/plugin/hparams/session_groups", {
      "experimentName": "", "startIndex": 0, "sliceSize": 100,
      "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                          "STATUS_RUNNING"],
      "colParams": [{"metric": {"group": "test", "tag": "accuracy"}, "order": "ORDER_DESC"}]})
  by_name = {g["name"]: g for g in groups["sessionGroups"]}
  assert set(by_name) == set(models)
  ranked = [g["name"] for g in groups["sessionGroups"]]
  assert ranked == sorted(models, key=lambda n: -models[n]["test_accuracy"])  # sorted by metric
  for name, group in by_name.items():
    values = {(v["name"]["group"], v["name"]["tag"]): v["value"] for v in group["metricValues"]}
    assert values[("test", "accuracy")] == pytest.approx(models[name]["test_accuracy"], abs=1e-6)
    assert values[("test", "errors")] == models[name]["test_errors"]
    assert group["hparams"]["role"] == models[name]["role"]
  images = _get(f"{url}/data/plugin/images/tags")
  for name in models:
    assert "confusion_matrix" in images[f"{name}/test"]
  assert "best_student_errors" in images["_comparison"]
  graphs = _get(f"{url}/data/plugin/graphs/info")
  for name in models:
    assert graphs[f"{name}/train"]["run_graph"], name


def _browser_or_skip():
  binary = find_chromium()
  if binary is None:
    reason = "chromium is not installed (scripts/install_system_deps.sh installs it)"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(reason)
    pytest.skip(reason)
  return binary


@pytest.mark.parametrize("dashboard,expected", [
    # HParams table: one row per model, sortable by the metrics.
    ("hparams", ["Trial ID", "temperature", "test_accuracy", "test_errors", "validation_accuracy",
                 "train_seconds", "Number of matching session groups: 4"]),
    # Time Series (the scalars): every model's runs in one list, one chart per tag.
    ("timeseries", ["teacher/train", "teacher/validation", "distilled/train",
                    "labels_only/validation", "teacher_only/test", "accuracy", "cross_entropy",
                    "distillation_loss", "student_loss", "learning_rate"]),
    ("images", ["confusion_matrix", "best_student_errors", "teacher/test", "_comparison"]),
])
def test_dashboard_in_headless_chromium(smoke_run, tensorboard_server, dashboard, expected):
  binary = _browser_or_skip()
  models = list(_models(smoke_run["model_dir"]))
  needles = expected + (models if dashboard == "hparams" else [])
  os.makedirs(ARTIFACTS, exist_ok=True)
  shot = os.path.join(ARTIFACTS, f"tensorboard-{dashboard}.png")
  with Chromium(binary, width=1600, height=1000) as browser:
    browser.open(f"{tensorboard_server}/#{dashboard}")
    text = browser.wait_for_text(needles, timeout=60)
    time.sleep(1)  # let charts finish drawing before the picture
    browser.screenshot(shot)
  missing = [n for n in needles if n not in text]
  assert not missing, f"{missing} not on the page; see {shot}. Page text: {text[:2000]}"
  assert os.path.getsize(shot) > 20_000


# ---- scripts/tensorboard.sh ----
def _script_env(**extra):
  env = dict(os.environ, PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2")
  env.update(extra)
  return env


def test_script_serves_a_local_run(smoke_run, tmp_path):
  port = _free_port()
  server = _Server(["bash", os.path.join(REPO, "scripts", "tensorboard.sh"), f"--port={port}",
                    smoke_run["model_dir"]], port, tmp_path / "script.log", env=_script_env())
  try:
    server.wait_for_runs(["teacher/train", "distilled/test", "_comparison"])
  finally:
    server.stop()


def test_script_syncs_a_bucket_run(smoke_run, gcs_emulator, tmp_path):
  """gs:// with STORAGE_EMULATOR_HOST: the logs are fetched with trainer.rundir.storage and
  served."""
  from trainer.rundir import storage
  uploader = storage.RunStorage(smoke_run["model_dir"], remote=gcs_emulator.url("runs/smoke"))
  uploader.sync("logs")
  uploader.close()
  port = _free_port()
  cache = tmp_path / "cache"
  server = _Server(["bash", os.path.join(REPO, "scripts", "tensorboard.sh"), f"--port={port}",
                    "--every=1", gcs_emulator.url("runs/smoke")], port, tmp_path / "script.log",
                   env=_script_env(MNIST_DISTILL_TB_CACHE=str(cache)))
  try:
    server.wait_for_runs(["teacher/train", "distilled/test", "_comparison"])
    copy = cache / gcs_emulator.bucket / "runs" / "smoke" / "logs"
    assert sorted(p.name for p in copy.iterdir()) == sorted(
        os.listdir(os.path.join(smoke_run["model_dir"], "logs")))
    # A model that appears in the bucket later shows up without restarting anything.
    late = tmp_path / "late"
    writer = tf.summary.create_file_writer(str(late / "logs" / "late_student" / "train"))
    with writer.as_default(step=1):
      tf.summary.scalar("accuracy", 0.5)
    writer.close()
    uploader = storage.RunStorage(str(late), remote=gcs_emulator.url("runs/smoke"))
    uploader.sync("logs/late_student")
    uploader.close()
    server.wait_for_runs(["late_student/train"], timeout=60)
  finally:
    server.stop()
