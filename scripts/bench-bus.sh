#!/usr/bin/env bash
# Bus benchmark: publish -> consume -> ack messages/s and p50/p99 latency for
# the memory, RabbitMQ and NATS backends, on servers started for the run.
#
# usage: scripts/bench-bus.sh [MESSAGES] [BACKENDS]   (defaults: 20000 memory,amqp,nats)
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d /tmp/devfleet-bench.XXXXXX)
cleanup() { scripts/servers.sh stop "$tmp/servers" >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
scripts/servers.sh start "$tmp/servers"
# shellcheck disable=SC1091
. "$tmp/servers/env"
cargo bench -p devfleet-bus --bench throughput -- "${1:-20000}" "${2:-memory,amqp,nats}"
