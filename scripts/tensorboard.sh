#!/usr/bin/env bash
# Serves the TensorBoard logs of a run: MODEL_DIR/logs, local or in a bucket.
#
# Usage: scripts/tensorboard.sh [--sync] [--every SECONDS] [--port PORT] [--host HOST] MODEL_DIR
#   MODEL_DIR        a local run folder (runs/default) or gs://bucket/prefix
#   --sync           gs:// only: copy MODEL_DIR/logs to a local folder with trainer.rundir.storage
#                    (google-cloud-storage, so STORAGE_EMULATOR_HOST works too) and serve that,
#                    fetching again every --every seconds (default 30; 0 = once). Without it,
#                    TensorBoard reads gs:// itself (needs Google Cloud credentials, e.g.
#                    `gcloud auth application-default login`). --sync is implied when
#                    STORAGE_EMULATOR_HOST is set, since TensorBoard's own gs:// reader cannot
#                    be pointed at an emulator.
#   --port PORT      default 6006; --host HOST default 127.0.0.1 (this machine only).
# Env: PYTHON (default: the project venv's python if `scripts/setup_env.sh` made one, else
#      python3); MNIST_DISTILL_TB_CACHE: where --sync keeps its copy (default
#      ${XDG_CACHE_HOME:-~/.cache}/mnist-distill/tensorboard).
# Exit codes: 0 after TensorBoard stops, 2 bad usage or nothing to serve.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
port=6006
host=127.0.0.1
sync=false
every=30
model_dir=""
usage() { sed -n '2,19p' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --sync) sync=true; shift ;;
    --every) every=${2:?}; shift 2 ;;
    --every=*) every=${1#*=}; shift ;;
    --port) port=${2:?}; shift 2 ;;
    --port=*) port=${1#*=}; shift ;;
    --host) host=${2:?}; shift 2 ;;
    --host=*) host=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "tensorboard.sh: unknown option $1" >&2; exit 2 ;;
    *) [ -z "$model_dir" ] || { echo "tensorboard.sh: one MODEL_DIR only" >&2; exit 2; }
       model_dir=$1; shift ;;
  esac
done
[ -n "$model_dir" ] || { usage >&2; exit 2; }
case "$every" in ''|*[!0-9]*) echo "tensorboard.sh: --every needs whole seconds" >&2; exit 2 ;; esac
model_dir=${model_dir%/}

python=${PYTHON:-}
if [ -z "$python" ]; then
  python=python3
  for venv in "${MNIST_DISTILL_VENV:-}" "$HOME"/.cache/mnist-distill/venv-*; do
    if [ -n "$venv" ] && [ -x "$venv/bin/python" ]; then python="$venv/bin/python"; break; fi
  done
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

case "$model_dir" in
  gs://*)
    if [ -n "${STORAGE_EMULATOR_HOST:-}" ]; then sync=true; fi
    ;;
  *)
    if [ "$sync" = true ]; then echo "tensorboard.sh: --sync is for gs:// model dirs" >&2; exit 2; fi
    if [ ! -d "$model_dir/logs" ]; then
      echo "tensorboard.sh: $model_dir/logs does not exist (no model has started training)" >&2
      exit 2
    fi
    ;;
esac

logdir="$model_dir/logs"
fetcher=""
if [ "$sync" = true ]; then
  cache=${MNIST_DISTILL_TB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mnist-distill/tensorboard}
  fetch() {  # prints the local copy's folder
    "$python" -c 'import sys
from trainer.rundir import downloads
print(downloads.fetch_to_local(sys.argv[1], sys.argv[2]))' "$model_dir/logs" "$cache"
  }
  if ! logdir=$(fetch); then
    echo "tensorboard.sh: could not fetch $model_dir/logs" >&2
    exit 2
  fi
  echo "tensorboard.sh: serving a copy of $model_dir/logs in $logdir" >&2
  if [ "$every" -gt 0 ]; then
    ( while sleep "$every"; do fetch >/dev/null || echo "tensorboard.sh: fetch failed, retrying" >&2; done ) &
    fetcher=$!
    trap 'kill "$fetcher" 2>/dev/null || true' EXIT
  fi
fi

echo "tensorboard.sh: http://$host:$port/" >&2
# Not exec: the trap above must stop the fetcher when TensorBoard exits.
"$python" -m tensorboard.main --logdir "$logdir" --host "$host" --port "$port" &
server=$!
trap 'kill "$server" 2>/dev/null || true; [ -z "$fetcher" ] || kill "$fetcher" 2>/dev/null || true' EXIT
trap 'exit 0' INT TERM
wait "$server"
