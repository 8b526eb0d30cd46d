#!/usr/bin/env bash
# Submits a run to the current kubectl context: renders an overlay of k8s/ with the image, the run
# folder and the Google service account filled in, applies it, waits for the teacher Job and then
# lets the (suspended) students Job start.
#
# Usage: scripts/submit.sh --image REF (--bucket gs://BUCKET [--run NAME] | --model-dir DIR) [options]
#   --overlay NAME     k8s/overlays/NAME: gke-gpu (default), multi-node, cpu-smoke.
#   --image REF        the image, best by digest as scripts/push_image.sh prints it
#                      (REGISTRY/mnist-distill@sha256:...); a tag works too.
#   --bucket gs://B    the run folder becomes gs://B/runs/RUN.
#   --run NAME         run name (default: default). Submitting the same run again resumes it: the
#                      trainer reuses finished models and continues from checkpoints.
#   --model-dir DIR    the run folder itself (gs://... or, for cpu-smoke, a path on its volume).
#   --gsa EMAIL        Google service account for Workload Identity (annotates the KSA).
#   --namespace NS     default: mnist-distill.
#   --replace          delete this namespace's mnist-distill Jobs first (Job templates are
#                      immutable, so a changed image or flags needs this).
#   --no-wait          apply and return; later run `scripts/submit.sh --resume-students`.
#   --resume-students  only wait for the teacher and resume the students of a submitted run.
#   --dry-run          print the rendered objects instead of applying them.
# Env: KUBECTL (default kubectl), TEACHER_TIMEOUT seconds (default 21600).
# Exit codes: 0 submitted (and students resumed), 1 teacher failed or timed out, 2 bad usage.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
kubectl=${KUBECTL:-kubectl}
overlay=gke-gpu
image=""
bucket=""
run=default
model_dir=""
gsa=""
namespace=mnist-distill
replace=false
wait=true
resume_only=false
dry_run=false
usage() { echo "submit: $*" >&2; echo "usage: see the header of $0" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --overlay|--image|--bucket|--run|--model-dir|--gsa|--namespace)
      [ $# -ge 2 ] || usage "$1 needs a value"
      opt=${1#--}; val=$2; shift 2
      case "$opt" in
        overlay) overlay=$val ;; image) image=$val ;; bucket) bucket=$val ;; run) run=$val ;;
        model-dir) model_dir=$val ;; gsa) gsa=$val ;; namespace) namespace=$val ;;
      esac ;;
    --replace) replace=true; shift ;;
    --no-wait) wait=false; shift ;;
    --resume-students) resume_only=true; shift ;;
    --dry-run) dry_run=true; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) usage "unknown argument $1" ;;
  esac
done
k() { "$kubectl" --namespace "$namespace" "$@"; }

job_state() {  # Complete, Failed, or empty while running
  local conditions
  conditions=$(k get job "$1" -o 'jsonpath={range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}' 2>/dev/null || true)
  case " $conditions " in
    *" Complete "*) echo Complete ;;
    *" Failed "*) echo Failed ;;
    *) echo "" ;;
  esac
}

resume_students() {
  local deadline state
  deadline=$(( $(date +%s) + ${TEACHER_TIMEOUT:-21600} ))
  echo "submit: waiting for job/mnist-distill-teacher (follow it with scripts/watch.sh)" >&2
  while :; do
    state=$(job_state mnist-distill-teacher)
    [ "$state" = Complete ] && break
    if [ "$state" = Failed ]; then
      echo "submit: the teacher failed; the students stay suspended:" >&2
      k get job mnist-distill-teacher \
        -o 'jsonpath={range .status.conditions[?(@.type=="Failed")]}{.reason}: {.message}{"\n"}{end}' >&2 || true
      exit 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "submit: gave up waiting for the teacher; resume later with $0 --resume-students" >&2
      exit 1
    fi
    sleep "${POLL_SECONDS:-15}"
  done
  k patch job mnist-distill-students --type=merge -p '{"spec":{"suspend":false}}' >&2
  echo "submit: teacher done, students started" >&2
}

if [ "$resume_only" = true ]; then
  resume_students
  exit 0
fi

[ -d "$repo/k8s/overlays/$overlay" ] || usage "no overlay k8s/overlays/$overlay"
[ -n "$image" ] || usage "--image is required"
if [ -z "$model_dir" ]; then
  if [ -n "$bucket" ]; then
    case "$bucket" in gs://*) ;; *) usage "--bucket must be gs://BUCKET" ;; esac
    model_dir="${bucket%/}/runs/$run"
  elif [ "$overlay" = cpu-smoke ]; then
    model_dir=/runs/$run
  else
    usage "--bucket or --model-dir is required"
  fi
fi
case "$run" in *[!a-zA-Z0-9._-]*|"") usage "--run must be letters, digits, '.', '_' or '-'" ;; esac

# image: REPO@sha256:DIGEST, REPO:TAG or REPO (kustomize's images transformer takes them apart).
image_fields=""
case "$image" in
  *@sha256:*) image_fields="    newName: ${image%@*}
    digest: ${image#*@}" ;;
  *)
    last=${image##*/}
    if [ "${last#*:}" != "$last" ]; then
      image_fields="    newName: ${image%:*}
    newTag: ${image##*:}"
    else
      image_fields="    newName: $image"
    fi ;;
esac

# A generated overlay on top of the chosen one, in a temporary copy of k8s/ (relative paths).
work=$(mktemp -d "${TMPDIR:-/tmp}/mnist-distill-submit.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp -a "$repo/k8s" "$work/k8s"
gen=$work/k8s/overlays/_submit
mkdir "$gen"
{
  echo "apiVersion: kustomize.config.k8s.io/v1beta1"
  echo "kind: Kustomization"
  echo "namespace: $namespace"
  echo "resources:"
  echo "  - ../$overlay"
  echo "images:"
  echo "  - name: mnist-distill"
  echo "$image_fields"
  echo "configMapGenerator:"
  echo "  - name: mnist-distill-run"
  echo "    behavior: replace"
  echo "    literals:"
  echo "      - MODEL_DIR=$model_dir"
  if [ -n "$gsa" ]; then
    echo "patches:"
    echo "  - target:"
    echo "      kind: ServiceAccount"
    echo "      name: mnist-distill"
    echo "    patch: |-"
    echo "      - op: replace"
    echo "        path: /metadata/annotations/iam.gke.io~1gcp-service-account"
    echo "        value: $gsa"
  fi
} > "$gen/kustomization.yaml"

if [ "$dry_run" = true ]; then
  "$kubectl" kustomize "$gen"
  exit 0
fi

existing=$(k get jobs -l app.kubernetes.io/part-of=mnist-distill -o name 2>/dev/null || true)
if [ -n "$existing" ]; then
  if [ "$replace" != true ]; then
    echo "submit: namespace $namespace already has $(echo $existing): watch it with" \
      "scripts/watch.sh, or pass --replace to delete them and submit again" >&2
    exit 2
  fi
  echo "submit: deleting $(echo $existing)" >&2
  # shellcheck disable=SC2086
  k delete $existing --wait=true >&2
fi
echo "submit: $overlay, image $image, run folder $model_dir, namespace $namespace" >&2
"$kubectl" apply -k "$gen" >&2
if [ "$wait" = true ]; then
  resume_students
else
  echo "submit: students are suspended until you run: $0 --namespace $namespace --resume-students" >&2
fi
echo "submit: TensorBoard: $kubectl -n $namespace port-forward service/mnist-distill-tensorboard 6006:80" >&2
echo "submit: results: $model_dir/results.json (and results.md)" >&2
