"""What the API server admits, on the real cluster before anything runs: the namespace's Pod
Security "restricted" label against every pod the shipped manifests make, and the JobSet overlay
applied where the JobSet CRD is missing (the JobSet controller is installed only after this)."""

import copy
import json
import subprocess

import pytest
import yaml

from local_cluster import NAMESPACE, REPO, prepare

OVERLAYS = ["base", "cpu-smoke", "gke-gpu", "gke-multi-gpu", "jobset"]


def _render(cluster, target):
  proc = cluster.kubectl("kustomize", str(target))
  return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _pod_templates(docs):
  """(where, pod template) for every pod the objects would create."""
  for doc in docs:
    kind, name = doc["kind"], doc["metadata"]["name"]
    if kind in ("Job", "Deployment"):
      yield f"{kind}/{name}", doc["spec"]["template"]
    elif kind == "JobSet":
      for rjob in doc["spec"]["replicatedJobs"]:
        yield f"JobSet/{name}/{rjob['name']}", rjob["template"]["spec"]["template"]


def _dry_run_pod(cluster, template, name):
  pod = {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": name, "namespace": NAMESPACE,
                      "labels": template.get("metadata", {}).get("labels", {})},
         "spec": template["spec"]}
  return cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod),
                         check=False)


@pytest.fixture(scope="module")
def namespace(cluster):
  """The shipped namespace (Pod Security `restricted` enforced) and service account (a pod naming
  a missing one is refused for that)."""
  base = REPO / "k8s" / "base"
  cluster.kubectl("apply", "-f", str(base / "namespace.yaml"))
  cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(base / "serviceaccount.yaml"))
  yield NAMESPACE
  cluster.delete_namespace()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_security_restricted_admits_every_shipped_pod(cluster, namespace, overlay, tmp_path):
  target = prepare(tmp_path, overlay, "localhost/mnist-distill:any", "gs://bucket/run",
                   components=())
  templates = list(_pod_templates(_render(cluster, target)))
  containers = {c["name"] for _, t in templates
                for c in t["spec"]["containers"] + t["spec"].get("initContainers", [])}
  assert {"trainer", "tensorboard"} <= containers, containers
  for i, (where, template) in enumerate(templates):
    proc = _dry_run_pod(cluster, template, f"admission-{i}")
    assert proc.returncode == 0, f"{overlay}: {where} refused:\n{proc.stderr}"
    assert "Warning" not in proc.stderr, proc.stderr  # warn=restricted too: no warning either


@pytest.mark.parametrize("change", ["privileged", "root", "hostPath"])
def test_pod_security_restricted_rejects_a_weaker_variant(cluster, namespace, change, tmp_path):
  target = prepare(tmp_path, "base", "localhost/mnist-distill:any", "gs://bucket/run",
                   components=())
  (where, template), *_ = _pod_templates(_render(cluster, target))
  weaker = copy.deepcopy(template)
  spec, trainer = weaker["spec"], weaker["spec"]["containers"][0]
  if change == "privileged":  # (privileged implies privilege escalation: the API insists)
    trainer["securityContext"].update(privileged=True, allowPrivilegeEscalation=True)
  elif change == "root":
    spec["securityContext"]["runAsUser"] = 0
    trainer["securityContext"]["runAsUser"] = 0
  else:
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/var/lib"}})
  assert _dry_run_pod(cluster, template, "admitted").returncode == 0
  proc = _dry_run_pod(cluster, weaker, "weaker")
  assert proc.returncode != 0
  assert 'violates PodSecurity "restricted:latest"' in proc.stderr, proc.stderr


def test_jobset_overlay_without_the_jobset_crd(cluster, tmp_path):
  """What the README says happens: a server-side dry run fails at once; a real apply creates the
  harmless objects (namespace, service account, ConfigMaps, policies, TensorBoard) and reports
  that the API server has no JobSet kind."""
  assert cluster.get("crd/jobsets.jobset.x-k8s.io", namespace=None, check=False) is None
  cluster.delete_namespace()  # left by the Pod Security tests' fixture, if any
  target = prepare(tmp_path, "jobset", "localhost/mnist-distill:any", "gs://bucket/run",
                   components=())
  dry = cluster.kubectl("apply", "--dry-run=server", "-k", str(target), check=False)
  assert dry.returncode != 0
  assert 'no matches for kind "JobSet" in version "jobset.x-k8s.io/v1alpha2"' in dry.stderr
  assert cluster.get(f"namespace/{NAMESPACE}", namespace=None, check=False) is None
  try:
    proc = cluster.kubectl("apply", "-k", str(target), check=False)
    assert proc.returncode == 1
    assert 'no matches for kind "JobSet" in version "jobset.x-k8s.io/v1alpha2"' in proc.stderr
    assert "ensure CRDs are installed first" in proc.stderr
    created = cluster.get("configmaps,serviceaccounts,deployments,networkpolicies")["items"]
    kinds = {item["kind"] for item in created}
    assert {"ConfigMap", "ServiceAccount", "Deployment", "NetworkPolicy"} <= kinds, kinds
    assert not cluster.get("jobs")["items"]  # nothing trains, nothing asks for a GPU
  finally:
    cluster.delete_namespace()


def test_the_cluster_has_no_way_out(cluster):
  """Containment: the cluster's network namespace holds loopback (with the node address), the
  pods' bridge and its veths, and nothing else: no link out, no default route."""
  links = json.loads(subprocess.run(cluster.in_netns(["ip", "-j", "link"]), check=True,
                                    capture_output=True, text=True).stdout)
  names = {link["ifname"] for link in links}
  assert names <= {"lo", "cni0"} | {n for n in names if n.startswith("veth")}, names
  routes = json.loads(subprocess.run(cluster.in_netns(["ip", "-j", "route"]), check=True,
                                     capture_output=True, text=True).stdout)
  assert not [r for r in routes if r.get("dst") == "default"], routes
  # Nothing outside is routable, whatever address a pod (routed through here) asks for.
  for address in ("1.1.1.1", "10.0.0.1", "192.168.1.1"):
    proc = subprocess.run(cluster.in_netns(["ip", "route", "get", address]),
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "unreachable" in proc.stderr, (address, proc.stdout)
