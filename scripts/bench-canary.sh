#!/usr/bin/env bash
# Canary benchmark: one `canary` process driving N deployments at once
# against a local health service, on servers started for the run. Prints
# duration, check lateness and CPU figures (docs/BENCHMARKS.md § Canary).
#
# usage: scripts/bench-canary.sh [N]   (default 100)
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d /tmp/devfleet-bench-canary.XXXXXX)
cleanup() { scripts/servers.sh stop "$tmp/servers" >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
scripts/servers.sh start "$tmp/servers"
# shellcheck disable=SC1091
. "$tmp/servers/env"
# The harness (benches/deployments.rs) reuses the integration tests' HTTP
# service and process helpers.
DEVFLEET_CANARY_BENCH_N=${1:-100} cargo bench -p devfleet-canary --bench deployments
