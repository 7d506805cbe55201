#!/usr/bin/env bash
# devfleet's test command: installs RabbitMQ, NATS and Redis when missing,
# starts them on free loopback ports with data in a temporary directory,
# runs the whole test suite against them, and stops them on every exit path.
#
# usage: scripts/test.sh [FILTER]
#   FILTER  optional nextest filter expression, e.g. 'package(devfleet-bus)'
set -euo pipefail

cd "$(dirname "$0")/.."
filter=${1:-all()}

tmp=$(mktemp -d /tmp/devfleet-test.XXXXXX)
cleanup() {
  scripts/servers.sh stop "$tmp/servers" >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Tools the tests use besides the servers: promtool and prometheus (gateway
# and canary), bubblewrap (QA sandbox), chromium (dashboard), graphviz (DOT),
# Flask and pytest (the examples' integration stages).
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v dot >/dev/null 2>&1 || need+=(graphviz)
# The QA sandbox sees only /usr: the example apps' integration tests need
# Flask and pytest in the system Python, not in a user's virtualenv.
/usr/bin/python3 -c 'import flask' >/dev/null 2>&1 || need+=(python3-flask)
/usr/bin/python3 -c 'import pytest' >/dev/null 2>&1 || need+=(python3-pytest)
if [ ${#need[@]} -gt 0 ]; then
  echo "test.sh: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# A real agent CLI from PyPI for the command executor's tests: aider in its
# own virtualenv (made from the system Python, so the agent sandbox, which
# sees /usr and the venv, can run it). About 45 s and 700 MB, once.
if [ ! -x /opt/devfleet-aider/bin/aider ]; then
  echo "test.sh: installing aider-chat into /opt/devfleet-aider" >&2
  /usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  }
  /usr/bin/python3 -m venv /opt/devfleet-aider
  /opt/devfleet-aider/bin/pip install -q aider-chat >&2
fi

scripts/servers.sh start "$tmp/servers"
# shellcheck disable=SC1091
. "$tmp/servers/env"

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "test.sh: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest >&2
fi

# Tests that run a service as its own process (tests/e2e) use this build's
# binaries; build them first so none is stale.
cargo build --workspace --bins

# Tests whose name says `restart` stop and start a shared server: they run
# one at a time, after everything else, so they disturb no other test.
status=0
cargo nextest run --workspace --no-fail-fast -E "($filter) & not test(/restart/)" || status=$?
cargo nextest run --workspace --no-fail-fast -j 1 --no-tests=pass -E "($filter) & test(/restart/)" || status=$?
exit $status
