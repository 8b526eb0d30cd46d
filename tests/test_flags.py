"""Every number and location a user can pass is checked before anything runs (trainer/flags.py)."""

import os
import subprocess
import sys

import pytest

from trainer.errors import UsageError

from helpers import cli_env, error_lines
from inprocess import parse

BAD_NUMBERS = {
    "--learning_rate=nan": "--learning_rate must be finite and > 0",
    "--learning_rate=inf": "--learning_rate must be finite and > 0",
    "--learning_rate=0": "--learning_rate must be finite and > 0",
    "--learning_rate=-1e-3": "--learning_rate must be finite and > 0",
    "--student_learning_rate=nan": "--student_learning_rate must be finite and > 0",
    "--student=s:alpha=0.5,temperature=inf": "temperature must be > 0 and finite",
    "--student=s:alpha=0.5,temperature=nan": "temperature must be > 0 and finite",
    "--student=s:alpha=nan": "alpha must be in [0, 1]",
    "--student=s:alpha=-0.1": "alpha must be in [0, 1]",
    "--student=s:alpha=1,mixup=nan": "mixup must be 0 (off) or in [0.1, 100]",
    "--student=s:alpha=1,mixup=inf": "mixup must be 0 (off) or in [0.1, 100]",
    "--student=s:alpha=1,mixup=0.05": "mixup must be 0 (off) or in [0.1, 100]",
    "--student=s:alpha=1,mixup=-1": "mixup must be 0 (off) or in [0.1, 100]",
    "--student=s:alpha=1,mixup=101": "mixup must be 0 (off) or in [0.1, 100]",
    "--student=s:alpha=0.5,mixup=1": "mixup needs alpha=1",
    "--seed=-1": "--seed",
    "--seed=4294967296": "--seed",
    "--teacher_epochs=0": "--teacher_epochs",
    "--student_epochs=10000000000": "--student_epochs must be at most",
    "--batch_size=0": "--batch_size",
    "--validation_examples=0": "--validation_examples must be > 0",
    "--num_cpu_devices=0": "--num_cpu_devices",
    "--checkpoint_every_steps=0": "--checkpoint_every_steps",
}


@pytest.mark.parametrize("arg", sorted(BAD_NUMBERS))
def test_bad_numbers_refused(arg):
  with pytest.raises(UsageError) as raised:
    parse([arg])
  assert BAD_NUMBERS[arg] in str(raised.value)


BAD_URLS = {
    "gs://": "no bucket name",
    "gs:/bucket/x": "two slashes",
    "gs:bucket": "gs://",
    "s3://bucket/x": "s3: URLs are not supported",
    "gcs://bucket/x": "gcs: URLs are not supported",
    "GS://bucket/x": "lower case",
    "gs://Bucket/x": "lower case",
    "gs://b/x": "bucket",  # too short a bucket name
    "gs://bucket/a/../b": "'..'",
    "gs://bucket//x": "empty",
}


@pytest.mark.parametrize("flag", ["model_dir", "teacher_dir", "idx_dir", "data_dir"])
@pytest.mark.parametrize("url", sorted(BAD_URLS))
def test_malformed_urls_refused_for_every_location_flag(flag, url):
  with pytest.raises(UsageError) as raised:
    parse([f"--{flag}={url}"])
  message = str(raised.value)
  assert message.startswith(f"--{flag}={url}: ") and BAD_URLS[url] in message, message


@pytest.mark.parametrize("variable", ["AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR",
                                      "AIP_TENSORBOARD_LOG_DIR"])
def test_malformed_vertex_variables_refused(variable, monkeypatch):
  monkeypatch.setenv(variable, "gs:/bucket/run")
  with pytest.raises(UsageError, match=rf"^\${variable}=gs:/bucket/run: .*two slashes"):
    parse([])


def test_valid_urls_and_local_paths_accepted():
  assert parse(["--model_dir=gs://my-bucket/runs/a/"]).model_dir == "gs://my-bucket/runs/a"
  assert parse(["--model_dir=gs://my-bucket"]).model_dir == "gs://my-bucket"
  assert parse(["--model_dir=runs/x:y"]).model_dir == "runs/x:y"  # no scheme: a local path


def test_cli_refuses_bucketless_url_and_creates_no_local_folder(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "trainer", "--model_dir=gs://"], cwd=tmp_path,
                        env=cli_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and "--model_dir=gs://: no bucket name" in lines[0], proc.stderr
  assert os.listdir(tmp_path) == []
