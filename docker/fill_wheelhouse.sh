#!/usr/bin/env bash
# Fills a wheelhouse with a wheel for every pinned requirement of the image, on the host, so that
# the image can be built with `--no-index --find-links /wheelhouse` (OFFLINE=true) where the build
# itself cannot reach PyPI. Prints the wheelhouse's path on stdout (progress goes to stderr).
#
# Usage: docker/fill_wheelhouse.sh [--variant cpu|gpu] [--dir DIR]
#   --variant  cpu (default): requirements.txt without its tensorflow line,
#              docker/requirements-cpu.txt (tensorflow-cpu) and docker/build-requirements.txt;
#              gpu: requirements.txt, docker/build-requirements.txt and docker/requirements-cuda.txt
#              (several GB of CUDA wheels).
#   --dir      where to put the wheels. Default: a folder under ${MNIST_DISTILL_CACHE:-~/.cache/mnist-distill}
#              keyed by a hash of the requirement files, reused as long as they do not change.
# Env: PYTHON (default python3) must be the same CPython minor version as the image's (3.11):
#      sdists (promise, ...) are built into wheels with it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
variant=cpu
dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant=$2; shift 2 ;;
    --variant=*) variant=${1#*=}; shift ;;
    --dir) dir=$2; shift 2 ;;
    --dir=*) dir=${1#*=}; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "fill_wheelhouse: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$variant" in
  cpu)
    # What the CPU image installs (docker/Dockerfile): requirements.txt less its tensorflow line.
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/fill_wheelhouse.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    sed '/^tensorflow==/d' "$repo/requirements.txt" >"$tmp/requirements.txt"
    reqs=("$tmp/requirements.txt" "$repo/docker/requirements-cpu.txt"
          "$repo/docker/build-requirements.txt") ;;
  gpu) reqs=("$repo/requirements.txt" "$repo/docker/build-requirements.txt"
             "$repo/docker/requirements-cuda.txt") ;;
  *) echo "fill_wheelhouse: --variant must be cpu or gpu, got $variant" >&2; exit 2 ;;
esac
python=${PYTHON:-python3}
want_py=3.11
have_py=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$have_py" != "$want_py" ]; then
  echo "fill_wheelhouse: $python is Python $have_py; the image runs Python $want_py (set PYTHON)" >&2
  exit 2
fi
if [ -z "$dir" ]; then
  key=$(cat "${reqs[@]}" | sha256sum | cut -c1-12)
  dir=${MNIST_DISTILL_CACHE:-$HOME/.cache/mnist-distill}/wheelhouse-$variant-py$have_py-$key
fi
if [ -f "$dir/.complete" ]; then
  echo "$dir"
  exit 0
fi
mkdir -p "$(dirname "$dir")"
# One filler at a time per wheelhouse (test runs may share the cache).
exec 9>"$dir.lock"
flock 9
if [ -f "$dir/.complete" ]; then
  echo "$dir"
  exit 0
fi
mkdir -p "$dir"
echo "fill_wheelhouse: filling $dir" >&2
req_args=()
for r in "${reqs[@]}"; do req_args+=(-r "$r"); done
# --no-deps: the requirement files are complete pins; the image installs with --no-deps and runs
# `pip check`, so a missing pin fails the build instead of floating in unpinned.
"$python" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$dir" "${req_args[@]}" >&2
touch "$dir/.complete"
# Keep the cache bounded: of the other wheelhouses of this variant, keep only the newest one.
parent=$(dirname "$dir")
for old in $(ls -1dt "$parent"/wheelhouse-"$variant"-py* | { grep -v '\.lock$' || true; } |
    { grep -vxF "$dir" || true; } | tail -n +2); do
  rm -rf "$old" "$old.lock"
done
echo "$dir"
