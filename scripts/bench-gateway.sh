#!/usr/bin/env bash
# Metrics gateway fan-out benchmark: CLIENTS concurrent WebSocket clients on
# loopback, samples published at each RATE for SECONDS; prints delivered
# frames/s and delivery latency p50/p99 (publish -> client read).
# Needs no servers: the gateway runs on the in-memory bus and store.
#
# usage: scripts/bench-gateway.sh [CLIENTS] [SECONDS] [RATES]   (defaults: 1000 5 20,100,200)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,7p' "$0"
  exit 0
fi
clients=${1:-1000}
seconds=${2:-5}
rates=${3:-20,100,200}
# Each client holds two descriptors in this process (client and server side).
need=$((clients * 2 + 256))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
  ulimit -n "$need" 2>/dev/null || { echo "bench-gateway.sh: raise 'ulimit -n' to at least $need" >&2; exit 1; }
fi
cargo bench -p devfleet-metrics-gateway --bench ws_fanout -- "$clients" "$seconds" "$rates"
