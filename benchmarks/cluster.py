"""`kubectl apply` to the first epoch line and to `Complete`, on the local Kubernetes cluster.

    python -m benchmarks.cluster --image=IMAGE --idx_dir=DATA [--overlays=cpu-smoke,base]

Needs the cluster of scripts/local_cluster.sh up and IMAGE, the CPU image, loaded into its node
(`local_cluster.sh load IMAGE`): the node is warm, as for a user's second run. Each overlay is
applied as a user applies it (docs/operations/local-cluster.md): a copy of k8s/ with the images
and MODEL_DIR set, by the drivers of tests/cluster/ (one way to apply an overlay, kept in one
place).

- cpu-smoke: as shipped, its run folder on a hostPath volume that holds MNIST
  (`--idx_dir=/runs/mnist`, the documented example); `--runs` times.
- base (the default job, its flags untouched): the bucket on the GCS emulator inside the
  cluster's network namespace, with the tests' local-cluster component (requests for one 2-core
  node, the emulator's address); once (it trains for about ten minutes).

The clock starts as `kubectl apply` is spawned (the host's clock, which the node shares). The first
epoch line's time is the one the container runtime stamped on it (`kubectl logs --timestamps`,
read after the run, so that no polling loads the node's two cores); `Complete` is when a
`kubectl wait` watching the Job returns. Beside them, where the first seconds went: the trainer
container's start (the API's, to the second) and its first log line.
"""

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import emit

REPO = Path(__file__).resolve().parents[1]
FIRST_EPOCH = "teacher epoch 1/"
OVERLAYS = ("cpu-smoke", "base")


def _drivers():
  """The cluster drivers of the tests (tests/cluster/local_cluster.py, and the emulator they
  use), imported only when a cluster is measured: `python -m benchmarks` without one never puts
  tests/ on its path (appended, so that nothing of tests/ shadows an installed module)."""
  for folder in (REPO / "tests", REPO / "tests" / "cluster"):
    if str(folder) not in sys.path:
      sys.path.append(str(folder))
  import local_cluster  # pylint: disable=import-outside-toplevel
  return local_cluster


def cluster_up() -> bool:
  """Whether scripts/local_cluster.sh reports a running cluster (its status exits 0)."""
  return subprocess.run(["bash", str(REPO / "scripts" / "local_cluster.sh"), "status"],
                        capture_output=True, timeout=60, check=False).returncode == 0


def _stamp(line: str):
  """(epoch seconds, text) of a `kubectl logs --timestamps` line (RFC 3339, nanoseconds)."""
  stamp, _, text = line.partition(" ")
  whole, _, fraction = stamp.rstrip("Z").partition(".")
  seconds = datetime.datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(
      tzinfo=datetime.timezone.utc).timestamp()
  return seconds + float(f"0.{fraction or 0}"), text


def _api_time(value):
  return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(
      tzinfo=datetime.timezone.utc).timestamp() if value else None


def _wait_finished(cluster, timeout):
  """Blocks until job/mnist-distill is Complete or Failed (two watches, no polling of the API);
  returns (condition, epoch seconds when seen)."""
  lc = _drivers()
  waits = {kind: subprocess.Popen(
      cluster.in_netns(cluster.kubectl_argv(
          "wait", f"--for=condition={kind}", "job/mnist-distill", "-n",
          lc.NAMESPACE, f"--timeout={timeout}s")),
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for kind in ("complete", "failed")}
  try:
    while True:
      for kind, proc in waits.items():
        if proc.poll() == 0:
          return kind, time.time()
      if all(proc.poll() is not None for proc in waits.values()):
        return "timeout", time.time()
      time.sleep(0.05)
  finally:
    for proc in waits.values():
      if proc.poll() is None:
        proc.kill()
      proc.wait()


def run_once(cluster, target: Path, timeout=3600) -> dict:
  """Applies the overlay folder `target`, waits for the Job to finish; its figures (seconds
  after `kubectl apply` was spawned)."""
  started = time.time()
  cluster.kubectl("apply", "-k", str(target))
  outcome, finished = _wait_finished(cluster, timeout)
  pods = cluster.get("pods -l job-name=mnist-distill")["items"]
  found = {"outcome": outcome, "apply_to_finished_s": finished - started, "pods": len(pods)}
  if not pods:
    return found
  pod = pods[0]
  lines = [_stamp(line) for line in cluster.logs(pod["metadata"]["name"], timestamps=True)
           .splitlines() if line.strip()]
  epoch = next((t for t, text in lines if FIRST_EPOCH in text), None)
  found["apply_to_first_epoch_s"] = epoch - started if epoch else None
  found["apply_to_first_log_line_s"] = lines[0][0] - started if lines else None
  for status in pod["status"].get("containerStatuses", []):
    if status["name"] == "trainer":
      state = status.get("state", {}).get("terminated") or {}
      begun = _api_time(state.get("startedAt"))
      found["apply_to_trainer_start_s"] = begun - started if begun else None
  return found


def _smoke_volume(cluster, folder: Path, idx_dir) -> None:
  """cpu-smoke's claim bound to a hostPath PersistentVolume on `folder`, which holds MNIST
  under mnist/ (the documented local-cluster example)."""
  lc = _drivers()
  (folder / "mnist").mkdir(parents=True)
  for name in lc.IDX_FILES:
    shutil.copy(os.path.join(idx_dir, name), folder / "mnist" / name)
  for path in (folder, folder / "mnist", *(folder / "mnist").iterdir()):
    os.chown(path, 10001, 10001)  # the image's user; hostPath gets no fsGroup change
  volume = {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": "mnist-distill-runs-bench"},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                     "persistentVolumeReclaimPolicy": "Retain",
                     "hostPath": {"path": str(folder)},
                     "claimRef": {"namespace": lc.NAMESPACE,
                                  "name": "mnist-distill-runs"}}}
  cluster.kubectl("apply", "-f", "-", input=json.dumps(volume))


def measure_smoke(cluster, image, idx_dir, workdir: Path, runs: int) -> list:
  """cpu-smoke as shipped, `runs` times, each from a clean namespace and an empty volume."""
  lc = _drivers()
  found = []
  for turn in range(runs):
    folder = Path(tempfile.mkdtemp(prefix=f"smoke-{turn}-", dir=workdir))
    try:
      _smoke_volume(cluster, folder / "runs", idx_dir)
      target = lc.prepare(folder, "cpu-smoke", image, "/runs/smoke", components=())
      flags = target / "smoke-flags.txt"
      flags.write_text(flags.read_text() + "--idx_dir=/runs/mnist\n")
      found.append(run_once(cluster, target, timeout=900))
    finally:
      cluster.delete_namespace()
      cluster.kubectl("delete", "pv", "mnist-distill-runs-bench", "--ignore-not-found",
                      "--wait=true", timeout=120)
    print(f"cluster, cpu-smoke run {turn + 1}/{runs}: " + _describe(found[-1]), file=sys.stderr,
          flush=True)
  return found


def measure_default(cluster, image, idx_dir, workdir: Path) -> dict:
  """k8s/base (the default job, untouched flags) once, its bucket on the emulator."""
  lc = _drivers()
  folder = Path(tempfile.mkdtemp(prefix="default-", dir=workdir))
  tls = lc.make_google_tls(folder)
  with lc.serve_bucket(cluster, tls, idx_dir):
    try:
      target = lc.prepare(
          folder, "base", image, f"gs://{lc.BUCKET}/runs/bench-{int(time.time())}",
          files={"local-cluster/ca.crt": tls[0].read_bytes()})
      found = run_once(cluster, target, timeout=3600)
    finally:
      cluster.delete_namespace()
  print("cluster, k8s/base: " + _describe(found), file=sys.stderr, flush=True)
  return found


def measure(image, idx_dir, workdir, overlays=("cpu-smoke",), runs=3) -> dict:
  """{overlay: [figures of each run]} on the running local cluster."""
  lc = _drivers()
  cluster = lc.Cluster()
  workdir = Path(workdir) / "cluster"
  workdir.mkdir(parents=True, exist_ok=True)
  found = {}
  if "cpu-smoke" in overlays:
    found["cpu-smoke"] = measure_smoke(cluster, image, idx_dir, workdir, runs)
  if "base" in overlays:
    found["base"] = [measure_default(cluster, image, idx_dir, workdir)]
  return found


def _seconds(value) -> str:
  return "-" if value is None else f"{value:.1f} s"


def _describe(run: dict) -> str:
  figures = (("trainer started", "apply_to_trainer_start_s"),
             ("its first line", "apply_to_first_log_line_s"),
             ("first epoch line", "apply_to_first_epoch_s"), ("finished", "apply_to_finished_s"))
  return f"{run['outcome']}; apply -> " + ", ".join(
      f"{label} {_seconds(run.get(key))}" for label, key in figures)


def _median(runs, key):
  values = [r.get(key) for r in runs if r.get(key) is not None]
  return statistics.median(values) if values else None


def report_lines(found: dict, target_first_epoch=5.0) -> list:
  """The benchmark's lines: per overlay, medians and every run's figures."""
  lines = []
  names = {"cpu-smoke": "`k8s/overlays/cpu-smoke`", "base": "`k8s/base` (the default job)"}
  for overlay, runs in found.items():
    epoch = _median(runs, "apply_to_first_epoch_s")
    done = _median(runs, "apply_to_finished_s")
    failed = [r["outcome"] for r in runs if r["outcome"] != "complete"]
    line = (f"- cluster, {names[overlay]}: kubectl apply -> first epoch line {_seconds(epoch)}, "
            f"-> Complete {_seconds(done)} (median of {len(runs)}; warm node, image present)")
    if overlay == "cpu-smoke" and epoch is not None:
      line += (f"; target <= {target_first_epoch:g} s: "
               + ("met" if epoch <= target_first_epoch else "MISSED"))
    lines.append(line)
    lines.append("  where the first seconds go (median): trainer container started "
                 f"{_seconds(_median(runs, 'apply_to_trainer_start_s'))} (to the second), its "
                 f"first log line {_seconds(_median(runs, 'apply_to_first_log_line_s'))}")
    lines += [f"  FAILED: run {i + 1}: {o}" for i, o in enumerate(failed)]
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--image", required=True, help="the CPU image, loaded into the node")
  parser.add_argument("--idx_dir", default=os.environ.get("MNIST_DIR"))
  parser.add_argument("--overlays", default="cpu-smoke",
                      help=f"comma-separated, of {', '.join(OVERLAYS)}")
  parser.add_argument("--runs", type=int, default=3, help="cpu-smoke runs (median)")
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--json_out", default=None)
  args = parser.parse_args(argv)
  overlays = [o for o in args.overlays.split(",") if o]
  if not args.idx_dir or set(overlays) - set(OVERLAYS) or args.runs < 1:
    parser.error(f"need --idx_dir, --overlays from {OVERLAYS} and --runs >= 1")
  if not cluster_up():
    parser.error("no local cluster is up: bash scripts/local_cluster.sh up")
  found = measure(args.image, args.idx_dir, args.workdir or tempfile.mkdtemp(), overlays,
                  args.runs)
  return emit(report_lines(found), found, args.json_out)


if __name__ == "__main__":
  sys.exit(main())
