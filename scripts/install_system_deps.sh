#!/usr/bin/env bash
# Installs the Debian packages the tests use (only what is missing). Needs root or sudo.
set -euo pipefail
want=(dataset-fashion-mnist)
# tests/test_image.py builds the image offline (a debootstrap base, buildah) and pushes to a
# loopback registry (docker-registry).
want+=(buildah debootstrap docker-registry)
# tests/test_tensorboard.py loads TensorBoard's pages in headless Chromium.
want+=(chromium)
# tests/cluster/ runs a local Kubernetes node (scripts/local_cluster.sh): the container runtime,
# the pods' network plugins, and what kube-proxy programs the node's rules with.
want+=(containerd runc containernetworking-plugins iptables conntrack)
missing=()
for p in "${want[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install_system_deps: installing ${missing[*]}" >&2
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
