"""The project's CPU image, built once per test session for the tests that run it.

The build cannot pull a base image or reach PyPI from inside, so it is done the offline way the
Dockerfile supports: a Debian bookworm base made with debootstrap (docker/make_debootstrap_base.sh)
and a wheelhouse filled on the host (docker/fill_wheelhouse.sh), both cached under
~/.cache/mnist-distill, then `scripts/build_image.sh --wheelhouse` with buildah (chroot isolation,
layer cache on). tests/test_image.py runs the image with buildah; tests/cluster/ runs it on the
local Kubernetes cluster. Both are one scheduling unit (tests/conftest.py), so it is built once.

Needs root, buildah and debootstrap (scripts/install_system_deps.sh installs them). Without them
the tests that need the image skip, except under CI=true, where they fail.
Set MNIST_DISTILL_IMAGE_NO_CACHE=1 to build without buildah's layer cache.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The tests use a tag of their own (several test runs may share this machine's image storage);
# CACHE_TAG keeps the last build, and with it buildah's layer cache, after they remove theirs.
TEST_TAG = f"localhost/mnist-distill-test:cpu-{os.getpid()}"
CACHE_TAG = "localhost/mnist-distill-test:cache"


def run(cmd, timeout=900, **kwargs):
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def tail(text, limit=4000):
  """The end of a tool's output for an assertion message, without pip's per-package noise."""
  ignored = "is ignored: it is neither a file nor a directory"
  lines = [line for line in text.splitlines() if ignored not in line]
  return "\n".join(lines)[-limit:]


def missing_or_fail(reason):
  if os.environ.get("CI", "").lower() == "true":
    pytest.fail(f"{reason} (CI must build the image: run scripts/install_system_deps.sh)")
  pytest.skip(reason)


def _need_build_tools():
  if os.geteuid() != 0:
    missing_or_fail("building the test image needs root (debootstrap, buildah storage)")
  for tool in ("buildah", "debootstrap", "unshare"):
    if not shutil.which(tool):
      missing_or_fail(f"{tool} is not installed")


@pytest.fixture(scope="session")
def debootstrap_base():
  """The debootstrap'ed Debian base image (cached: ~1 min the first time on a machine)."""
  _need_build_tools()
  started = time.monotonic()
  proc = run(["bash", str(REPO / "docker" / "make_debootstrap_base.sh")])
  assert proc.returncode == 0, tail(proc.stderr)
  print(f"debootstrap base: {time.monotonic() - started:.0f}s")
  return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def cpu_image(debootstrap_base):
  """Builds the CPU image from the debootstrap base and a host wheelhouse; yields its reference."""
  base = debootstrap_base
  timings = {}
  started = time.monotonic()
  proc = run(["bash", str(REPO / "docker" / "fill_wheelhouse.sh"), "--variant", "cpu"],
             env=dict(os.environ, PYTHON=sys.executable))
  assert proc.returncode == 0, tail(proc.stderr)
  wheelhouse = proc.stdout.strip().splitlines()[-1]
  timings["wheelhouse"] = time.monotonic() - started

  started = time.monotonic()
  cmd = ["bash", str(REPO / "scripts" / "build_image.sh"), "--tool", "buildah", "--variant",
         "cpu", "--base", base, "--wheelhouse", wheelhouse, "--tag", TEST_TAG]
  if os.environ.get("MNIST_DISTILL_IMAGE_NO_CACHE") != "1":
    cmd.append("--layers")
  proc = run(cmd, timeout=1500)
  assert proc.returncode == 0, tail(proc.stderr, 8000)
  assert proc.stdout.strip().splitlines()[-1] == TEST_TAG
  timings["build"] = time.monotonic() - started
  print("image timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
  proc = run(["buildah", "tag", TEST_TAG, CACHE_TAG])
  assert proc.returncode == 0, proc.stderr
  yield TEST_TAG
  # Removing only our tag keeps the image under CACHE_TAG, and so its untagged parents: buildah's
  # layer cache (the 2.5 GB dependency layer among them). Each code change leaves a small untagged
  # image behind; keep the storage bounded by dropping those older than three days (a later build
  # recreates what it still needs; images that others build on are refused and kept).
  run(["buildah", "rmi", TEST_TAG])
  proc = run(["buildah", "images", "--quiet", "--filter", "dangling=true", "--filter",
              "until=72h"])
  for image_id in proc.stdout.split():
    run(["buildah", "rmi", image_id])

