#!/usr/bin/env bash
# make demo: watch celery-fleet scale real Celery workers on this machine, no Docker, no cloud.
#
# `make demo` has already built the venv, installed redis-server and started the local control
# plane (kube-apiserver + kwok's fake nodes). This script then:
#   1. starts a Redis on a free port (.local/demo/), applies the CRDs;
#   2. starts the operator (`celery-fleet run`) and the local runtime (`celery-fleet localrun`,
#      development only: it runs each pod of the operator's Deployments as a local process);
#   3. applies the demo pool (three tiers) and a CeleryBeat with a standby (demo/manifests/);
#   4. sends a burst into the high and low queues and shows a live view until the queues drain
#      and the tiers step back down (the beat leader's pod is deleted on the way, to show failover);
#   5. prints a summary, then tears everything down. KEEP=1 leaves it running.
#
#   hack/demo.sh          # the demo
#   hack/demo.sh stop     # stop what a KEEP=1 run left running
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$root/.local/demo"
ns="${DEMO_NAMESPACE:-celery-fleet-demo}"
keep="${KEEP:-0}"
export KUBECONFIG="$root/.local/kubeconfig"
kubectl="$root/.local/bin/kubectl"
py="$root/.venv/bin/python"
started=$SECONDS

say() { printf '\033[1m[demo %3ds]\033[0m %s\n' "$((SECONDS - started))" "$*"; }
die() { printf '[demo] error: %s\n' "$*" >&2; exit 1; }

# A pid file's process, only while it is still the process we started (its command line says so).
ours() {  # pidfile pattern
  local pid
  [[ -f "$1" ]] || return 1
  pid="$(cat "$1")"
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$2" || return 1
  echo "$pid"
}

stop_pid() {  # pidfile pattern timeout
  local pid
  pid="$(ours "$1" "$2")" || { rm -f "$1"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 $(( $3 * 10 ))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  rm -f "$1"
}

stop_all() {
  # The local runtime first: its workers finish their tasks (warm shutdown) while Redis is still up.
  stop_pid "$dir/localrun.pid" "celery-fleet localrun" 70
  stop_pid "$dir/operator.pid" "celery-fleet run" 20
  "$kubectl" delete namespace "$ns" --wait=false --ignore-not-found >/dev/null 2>&1 || true
  stop_pid "$dir/redis.pid" "redis-server" 10
}

if [[ "${1:-}" == "stop" ]]; then
  stop_all
  echo "demo stopped (namespace $ns deleted, Redis, operator and local runtime stopped)"
  exit 0
fi

[[ -f "$KUBECONFIG" ]] && "$kubectl" get --raw /readyz >/dev/null 2>&1 || die "the local cluster is not up: run 'make demo' (or 'make cluster-up')"
command -v redis-server >/dev/null || die "redis-server is missing: run 'make install-system'"

# A previous KEEP=1 run (or an interrupted one) may still be running.
stop_all
mkdir -p "$dir"
rm -rf "$dir/localrun" "$dir"/*.log "$dir/summary.json"

free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cleanup() {
  local code=$?
  if [[ "$keep" == 1 && $code -eq 0 ]]; then
    cat <<MSG

KEEP=1: everything keeps running.
  export KUBECONFIG=$KUBECONFIG PATH=$root/.local/bin:\$PATH
  kubectl -n $ns get celeryworkerpools,celerybeats,deployments,pods
  $py demo/produce.py --broker $broker --queue high_priority=200:1     # another burst
  logs: $dir/operator.log, $dir/localrun.log, $dir/localrun/logs/
  metrics: http://127.0.0.1:$metrics_port/metrics
Stop it all with: hack/demo.sh stop
MSG
    return
  fi
  say "tearing down (workers finish their tasks first)"
  stop_all
  say "done; logs are in $dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "starting Redis"
redis_port="$(free_port)"
redis-server --bind 127.0.0.1 --port "$redis_port" --dir "$dir" --save '' --appendonly no \
  --daemonize yes --logfile "$dir/redis.log" --pidfile "$dir/redis.pid"
broker="redis://127.0.0.1:$redis_port/0"
"$py" -c 'import sys, time, redis
r = redis.Redis.from_url(sys.argv[1])
for _ in range(100):
    try:
        sys.exit(0 if r.ping() else 1)
    except redis.ConnectionError:
        time.sleep(0.1)
sys.exit("redis-server did not answer")' "$broker"

say "applying the CRDs"
"$kubectl" apply --server-side --force-conflicts -f "$root/crds/" >/dev/null
"$kubectl" wait --for=condition=Established --timeout=60s crd/celeryworkerpools.celeryfleet.io crd/celerybeats.celeryfleet.io >/dev/null

if "$kubectl" get namespace "$ns" >/dev/null 2>&1; then
  say "removing the previous demo namespace"
  "$kubectl" delete namespace "$ns" --timeout=90s >/dev/null
fi
"$kubectl" create namespace "$ns" >/dev/null
"$kubectl" -n "$ns" create secret generic demo-broker --from-literal=url="$broker" >/dev/null

say "starting the operator (log: .local/demo/operator.log)"
metrics_port="$(free_port)"; health_port="$(free_port)"
# The demo's Redis listens on loopback, which the operator refuses as a broker by default: allowed here.
"$root/.venv/bin/celery-fleet" run --namespace "$ns" --kubeconfig "$KUBECONFIG" \
  --broker-allow 127.0.0.0/8 --broker-allow ::1/128 \
  --metrics-addr 127.0.0.1 --metrics-port "$metrics_port" --health-endpoint "http://127.0.0.1:$health_port/healthz" \
  >"$dir/operator.log" 2>&1 &
echo $! > "$dir/operator.pid"
for _ in $(seq 1 300); do
  "$py" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
    "http://127.0.0.1:$health_port/healthz" >/dev/null 2>&1 && break
  kill -0 "$(cat "$dir/operator.pid")" 2>/dev/null || { tail -20 "$dir/operator.log" >&2; die "the operator exited"; }
  sleep 0.1
done

say "starting the local runtime (development only; log: .local/demo/localrun.log)"
"$root/.venv/bin/celery-fleet" localrun --namespace "$ns" --kubeconfig "$KUBECONFIG" \
  --state-dir "$dir/localrun" --pythonpath "$root/demo" >"$dir/localrun.log" 2>&1 &
echo $! > "$dir/localrun.pid"

say "applying the demo pool (high/medium/low) and a CeleryBeat with one standby"
"$kubectl" -n "$ns" apply -f "$root/demo/manifests/pool.yaml" -f "$root/demo/manifests/beat.yaml" >/dev/null
"$py" "$root/demo/view.py" ready --namespace "$ns" --kubeconfig "$KUBECONFIG" --timeout 120 \
  || { tail -20 "$dir/localrun.log" >&2; die "the workers did not become ready"; }

high="${DEMO_HIGH:-360}"; low="${DEMO_LOW:-80}"
say "sending a burst: $high tasks (~1 s each) into high_priority, $low (~2 s each) into low_priority, mixed priorities"
since="$("$py" -c 'import time; print(time.time())')"
"$py" "$root/demo/produce.py" --broker "$broker" --queue "high_priority=$high:1" --queue "low_priority=$low:2"

"$py" "$root/demo/view.py" watch --namespace "$ns" --kubeconfig "$KUBECONFIG" --broker "$broker" --since "$since" \
  --expect "high_priority=$high" --expect "low_priority=$low" --failover-at "${DEMO_FAILOVER_AT:-20}" \
  --timeout "${DEMO_TIMEOUT:-150}" --summary "$dir/summary.json"
