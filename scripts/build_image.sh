#!/usr/bin/env bash
# Builds the mnist-distill image from docker/Dockerfile with docker (when an engine answers) or
# else buildah (`buildah bud --isolation chroot`). Prints the image reference on stdout.
#
# Usage: scripts/build_image.sh [options]
#   --variant gpu|cpu     gpu (default): tensorflow[and-cuda] + pinned CUDA wheels; cpu: tensorflow-cpu.
#   --base IMAGE          base image (default: the Dockerfile's, python:3.11-slim-bookworm pinned by
#                         digest; any Debian-like base with
#                         python3.11, venv, groupadd/useradd).
#   --tag REF             image reference (default mnist-distill:<git describe>-<variant>).
#   --wheelhouse DIR      use only these wheels (--no-index --find-links); see docker/fill_wheelhouse.sh.
#   --tool docker|buildah force a builder (default: docker if `docker info` works, else buildah).
#   --layers              let buildah cache intermediate layers (docker always does).
#   --platform OS/ARCH    target platform (default linux/amd64, what GKE's GPU nodes run; an
#                         Apple-silicon laptop would otherwise build an arm64 image).
# Reproducible: every timestamp in the image (its creation time, the files' mtimes, the
# org.opencontainers.image.created label, .pyc files) comes from SOURCE_DATE_EPOCH, by default the
# commit time of HEAD, so the same commit and base digest give the same image digest (without
# --layers: a cached dependency layer keeps the file times of the build that made it). The
# dependency layer's .pyc files and user take DEPS_EPOCH, the newest commit time of the pin files
# (SOURCE_DATE_EPOCH when that is set), so its layer cache outlives commits that keep the pins.
#   Anything after `--` goes to the builder unchanged.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
variant=gpu
# The Dockerfile's default base, pinned by digest (refresh both together:
# `docker buildx imagetools inspect python:3.11-slim-bookworm` prints the current index digest).
base=$(sed -n 's/^ARG BASE_IMAGE=//p' "$repo/docker/Dockerfile" | head -n1)
tag=""
wheelhouse=""
tool=""
layers=false
platform=linux/amd64
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant=$2; shift 2 ;;
    --variant=*) variant=${1#*=}; shift ;;
    --base) base=$2; shift 2 ;;
    --base=*) base=${1#*=}; shift ;;
    --tag) tag=$2; shift 2 ;;
    --tag=*) tag=${1#*=}; shift ;;
    --wheelhouse) wheelhouse=$2; shift 2 ;;
    --wheelhouse=*) wheelhouse=${1#*=}; shift ;;
    --tool) tool=$2; shift 2 ;;
    --tool=*) tool=${1#*=}; shift ;;
    --layers) layers=true; shift ;;
    --platform) platform=$2; shift 2 ;;
    --platform=*) platform=${1#*=}; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "build_image: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$variant" in cpu|gpu) ;; *) echo "build_image: --variant must be cpu or gpu" >&2; exit 2 ;; esac
if [ -z "$tool" ]; then
  # shellcheck source=scripts/container_tool.sh
  . "$(dirname "$0")/container_tool.sh"
  tool=$(pick_container_tool build_image) || exit 2
fi

version=$(sed -n 's/^ *version="\([^"]*\)".*/\1/p' "$repo/setup.py" | head -n1)
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
describe=$(git -C "$repo" describe --always --dirty 2>/dev/null || echo "$version")
source_url=$(git -C "$repo" remote get-url origin 2>/dev/null || echo unknown)
tag=${tag:-mnist-distill:$describe-$variant}
# One timestamp for everything (see the header): the commit's, unless the caller sets one.
epoch=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
# The dependency layer's own timestamp: the newest commit that changed what it installs. With the
# commit time there, every commit would reinstall TensorFlow (buildah and Docker key a RUN's cache
# on the ARGs declared before it). A dirty pin file counts as changed now: HEAD's time.
deps_files=(requirements.txt docker/build-requirements.txt docker/requirements-cuda.txt
  docker/requirements-cpu.txt docker/Dockerfile)
deps_epoch=$(git -C "$repo" log -1 --format=%ct -- "${deps_files[@]}" 2>/dev/null || true)
if [ -n "${SOURCE_DATE_EPOCH:-}" ] || [ -z "$deps_epoch" ] \
   || [ -n "$(git -C "$repo" status --porcelain -- "${deps_files[@]}" 2>/dev/null)" ]; then
  deps_epoch=$epoch
fi

# Stage a minimal build context: the package's files plus wheelhouse/ (hard links when possible),
# so the checkout is never modified and nothing else (runs/, venvs, .git) is sent to the builder.
ctx=$(mktemp -d "${TMPDIR:-/tmp}/mnist-distill-ctx.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
for f in setup.py setup.cfg pyproject.toml MANIFEST.in README.md requirements.txt trainer docker; do
  [ -e "$repo/$f" ] && cp -a "$repo/$f" "$ctx/"
done
find "$ctx" -name __pycache__ -prune -exec rm -rf {} +
mkdir "$ctx/wheelhouse"
offline=false
if [ -n "$wheelhouse" ]; then
  [ -d "$wheelhouse" ] || { echo "build_image: no wheelhouse at $wheelhouse" >&2; exit 2; }
  cp -al "$wheelhouse/." "$ctx/wheelhouse/" 2>/dev/null || cp -a "$wheelhouse/." "$ctx/wheelhouse/"
  offline=true
fi

build_args=(
  --build-arg "BASE_IMAGE=$base"
  --build-arg "VARIANT=$variant"
  --build-arg "OFFLINE=$offline"
  --build-arg "VERSION=$version"
  --build-arg "REVISION=$revision"
  --build-arg "CREATED=$created"
  --build-arg "SOURCE_DATE_EPOCH=$epoch"
  --build-arg "DEPS_EPOCH=$deps_epoch"
  --build-arg "SOURCE=$source_url"
)
echo "build_image: $tool, $platform, variant=$variant, base=$base, offline=$offline -> $tag" >&2
start=$(date +%s)
if [ "$tool" = docker ]; then
  # BuildKit takes SOURCE_DATE_EPOCH (a build arg) for the image's creation time; file mtimes
  # are clamped too with `docker buildx build --output type=docker,rewrite-timestamp=true`.
  DOCKER_BUILDKIT=1 docker build --platform "$platform" -f "$ctx/docker/Dockerfile" \
    "${build_args[@]}" -t "$tag" "${extra[@]}" "$ctx" >&2
else
  # --timestamp sets the creation time and every file's mtime in the new layers.
  buildah bud --isolation "${BUILDAH_ISOLATION:-chroot}" --layers="$layers" --platform "$platform" \
    --timestamp "$epoch" -f "$ctx/docker/Dockerfile" "${build_args[@]}" -t "$tag" "${extra[@]}" \
    "$ctx" >&2
fi
echo "build_image: built $tag in $(( $(date +%s) - start ))s" >&2
echo "$tag"
