#!/usr/bin/env bash
# Sets up the pinned environment and runs the default job on this machine (CPU, local model_dir).
# Usage: bash scripts/run_local.sh [mnist-distill flags]
#   Without flags: tensorflow-datasets MNIST (downloads once), output in runs/default.
#   Offline: bash scripts/run_local.sh --idx_dir=../shared/data/mnist
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
venv=$(bash scripts/setup_env.sh)
exec "$venv/bin/mnist-distill" --model_dir="${MODEL_DIR:-runs/default}" "$@"
