"""The JobSet overlay under the real JobSet controller (v0.12.0, from its module's own manifests):
the teacher's two workers find each other through the JobSet's headless Service and train with
MultiWorkerMirroredStrategy; the students' Jobs exist only once the teacher's Job is Complete
(dependsOn); every student completes. Short runs (tests/cluster/components/short-run)."""

import copy
import json
import re
import time
from datetime import datetime

import pytest
import yaml

from local_cluster import BUCKET, condition, prepare, record

RUN = "jobset"


def _time(stamp):
  return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def jobs_by_role(cluster):
  items = cluster.get("jobs")["items"]
  return {j["metadata"]["labels"].get("jobset.sigs.k8s.io/replicatedjob-name"): j for j in items}


@pytest.fixture(scope="module")
def jobset_run(cluster, jobset, cluster_image, bucket, google_tls, gpu_node, tmp_path_factory):
  target = prepare(tmp_path_factory.mktemp("jobset"), "jobset", cluster_image,
                   f"gs://{BUCKET}/runs/{RUN}", components=("local-cluster", "short-run"),
                   files={"local-cluster/ca.crt": google_tls[0].read_bytes()})
  started = time.monotonic()
  cluster.kubectl("apply", "-k", str(target))
  # Watch the whole run: whenever the students' Job exists, the teacher's must be Complete.
  early, teacher_logs = [], {}
  deadline = time.monotonic() + 1500
  while True:
    jobs = jobs_by_role(cluster)
    if "students" in jobs and not condition(jobs.get("teacher"), "Complete"):
      early.append(jobs["students"]["metadata"]["creationTimestamp"])
    for pod in cluster.get("pods -l jobset.sigs.k8s.io/replicatedjob-name=teacher")["items"]:
      name = pod["metadata"]["name"]
      if pod["status"].get("phase") in ("Running", "Succeeded"):
        teacher_logs[name] = cluster.logs(name) or teacher_logs.get(name, "")
    jobset_obj = cluster.get("jobset/mnist-distill")
    if condition(jobset_obj, "Completed") or condition(jobset_obj, "Failed"):
      break
    assert time.monotonic() < deadline, cluster.describe()
    time.sleep(1)
  record(what="jobset overlay, short run", apply_to_completed_s=round(time.monotonic() - started,
                                                                       1))
  try:
    yield {"jobset": jobset_obj, "jobs": jobs_by_role(cluster), "early": early,
           "teacher_logs": teacher_logs,
           "pods": cluster.get("pods -l jobset.sigs.k8s.io/jobset-name=mnist-distill")["items"]}
  finally:
    cluster.delete_namespace()


def test_the_jobset_completes(jobset_run):
  assert condition(jobset_run["jobset"], "Completed"), json.dumps(jobset_run["jobset"]["status"])
  assert not jobset_run["jobset"]["status"].get("restarts")


def test_students_are_created_only_after_the_teacher_completes(jobset_run):
  assert not jobset_run["early"], f"students' Job existed before the teacher completed: " \
                                  f"{jobset_run['early']}"
  teacher, students = jobset_run["jobs"]["teacher"], jobset_run["jobs"]["students"]
  completed = _time(teacher["status"]["completionTime"])
  created = _time(students["metadata"]["creationTimestamp"])
  assert created >= completed, (created, completed)


def test_every_student_completes_in_its_own_pod(jobset_run, bucket):
  students = jobset_run["jobs"]["students"]
  assert students["status"]["succeeded"] == students["spec"]["completions"] == 3
  results = json.loads(bucket.read(f"runs/{RUN}/results.json"))
  trained = {m["name"] for m in results["models"] if m.get("role") == "student"}
  assert len(trained) == 3, trained


def test_the_teachers_workers_train_together(jobset_run, bucket):
  logs = jobset_run["teacher_logs"]
  assert len(logs) == 2, list(logs)
  hosts = {f"mnist-distill-teacher-0-{i}.mnist-distill:2222" for i in (0, 1)}
  for name, text in logs.items():
    tf_config = json.loads(re.search(r"TF_CONFIG=(\{.*\})", text).group(1))
    assert set(tf_config["cluster"]["worker"]) == hosts, name
    # The trainer logs this once the workers' collective agreed on where to start.
    assert "All 2 workers start from epoch 0, step 0" in text, text[-3000:]
    assert re.search(r"teacher epoch 1/1:", text), text[-3000:]
  teacher = json.loads(bucket.read(f"runs/{RUN}/teacher/result.json"))
  assert teacher["test_examples"] == 512


def _broken(jobset, change):
  broken = copy.deepcopy(jobset)
  broken["metadata"]["namespace"] = "default"
  change(broken["spec"], broken)
  return broken


# What the JobSet API refuses (its webhooks, or its CRD's schema): each a small change to the
# shipped JobSet.
BROKEN = {
    "first replicatedJob depends on another": lambda s, _: s["replicatedJobs"][0].update(
        dependsOn=[{"name": "students", "status": "Complete"}]),
    "dependsOn status Succeeded": lambda s, _: s["replicatedJobs"][1]["dependsOn"][0].update(
        status="Succeeded"),
    "InOrder startup with dependsOn": lambda s, _: s.update(
        startupPolicy={"startupPolicyOrder": "InOrder"}),
    "rule name with a dash": lambda s, _: s["failurePolicy"]["rules"][0].update(name="bad-name"),
    "rule names not unique": lambda s, _: s["failurePolicy"]["rules"][1].update(
        name=s["failurePolicy"]["rules"][0]["name"]),
    "rule targets an unknown replicatedJob": lambda s, _: s["failurePolicy"]["rules"][1].update(
        targetReplicatedJobs=["nobody"]),
    "unknown job failure reason": lambda s, _: s["failurePolicy"]["rules"][0].update(
        onJobFailureReasons=["OOMKilled"]),
    "pod names over 63 characters": lambda _, js: js["metadata"].update(name="x" * 50),
}


def test_the_jobset_api_admits_the_shipped_jobset_and_refuses_broken_ones(cluster, jobset,
                                                                         tmp_path):
  target = prepare(tmp_path, "jobset", "localhost/mnist-distill:any", "gs://bucket/run",
                   components=())
  docs = yaml.safe_load_all(cluster.kubectl("kustomize", str(target)).stdout)
  shipped = next(d for d in docs if d and d["kind"] == "JobSet")
  ok = cluster.kubectl("create", "--dry-run=server", "-f", "-",
                       input=json.dumps(_broken(shipped, lambda s, js: None)), check=False)
  assert ok.returncode == 0, ok.stderr
  for what, change in BROKEN.items():
    proc = cluster.kubectl("create", "--dry-run=server", "-f", "-",
                           input=json.dumps(_broken(shipped, change)), check=False)
    assert proc.returncode != 0, f"admitted although {what}"
    assert "jobset" in proc.stderr.lower() or "invalid" in proc.stderr.lower(), proc.stderr
