"""The local Kubernetes cluster of scripts/local_cluster.sh, from the tests.

kubectl runs inside the cluster's network namespace (nsenter --net), as a person's would after
`bash scripts/local_cluster.sh exec`. Overlays are applied the way the README tells a user to: a
copy of k8s/ with the overlay's two edits (the images, MODEL_DIR), plus the small local components
of tests/cluster/components that fit the pods to this machine (see their kustomization.yaml).
"""

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from gcs_emulator import GcsEmulator

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "local_cluster.sh"
COMPONENTS = Path(__file__).resolve().parent / "components"
NAMESPACE = "mnist-distill"
# The bucket the pods use, served by the suite's GCS emulator inside the cluster's namespace on
# the node address (the port is fixed: the namespace is the cluster's own).
BUCKET = "mnist-distill-e2e"
EMULATOR_PORT = 4443
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# Google's API host names the TensorBoard pod's TensorFlow calls; the cluster's DNS points them at
# the node, where the emulator serves TLS.
GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
# Figures the cluster tests measure (bring-up, image load, apply -> first epoch -> Complete), one
# JSON object per line, for benchmarks and the docs.
TIMINGS = os.environ.get("MNIST_DISTILL_CLUSTER_TIMINGS")


def record(**figures):
  """Prints a test's measurements and appends them to $MNIST_DISTILL_CLUSTER_TIMINGS."""
  print("cluster timing: " + json.dumps(figures))
  if TIMINGS:
    with open(TIMINGS, "a") as f:
      f.write(json.dumps(figures) + "\n")


def script(*args, timeout=1800, check=True):
  proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"local_cluster.sh {' '.join(args)} exited {proc.returncode}:\n"
                         f"{proc.stderr[-6000:]}")
  return proc


class Cluster:
  """A running local cluster: addresses, kubectl, and waiting on what the API server reports."""

  def __init__(self):
    env = {}
    for line in script("env").stdout.split("\n"):
      for pair in line.split():
        key, value = pair.split("=", 1)
        env[key] = value
    self.node_ip, self.node_name = env["node_ip"], env["node_name"]
    self.state, self.kubeconfig, self.kubectl_bin = env["state"], env["kubeconfig"], env["kubectl"]

  @property
  def netns(self) -> str:
    """The cluster's network namespace, as a path setns(2) and nsenter take."""
    pid = subprocess.run(["pgrep", "-f", "^mnist-distill-cluster-holder( |$)"],
                         capture_output=True, text=True).stdout.split()
    assert pid, "the local cluster is not up"
    return f"/proc/{pid[0]}/ns/net"

  def in_netns(self, argv):
    """argv as a command that runs inside the cluster's network namespace."""
    return ["nsenter", f"--net={self.netns}", "--", *argv]

  def kubectl_argv(self, *args):
    """kubectl with this cluster's credentials and a discovery cache of its own (a cache kept
    from an earlier cluster would still know kinds this one lacks)."""
    return [self.kubectl_bin, f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.state}/kube-cache", *args]

  def kubectl(self, *args, input=None, check=True, timeout=120):
    proc = subprocess.run(self.in_netns(self.kubectl_argv(*args)),
                          input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
      raise AssertionError(f"kubectl {' '.join(args)} exited {proc.returncode}:\n"
                           f"{proc.stderr[-4000:]}")
    return proc

  def get(self, what, namespace=NAMESPACE, check=True):
    """One object (e.g. "job/mnist-distill") or a list ("pods -l ...") as parsed JSON."""
    ns = ["-n", namespace] if namespace else []
    proc = self.kubectl("get", *what.split(), *ns, "-o", "json", check=check)
    return json.loads(proc.stdout) if proc.returncode == 0 else None

  def wait_until(self, what, predicate, timeout, every=1.0):
    """Polls predicate() until it returns something truthy; fails with `what` and the namespace's
    pods and events after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
      value = predicate()
      if value:
        return value
      if time.monotonic() > deadline:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.describe()}")
      time.sleep(every)

  def describe(self):
    """The namespace's pods, jobs and recent events: what a person would look at."""
    out = []
    for args in (("get", "pods,jobs", "-o", "wide"),
                 ("get", "events", "--sort-by=.lastTimestamp")):
      proc = self.kubectl(*args, "-n", NAMESPACE, check=False)
      out.append(proc.stdout[-3000:] + proc.stderr[-500:])
    return "\n".join(out)

  def logs(self, pod, container="trainer", previous=False, timestamps=False):
    """A container's log; with `timestamps`, each line led by the runtime's RFC 3339 time."""
    args = (["logs", pod, "-c", container, "-n", NAMESPACE] + (["--previous"] if previous else [])
            + (["--timestamps"] if timestamps else []))
    return self.kubectl(*args, check=False).stdout

  def delete_namespace(self):
    """Removes the run's namespace and waits until it is gone (a clean slate for the next run)."""
    self.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true",
                 timeout=300)


def condition(obj, kind):
  """The status condition `kind` of obj when it is True, else None."""
  for c in (obj or {}).get("status", {}).get("conditions", []) or []:
    if c.get("type") == kind and c.get("status") == "True":
      return c
  return None


def finished(cluster, what="job/mnist-distill", timeout=1200):
  """Waits until the Job (or JobSet) `what` is Complete/Completed or Failed; returns it."""
  def done():
    obj = cluster.get(what)
    return obj if any(condition(obj, c) for c in ("Complete", "Completed", "Failed")) else None
  return cluster.wait_until(f"{what} finished", done, timeout, every=1)


def prepare(tmp_path, overlay, image, model_dir, components=("local-cluster",), files=None,
            patches=()):
  """A copy of k8s/ in tmp_path with the README's two edits made in `overlay` (both images set to
  `image`; MODEL_DIR set) and the given local components added to it; returns the folder to
  `kubectl apply -k`. files: {"component/name": bytes} written into the components' copies;
  patches: kustomize patch entries appended to the overlay's own (they apply after them)."""
  k8s = tmp_path / "k8s"
  shutil.copytree(REPO / "k8s", k8s)
  for name in components:
    shutil.copytree(COMPONENTS / name, k8s / "components" / f"test-{name}")
  for name, data in (files or {}).items():
    component, _, filename = name.partition("/")
    (k8s / "components" / f"test-{component}" / filename).write_bytes(data)
  target = k8s / ("base" if overlay == "base" else f"overlays/{overlay}")
  path = target / "kustomization.yaml"
  doc = yaml.safe_load(path.read_text())
  repo, _, tag = image.rpartition(":")
  # `kustomize edit set image mnist-distill=IMAGE mnist-distill-cpu=IMAGE`
  images = {entry["name"]: entry for entry in doc.get("images", [])}
  for name in ("mnist-distill", "mnist-distill-cpu"):
    images[name] = {"name": name, "newName": repo, "newTag": tag}
  doc["images"] = list(images.values())
  # MODEL_DIR=...: in the overlay's mnist-distill-run literal (the base's for the base).
  for generator in doc.get("configMapGenerator", []):
    if generator["name"] == "mnist-distill-run":
      generator["literals"] = [f"MODEL_DIR={model_dir}"]
  rel = os.path.relpath(k8s / "components", target)
  doc["components"] = doc.get("components", []) + [f"{rel}/test-{name}" for name in components]
  doc["patches"] = doc.get("patches", []) + list(patches)
  path.write_text(yaml.safe_dump(doc, sort_keys=False))
  return target


def make_google_tls(folder: Path):
  """A test CA and a certificate for GOOGLE_HOSTS signed by it, in `folder`: (ca.crt, cert, key)
  paths. The CA goes into the local-cluster component (ca.crt), the rest to the emulator."""
  ca, cert, key, csr = (folder / n for n in ("ca.crt", "server.crt", "server.key", "server.csr"))

  def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)

  openssl("req", "-x509", "-new", "-newkey", "rsa:2048", "-nodes", "-days", "2",
          "-subj", "/CN=mnist-distill test CA", "-keyout", str(folder / "ca.key"), "-out", str(ca))
  openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={GOOGLE_HOSTS[0]}",
          "-keyout", str(key), "-out", str(csr))
  (folder / "ext").write_text("subjectAltName=" + ",".join(f"DNS:{h}" for h in GOOGLE_HOSTS)
                              + "\n")
  openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(folder / "ca.key"),
          "-CAcreateserial", "-days", "2", "-extfile", str(folder / "ext"), "-out", str(cert))
  return ca, cert, key


@contextlib.contextmanager
def serve_bucket(cluster, tls, mnist_dir):
  """gs://BUCKET on the GCS emulator, on the node address inside the cluster's network namespace
  (pods reach it at http://NODE:4443, and as https://www.googleapis.com through the cluster's
  DNS), holding the real MNIST IDX files of `mnist_dir` under mnist/ (the pods have no egress).
  Yields the emulator; stops it on exit."""
  gcs = GcsEmulator(buckets=(BUCKET,), port=EMULATOR_PORT, host=cluster.node_ip,
                    netns=cluster.netns).start()
  for name in IDX_FILES:
    with open(os.path.join(mnist_dir, name), "rb") as f:
      gcs.write(f"mnist/{name}", f.read())
  _, cert, key = tls
  https = gcs.serve_tls(443, str(cert), str(key))
  with open(os.path.join(cluster.state, "coredns", "hosts"), "a") as f:
    f.write(f"{cluster.node_ip} {' '.join(GOOGLE_HOSTS)}\n")
  try:
    yield gcs
  finally:
    https.shutdown()
    https.server_close()
    gcs.stop()
