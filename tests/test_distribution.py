"""N replicas give the same update as one device on the same global batch."""

import json
import subprocess
import sys

import pytest

from trainer.errors import UsageError
from trainer.training import distribution

from helpers import MNIST_DIR, REPO, cli_env


@pytest.fixture(scope="module")
def equivalence():
  proc = subprocess.run([sys.executable, "tests/one_step_equivalence.py", MNIST_DIR], cwd=REPO,
                        env=cli_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["teacher", "distiller_cached", "distiller_online",
                                  "teacher_fused_adam"])
def test_mirrored_two_replicas_match_one_device(equivalence, kind):
  result = equivalence[kind]
  assert result["max_update"] > 1e-4  # the step really moved the weights
  assert result["replica_spread"] == 0.0  # every replica's copy got the same update
  # A loss averaged per replica instead of over the global batch would double the SGD update,
  # a difference of the order of max_update.
  assert result["max_weight_diff"] < 1e-5 * max(1.0, result["max_update"] * 100)
  assert result["loss_mirrored"] == pytest.approx(result["loss_one_device"], rel=1e-5)


def test_tf_config_worker_count():
  spec = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker",
                                                                          "index": 0}}
  assert distribution.tf_config_workers({"TF_CONFIG": json.dumps(spec)}) == 2
  assert distribution.tf_config_workers({}) == 0
  with pytest.raises(UsageError):
    distribution.tf_config_workers({"TF_CONFIG": "{not json"})
