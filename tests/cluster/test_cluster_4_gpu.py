"""The GPU overlays on a node dressed as a GKE GPU node: its labels and taint, and nvidia.com/gpu
advertised as an extended resource through the node status API (no device plugin, no GPU: the
trainer falls back to the CPU, the same code path). The scheduler must place each trainer pod
there for what it asks, and the run completes. Short runs (tests/cluster/components/short-run)."""

import json
import time

import pytest

from local_cluster import BUCKET, condition, finished, prepare, record


def short_run(cluster, tmp_path, overlay, image, ca, run):
  """Applies `overlay` with the short-run flags into gs://BUCKET/runs/RUN; returns the Job once
  it has finished (Complete or Failed) and the apply -> finished seconds."""
  target = prepare(tmp_path, overlay, image, f"gs://{BUCKET}/runs/{run}",
                   components=("local-cluster", "short-run"),
                   files={"local-cluster/ca.crt": ca.read_bytes()})
  started = time.monotonic()
  cluster.kubectl("apply", "-k", str(target))
  return finished(cluster), time.monotonic() - started


@pytest.mark.parametrize("overlay,gpus", [("gke-gpu", "1"), ("gke-multi-gpu", "4")])
def test_gpu_overlay_is_scheduled_on_the_gpu_node_and_completes(cluster, cluster_image, bucket,
                                                                  google_tls, gpu_node, overlay,
                                                                  gpus, tmp_path):
  try:
    job, seconds = short_run(cluster, tmp_path, overlay, cluster_image, google_tls[0], overlay)
    record(what=f"{overlay} overlay, short run", apply_to_finished_s=round(seconds, 1))
    pods = cluster.get("pods -l job-name=mnist-distill")["items"]
    assert condition(job, "Complete"), cluster.describe()
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    pod = pods[0]
    assert pod["spec"]["nodeName"] == gpu_node
    trainer = pod["spec"]["containers"][0]
    assert trainer["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["spec"]["tolerations"])
    results = json.loads(bucket.read(f"runs/{overlay}/results.json"))
    assert {m["name"] for m in results["models"]} >= {"teacher"}
  finally:
    cluster.delete_namespace()

