"""Fixtures of the real-cluster tests (tests/cluster/): a local Kubernetes cluster brought up once
for them and torn down after (scripts/local_cluster.sh), the project's CPU image loaded into its
containerd, and a bucket on the GCS emulator listening inside the cluster's network namespace.

The modules run in file order on one pytest-xdist worker (tests/conftest.py): admission checks
first, while the JobSet CRD is still missing, then the runs.
"""

import json
import time

import pytest

from helpers import MNIST_DIR
from local_cluster import Cluster, make_google_tls, record, script, serve_bucket


@pytest.fixture(scope="session")
def cluster():
  """`bash scripts/local_cluster.sh up --no-jobset` (JobSet comes later: the first tests need its
  CRD missing); `down` afterwards, which must leave nothing behind."""
  started = time.monotonic()
  script("up", "--no-jobset", timeout=3600)  # a fresh machine builds the binaries first
  record(what="cluster up", seconds=round(time.monotonic() - started, 1))
  try:
    yield Cluster()
  finally:
    script("down", timeout=300)


@pytest.fixture(scope="session")
def cluster_image(cluster, cpu_image):
  """The CPU image of this checkout in the node's containerd (never pulled: IfNotPresent)."""
  started = time.monotonic()
  script("load", cpu_image, timeout=1800)
  record(what="image load", seconds=round(time.monotonic() - started, 1))
  return cpu_image


@pytest.fixture(scope="session")
def jobset(cluster):
  """The JobSet controller, from the pinned module's own manifests (webhooks answering)."""
  script("jobset", timeout=1200)
  return cluster


@pytest.fixture(scope="session")
def google_tls(tmp_path_factory):
  """A test CA and a certificate for Google's API hosts signed by it: (ca.crt, cert, key)."""
  return make_google_tls(tmp_path_factory.mktemp("google-tls"))


@pytest.fixture(scope="session")
def bucket(cluster, google_tls):
  """gs://mnist-distill-e2e on the GCS emulator inside the cluster's network namespace, holding
  the real MNIST IDX files under mnist/ (local_cluster.serve_bucket)."""
  with serve_bucket(cluster, google_tls, MNIST_DIR) as gcs:
    yield gcs


GKE_GPU_LABELS = {"cloud.google.com/gke-accelerator": "nvidia-l4",
                  "iam.gke.io/gke-metadata-server-enabled": "true",
                  "node.kubernetes.io/instance-type": "g2-standard-48"}
GPUS = "4"


@pytest.fixture(scope="module")
def gpu_node(cluster, jobset):
  """The node as GKE shows a 4-GPU L4 node: labels, `nvidia.com/gpu: 4`, and the GPU taint (so
  that only pods tolerating it land there: the tests' pods must carry the toleration). JobSet is
  installed first: its controller, like any pod without the toleration, could not start after.
  Per module: the taint goes at the module's end, so later modules' CPU pods can land again."""
  node = cluster.node_name
  cluster.kubectl("label", "node", node, "--overwrite",
                  *[f"{k}={v}" for k, v in GKE_GPU_LABELS.items()])
  gpus = {"nvidia.com/gpu": GPUS}
  cluster.kubectl("patch", "node", node, "--subresource=status", "--type=merge", "-p",
                  json.dumps({"status": {"capacity": gpus, "allocatable": gpus}}))
  cluster.kubectl("taint", "node", node, "nvidia.com/gpu=present:NoSchedule", "--overwrite")
  assert cluster.get(f"node/{node}", namespace=None)["status"]["allocatable"]["nvidia.com/gpu"] \
      == GPUS
  yield node
  cluster.kubectl("taint", "node", node, "nvidia.com/gpu-", check=False)
