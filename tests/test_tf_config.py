"""A malformed TF_CONFIG is bad input: exit 2, one line naming the mistake, nothing written.

Before, only invalid JSON was refused (after the run folder was created); a task outside its
cluster ended in TensorFlow's ValueError (exit 1), and a duplicated address, a port above 65535
or a `ps` job left the process waiting (each of these cases fails against that code)."""

import json
import os

import pytest

from trainer.errors import UsageError
from trainer.training import tf_config

from helpers import MNIST_DIR, error_lines, run_cli, tree_digest

WORKERS = ["127.0.0.1:1", "127.0.0.1:2"]


def _config(cluster, task_type="worker", index=0):
  return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


MALFORMED = {
    "index out of range": (_config({"worker": WORKERS}, index=5),
                           "task index 5 is out of range: cluster.worker has 2 tasks"),
    "negative index": (_config({"worker": WORKERS}, index=-1), "task index -1 is out of range"),
    "index not a number": (_config({"worker": WORKERS}, index="one"), "task index \"one\" is not"),
    "task type absent": (_config({"worker": WORKERS}, task_type="chief"),
                         "task type \"chief\" is not in the cluster"),
    "no port": (_config({"worker": ["127.0.0.1", "127.0.0.1:2"]}),
                "cluster.worker[0] '127.0.0.1' has no port"),
    "port not a number": (_config({"worker": ["127.0.0.1:1", "127.0.0.1:http"]}),
                          "cluster.worker[1] '127.0.0.1:http': the port 'http' is not"),
    "port too large": (_config({"worker": ["127.0.0.1:1", "127.0.0.1:70000"]}),
                       "the port '70000' is not a number from 1 to 65535"),
    "chief twice": (_config({"chief": ["127.0.0.1:1", "127.0.0.1:3"], "worker": ["127.0.0.1:2"]},
                            task_type="chief"),
                    "cluster.chief names 2 tasks: there can be at most one chief"),
    "one address twice": (_config({"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:1"]}),
                          "cluster.worker[0] and cluster.chief[0] are both 127.0.0.1:1"),
    "parameter servers": (_config({"worker": WORKERS, "ps": ["127.0.0.1:3"]}),
                          "cluster job 'ps' is not supported"),
    "no task": (json.dumps({"cluster": {"worker": WORKERS}}),
                "a cluster needs this process's task"),
    "not an object": ("[\"127.0.0.1:1\"]", "expected a JSON object"),
    "invalid JSON": ("{\"cluster\": ", "TF_CONFIG is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_tf_config_exits_2_before_anything_is_written(case, tmp_path):
  raw, message = MALFORMED[case]
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "keep.txt").write_text("earlier output")
  before = tree_digest(existing)
  for model_dir in (existing, tmp_path / "new"):
    # Timeout: before the check, TensorFlow's collectives could wait for a peer forever.
    proc = run_cli([f"--model_dir={model_dir}", f"--idx_dir={MNIST_DIR}", "--teacher_epochs=1",
                    "--max_train_examples=512"], timeout=180, TF_CONFIG=raw)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_lines(proc.stderr) == proc.stderr.strip().splitlines(), proc.stderr[-2000:]
    [line] = error_lines(proc.stderr)
    assert line.startswith("mnist-distill: error: TF_CONFIG") and message in line, line
  assert tree_digest(existing) == before and os.listdir(existing) == ["keep.txt"]
  assert not os.path.exists(tmp_path / "new")


@pytest.mark.parametrize("raw,workers,task", [
    (None, 0, None),
    ("", 0, None),
    (json.dumps({"cluster": {}}), 0, None),
    (_config({"worker": WORKERS}, index=1), 2, ("worker", 1)),
    (_config({"worker": WORKERS}, index="1"), 2, ("worker", 1)),  # TensorFlow reads int("1")
    (_config({"chief": ["chief-0.run:2222"], "worker": ["run-teacher-0-0.run:2222"]},
             task_type="chief"), 2, ("chief", 0)),
    (_config({"worker": ["[::1]:2222", "[::1]:2223", "10.0.0.7:2222"]}, index=2), 3,
     ("worker", 2)),
    (json.dumps({"cluster": {"chief": ["cmle-training-workerpool0-ab-0:2222"]},
                 "task": {"type": "chief", "index": 0, "trial": ""}, "environment": "cloud",
                 "job": {"workerPoolSpecs": []}}), 1, ("chief", 0)),  # Vertex AI's extra keys
])
def test_well_formed_tf_configs_are_read(raw, workers, task):
  environ = {} if raw is None else {"TF_CONFIG": raw}
  cluster = tf_config.parse(environ)
  assert tf_config.worker_count(environ) == workers
  assert (None if cluster is None or cluster.task_type is None
          else (cluster.task_type, cluster.task_index)) == task


def test_ipv6_without_brackets_is_named():
  with pytest.raises(UsageError, match=r"an IPv6 address goes in brackets"):
    tf_config.parse({"TF_CONFIG": _config({"worker": ["::1:2222"]})})
