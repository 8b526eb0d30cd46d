#!/usr/bin/env bash
# Submits a run to the current kubectl context: a thin wrapper around `kubectl apply -k` that fills
# in the image, the run folder and the Google service account on top of an overlay of k8s/, and
# applies it. The cluster then runs the whole pipeline by itself; nothing waits here.
#
# Usage: scripts/submit.sh --image REF (--bucket gs://BUCKET [--run NAME] | --model-dir DIR) [options]
#   --overlay NAME     k8s/overlays/NAME: gke-gpu (default), gke-multi-gpu, jobset, cpu-smoke.
#   --image REF        the training image, best by digest as scripts/push_image.sh prints it
#                      (REGISTRY/mnist-distill@sha256:...); a tag works too.
#   --tensorboard-image REF  the CPU build for TensorBoard (default: --image; give the CPU build so
#                      that CPU nodes do not pull the CUDA image).
#   --bucket gs://B    the run folder becomes gs://B/runs/RUN.
#   --run NAME         run name (default: default). Submitting the same run again resumes it: the
#                      trainer reuses finished models and continues from checkpoints.
#   --model-dir DIR    the run folder itself (gs://... or, for cpu-smoke, a path on its volume).
#   --gsa EMAIL        act as this Google service account (annotates the Kubernetes one); without
#                      it IAM grants the bucket to the Kubernetes service account directly.
#   --namespace NS     default: mnist-distill.
#   --replace          delete a run that is still active first and wait until its pods are gone
#                      (foreground deletion), then apply. A finished run is replaced without it.
#   --watch            follow the run with scripts/watch.sh after applying.
#   --dry-run          print the rendered objects instead of applying them.
# Env: KUBECTL (default kubectl), DELETE_TIMEOUT seconds to wait for old pods (default 600).
# Exit codes: 0 applied (with --watch: watch.sh's code), 1 apply or deletion failed,
#             2 bad usage, JobSet not installed, or an active run without --replace.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
kubectl=${KUBECTL:-kubectl}
overlay=gke-gpu
image=""
tb_image=""
bucket=""
run=default
model_dir=""
gsa=""
namespace=mnist-distill
replace=false
watch=false
dry_run=false
usage() { echo "submit: $*" >&2; echo "usage: see the header of $0" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --overlay|--image|--tensorboard-image|--bucket|--run|--model-dir|--gsa|--namespace)
      [ $# -ge 2 ] || usage "$1 needs a value"
      opt=${1#--}; val=$2; shift 2
      case "$opt" in
        overlay) overlay=$val ;; image) image=$val ;; tensorboard-image) tb_image=$val ;;
        bucket) bucket=$val ;; run) run=$val ;; model-dir) model_dir=$val ;; gsa) gsa=$val ;;
        namespace) namespace=$val ;;
      esac ;;
    --replace) replace=true; shift ;;
    --watch) watch=true; shift ;;
    --dry-run) dry_run=true; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) usage "unknown argument $1" ;;
  esac
done
k() { "$kubectl" --namespace "$namespace" "$@"; }

[ -n "$overlay" ] && [ "${overlay#_}" = "$overlay" ] && [ -d "$repo/k8s/overlays/$overlay" ] ||
  usage "no overlay k8s/overlays/$overlay"
[ -n "$image" ] || usage "--image is required"
tb_image=${tb_image:-$image}
case "$run" in *[!a-zA-Z0-9._-]*|"") usage "--run must be letters, digits, '.', '_' or '-'" ;; esac
if [ -z "$model_dir" ]; then
  if [ -n "$bucket" ]; then
    case "$bucket" in gs://?*) ;; *) usage "--bucket must be gs://BUCKET" ;; esac
    model_dir="${bucket%/}/runs/$run"
  elif [ "$overlay" = cpu-smoke ]; then
    model_dir=/runs/$run
  else
    usage "--bucket or --model-dir is required"
  fi
fi

image_entry() {  # NAME REF: one kustomize `images:` entry (REPO@sha256:D, REPO:TAG or REPO)
  local name=$1 ref=$2 last
  echo "  - name: $name"
  case "$ref" in
    *@sha256:*) echo "    newName: ${ref%@*}"; echo "    digest: ${ref#*@}" ;;
    *)
      last=${ref##*/}
      if [ "${last#*:}" != "$last" ]; then
        echo "    newName: ${ref%:*}"; echo "    newTag: ${ref##*:}"
      else
        echo "    newName: $ref"
      fi ;;
  esac
}

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
  image_entry mnist-distill "$image"
  image_entry mnist-distill-cpu "$tb_image"
  echo "configMapGenerator:"
  echo "  - name: mnist-distill-run"
  echo "    behavior: replace"
  echo "    literals:"
  echo "      - MODEL_DIR=$model_dir"
  if [ -n "$gsa" ]; then
    echo "patches:"
    echo "  - patch: |-"
    echo "      apiVersion: v1"
    echo "      kind: ServiceAccount"
    echo "      metadata:"
    echo "        name: mnist-distill"
    echo "        annotations:"
    echo "          iam.gke.io/gcp-service-account: $gsa"
  fi
} > "$gen/kustomization.yaml"
rendered=$work/rendered.yaml
"$kubectl" kustomize "$gen" > "$rendered"

if [ "$dry_run" = true ]; then
  cat "$rendered"
  exit 0
fi

kinds=job
# Discovery, not `get crd`: it needs no cluster-wide read permission.
resources=$("$kubectl" api-resources --api-group=jobset.x-k8s.io -o name 2>/dev/null || true)
if printf '%s\n' "$resources" | grep -q '^jobsets\.'; then
  kinds="job jobset"
elif grep -q '^kind: JobSet$' "$rendered"; then
  # Without the CRD the API server rejects the JobSet and kubectl would still create the rest.
  echo "submit: the JobSet API is not installed in this cluster; install it with" >&2
  echo "  $kubectl apply --server-side -f https://github.com/kubernetes-sigs/jobset/releases/download/v0.12.0/manifests.yaml" >&2
  exit 2
fi

# The run's workload pods (not TensorBoard's), for waiting until they are gone.
pods_selector="app.kubernetes.io/part-of=mnist-distill,app.kubernetes.io/component in (trainer,teacher,students)"
run_state() {  # KIND: Active, Finished or Missing for KIND/mnist-distill
  local conditions
  if ! conditions=$(k get "$1" mnist-distill \
      -o 'jsonpath={range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}' 2>/dev/null); then
    echo Missing; return
  fi
  case " $conditions " in
    *" Complete "*|*" Completed "*|*" Failed "*) echo Finished ;;
    *) echo Active ;;
  esac
}

# The Job (or JobSet) of an earlier submission, of any overlay, must be gone first: a Job's pod
# template is immutable and a finished Job never runs again, and two runs must never share pods.
deleted=false
for kind in $kinds; do
  state=$(run_state "$kind")
  [ "$state" != Missing ] || continue
  if [ "$state" = Active ] && [ "$replace" != true ]; then
    echo "submit: $kind/mnist-distill is still running in namespace $namespace: follow it with" \
      "scripts/watch.sh, or pass --replace to stop it and submit again" >&2
    exit 2
  fi
  echo "submit: deleting the $(echo "$state" | tr 'A-Z' 'a-z') $kind/mnist-distill (foreground: its pods first)" >&2
  k delete "$kind" mnist-distill --cascade=foreground --wait=true >&2 || exit 1
  deleted=true
done
if [ "$deleted" = true ]; then
  deadline=$(( $(date +%s) + ${DELETE_TIMEOUT:-600} ))
  while [ -n "$(k get pods -l "$pods_selector" -o name 2>/dev/null)" ]; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "submit: old pods still terminating after ${DELETE_TIMEOUT:-600}s; not applying" >&2
      exit 1
    fi
    sleep "${POLL_SECONDS:-5}"
  done
fi
echo "submit: $overlay, image $image, run folder $model_dir, namespace $namespace" >&2
"$kubectl" apply -k "$gen" >&2 || exit 1
echo "submit: follow it with scripts/watch.sh --namespace $namespace" >&2
echo "submit: TensorBoard: $kubectl -n $namespace port-forward service/mnist-distill-tensorboard 6006:80" >&2
echo "submit: results: $model_dir/results.json (and results.md)" >&2
if [ "$watch" = true ]; then
  exec bash "$repo/scripts/watch.sh" --namespace "$namespace"
fi
