"""Fixtures shared by the whole test suite."""

from gcs_emulator import gcs_emulator_fixture

# A running GCS emulator with bucket "test-bucket" and STORAGE_EMULATOR_HOST set (see
# tests/gcs_emulator.py; build one with another bucket or scope with gcs_emulator_fixture()).
gcs_emulator = gcs_emulator_fixture()


import os  # noqa: E402

import pytest  # noqa: E402

from helpers import FASHION_MNIST_DIR, MNIST_DIR, SMOKE_ARGS, run_cli  # noqa: E402

# The CPU image, built once a session (tests/image_build.py).
from image_build import cpu_image, debootstrap_base  # noqa: E402, F401


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
  """A finished default job (teacher + 3 students) on a small real-MNIST subset."""
  model_dir = tmp_path_factory.mktemp("smoke") / "run"
  proc = run_cli([f"--model_dir={model_dir}", *SMOKE_ARGS])  # a fresh process: its thread
  assert proc.returncode == 0, proc.stderr[-4000:]  # settings are the job's own (results.json)
  return {"model_dir": str(model_dir), "stderr": proc.stderr, "stdout": proc.stdout,
          "args": SMOKE_ARGS}


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory):
  """A tfds data_dir with mnist and fashion_mnist prepared offline by tfds' real code path.

  tfds cannot download here, so its builders read the canonical IDX files from manual_dir
  (the .gz bytes differ from the ones tfds registered, hence register_checksums).
  """
  import tensorflow_datasets as tfds
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  for name, folder in (("mnist", MNIST_DIR), ("fashion_mnist", FASHION_MNIST_DIR)):
    builder = tfds.builder(name, data_dir=data_dir)
    # One download dir per dataset: tfds names manual files' extractions by file name, and
    # MNIST and Fashion-MNIST share their file names.
    builder.download_and_prepare(
        download_dir=os.path.join(data_dir, "downloads", name),
        download_config=tfds.download.DownloadConfig(manual_dir=folder, register_checksums=True))
    assert builder.is_prepared()
  return data_dir



# The suite runs on two pytest-xdist workers (scripts/test.sh: -n 2): much of it waits on
# subprocesses, sleeps and I/O, and one process leaves a core idle. Each module is one unit of
# work, so that its module fixtures are built once; modules sharing a costly session fixture form
# one unit, so that it is built once too. Units are handed out longest first (measured on a
# 2-core machine), which keeps the two workers' shares even. (xdist's own --dist=loadgroup
# cannot do this under pytest 9.2: it renames item._nodeid, which pytest no longer reads.)
_SHARED_FIXTURE_UNITS = {"test_job": "smoke_run", "test_results": "smoke_run",
                         "test_tensorboard": "smoke_run", "test_tfds": "tfds",
                         "test_transfer_set": "tfds", "test_image": "image"}
# tests/cluster/ (the local Kubernetes cluster and the CPU image it runs) is one unit with
# tests/test_image.py: the image is built once, and the cluster's modules run in file order.
_CLUSTER_PREFIX = "test_cluster_"
_LONGEST_FIRST = ("image", "smoke_run", "test_bucket_job", "tfds", "test_multi_worker",
                  "test_resume", "test_benchmark", "test_precision", "test_augment_job",
                  "test_k8s", "test_k8s_versions", "test_rerun", "test_report_mode",
                  "test_distribution", "test_teacher_and_transfer", "test_one_writer",
                  "test_teacher_logits", "test_peer_loss")


def _unit(nodeid: str) -> str:
  module = os.path.splitext(os.path.basename(nodeid.split("::", 1)[0]))[0]
  if module.startswith(_CLUSTER_PREFIX):
    return "image"
  return _SHARED_FIXTURE_UNITS.get(module, module)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(_unit(item.nodeid), len(rank)))  # stable otherwise


def pytest_xdist_make_scheduler(config, log):
  from xdist.scheduler import LoadScopeScheduling

  class ByUnit(LoadScopeScheduling):
    def _split_scope(self, nodeid):
      return _unit(nodeid)

  config.option.loadscopereorder = False  # keep the longest-first order above
  return ByUnit(config, log)
