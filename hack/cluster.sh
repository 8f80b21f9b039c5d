#!/usr/bin/env bash
# Start/stop the local control plane: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kwok (fake kubelets), as plain processes via kwokctl's binary
# runtime, bound to 127.0.0.1 on free ports. Idempotent.
#
#   hack/cluster.sh up     # admin kubeconfig -> .local/kubeconfig, tools -> .local/bin/
#   hack/cluster.sh down
#   hack/cluster.sh status
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
local_dir="$root/.local"
name="${CELERY_FLEET_CLUSTER:-celery-fleet}"
nodes="${CELERY_FLEET_NODES:-3}"
export KWOK_WORKDIR="$local_dir/kwok"
kubeconfig="$local_dir/kubeconfig"

log() { printf '[cluster] %s\n' "$*" >&2; }

bin_dir="$("$here/build-binaries.sh" kwok etcd kubernetes | tail -1)"
kwokctl="$bin_dir/kwokctl"
kubectl="$bin_dir/kubectl"

link_tools() {
  mkdir -p "$local_dir/bin"
  local t
  for t in kubectl kwokctl helm etcd kube-apiserver; do
    [[ -x "$bin_dir/$t" ]] && ln -sfn "$bin_dir/$t" "$local_dir/bin/$t"
  done
}

write_config() {
  mkdir -p "$local_dir"
  cat > "$local_dir/kwok.yaml" <<YAML
kind: KwokctlConfiguration
apiVersion: config.kwok.x-k8s.io/v1alpha1
options:
  runtime: binary
  bindAddress: 127.0.0.1
  kubeApiserverBinary: $bin_dir/kube-apiserver
  kubeControllerManagerBinary: $bin_dir/kube-controller-manager
  kubeSchedulerBinary: $bin_dir/kube-scheduler
  kwokControllerBinary: $bin_dir/kwok
  etcdBinary: $bin_dir/etcd
  kubectlBinary: $bin_dir/kubectl
  disableQPSLimits: true
YAML
}

# Every component's process is alive: the apiserver can answer /readyz while the scheduler or the
# controller-manager has exited (both exit when they lose their lease under a stalled apiserver).
components_alive() {
  local pids="$KWOK_WORKDIR/clusters/$name/pids" f
  [[ -d "$pids" ]] || return 1
  for f in "$pids"/*.pid; do kill -0 "$(cat "$f")" 2>/dev/null || { log "$(basename "$f" .pid) is not running"; return 1; }; done
}

healthy() {
  [[ -f "$kubeconfig" ]] && components_alive &&
    "$kubectl" --kubeconfig "$kubeconfig" --request-timeout=5s get --raw /readyz >/dev/null 2>&1
}

exists() { "$kwokctl" get clusters 2>/dev/null | grep -qx "$name"; }

wait_nodes() {
  local deadline=$((SECONDS + 120))
  until [[ "$("$kubectl" --kubeconfig "$kubeconfig" get nodes --no-headers 2>/dev/null | grep -c ' Ready ')" -ge "$nodes" ]]; do
    (( SECONDS < deadline )) || { log "nodes not Ready after 120s"; "$kubectl" --kubeconfig "$kubeconfig" get nodes >&2 || true; return 1; }
    sleep 1
  done
}

up() {
  link_tools
  if healthy; then log "already running ($kubeconfig)"; return 0; fi
  write_config
  if exists; then
    log "starting existing cluster $name"
    "$kwokctl" --name "$name" stop cluster >&2 || true
    "$kwokctl" -c "$local_dir/kwok.yaml" --name "$name" start cluster --wait 120s >&2 || {
      log "restart failed; recreating"; "$kwokctl" --name "$name" delete cluster >&2 || true; }
  fi
  if ! exists; then
    log "creating cluster $name (kwokctl binary runtime)"
    "$kwokctl" -c "$local_dir/kwok.yaml" --name "$name" create cluster \
      --kubeconfig "$kubeconfig" --wait 180s \
      --extra-args kube-controller-manager=concurrent-deployment-syncs=25 \
      --extra-args kube-controller-manager=concurrent-replicaset-syncs=25 \
      --extra-args kube-controller-manager=concurrent-gc-syncs=25 >&2
  fi
  "$kwokctl" --name "$name" get kubeconfig > "$kubeconfig.tmp" && mv "$kubeconfig.tmp" "$kubeconfig"
  "$kwokctl" --name "$name" scale node --replicas "$nodes" >&2
  wait_nodes
  log "ready: export KUBECONFIG=$kubeconfig PATH=$local_dir/bin:\$PATH"
}

down() {
  if exists; then "$kwokctl" --name "$name" delete cluster >&2; fi
  rm -f "$kubeconfig"
  log "down"
}

status() {
  if healthy; then
    "$kubectl" --kubeconfig "$kubeconfig" get nodes
  else
    echo "not running"; return 1
  fi
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
