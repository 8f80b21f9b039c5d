#!/usr/bin/env bash
# Build the operator image with whatever builder this machine has.
#
#   hack/image.sh tools     # install the daemonless builder from Debian's packages (when there is no Docker engine)
#   hack/image.sh build     # build; the last line printed is the image reference
#   hack/image.sh engine    # print the command that runs containers (docker, or podman with its flags here)
#
# With a Docker engine: `docker build .` from the Dockerfile's upstream python base. Without one
# (this project's machines): buildah, chroot isolation, on a local base built from Debian's
# packages by hack/image-base.sh (cached by its inputs). The build reaches PyPI through this
# machine's CA bundle and pip index, mounted read-only for the RUN steps only: nothing of them is
# committed to a layer. IMAGE=<ref> picks the reference; CELERY_FLEET_BUILDER=docker|buildah forces one.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
version="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$root/pyproject.toml")"
revision="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
tools=(buildah podman runc mmdebstrap uidmap skopeo)

log() { printf '[image] %s\n' "$*" >&2; }

builder() {
  if [[ -n ${CELERY_FLEET_BUILDER:-} ]]; then echo "$CELERY_FLEET_BUILDER"
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker
  else echo buildah
  fi
}

install_tools() {
  [[ $(builder) == docker ]] && return 0
  local missing=() t
  for t in "${tools[@]}"; do
    [[ $t == uidmap ]] && t=newuidmap
    command -v "$t" >/dev/null || missing+=("$t")
  done
  [[ ${#missing[@]} == 0 ]] && return 0
  local sudo=; [[ $(id -u) == 0 ]] || sudo=sudo
  log "installing ${tools[*]} (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  local apt=($sudo apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 "${tools[@]}")
  "${apt[@]}" || { $sudo apt-get update -q && "${apt[@]}"; }
}

build() {
  local labels=(--label "org.opencontainers.image.version=$version" --label "org.opencontainers.image.revision=$revision")
  case "$(builder)" in
    docker)
      local ref="${IMAGE:-celery-fleet:$version}" base
      base="$(sed -n 's/^ARG PYTHON_IMAGE=//p' "$root/Dockerfile")"
      docker build "${labels[@]}" --label "org.opencontainers.image.base.name=$base" -t "$ref" "$root" >&2
      ;;
    buildah)
      install_tools
      local ref="${IMAGE:-localhost/celery-fleet:$version}" base conf
      base="$("$here/image-base.sh")"
      conf="$(mktemp)"
      trap 'rm -f "$conf"' RETURN
      # Only what pip needs to reach the index from here: the CA bundle and the index URL.
      local ca=/etc/ssl/certs/ca-certificates.crt index
      index="$(pip3 config get global.index-url 2>/dev/null || true)"
      { echo '[global]'; [[ -f $ca ]] && echo "cert = $ca"; [[ -n $index ]] && echo "index-url = $index"; } > "$conf"
      chmod 0644 "$conf"
      local mounts=(-v "$conf:/etc/pip.conf:ro")
      [[ -f $ca ]] && mounts+=(-v "$ca:$ca:ro")
      buildah bud --quiet --isolation chroot --layers "${labels[@]}" --label "org.opencontainers.image.base.name=$base" \
        --build-arg "PYTHON_IMAGE=$base" "${mounts[@]}" -t "$ref" "$root" >&2
      ;;
    *) echo "unknown builder $(builder)" >&2; exit 2 ;;
  esac
  log "built $ref"
  echo "$ref"
}

engine() {
  case "$(builder)" in
    docker) echo docker ;;
    # No systemd and no cgroup delegation here: cgroupfs; runc is the runtime installed above.
    *) echo podman --runtime runc --cgroup-manager cgroupfs ;;
  esac
}

case "${1:-build}" in
  tools) install_tools ;;
  build) build ;;
  engine) engine ;;
  *) echo "usage: $0 tools|build|engine" >&2; exit 2 ;;
esac
