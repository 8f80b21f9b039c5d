#!/usr/bin/env bash
# Release the operator image: build, tag by version (and git revision), push, record the digest,
# write an SBOM. Run by a maintainer from a clean checkout of the release commit.
#
#   hack/release-image.sh ghcr.io/celery-fleet/celery-fleet            # push to a registry
#   hack/release-image.sh oci-archive:/tmp/celery-fleet.tar            # no registry: an OCI archive
#   PLATFORMS=linux/amd64,linux/arm64 hack/release-image.sh ghcr.io/... # multi-arch (see below)
#
# Writes dist/image/: digest (repo@sha256:...), tags, and sbom.*.json. Multi-arch: with a Docker
# engine through `docker buildx` (its BuildKit SBOM and provenance attestations are attached
# too); with buildah through `--platform` into a manifest list, which needs qemu-user binfmt for
# foreign architectures and a base image that has them (the upstream python image does; the
# local Debian base of hack/image-base.sh is built for this machine's architecture only).
# SBOM: syft, when on PATH (Debian and Python packages of the image, SPDX); else cyclonedx-py
# (PyPI's cyclonedx-bom, pinned below) of the locked Python dependencies, CycloneDX.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
dest="${1:?usage: $0 REGISTRY/REPOSITORY | oci-archive:PATH}"
platforms="${PLATFORMS:-}"
version="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$root/pyproject.toml")"
revision="$(git -C "$root" rev-parse HEAD)"
out="$root/dist/image"
mkdir -p "$out"
log() { printf '[release] %s\n' "$*" >&2; }

[[ -z $(git -C "$root" status --porcelain --untracked-files=no) ]] || { log "the checkout has changes: release from a clean commit"; exit 1; }

builder="$("$here/image.sh" engine | cut -d' ' -f1)"
tags=("$version" "sha-${revision:0:12}")
labels=(--label "org.opencontainers.image.version=$version" --label "org.opencontainers.image.revision=$revision")

if [[ $builder == docker && $dest != oci-archive:* ]]; then
  # buildx pushes every platform and the attestations in one go.
  args=(--push --sbom=true --provenance=mode=max "${labels[@]}" --metadata-file "$out/buildx.json")
  [[ -n $platforms ]] && args+=(--platform "$platforms")
  for t in "${tags[@]}"; do args+=(-t "$dest:$t"); done
  docker buildx build "${args[@]}" "$root"
  digest="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["containerimage.digest"])' "$out/buildx.json")"
  ref="$dest@$digest"
  local_ref="$dest:$version"
else
  if [[ -n $platforms ]]; then
    manifest="localhost/celery-fleet-release:$version"
    buildah manifest rm "$manifest" >/dev/null 2>&1 || true
    buildah bud --isolation chroot --layers "${labels[@]}" --platform "$platforms" --manifest "$manifest" "$root" >&2
    local_ref="$manifest"
    push=(buildah manifest push --all)
  else
    local_ref="$(IMAGE="localhost/celery-fleet:$version" "$here/image.sh" build | tail -1)"
    push=(buildah push)
  fi
  if [[ $dest == oci-archive:* ]]; then
    "${push[@]}" --digestfile "$out/digest.tmp" "$local_ref" "$dest:$version" >&2
    ref="$dest@$(cat "$out/digest.tmp")"
  else
    for t in "${tags[@]}"; do "${push[@]}" --digestfile "$out/digest.tmp" "$local_ref" "docker://$dest:$t" >&2; done
    ref="$dest@$(cat "$out/digest.tmp")"
  fi
  rm -f "$out/digest.tmp"
fi
echo "$ref" > "$out/digest"
printf '%s\n' "${tags[@]}" > "$out/tags"
log "pushed $ref (tags: ${tags[*]})"

if command -v syft >/dev/null; then
  if [[ $dest == oci-archive:* ]]; then src="$dest"; else src="registry:$ref"; fi
  syft scan "$src" -o "spdx-json=$out/sbom.spdx.json"
  log "SBOM (syft, SPDX): $out/sbom.spdx.json"
else
  venv="$(mktemp -d)"
  trap 'rm -rf "$venv"' EXIT
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q cyclonedx-bom==7.5.0
  "$venv/bin/cyclonedx-py" requirements --of JSON -o "$out/sbom.cyclonedx.json" "$root/requirements.lock"
  log "SBOM (cyclonedx-py, CycloneDX, Python dependencies as locked): $out/sbom.cyclonedx.json"
fi
echo "$ref"
