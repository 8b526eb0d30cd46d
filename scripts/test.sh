#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh machine, then runs it.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash scripts/install_system_deps.sh
venv=$(bash scripts/setup_env.sh)
export PATH="$venv/bin:$PATH"
export MNIST_DIR=${MNIST_DIR:-$(cd "$repo/.." && pwd)/shared/data/mnist}
# Style first: it takes a second and names the line.
"$venv/bin/ruff" check --quiet .
exec "$venv/bin/python" -m pytest "$@"
