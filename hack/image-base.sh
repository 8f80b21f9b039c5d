#!/usr/bin/env bash
# A local stand-in for the Dockerfile's python:3.11-slim-bookworm base, built from Debian's packages
# with mmdebstrap, for machines that cannot pull from a container registry (ours: no registry but
# Debian's, PyPI, ...). Debian bookworm's Python 3.11 (3.11.2) with venv and the CA bundle; no apt,
# no docs, no man pages or locales.
#
#   hack/image-base.sh         # prints the image reference, building it only when its inputs changed
#
# The rootfs tarball is cached under ${CELERY_FLEET_CACHE:-${XDG_CACHE_HOME:-~/.cache}/celery-fleet}/image/
# keyed by the hash of this script (the recipe) and the architecture, and imported into the local
# containers-storage (buildah) once per key.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${CELERY_FLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/celery-fleet}"
arch="$(dpkg --print-architecture)"
suite=bookworm
mirror=http://deb.debian.org/debian
packages=python3,python3-venv,python-is-python3,ca-certificates

key="$({ cat "${BASH_SOURCE[0]}"; echo "$arch"; } | sha256sum | cut -c1-12)"
ref="localhost/celery-fleet-base:${suite}-${arch}-${key}"
tarball="$cache_root/image/base-${suite}-${arch}-${key}.tar"

log() { printf '[image-base] %s\n' "$*" >&2; }

if buildah inspect --type image "$ref" >/dev/null 2>&1; then
  echo "$ref"
  exit 0
fi

if [[ ! -s $tarball ]]; then
  mkdir -p "$(dirname "$tarball")"
  log "mmdebstrap $suite ($packages) -> $tarball"
  # Only what a Python program needs at run time: the essential set (no apt) plus Python and CAs.
  # Security and point-release updates are part of the base, as they are in the upstream image.
  # The merged-usr hook lays out /usr directly (bookworm's usrmerge package would bring in perl).
  mmdebstrap --quiet --format=tar --variant=essential --include="$packages" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --customize-hook='rm -rf "$1"/var/cache/* "$1"/var/lib/apt/lists/* "$1"/var/log/*' \
    "$suite" "$tarball.$$.tmp" \
    "deb $mirror $suite main" "deb $mirror $suite-updates main" \
    "deb ${mirror%/debian}/debian-security $suite-security main"
  mv "$tarball.$$.tmp" "$tarball"
fi

log "importing $tarball as $ref"
container="$(buildah from --quiet scratch)"
trap 'buildah rm "$container" >/dev/null 2>&1 || true' EXIT
buildah add --quiet "$container" "$tarball" / >/dev/null
# What the upstream python image sets that the Dockerfile relies on.
buildah config --env LANG=C.UTF-8 --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --cmd '["python3"]' --os linux --arch "$arch" \
  --label "org.opencontainers.image.description=celery-fleet local base: Debian $suite python3 (mmdebstrap)" \
  "$container"
buildah commit --quiet --rm "$container" "$ref" >/dev/null
trap - EXIT
echo "$ref"
