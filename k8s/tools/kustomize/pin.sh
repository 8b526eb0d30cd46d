#!/usr/bin/env bash
# Pins the kustomize that a kubectl release embeds, for tests/test_k8s_versions.py.
# Usage: bash k8s/tools/kustomize/pin.sh v0.34.13    (a k8s.io/kubectl module version = kubectl 1.34.13)
# Reads that k8s.io/kubectl go.mod from the Go module proxy, takes its three kustomize modules
# (kustomize/v5, api, kyaml: the versions kubectl builds its `kubectl kustomize` from), writes
# k8s/tools/kustomize/<kustomize/v5 version>/go.mod requiring exactly those, lets `go mod tidy`
# fill in the rest (kustomize's own requirements) and go.sum, and records the kubectl version in
# kubectl.txt. Rerunning with another patch of a minor that embeds the same kustomize only adds
# its line to kubectl.txt.
set -euo pipefail
kubectl_version=${1:?usage: pin.sh K8S_IO_KUBECTL_VERSION (e.g. v0.34.13)}
here=$(cd "$(dirname "$0")" && pwd)
export GOTOOLCHAIN=local GOFLAGS=-mod=mod
mod=$(go mod download -json "k8s.io/kubectl@$kubectl_version" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')
[ -f "$mod" ] || { echo "pin.sh: no go.mod for k8s.io/kubectl@$kubectl_version" >&2; exit 1; }
version_of() {  # the version k8s.io/kubectl's go.mod requires of module $1
  awk -v m="$1" '$1 == m && $2 ~ /^v/ {print $2}' "$mod" | head -1
}
kustomize=$(version_of sigs.k8s.io/kustomize/kustomize/v5)
api=$(version_of sigs.k8s.io/kustomize/api)
kyaml=$(version_of sigs.k8s.io/kustomize/kyaml)
[ -n "$kustomize" ] && [ -n "$api" ] && [ -n "$kyaml" ] || {
  echo "pin.sh: k8s.io/kubectl@$kubectl_version names no kustomize/v5, api and kyaml" >&2; exit 1; }
dir="$here/$kustomize"
mkdir -p "$dir"
cat > "$dir/go.mod" <<MOD
// kustomize as kubectl embeds it: k8s.io/kubectl $kubectl_version requires these three versions
// (written by k8s/tools/kustomize/pin.sh; kubectl.txt lists the kubectl releases read).
module mnist-distill/k8s/tools/kustomize/$kustomize

go 1.24

tool sigs.k8s.io/kustomize/kustomize/v5

require (
	sigs.k8s.io/kustomize/api $api
	sigs.k8s.io/kustomize/kustomize/v5 $kustomize
	sigs.k8s.io/kustomize/kyaml $kyaml
)
MOD
(cd "$dir" && go mod tidy)
table="$here/kubectl.txt"
line="$kubectl_version $kustomize $api $kyaml"
touch "$table"
{ grep -v "^$kubectl_version " "$table" | grep -v '^#' || true; echo "$line"; } | sort -V -o "$table.new"
{ echo "# k8s.io/kubectl version (= kubectl 1.MINOR.PATCH), the kustomize/v5, api and kyaml it requires."
  echo "# Each kustomize/v5 version has a folder here; written by pin.sh."
  cat "$table.new"; } > "$table"
rm "$table.new"
echo "$line"
