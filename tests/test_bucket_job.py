"""The whole job against a real GCS server (tests/gcs_emulator.py), run as a subprocess.

gs:// inputs and outputs, a fresh disk that resumes from the bucket alone, Indexed-Job pods that
share one model_dir, Vertex AI's environment variables, outages and bad buckets.
"""

import glob
import json
import os
import re
import time

import numpy as np
import pytest
import tensorflow as tf

from trainer.data import idx

from gcs_emulator import free_port
from helpers import MNIST_DIR, error_lines, read, run_cli, start_cli
from tb_events import events

# 256 training examples in batches of 32: 8 steps an epoch.
TINY = [f"--idx_dir={MNIST_DIR}", "--max_train_examples=256", "--validation_examples=128",
        "--max_test_examples=256", "--teacher_epochs=2", "--student_epochs=2", "--batch_size=32",
        "--nolitert"]
STUDENTS = ["--student=a:alpha=0", "--student=b:alpha=0.5,temperature=2"]
MODEL_FILES = ("checkpoints/checkpoint", "export/saved_model.pb", "model.keras", "result.json")


def wait_for_object(gcs, name, proc, timeout=180.0):
  deadline = time.monotonic() + timeout
  while name not in gcs.objects(name):
    assert proc.poll() is None, f"the job ended before {name} appeared"
    assert time.monotonic() < deadline, f"{name} did not appear in {timeout}s"
    time.sleep(0.05)


def download(gcs, prefix, dest):
  """Copies every object under prefix/ to dest, straight from the emulator's memory."""
  for name in gcs.objects(prefix + "/"):
    path = os.path.join(dest, name[len(prefix) + 1:])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(gcs.read(name))
  return dest


def generations(gcs, prefix):
  return {name: int(obj["generation"]) for name, obj in gcs.objects(prefix).items()}


def model_names(gcs, name="run/results.json"):
  return [m["name"] for m in json.loads(gcs.read(name))["models"]]


def assert_model_complete(objects, root, name):
  for rel in MODEL_FILES:
    assert f"{root}/{name}/{rel}" in objects, (name, rel)
  for run in ("train", "validation"):
    assert [n for n in objects if n.startswith(f"{root}/logs/{name}/{run}/events.out.tfevents.")]


def test_everything_lands_in_the_bucket_and_a_fresh_disk_reuses_it(gcs_emulator, tmp_path):
  bucket = gcs_emulator.client().bucket(gcs_emulator.bucket)
  for path in glob.glob(os.path.join(MNIST_DIR, "*-ubyte*")):
    bucket.blob(f"inputs/mnist/{os.path.basename(path)}").upload_from_filename(path)
  args = [f"--model_dir={gcs_emulator.url('run')}", f"--idx_dir={gcs_emulator.url('inputs/mnist')}",
          *TINY[1:], *STUDENTS]
  proc = run_cli(args, MNIST_DISTILL_STAGING=str(tmp_path / "disk1"))
  assert proc.returncode == 0, proc.stderr[-3000:]

  objects = gcs_emulator.objects("run/")
  for name in ("teacher", "a", "b"):
    assert_model_complete(objects, "run", name)
  cache = {n for n in objects if n.startswith("run/teacher_logits/")}
  assert len(cache) == 3 and {n.rsplit("/", 1)[1] for n in cache} == {
      "key.json", "train.npy", "validation.npy"}
  assert not [n for n in objects if re.search(r"\.tmp|_temp/|mnist-distill-part", n)]
  # Markers go up last: a model's result.json after all its files, results.json after those.
  gens = generations(gcs_emulator, "run/")
  for name in ("teacher", "a", "b"):
    own = [g for n, g in gens.items() if n.startswith(f"run/{name}/") and
           not n.endswith("/result.json")]
    assert max(own) < gens[f"run/{name}/result.json"] < gens["run/results.json"]
  assert model_names(gcs_emulator) == ["teacher", "a", "b"]
  # Students start from identical weights even while uploads run beside them.
  assert len({json.loads(gcs_emulator.read(f"run/{name}/result.json"))["initial_weights_sha256"]
              for name in ("a", "b")}) == 1

  # TensorBoard events in the bucket include the last epoch of every model.
  logs = download(gcs_emulator, "run/logs", str(tmp_path / "logs"))
  for name in ("teacher", "a", "b"):
    steps = set()
    for event in events(f"{logs}/{name}/validation"):
      steps.update(event.step for v in event.summary.value if v.tag == "accuracy")
    assert steps == {1, 2}, name

  # The exports reload from the bucket and give the accuracy their result.json reports.
  images, labels = idx.load_split(MNIST_DIR, "test")
  for name in ("teacher", "b"):
    export = download(gcs_emulator, f"run/{name}/export", str(tmp_path / name))
    served = tf.saved_model.load(export).signatures["serving_default"]
    accuracy = float(np.mean(served(images=tf.constant(images[:256]))["classes"].numpy()
                             == labels[:256]))
    result = json.loads(gcs_emulator.read(f"run/{name}/result.json"))
    assert accuracy == pytest.approx(result["test_accuracy"], abs=1e-9), name

  # Same command on a new disk: the bucket alone says everything is done; nothing retrains,
  # no object of a model changes (only the merged report is written again).
  def model_objects():
    return {n: g for n, g in generations(gcs_emulator, "run/").items()
            if n.startswith(("run/teacher/", "run/a/", "run/b/", "run/teacher_logits/",
                             "run/logs/teacher/", "run/logs/a/", "run/logs/b/"))}

  models_before = model_objects()
  proc = run_cli(args, MNIST_DISTILL_STAGING=str(tmp_path / "disk2"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "teacher already finished" in proc.stderr and " epoch 1/" not in proc.stderr
  assert model_objects() == models_before
  assert model_names(gcs_emulator) == ["teacher", "a", "b"]


def test_two_indexed_pods_share_one_model_dir(gcs_emulator, tmp_path):
  url = gcs_emulator.url("run")
  proc = run_cli([f"--model_dir={url}", "--mode=teacher", *TINY, "--teacher_epochs=1"],
                 MNIST_DISTILL_STAGING=str(tmp_path / "disk0"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  pods = [start_cli([f"--model_dir={url}", "--mode=students", *TINY, *STUDENTS],
                    tmp_path / f"pod{i}.log", JOB_COMPLETION_INDEX=str(i),
                    MNIST_DISTILL_STAGING=str(tmp_path / f"disk{i + 1}")) for i in (0, 1)]
  try:
    codes = [pod.wait(timeout=600) for pod in pods]
  finally:
    for pod in pods:
      pod.kill()
  assert codes == [0, 0], [read(tmp_path / f"pod{i}.log")[-3000:] for i in (0, 1)]

  objects = gcs_emulator.objects("run/")
  for name in ("teacher", "a", "b"):
    assert_model_complete(objects, "run", name)
  # Both pods computed the same teacher-logits cache into the same folder, deleting nothing.
  assert len({n.rsplit("/", 2)[1] for n in objects if n.startswith("run/teacher_logits/")}) == 1
  assert model_names(gcs_emulator) == ["teacher", "a", "b"]  # whichever pod merged last

  proc = run_cli([f"--model_dir={url}", "--mode=report", *TINY, *STUDENTS],
                 MNIST_DISTILL_STAGING=str(tmp_path / "disk3"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert " epoch " not in proc.stderr
  assert model_names(gcs_emulator) == ["teacher", "a", "b"]
  pulled = tmp_path / "disk3" / "test-bucket" / "run"
  assert not list(pulled.glob("*/checkpoints")) and not list(pulled.glob("*/export"))
  assert not list(pulled.glob("*/model.keras"))  # a report needs the markers, not the models


def test_vertex_ai_environment_decides_where_things_go(gcs_emulator, tmp_path):
  proc = run_cli(["--mode=teacher", *TINY, "--teacher_epochs=1"],
                 MNIST_DISTILL_STAGING=str(tmp_path / "disk"),
                 AIP_MODEL_DIR=gcs_emulator.url("job/model") + "/",
                 AIP_CHECKPOINT_DIR=gcs_emulator.url("job/checkpoints") + "/",
                 AIP_TENSORBOARD_LOG_DIR=gcs_emulator.url("tensorboard/job") + "/")
  assert proc.returncode == 0, proc.stderr[-3000:]
  objects = gcs_emulator.objects()
  assert_model_complete(objects, "job", "teacher")  # model_dir = AIP_MODEL_DIR's parent
  assert "job/results.json" in objects
  assert not [n for n in objects if n.startswith("job/model/")]
  # Checkpoints are mirrored to AIP_CHECKPOINT_DIR, file for file (resume reads model_dir).
  checkpoints = {n[len("job/checkpoints/"):]: gcs_emulator.read(n)
                 for n in objects if n.startswith("job/checkpoints/")}
  assert "teacher/checkpoints/checkpoint" in checkpoints
  assert checkpoints == {n[len("job/"):]: gcs_emulator.read(n)
                         for n in objects if n.startswith("job/teacher/checkpoints/")}
  # The logs are mirrored to AIP_TENSORBOARD_LOG_DIR, file for file.
  mirrored = {n[len("tensorboard/job/"):]: gcs_emulator.read(n)
              for n in objects if n.startswith("tensorboard/")}
  assert mirrored and mirrored == {n[len("job/logs/"):]: gcs_emulator.read(n)
                                   for n in objects if n.startswith("job/logs/")}


def test_an_outage_mid_run_is_ridden_out(gcs_emulator, tmp_path):
  proc = start_cli([f"--model_dir={gcs_emulator.url('run')}", "--mode=teacher", *TINY,
                    "--teacher_epochs=3", "--checkpoint_every_steps=2"], tmp_path / "job.log",
                   MNIST_DISTILL_STAGING=str(tmp_path / "disk"),
                   MNIST_DISTILL_GCS_RETRY_SECONDS="60")
  try:
    wait_for_object(gcs_emulator, "run/teacher/checkpoints/checkpoint", proc)
    gcs_emulator.stop()
    time.sleep(3)
    gcs_emulator.start()
    assert proc.wait(timeout=300) == 0, read(tmp_path / "job.log")[-3000:]
  finally:
    proc.kill()
  assert re.search(r"failed \(.*\); retry \d+ in", read(tmp_path / "job.log"))
  assert_model_complete(gcs_emulator.objects("run/"), "run", "teacher")
  assert model_names(gcs_emulator) == ["teacher"]


def test_a_bucket_that_stays_down_exits_3_and_a_rerun_completes(gcs_emulator, tmp_path):
  # The lease outlives the 3 s of retries (so the storage error, 3, ends the job, not a lost
  # lease, 5) but not by much: the rerun waits for it to expire.
  args = [f"--model_dir={gcs_emulator.url('run')}", "--mode=teacher", *TINY,
          "--teacher_epochs=4", "--checkpoint_every_steps=2", "--lease_ttl_seconds=20"]
  env = {"MNIST_DISTILL_STAGING": str(tmp_path / "disk"), "MNIST_DISTILL_GCS_RETRY_SECONDS": "3"}
  proc = start_cli(args, tmp_path / "job.log", **env)
  try:
    wait_for_object(gcs_emulator, "run/teacher/checkpoints/checkpoint", proc)
    gcs_emulator.stop()
    stopped = time.monotonic()
    code = proc.wait(timeout=120)
  finally:
    proc.kill()
  log = read(tmp_path / "job.log")
  assert code == 3, log[-3000:]
  assert time.monotonic() - stopped < 30
  errors = error_lines(log)
  assert len(errors) == 1 and f"127.0.0.1:{gcs_emulator.port}" in errors[0], errors
  assert "still failing after" in errors[0]
  assert "run/teacher/result.json" not in gcs_emulator.objects("run/")

  gcs_emulator.start()
  proc = run_cli(args, **env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Resumed from" in proc.stderr
  assert_model_complete(gcs_emulator.objects("run/"), "run", "teacher")
  assert model_names(gcs_emulator) == ["teacher"]


@pytest.mark.parametrize("case", ["missing_bucket", "unreachable_endpoint", "missing_input_bucket"])
def test_a_bad_bucket_fails_fast_with_2_before_training(case, gcs_emulator, tmp_path):
  model_dir, idx_dir = gcs_emulator.url("run"), MNIST_DIR
  env = {"MNIST_DISTILL_STAGING": str(tmp_path / "disk"), "MNIST_DISTILL_GCS_RETRY_SECONDS": "2"}
  if case == "missing_bucket":
    model_dir, expected = "gs://no-such-bucket/run", "bucket 'no-such-bucket' does not exist"
  elif case == "unreachable_endpoint":
    env["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{free_port()}"
    expected = "Cloud Storage unreachable"
  else:
    idx_dir, expected = "gs://no-such-bucket/mnist", "bucket 'no-such-bucket' does not exist"
  started = time.monotonic()
  proc = run_cli([f"--model_dir={model_dir}", *TINY, f"--idx_dir={idx_dir}"], timeout=120, **env)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = error_lines(proc.stderr)
  assert len(errors) == 1 and expected in errors[0], errors
  assert " epoch " not in proc.stderr
  assert time.monotonic() - started < 60
  assert not gcs_emulator.objects()
