#!/usr/bin/env bash
# make demo (foundation stage): the local cluster is up; start a Redis beside it and say how to reach both.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$root/.local/redis"; mkdir -p "$dir"
port_file="$dir/port"
if [[ -f "$port_file" ]] && redis-cli -p "$(cat "$port_file")" ping >/dev/null 2>&1; then
  port="$(cat "$port_file")"
else
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --save '' --daemonize yes --logfile "$dir/redis.log" --pidfile "$dir/redis.pid"
  echo "$port" > "$port_file"
fi
"$root/.local/bin/kubectl" --kubeconfig "$root/.local/kubeconfig" get nodes
cat <<MSG

Local cluster and Redis are up:
  export KUBECONFIG=$root/.local/kubeconfig PATH=$root/.local/bin:\$PATH
  kubectl get nodes
  redis-cli -p $port ping          # broker URL: redis://127.0.0.1:$port/0
Stop them with: make cluster-down; kill \$(cat $dir/redis.pid)
MSG
