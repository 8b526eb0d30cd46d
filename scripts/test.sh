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
# Two workers: one process leaves a core idle while it waits on subprocesses, sleeps and I/O
# (tests/conftest.py decides what runs together). MNIST_DISTILL_TEST_WORKERS=0 runs serially.
exec "$venv/bin/python" -m pytest -n "${MNIST_DISTILL_TEST_WORKERS:-2}" "$@"
