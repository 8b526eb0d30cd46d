"""Fixtures shared by the whole test suite."""

from gcs_emulator import gcs_emulator_fixture

# A running GCS emulator with bucket "test-bucket" and STORAGE_EMULATOR_HOST set (see
# tests/gcs_emulator.py; build one with another bucket or scope with gcs_emulator_fixture()).
gcs_emulator = gcs_emulator_fixture()


import os  # noqa: E402

import pytest  # noqa: E402

from helpers import FASHION_MNIST_DIR, MNIST_DIR, SMOKE_ARGS, run_cli  # noqa: E402


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
  """A finished default job (teacher + 3 students) on a small real-MNIST subset."""
  model_dir = tmp_path_factory.mktemp("smoke") / "run"
  proc = run_cli([f"--model_dir={model_dir}", *SMOKE_ARGS])  # a fresh process: its thread
  assert proc.returncode == 0, proc.stderr[-4000:]  # settings are the job's own (results.json)
  return {"model_dir": str(model_dir), "stderr": proc.stderr, "args": SMOKE_ARGS}


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
