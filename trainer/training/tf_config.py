"""TF_CONFIG, read and checked without TensorFlow: the cluster and this process's task.

A malformed TF_CONFIG is bad input. TensorFlow finds most mistakes only once the strategy
starts, after the run folder was created, as a traceback and exit 1 (a task outside its
cluster, a second chief, an address without a port), and some never: with a duplicated
address, a port above 65535 or a `ps` job the process was still waiting after 90 s. So the
flags check it (trainer/flags.py), before anything is written, and a mistake is one line
naming the field (exit 2).

Only what this job runs is accepted: MultiWorkerMirroredStrategy with `chief` and `worker`
tasks (no parameter servers, no evaluator), each at one `host:port`.
"""

import dataclasses
import json
import os
import re
from typing import Dict, Optional, Tuple

from trainer.errors import UsageError

JOBS = ("chief", "worker")  # the task types MultiWorkerMirroredStrategy trains with
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])$")


@dataclasses.dataclass(frozen=True)
class Cluster:
  """The checked TF_CONFIG: addresses per job, and this process's task (None without one)."""

  jobs: Dict[str, Tuple[str, ...]]
  task_type: Optional[str]
  task_index: Optional[int]

  @property
  def workers(self) -> int:
    """Processes that train together (chief included)."""
    return sum(len(self.jobs.get(job, ())) for job in JOBS)


def _bad(why: str) -> UsageError:
  return UsageError(f"TF_CONFIG: {why}")


def _address_problem(address) -> Optional[str]:
  """Why `address` is not `host:port` with a port 1..65535, or None."""
  if not isinstance(address, str):
    return f"{json.dumps(address)} is not a \"host:port\" string"
  host, sep, port = address.rpartition(":")
  if not sep or not host:
    return f"{address!r} has no port (expected host:port, e.g. worker-0.run:2222)"
  if ":" in host and not host.startswith("["):
    return f"{address!r}: an IPv6 address goes in brackets, [ADDRESS]:PORT"
  if not _HOST_RE.match(host):
    return f"{address!r}: {host!r} is not a host name or IP address"
  if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
    return f"{address!r}: the port {port!r} is not a number from 1 to 65535"
  return None


def _index(raw) -> int:
  """The task index as TensorFlow reads it (an integer, or digits as a string)."""
  if isinstance(raw, bool) or not isinstance(raw, (int, str)):
    raise _bad(f"task index {json.dumps(raw)} is not an integer")
  text = str(raw).strip()
  if not re.fullmatch(r"-?[0-9]+", text):
    raise _bad(f"task index {json.dumps(raw)} is not an integer")
  return int(text)


def _jobs(cluster) -> Dict[str, Tuple[str, ...]]:
  if not isinstance(cluster, dict):
    raise _bad("\"cluster\" must be an object mapping chief/worker to lists of \"host:port\"")
  jobs, seen = {}, {}
  for job, addresses in cluster.items():
    if job not in JOBS:
      raise _bad(f"cluster job {job!r} is not supported: this job trains with "
                 "MultiWorkerMirroredStrategy, whose tasks are chief and worker only")
    if not isinstance(addresses, list):
      raise _bad(f"cluster.{job} must be a list of \"host:port\" addresses, got "
                 f"{json.dumps(addresses)[:60]}")
    for i, address in enumerate(addresses):
      why = _address_problem(address)
      if why:
        raise _bad(f"cluster.{job}[{i}] {why}")
      if address in seen:
        raise _bad(f"cluster.{job}[{i}] and {seen[address]} are both {address}: every task "
                   "needs an address of its own")
      seen[address] = f"cluster.{job}[{i}]"
    jobs[job] = tuple(addresses)
  if len(jobs.get("chief", ())) > 1:
    raise _bad(f"cluster.chief names {len(jobs['chief'])} tasks: there can be at most one chief")
  return jobs


def parse(environ=None) -> Optional[Cluster]:
  """The checked TF_CONFIG, or None when it is unset or empty; UsageError (one line) when
  it is malformed."""
  environ = os.environ if environ is None else environ
  raw = environ.get("TF_CONFIG", "")
  if not raw.strip():
    return None
  try:
    config = json.loads(raw)
  except ValueError as e:
    raise UsageError(f"TF_CONFIG is not valid JSON ({e})") from None
  if not isinstance(config, dict):
    raise _bad(f"expected a JSON object with \"cluster\" and \"task\", got {raw.strip()[:60]}")
  jobs = _jobs(config.get("cluster") or {})
  task = config.get("task")
  if not any(jobs.values()):
    return Cluster(jobs=jobs, task_type=None, task_index=None)  # no cluster: a local run
  if not isinstance(task, dict) or "type" not in task or "index" not in task:
    raise _bad("a cluster needs this process's task: \"task\": {\"type\": \"worker\", "
               "\"index\": N}")
  task_type, index = task["type"], _index(task["index"])
  if task_type not in jobs:
    raise _bad(f"task type {json.dumps(task_type)} is not in the cluster (its jobs: "
               f"{', '.join(sorted(jobs))})")
  count = len(jobs[task_type])
  if not count:
    raise _bad(f"task type {task_type!r} has no addresses in the cluster (cluster.{task_type} "
               "is empty)")
  if not 0 <= index < count:
    raise _bad(f"task index {index} is out of range: cluster.{task_type} has {count} "
               f"task{'s' if count != 1 else ''} (index 0..{count - 1})")
  return Cluster(jobs=jobs, task_type=task_type, task_index=index)


def worker_count(environ=None) -> int:
  """Workers (chief included) that TF_CONFIG names; 0 without TF_CONFIG."""
  cluster = parse(environ)
  return cluster.workers if cluster is not None else 0
