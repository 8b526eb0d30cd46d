"""The default way on a real cluster: one `kubectl apply -k` of k8s/base (the one-pod Job on CPU
nodes, the default job's flags, untouched) runs the whole pipeline to `Complete`, writes the run
into the bucket, and the TensorBoard Deployment serves it (seen in headless Chromium through
`kubectl port-forward`, as a person would look at it)."""

import json
import os
import re
import subprocess
import time
import urllib.request

import pytest

from gcs_emulator import in_netns
from headless_chromium import Chromium, find_chromium
from local_cluster import BUCKET, NAMESPACE, condition, prepare, record

MODEL_DIR = f"gs://{BUCKET}/runs/default"
FIRST_EPOCH = re.compile(r"teacher epoch 1/\d+:")


def trainer_pod(cluster, job="mnist-distill"):
  pods = cluster.get(f"pods -l job-name={job}")["items"]
  return pods[0]["metadata"]["name"] if pods else None


@pytest.fixture(scope="module")
def default_run(cluster, cluster_image, bucket, google_tls, tmp_path_factory):
  target = prepare(tmp_path_factory.mktemp("default"), "base", cluster_image, MODEL_DIR,
                   files={"local-cluster/ca.crt": google_tls[0].read_bytes()})
  started = time.monotonic()
  cluster.kubectl("apply", "-k", str(target))
  pod = cluster.wait_until("the trainer pod", lambda: trainer_pod(cluster), 120)
  cluster.wait_until("the first epoch line",
                     lambda: FIRST_EPOCH.search(cluster.logs(pod)), 900, every=0.5)
  first_epoch = time.monotonic() - started
  job = cluster.wait_until(
      "job/mnist-distill Complete",
      lambda: (lambda j: j if condition(j, "Complete") or condition(j, "Failed") else None)(
          cluster.get("job/mnist-distill")), 3600, every=2)
  complete = time.monotonic() - started
  record(what="default overlay (k8s/base)", apply_to_first_epoch_s=round(first_epoch, 1),
         apply_to_complete_s=round(complete, 1))
  try:
    yield {"job": job, "pod": pod, "logs": cluster.logs(pod)}
  finally:
    cluster.delete_namespace()


def test_the_job_completes_on_its_first_pod(default_run):
  job = default_run["job"]
  assert condition(job, "Complete"), json.dumps(job["status"], indent=1)
  assert job["status"].get("succeeded") == 1 and not job["status"].get("failed")


def test_the_results_land_in_the_bucket(default_run, bucket):
  objects = bucket.objects("runs/default/")
  for name in ("results.json", "results.md", "teacher/result.json", "distilled/result.json"):
    assert f"runs/default/{name}" in objects, sorted(objects)[:50]
  results = json.loads(bucket.read("runs/default/results.json"))
  models = {m["name"]: m for m in results["models"]}
  assert set(models) == {"teacher", "labels_only", "teacher_only", "distilled"}
  # The default job, full MNIST: every model far above chance, the teacher near its usual 99%.
  assert models["teacher"]["test_examples"] == 10000
  assert models["teacher"]["test_accuracy"] > 0.98, models["teacher"]
  assert all(m["test_accuracy"] > 0.95 for m in models.values()), models
  assert "labels_only" in bucket.read("runs/default/results.md").decode()


def test_tensorboard_serves_the_run_from_the_bucket(cluster, default_run, tmp_path):
  cluster.wait_until("TensorBoard Available",
                     lambda: condition(cluster.get("deployment/mnist-distill-tensorboard"),
                                       "Available"), 300)
  port = 16006
  forward = subprocess.Popen(
      cluster.in_netns(cluster.kubectl_argv("-n", NAMESPACE, "port-forward",
                                            "service/mnist-distill-tensorboard", f"{port}:80")),
      stdout=subprocess.DEVNULL, stderr=open(tmp_path / "port-forward.log", "wb"))
  url = f"http://127.0.0.1:{port}"

  def runs():
    try:
      with in_netns(cluster.netns, lambda: urllib.request.urlopen(f"{url}/data/runs", timeout=10)) \
          as response:
        return set(json.loads(response.read()))
    except OSError:
      return set()

  try:
    wanted = {"teacher/train", "distilled/test", "_comparison"}
    cluster.wait_until(f"TensorBoard listing {wanted}", lambda: wanted <= runs(), 240, every=2)
    binary = find_chromium()
    assert binary, "chromium is missing (scripts/install_system_deps.sh installs it)"
    shot = tmp_path / "tensorboard-on-the-cluster.png"
    with Chromium(binary, prefix=cluster.in_netns([])) as browser:
      browser.open(f"{url}/#hparams")
      needles = ["teacher", "labels_only", "teacher_only", "distilled", "test_accuracy"]
      text = browser.wait_for_text(needles, timeout=90)
      browser.screenshot(shot)
    missing = [n for n in needles if n not in text]
    assert not missing, f"{missing} not on the page; page text: {text[:1500]}"
    assert os.path.getsize(shot) > 20_000
  finally:
    forward.terminate()
    forward.wait(timeout=10)
