#!/usr/bin/env bash
# make bench: run every registered benchmark; each writes bench/results/<name>.md with its command line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
shopt -s nullglob
benches=(bench/*.py)
if [[ ${#benches[@]} == 0 ]]; then echo "no benchmarks registered yet"; exit 0; fi
for b in "${benches[@]}"; do
  [[ "$(basename "$b")" == _* ]] && continue
  echo "== $b"
  .venv/bin/python "$b"
done
