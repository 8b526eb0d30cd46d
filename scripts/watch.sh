#!/usr/bin/env bash
# Follows a submitted run (the Job or the JobSet `mnist-distill`): its status, then the logs of
# every pod of the run (teacher workers, students, the one-pod Job; each line prefixed with its
# pod name) until the run has finished. Pods that replace preempted or failed ones, and the pods
# of a JobSet restart, are picked up as they start.
#
# Usage: scripts/watch.sh [--namespace NS] [--once]
#   --once   print the status (run, pods, failure reasons) and exit.
# Env: KUBECTL (default kubectl), POLL_SECONDS (default 10).
# Exit codes: 0 the run completed, 1 it failed, 2 bad usage or no run in the namespace.
set -euo pipefail
kubectl=${KUBECTL:-kubectl}
namespace=mnist-distill
once=false
while [ $# -gt 0 ]; do
  case "$1" in
    --namespace) namespace=$2; shift 2 ;;
    --namespace=*) namespace=${1#*=}; shift ;;
    --once) once=true; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "watch: unknown argument $1" >&2; exit 2 ;;
  esac
done
k() { "$kubectl" --namespace "$namespace" "$@"; }
poll=${POLL_SECONDS:-10}
pods_selector="app.kubernetes.io/part-of=mnist-distill,app.kubernetes.io/component in (trainer,teacher,students)"

kind=""
for candidate in jobset job; do
  if k get "$candidate" mnist-distill -o name >/dev/null 2>&1; then kind=$candidate; break; fi
done
if [ -z "$kind" ]; then
  echo "watch: no mnist-distill Job or JobSet in namespace $namespace (submit with scripts/submit.sh)" >&2
  exit 2
fi

run_state() {  # Complete, Failed or Running
  local out
  out=$(k get "$kind" mnist-distill \
    -o 'jsonpath={range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}' 2>/dev/null || true)
  case " $out " in
    *" Complete "*|*" Completed "*) echo Complete ;;
    *" Failed "*) echo Failed ;;
    *) echo Running ;;
  esac
}

status() {
  echo "== $(date -u +%H:%M:%SZ) $kind/mnist-distill in namespace $namespace"
  k get "$kind" mnist-distill || true
  [ "$kind" = job ] || k get jobs -l jobset.sigs.k8s.io/jobset-name=mnist-distill || true
  k get pods -l "$pods_selector" -o wide 2>/dev/null || true
  if [ "$(run_state)" = Failed ]; then
    echo "-- $kind/mnist-distill failed:"
    k get "$kind" mnist-distill \
      -o 'jsonpath={range .status.conditions[?(@.type=="Failed")]}{.reason}: {.message}{"\n"}{end}' || true
    # The last words of its failed pods (exit 2 = bad flags/config: fix and resubmit; 4 = lost a
    # peer worker, 143 = SIGTERM after a checkpoint: both restarted; others retried up to a limit).
    k get pods -l "$pods_selector" --field-selector=status.phase=Failed \
      -o 'jsonpath={range .items[*]}{.metadata.name}{" exit "}{.status.containerStatuses[0].state.terminated.exitCode}{"\n"}{end}' || true
  fi
}

status
state=$(run_state)
if [ "$once" = true ]; then
  [ "$state" = Failed ] && exit 1
  exit 0
fi

declare -A seen=()
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
while :; do
  for entry in $(k get pods -l "$pods_selector" \
      -o 'jsonpath={range .items[*]}{.metadata.name}{"="}{.status.phase}{" "}{end}' 2>/dev/null); do
    name=${entry%%=*}; phase=${entry#*=}
    if [ "$phase" != Pending ] && [ -z "${seen[$name]:-}" ]; then
      seen[$name]=1
      k logs -f --all-containers=false -c trainer --prefix "pod/$name" 2>&1 &
    fi
  done
  case "$state" in Complete|Failed) break ;; esac
  sleep "$poll"
  state=$(run_state)
done
wait
status
if [ "$state" = Complete ]; then
  run_config=$(k get configmap -l app.kubernetes.io/part-of=mnist-distill -o name 2>/dev/null |
    grep -m1 'mnist-distill-run' || true)
  model_dir=""
  [ -z "$run_config" ] || model_dir=$(k get "$run_config" -o 'jsonpath={.data.MODEL_DIR}' 2>/dev/null || true)
  echo "watch: run complete: results in ${model_dir:-the run folder}/results.json and results.md"
  exit 0
fi
exit 1
