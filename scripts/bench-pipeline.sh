#!/usr/bin/env bash
# Pipeline benchmark: tasks/s and p50/p99 READY->completed latency through
# the scheduler and dev-workers over RabbitMQ and Redis started for the run,
# with the simulate executor at 0 ms (see benches/pipeline.rs).
#
# usage: scripts/bench-pipeline.sh [TASKS] [WIDTH] [WORKERS] [SLOTS]   (defaults: 2000 50 2 10)
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d /tmp/devfleet-bench.XXXXXX)
cleanup() { scripts/servers.sh stop "$tmp/servers" >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
cargo bench --no-run --bench pipeline
scripts/servers.sh start "$tmp/servers"
# shellcheck disable=SC1091
. "$tmp/servers/env"
RUST_LOG=${RUST_LOG:-warn} cargo bench -q --bench pipeline -- \
  "${1:-2000}" "${2:-50}" "${3:-2}" "${4:-10}"
