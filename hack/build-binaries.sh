#!/usr/bin/env bash
# Build the local control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, etcd, kwok, kwokctl, helm) and the checkers the tests judge with
# (kstatus, kubeconform, kube-score) from Go modules into a cache outside the repo, keyed by
# version. A second run is a no-op.
#
# Kubernetes and etcd cannot be `go install`ed directly (their go.mod files
# carry replace directives), so each is built through a small wrapper module.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${CELERY_FLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/celery-fleet}"
bin_dir="$cache_root/bin/k8s-${KUBE_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_helm-${HELM_VERSION}"
work="$cache_root/build"
mkdir -p "$bin_dir" "$work"

export GOWORK=off GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
export GOMODCACHE="${GOMODCACHE:-$cache_root/gomod}"
export GOCACHE="${GOCACHE:-$cache_root/gocache}"

log() { printf '[build-binaries] %s\n' "$*" >&2; }

have() { [[ -x "$bin_dir/$1" ]]; }

# Binaries whose recipe can change without a version in the directory name carry a stamp of it:
# a binary with another (or no) stamp is rebuilt.
stamped() { have "$1" && [[ "$(cat "$bin_dir/.$1.recipe" 2>/dev/null)" == "$2" ]]; }
stamp() { printf '%s' "$2" > "$bin_dir/.$1.recipe"; }

build_kubernetes() {
  local cmds=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  local missing=0 c
  for c in "${cmds[@]}"; do have "$c" || missing=1; done
  [[ $missing == 0 ]] && return 0
  local minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
  local staging="v0.${KUBE_VERSION#v1.}"
  local mod="$work/k8s-$KUBE_VERSION"
  rm -rf "$mod"; mkdir -p "$mod"; cd "$mod"
  go mod init local/k8sbin >/dev/null 2>&1
  # The tag's own go.mod lists every staging module it replaces with ./staging/...;
  # point each at its published v0.X.Y twin instead.
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  local replaces=()
  while read -r m; do replaces+=("-replace=$m=$m@$staging"); done < <(
    grep -E '^\s*k8s\.io/[^ ]+ => \./staging/' "$gomod" | awk '{print $1}' | sort -u)
  log "kubernetes $KUBE_VERSION: ${#replaces[@]} staging modules -> $staging"
  go mod edit "${replaces[@]}" "-require=k8s.io/kubernetes@$KUBE_VERSION" -godebug=default=go1.24
  {
    echo '//go:build tools'
    echo 'package tools'
    echo 'import ('
    for c in "${cmds[@]}"; do echo "  _ \"k8s.io/kubernetes/cmd/$c\""; done
    echo ')'
  } > tools.go
  go mod tidy >/dev/null
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitTreeState=clean"
  for c in "${cmds[@]}"; do
    have "$c" && continue
    log "building $c"
    go build -trimpath -tags selinux,notest -ldflags "$ldflags" -o "$bin_dir/$c.tmp" "k8s.io/kubernetes/cmd/$c"
    mv "$bin_dir/$c.tmp" "$bin_dir/$c"
  done
}

build_etcd() {
  have etcd && return 0
  local mod="$work/etcd-$ETCD_VERSION"
  rm -rf "$mod"; mkdir -p "$mod"; cd "$mod"
  go mod init local/etcdbin >/dev/null 2>&1
  printf '//go:build tools\npackage tools\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null
  go mod tidy >/dev/null
  log "building etcd $ETCD_VERSION"
  go build -trimpath -ldflags "-s -w" -o "$bin_dir/etcd.tmp" go.etcd.io/etcd/server/v3
  mv "$bin_dir/etcd.tmp" "$bin_dir/etcd"
}

build_kwok() {
  if ! { have kwok && have kwokctl; }; then
    log "building kwok/kwokctl $KWOK_VERSION"
    GOBIN="$bin_dir" go install -trimpath -ldflags "-s -w" \
      "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
  fi
  kwok_default_stages
}

# kwok's own default Stages (what kwokctl configures when given none), from its module source, so
# hack/cluster.sh can add a Stage of ours beside them without copying them into the repo.
kwok_default_stages() {
  local out="$bin_dir/kwok-stages" recipe="kwok $KWOK_VERSION default stages" src
  [[ -d "$out" && "$(cat "$out/.recipe" 2>/dev/null)" == "$recipe" ]] && return 0
  src="$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
  rm -rf "$out.tmp"; mkdir -p "$out.tmp"
  cp "$src/kustomize/stage/node/fast/node-initialize.yaml" \
     "$src/kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml" \
     "$src/kustomize/stage/pod/fast/pod-ready.yaml" \
     "$src/kustomize/stage/pod/fast/pod-complete.yaml" \
     "$src/kustomize/stage/pod/fast/pod-delete.yaml" "$out.tmp/"
  chmod u+w "$out.tmp"/*.yaml
  printf '%s' "$recipe" > "$out.tmp/.recipe"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_helm() {
  # helm template without a cluster assumes the Kubernetes version stamped at build time (v1.20
  # when unstamped, which a chart's kubeVersion ">=1.27" refuses): stamp the version of the
  # client-go helm is built with, as helm's own Makefile does.
  local gomod client_go major minor
  gomod="$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  client_go="$(awk '$1 == "k8s.io/client-go" {print $2}' "$gomod")"
  # k8s.io modules v0.N.M are Kubernetes v1.N.
  major=1; minor="${client_go#v0.}"; minor="${minor%%.*}"
  local recipe="helm $HELM_VERSION kube v$major.$minor"
  stamped helm "$recipe" && return 0
  log "building helm $HELM_VERSION (Kubernetes v$major.$minor without a cluster)"
  local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  local pkg
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ldflags+=" -X $pkg.k8sVersionMajor=$major -X $pkg.k8sVersionMinor=$minor"
  done
  GOBIN="$bin_dir" go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  stamp helm "$recipe"
}

build_kstatus() {
  # A small command over sigs.k8s.io/cli-utils' status.Compute (source: hack/kstatus/main.go).
  local src="$here/kstatus/main.go" sum
  sum="$(sha256sum "$src" | cut -c1-16)"
  local recipe="cli-utils $CLI_UTILS_VERSION main.go $sum"
  stamped kstatus "$recipe" && return 0
  log "building kstatus (sigs.k8s.io/cli-utils $CLI_UTILS_VERSION)"
  local mod="$work/kstatus-$CLI_UTILS_VERSION"
  rm -rf "$mod"; mkdir -p "$mod"; cd "$mod"
  go mod init local/kstatus >/dev/null 2>&1
  cp "$src" main.go
  go get "sigs.k8s.io/cli-utils@$CLI_UTILS_VERSION" >/dev/null 2>&1
  go mod tidy >/dev/null 2>&1
  go build -trimpath -ldflags "-s -w" -o "$bin_dir/kstatus.tmp" .
  mv "$bin_dir/kstatus.tmp" "$bin_dir/kstatus"
  stamp kstatus "$recipe"
}

build_kubeconform() {
  stamped kubeconform "kubeconform $KUBECONFORM_VERSION" && return 0
  log "building kubeconform $KUBECONFORM_VERSION"
  GOBIN="$bin_dir" go install -trimpath -ldflags "-s -w -X main.version=$KUBECONFORM_VERSION" \
    "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
  stamp kubeconform "kubeconform $KUBECONFORM_VERSION"
}

build_kube_score() {
  stamped kube-score "$KUBE_SCORE_VERSION" && return 0
  log "building kube-score $KUBE_SCORE_VERSION"
  GOBIN="$bin_dir" go install -trimpath -ldflags "-s -w -X main.version=$KUBE_SCORE_VERSION" \
    "github.com/zegl/kube-score/cmd/kube-score@$KUBE_SCORE_VERSION"
  stamp kube-score "$KUBE_SCORE_VERSION"
}

targets=("$@")
[[ ${#targets[@]} == 0 ]] && targets=(kwok etcd kubernetes helm kstatus kubeconform kube-score)
for t in "${targets[@]}"; do
  case "$t" in
    kubernetes) build_kubernetes ;;
    etcd) build_etcd ;;
    kwok) build_kwok ;;
    helm) build_helm ;;
    kstatus) build_kstatus ;;
    kubeconform) build_kubeconform ;;
    kube-score) build_kube_score ;;
    *) echo "unknown target $t" >&2; exit 2 ;;
  esac
done
echo "$bin_dir"
