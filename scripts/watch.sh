#!/usr/bin/env bash
# Follows a submitted run: the Jobs' status, then the logs of the teacher's pods and of the
# students' pods (every index, prefixed with its pod name) until both Jobs have finished. Pods that
# are replaced after a preemption or a retry are picked up again.
#
# Usage: scripts/watch.sh [--namespace NS] [--once]
#   --once   print the status (Jobs, pods, failure reasons) and exit.
# Env: KUBECTL (default kubectl), POLL_SECONDS (default 10).
# Exit codes: 0 both Jobs complete, 1 a Job failed, 2 bad usage or no run in the namespace.
set -euo pipefail
kubectl=${KUBECTL:-kubectl}
namespace=mnist-distill
once=false
while [ $# -gt 0 ]; do
  case "$1" in
    --namespace) namespace=$2; shift 2 ;;
    --namespace=*) namespace=${1#*=}; shift ;;
    --once) once=true; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "watch: unknown argument $1" >&2; exit 2 ;;
  esac
done
k() { "$kubectl" --namespace "$namespace" "$@"; }
poll=${POLL_SECONDS:-10}

job_state() {  # Complete, Failed, Suspended, Missing, or Running
  local out
  if ! out=$(k get job "$1" -o 'jsonpath={.spec.suspend}{" "}{range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}' 2>/dev/null); then
    echo Missing; return
  fi
  case " $out " in
    *" Complete "*) echo Complete ;;
    *" Failed "*) echo Failed ;;
    " true "*) echo Suspended ;;
    *) echo Running ;;
  esac
}

status() {
  echo "== $(date -u +%H:%M:%SZ) namespace $namespace"
  k get jobs -l app.kubernetes.io/part-of=mnist-distill \
    -o 'custom-columns=JOB:.metadata.name,SUSPENDED:.spec.suspend,ACTIVE:.status.active,SUCCEEDED:.status.succeeded,FAILED:.status.failed,COMPLETED-INDEXES:.status.completedIndexes,FAILED-INDEXES:.status.failedIndexes' || true
  k get pods -l app.kubernetes.io/part-of=mnist-distill -o wide 2>/dev/null || true
  local job
  for job in mnist-distill-teacher mnist-distill-students; do
    if [ "$(job_state "$job")" = Failed ]; then
      echo "-- $job failed:"
      k get job "$job" -o 'jsonpath={range .status.conditions[?(@.type=="Failed")]}{.reason}: {.message}{"\n"}{end}' || true
      # The last words of its failed pods (exit code 2 = bad flags/config: fix and resubmit;
      # others were retried up to the backoff limit).
      k get pods -l "batch.kubernetes.io/job-name=$job" --field-selector=status.phase=Failed \
        -o 'jsonpath={range .items[*]}{.metadata.name}{" exit "}{.status.containerStatuses[0].state.terminated.exitCode}{"\n"}{end}' || true
    fi
  done
}

declare -A seen=()
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
follow() {  # follow the logs of every pod of one Job (retries included) until the Job finishes
  local job=$1 state entry name phase told=""
  while :; do
    state=$(job_state "$job")
    case "$state" in
      Missing) echo "== job/$job does not exist"; return 0 ;;
      Suspended)
        [ -n "$told" ] || echo "== job/$job is suspended until the teacher completes (scripts/submit.sh resumes it)"
        told=1; sleep "$poll"; continue ;;
    esac
    for entry in $(k get pods -l "batch.kubernetes.io/job-name=$job" \
        -o 'jsonpath={range .items[*]}{.metadata.name}{"="}{.status.phase}{" "}{end}' 2>/dev/null); do
      name=${entry%%=*}; phase=${entry#*=}
      if [ "$phase" != Pending ] && [ -z "${seen[$name]:-}" ]; then
        seen[$name]=1
        k logs -f --prefix "pod/$name" 2>&1 &
      fi
    done
    case "$state" in
      Complete|Failed) wait; echo "== job/$job: $state"; return 0 ;;
    esac
    sleep "$poll"
  done
}

if ! k get jobs -l app.kubernetes.io/part-of=mnist-distill -o name 2>/dev/null | grep -q .; then
  echo "watch: no mnist-distill Jobs in namespace $namespace (submit with scripts/submit.sh)" >&2
  exit 2
fi
status
if [ "$once" = true ]; then
  case "$(job_state mnist-distill-teacher) $(job_state mnist-distill-students)" in
    *Failed*) exit 1 ;;
    *) exit 0 ;;
  esac
fi
follow mnist-distill-teacher
if [ "$(job_state mnist-distill-teacher)" = Complete ]; then
  follow mnist-distill-students
fi
status
teacher=$(job_state mnist-distill-teacher)
students=$(job_state mnist-distill-students)
if [ "$teacher" = Complete ] && [ "$students" = Complete ]; then
  run_config=$(k get job mnist-distill-teacher -o \
    'jsonpath={.spec.template.spec.containers[0].env[?(@.name=="MODEL_DIR")].valueFrom.configMapKeyRef.name}' || true)
  model_dir=$(k get configmap "$run_config" -o 'jsonpath={.data.MODEL_DIR}' 2>/dev/null || true)
  echo "watch: run complete: results in ${model_dir:-the run folder}/results.json and results.md"
  exit 0
fi
exit 1
