"""Failures on the real cluster, and what the shipped failure policies make of them:
- the trainer pod evicted through the Eviction API mid-epoch: replaced, not counted as a failure,
  the replacement resumes from the checkpoint, and with --deterministic the results equal an
  undisturbed run's;
- one worker pod of the JobSet's multi-worker teacher deleted mid-training: the JobSet restarts
  the group (not counted against maxRestarts) and the run finishes;
- a flag file with a bad value: the container exits 2 and the Job fails at once (reason
  PodFailurePolicy, no retry); the JobSet fails at once too (its BadInput rule);
- the bucket gone mid-run: exit 3, counted against backoffLimit, the replacement resumes.
The one-pod Job's tests come first: the JobSet's dress the node as a tainted GPU node (gpu_node),
where the one-pod Job of k8s/base could not land until the module ends."""

import json
import re
import time

import pytest

from local_cluster import BUCKET, NAMESPACE, condition, finished, prepare

RESUMED = re.compile(r"Resumed from \S+ \(epoch (\d+), step (\d+)\)")
STEPS_PER_EPOCH = 16384 // 64  # components/resumable: --max_train_examples over --batch_size


def _apply(cluster, tmp_path, overlay, image, ca, run, components):
  target = prepare(tmp_path, overlay, image, f"gs://{BUCKET}/runs/{run}",
                   components=("local-cluster", *components),
                   files={"local-cluster/ca.crt": ca.read_bytes()})
  cluster.kubectl("apply", "-k", str(target))


def _pods(cluster, selector):
  return cluster.get(f"pods -l {selector}")["items"]


def _accuracies(bucket, run):
  results = json.loads(bucket.read(f"runs/{run}/results.json"))
  return {m["name"]: (m["test_accuracy"], m["test_errors"]) for m in results["models"]}


def _training(cluster, pod, pattern=r"teacher epoch 1/"):
  """True once the pod's trainer logs `pattern` (it is past start-up and mid-training)."""
  return re.search(pattern, cluster.logs(pod) or "")


def _restorable(bucket, folder):
  """True once the bucket holds TensorFlow's `checkpoint` file in folder and the checkpoint it
  names (what a replacement pod restores)."""
  objects = bucket.objects(folder)
  if folder + "checkpoint" not in objects:
    return False
  named = re.search(rb'model_checkpoint_path: "([^"]+)"', bucket.read(folder + "checkpoint"))
  name = named and named.group(1).decode().rsplit("/", 1)[-1]
  return bool(name) and f"{folder}{name}.index" in objects


@pytest.fixture(scope="module")
def undisturbed(cluster, cluster_image, bucket, google_tls, tmp_path_factory):
  """The reference: the same short deterministic run, left alone."""
  try:
    _apply(cluster, tmp_path_factory.mktemp("undisturbed"), "base", cluster_image,
           google_tls[0], "undisturbed", ("short-run", "resumable"))
    job = finished(cluster)
    assert condition(job, "Complete"), cluster.describe()
    return _accuracies(bucket, "undisturbed")
  finally:
    cluster.delete_namespace()


def test_an_evicted_pod_is_replaced_resumes_and_matches_an_undisturbed_run(
    cluster, cluster_image, bucket, google_tls, undisturbed, tmp_path):
  try:
    _apply(cluster, tmp_path, "base", cluster_image, google_tls[0], "evicted",
           ("short-run", "resumable"))
    first = cluster.wait_until("the trainer pod", lambda: _pods(cluster, "job-name=mnist-distill"),
                               120)[0]["metadata"]["name"]
    # Mid-epoch: the teacher's first epoch is done and its second has begun (2 epochs of 256
    # steps; the trainer checks for SIGTERM every 50 steps and checkpoints where it stops).
    cluster.wait_until("the teacher's first epoch", lambda: _training(cluster, first), 900, 0.5)
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": first, "namespace": NAMESPACE}}
    cluster.kubectl("create", "--raw",
                    f"/api/v1/namespaces/{NAMESPACE}/pods/{first}/eviction", "-f", "-",
                    input=json.dumps(eviction))
    job = finished(cluster)
    assert condition(job, "Complete"), cluster.describe()
    assert not job["status"].get("failed"), job["status"]  # the Ignore rule: not counted
    # An eviction deletes the pod: only its replacement is left.
    [replacement] = [p["metadata"]["name"] for p in _pods(cluster, "job-name=mnist-distill")]
    assert replacement != first
    resumed = RESUMED.search(cluster.logs(replacement))
    assert resumed, cluster.logs(replacement)[-3000:]
    epoch, step = int(resumed.group(1)), int(resumed.group(2))
    assert step % STEPS_PER_EPOCH, f"resumed at an epoch boundary (epoch {epoch}, step {step})"
    assert _accuracies(bucket, "evicted") == undisturbed
  finally:
    cluster.delete_namespace()


def test_a_bad_flag_fails_the_job_at_once(cluster, cluster_image, bucket, google_tls, tmp_path):
  try:
    _apply(cluster, tmp_path, "base", cluster_image, google_tls[0], "bad-flag", ("bad-flags",))
    job = finished(cluster, timeout=600)
    failed = condition(job, "Failed")
    assert failed and failed["reason"] == "PodFailurePolicy", job["status"]
    assert "failed with exit code 2 matching FailJob rule at index 0" in failed["message"]
    time.sleep(5)  # a retry would have been created by now
    pods = _pods(cluster, "job-name=mnist-distill")
    assert len(pods) == 1 and job["status"].get("failed") == 1, job["status"]
    terminated = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 2
    assert not bucket.objects("runs/bad-flag/")  # refused before writing anything
  finally:
    cluster.delete_namespace()


def test_a_bucket_outage_is_retried_counted_and_resumed(cluster, cluster_image, bucket,
                                                        google_tls, tmp_path):
  """The bucket goes away mid-run: the trainer exits 3 once its retries are spent, the Job counts
  that failure and starts a replacement, which resumes from the checkpoint the bucket holds."""
  try:
    _apply(cluster, tmp_path, "base", cluster_image, google_tls[0], "outage",
           ("short-run", "resumable", "outage"))
    first = cluster.wait_until("the trainer pod", lambda: _pods(cluster, "job-name=mnist-distill"),
                               120)[0]["metadata"]["name"]
    # The outage starts once the bucket holds a checkpoint of the unfinished teacher (read from
    # the emulator's memory, without kubectl's delay): the epoch line comes before its checkpoint
    # is uploaded, and a fast trainer can finish the teacher while a log is being fetched.
    cluster.wait_until("a teacher checkpoint in the bucket",
                       lambda: _restorable(bucket, "runs/outage/teacher/checkpoints/"), 900, 0.05)
    bucket.stop()
    assert "runs/outage/teacher/result.json" not in bucket.objects("runs/outage/teacher/")
    try:
      state = cluster.wait_until("the trainer to give up", lambda: cluster.get(
          f"pod/{first}")["status"].get("containerStatuses", [{}])[0].get("state", {}).get(
              "terminated"), 300, every=0.25)
    finally:
      bucket.start()  # before the replacement's first look at the bucket
    assert state["exitCode"] == 3, state
    job = finished(cluster)
    assert condition(job, "Complete"), cluster.describe()
    assert job["status"].get("failed") == 1, job["status"]  # counted against backoffLimit
    pods = _pods(cluster, "job-name=mnist-distill")
    replacement = next(p["metadata"]["name"] for p in pods if p["metadata"]["name"] != first)
    assert RESUMED.search(cluster.logs(replacement)), cluster.logs(replacement)[-3000:]
    assert len(_accuracies(bucket, "outage")) == 4
  finally:
    bucket.start()
    cluster.delete_namespace()


def test_a_deleted_worker_restarts_the_group_and_the_run_finishes(
    cluster, jobset, gpu_node, cluster_image, bucket, google_tls, tmp_path):
  try:
    _apply(cluster, tmp_path, "jobset", cluster_image, google_tls[0], "worker-lost",
           ("short-run", "resumable"))
    selector = "jobset.sigs.k8s.io/replicatedjob-name=teacher"
    workers = cluster.wait_until("two teacher workers",
                                 lambda: (lambda p: p if len(p) == 2 else None)(
                                     _pods(cluster, selector)), 300)
    victim = sorted(p["metadata"]["name"] for p in workers)[1]
    cluster.wait_until("the workers training", lambda: _training(cluster, victim), 900, 0.5)
    cluster.kubectl("delete", "pod", victim, "-n", NAMESPACE, "--wait=false")
    jobset_obj = finished(cluster, "jobset/mnist-distill", timeout=1800)
    assert condition(jobset_obj, "Completed"), cluster.describe()
    status = jobset_obj["status"]
    assert status.get("restarts", 0) >= 1, status  # the whole group was recreated ...
    # ... as a disruption, not counted (the events say which Job failure reason counted)
    assert not status.get("restartsCountTowardsMax"), (status, cluster.describe())
    assert len(_accuracies(bucket, "worker-lost")) == 4
  finally:
    cluster.delete_namespace()


def test_a_bad_flag_fails_the_jobset_at_once(cluster, jobset, gpu_node, cluster_image, bucket,
                                            google_tls, tmp_path):
  try:
    _apply(cluster, tmp_path, "jobset", cluster_image, google_tls[0], "bad-flag-jobset",
           ("bad-flags",))
    jobset_obj = finished(cluster, "jobset/mnist-distill", timeout=600)
    failed = condition(jobset_obj, "Failed")
    assert failed, jobset_obj["status"]
    assert failed["reason"] == "FailJobSetFailurePolicyAction", failed
    assert "first failed job: mnist-distill-teacher-0" in failed["message"], failed
    teacher = condition(cluster.get("job/mnist-distill-teacher-0"), "Failed")
    assert teacher["reason"] == "PodFailurePolicy", teacher
    assert "failed with exit code 2 matching FailJob rule at index 0" in teacher["message"]
    assert not jobset_obj["status"].get("restarts"), jobset_obj["status"]
    assert "students" not in {j["metadata"]["labels"].get(
        "jobset.sigs.k8s.io/replicatedjob-name") for j in cluster.get("jobs")["items"]}
  finally:
    cluster.delete_namespace()
