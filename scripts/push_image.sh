#!/usr/bin/env bash
# Pushes a locally built image (scripts/build_image.sh) to a registry and prints its digest
# reference (REPOSITORY@sha256:...) on stdout: pass that to scripts/submit.sh --image, so every pod
# (and every retry) runs exactly this build.
#
# Usage: scripts/push_image.sh SOURCE DEST
#        scripts/push_image.sh SOURCE --kind CLUSTER
#   SOURCE  the local image, e.g. mnist-distill:1a2b3c4-gpu
#   DEST    e.g. REGION-docker.pkg.dev/PROJECT/REPOSITORY/mnist-distill:1a2b3c4-gpu
#   --kind  load SOURCE into the kind cluster CLUSTER instead (for overlays/cpu-smoke; the
#           manifests use imagePullPolicy IfNotPresent) and print SOURCE.
# Credentials for Artifact Registry, once:
#   docker:  gcloud auth configure-docker REGION-docker.pkg.dev
#   buildah: gcloud auth print-access-token | buildah login -u oauth2accesstoken --password-stdin REGION-docker.pkg.dev
# Env: TOOL=docker|buildah to force one (default: docker if `docker info` works, else buildah).
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,16p' "$0" >&2; exit 2; }
source_ref=$1
shift
tool=${TOOL:-}
if [ -z "$tool" ]; then
  # shellcheck source=scripts/container_tool.sh
  . "$(dirname "$0")/container_tool.sh"
  tool=$(pick_container_tool push_image) || exit 2
fi

if [ "$1" = --kind ]; then
  [ $# -ge 2 ] || { echo "push_image: --kind needs a cluster name" >&2; exit 2; }
  cluster=$2
  if [ "$tool" = docker ]; then
    kind load docker-image "$source_ref" --name "$cluster" >&2
  else
    archive=$(mktemp "${TMPDIR:-/tmp}/mnist-distill-image.XXXXXX.tar")
    trap 'rm -f "$archive"' EXIT
    rm -f "$archive"
    buildah push "$source_ref" "docker-archive:$archive:$source_ref" >&2
    kind load image-archive "$archive" --name "$cluster" >&2
  fi
  echo "$source_ref"
  exit 0
fi

dest=$1
# The repository is DEST without its tag (a ':' after the last '/').
last=${dest##*/}
repository=$dest
[ "${last#*:}" != "$last" ] && repository=${dest%:*}
if [ "$tool" = docker ]; then
  docker tag "$source_ref" "$dest"
  docker push "$dest" >&2
  digest=$(docker inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$dest" |
    grep -F "$repository@" | head -n1 | sed 's/.*@//')
else
  digestfile=$(mktemp)
  trap 'rm -f "$digestfile"' EXIT
  buildah push --digestfile "$digestfile" "$source_ref" "docker://$dest" >&2
  digest=$(cat "$digestfile")
fi
case "$digest" in
  sha256:*) ;;
  *) echo "push_image: pushed $dest but could not read its digest" >&2; exit 1 ;;
esac
echo "$repository@$digest"
