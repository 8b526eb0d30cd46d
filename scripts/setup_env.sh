#!/usr/bin/env bash
# Creates (or reuses) the project's virtualenv and prints its path on stdout.
# The venv lives outside the checkout, keyed by the pinned requirements, so fresh clones on the
# same machine (CI) reuse it; set MNIST_DISTILL_VENV to choose another place.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
key=$(cat "$repo/requirements.txt" "$repo/requirements-dev.txt" "$repo/setup.py" | sha256sum | cut -c1-12)
venv=${MNIST_DISTILL_VENV:-$HOME/.cache/mnist-distill/venv-$key}
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  echo "setup_env: creating $venv" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$repo/requirements-dev.txt" >&2
  touch "$venv/.complete"
fi
# The package itself is installed editable from this checkout (cheap, no dependencies).
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$repo" >&2
echo "$venv"
