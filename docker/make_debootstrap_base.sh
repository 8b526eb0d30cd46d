#!/usr/bin/env bash
# Makes a minimal Debian base image (python3 + venv) with debootstrap and imports it into buildah's
# local storage, for building the CPU image where no registry can be reached (the tests do this).
# Prints the image reference on stdout; progress goes to stderr. Needs root, debootstrap, buildah.
#
# Usage: docker/make_debootstrap_base.sh [--suite bookworm] [--mirror URL]
# Both the rootfs tarball (under ${MNIST_DISTILL_CACHE:-~/.cache/mnist-distill}) and the imported
# image are keyed by a hash of this script and its settings, so reruns reuse them.
# No build-time timestamp reaches the image: file mtimes in the tarball are clamped and the image's
# creation time is set, both to SOURCE_DATE_EPOCH (default 0); the packages themselves are
# whatever the mirror serves that day.
set -euo pipefail
suite=bookworm
mirror=http://deb.debian.org/debian
while [ $# -gt 0 ]; do
  case "$1" in
    --suite) suite=$2; shift 2 ;;
    --suite=*) suite=${1#*=}; shift ;;
    --mirror) mirror=$2; shift 2 ;;
    --mirror=*) mirror=${1#*=}; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "make_debootstrap_base: unknown argument $1" >&2; exit 2 ;;
  esac
done
# What the image needs from Debian: the interpreter, venv (with its bundled pip) and CA
# certificates for google-cloud-storage's TLS. Debian 12's python3 is 3.11, as in python:3.11-slim.
include=python3,python3-venv,ca-certificates
arch=$(dpkg --print-architecture)
# Bump when the rootfs recipe below (debootstrap options, trimming, image config) changes: the key
# decides whether the cached tarball and image are reused.
recipe=2
key=$(echo "$recipe $suite $mirror $arch $include" | sha256sum | cut -c1-12)
ref=localhost/mnist-distill-base:$suite-$key
cache=${MNIST_DISTILL_CACHE:-$HOME/.cache/mnist-distill}
epoch=${SOURCE_DATE_EPOCH:-0}
tarball=$cache/debootstrap-$suite-$arch-$key.tar

if buildah inspect --type image "$ref" >/dev/null 2>&1; then
  echo "$ref"
  exit 0
fi
for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || {
    echo "make_debootstrap_base: $tool is missing (run scripts/install_system_deps.sh)" >&2; exit 2; }
done
[ "$(id -u)" -eq 0 ] || { echo "make_debootstrap_base: debootstrap needs root" >&2; exit 2; }
mkdir -p "$cache"
# One builder at a time (test runs may share the cache and the image storage).
exec 9>"$cache/debootstrap-$suite-$arch.lock"
flock 9
if buildah inspect --type image "$ref" >/dev/null 2>&1; then
  echo "$ref"
  exit 0
fi

if [ ! -f "$tarball" ]; then
  work=$(mktemp -d "$cache/debootstrap.XXXXXX")
  root=$work/rootfs
  cleanup() {
    # debootstrap mounts proc/sys (and may bind /dev) inside the target: unmount before deleting,
    # and never let rm cross into another filesystem.
    local m
    for m in $(awk -v r="$root" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r); do
      umount -l "$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$work"
  }
  trap cleanup EXIT
  echo "make_debootstrap_base: debootstrap $suite ($include) into $root" >&2
  debootstrap --variant=minbase --include="$include" --arch="$arch" "$suite" "$root" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
  # Trim what a container never uses: downloaded .debs, apt lists, docs, man pages.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
    "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/info/* "$root"/var/log/* "$root"/tmp/* "$root"/var/cache/debconf/*-old \
    "$root"/var/lib/dpkg/*-old "$root"/var/cache/ldconfig/aux-cache
  # A machine id is per machine, not per image (systemd and dbus create it when they need one).
  : > "$root/etc/machine-id"
  # /dev, /proc and /sys are provided by the container runtime.
  # Sorted, with every mtime clamped to the epoch: the same tree gives the same tar.
  tar --numeric-owner --xattrs --one-file-system -C "$root" --sort=name \
    --mtime="@$epoch" --clamp-mtime \
    --exclude=./dev/* --exclude=./proc/* --exclude=./sys/* -cf "$tarball.part" .
  mv "$tarball.part" "$tarball"
  cleanup
  trap - EXIT
  # Keep the cache bounded: drop the tarballs and images of other recipes (an image that others
  # still build on is refused by buildah and stays).
  for old in "$cache"/debootstrap-"$suite"-"$arch"-*.tar; do
    [ "$old" = "$tarball" ] || rm -f "$old"
  done
  for old in $(buildah images --format '{{.Name}}:{{.Tag}}' | grep -F "localhost/mnist-distill-base:$suite-" || true); do
    [ "$old" = "$ref" ] || buildah rmi "$old" >/dev/null 2>&1 || true
  done
fi

echo "make_debootstrap_base: importing $tarball as $ref" >&2
ctr=$(buildah from scratch)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah add --quiet "$ctr" "$tarball" / >/dev/null
buildah config \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 \
  --cmd /bin/bash \
  --label org.opencontainers.image.title="debootstrap $suite minbase + python3" \
  --label org.opencontainers.image.base.name="debian:$suite" \
  "$ctr"
buildah commit --quiet --rm --timestamp "$epoch" "$ctr" "$ref" >/dev/null
trap - EXIT
echo "$ref"
