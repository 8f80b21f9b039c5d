#!/usr/bin/env bash
# Start/stop the local control plane: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kwok (fake kubelets), as plain processes via kwokctl's binary
# runtime, bound to 127.0.0.1 on free ports. Idempotent.
#
#   hack/cluster.sh up     # admin kubeconfig -> .local/kubeconfig, tools -> .local/bin/
#   hack/cluster.sh down
#   hack/cluster.sh status
set -euo pipefail
shopt -s nullglob

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
local_dir="$root/.local"
name="${CELERY_FLEET_CLUSTER:-celery-fleet}"
nodes="${CELERY_FLEET_NODES:-3}"
export KWOK_WORKDIR="$local_dir/kwok"
kubeconfig="$local_dir/kubeconfig"
config="$local_dir/kwok.yaml"
stamp="$local_dir/kwok-$name.config.sha256"

log() { printf '[cluster] %s\n' "$*" >&2; }

bin_dir="$("$here/build-binaries.sh" kwok etcd kubernetes | tail -1)"
# kwokctl starts the cluster's daemons: they must not inherit the lock's descriptor (or hold it forever).
kwokctl() { "$bin_dir/kwokctl" "$@" 9>&-; }
kubectl="$bin_dir/kubectl"

link_tools() {
  mkdir -p "$local_dir/bin"
  local t
  for t in kubectl kwokctl helm etcd kube-apiserver; do
    [[ -x "$bin_dir/$t" ]] && ln -sfn "$bin_dir/$t" "$local_dir/bin/$t"
  done
}

# The cluster's kwokctl configuration: our options, then kwok's own default Stages (given any Stage,
# kwokctl adds none of its defaults) and ours (hack/kwok/: pods the local runtime runs are not Ready
# until it says so).
write_config() {
  local tmp
  tmp="$(mktemp "$config.XXXXXX")"
  {
    cat <<YAML
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
    local stage
    for stage in "$bin_dir"/kwok-stages/*.yaml "$here"/kwok/*.yaml; do
      printf -- '---\n'
      cat "$stage"
    done
  } > "$tmp"
  mv "$tmp" "$config"
}

# Flags for the components, given at creation. One controller-manager and one scheduler: leader election
# buys nothing here, and under a stalled apiserver (a 1000-pool benchmark on 2 cores) each exited when a
# lease renewal timed out, leaving Deployments' status unwritten for the rest of the run.
extra_args=(
  --extra-args kube-controller-manager=concurrent-deployment-syncs=25
  --extra-args kube-controller-manager=concurrent-replicaset-syncs=25
  --extra-args kube-controller-manager=concurrent-gc-syncs=25
  --extra-args kube-controller-manager=leader-elect=false
  --extra-args kube-scheduler=leader-elect=false
)

# kwok reads its Stages, and the components their flags, when the cluster is created: a cluster made
# from another config or other flags is stale.
config_digest() { { cat "$config"; printf '%s\n' "${extra_args[@]}"; } | sha256sum | cut -d' ' -f1; }
stamp_ok() { [[ -f "$stamp" && "$(cat "$stamp")" == "$(config_digest)" ]]; }

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

exists() { kwokctl get clusters 2>/dev/null | grep -qx "$name"; }

wait_nodes() {
  local deadline=$((SECONDS + 120))
  until [[ "$("$kubectl" --kubeconfig "$kubeconfig" get nodes --no-headers 2>/dev/null | grep -c ' Ready ')" -ge "$nodes" ]]; do
    (( SECONDS < deadline )) || { log "nodes not Ready after 120s"; "$kubectl" --kubeconfig "$kubeconfig" get nodes >&2 || true; return 1; }
    sleep 1
  done
}

# One `up` or `down` at a time: test sessions in several worktrees share one cluster.
lock() { mkdir -p "$local_dir"; exec 9>"$local_dir/.cluster.lock"; flock 9; }

up() {
  lock
  link_tools
  write_config
  if exists && ! stamp_ok; then
    # Stages are read at creation only; everyone's cluster predates the current config.
    log "cluster $name was made from another configuration (kwok stages): recreating it"
    kwokctl --name "$name" delete cluster >&2 || true
    rm -f "$kubeconfig" "$stamp"
  fi
  if healthy; then log "already running ($kubeconfig)"; return 0; fi
  if exists; then
    log "starting existing cluster $name"
    kwokctl --name "$name" stop cluster >&2 || true
    kwokctl -c "$config" --name "$name" start cluster --wait 120s >&2 || {
      log "restart failed; recreating"; kwokctl --name "$name" delete cluster >&2 || true; }
  fi
  if ! exists; then
    log "creating cluster $name (kwokctl binary runtime)"
    rm -f "$stamp"
    kwokctl -c "$config" --name "$name" create cluster \
      --kubeconfig "$kubeconfig" --wait 180s "${extra_args[@]}" >&2
    config_digest > "$stamp"
  fi
  kwokctl --name "$name" get kubeconfig > "$kubeconfig.tmp" && mv "$kubeconfig.tmp" "$kubeconfig"
  kwokctl --name "$name" scale node --replicas "$nodes" >&2
  wait_nodes
  log "ready: export KUBECONFIG=$kubeconfig PATH=$local_dir/bin:\$PATH"
}

down() {
  lock
  if exists; then kwokctl --name "$name" delete cluster >&2; fi
  rm -f "$kubeconfig" "$stamp"
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
