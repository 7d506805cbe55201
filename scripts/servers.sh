#!/usr/bin/env bash
# Starts, stops and restarts the real servers devfleet's tests run against:
# RabbitMQ, NATS (JetStream) and Redis, as plain processes on loopback, on
# free ports, with their data in one directory.
#
# usage: scripts/servers.sh start DIR      start all three; writes DIR/env
#        scripts/servers.sh stop DIR       stop all three
#        scripts/servers.sh restart DIR rabbitmq|nats|redis
#                                          stop one (SIGTERM) and start it again
#                                          on the same port and data
#        scripts/servers.sh kill DIR rabbitmq|nats|redis
#                                          SIGKILL one (it stays down)
#        scripts/servers.sh up DIR rabbitmq|nats|redis
#                                          start one that is down
# DIR/env holds the DEVFLEET_*_URL exports; source it. A RabbitMQ node
# reads DIR/rabbitmq/rabbitmq.conf (written with defaults when missing) and
# DIR/rabbitmq/advanced.config when present, so `up` after writing them
# starts a node with its own settings. `start` takes
# REDIS_PORT, NATS_PORT, RABBIT_PORT, RABBIT_DIST_PORT, EPMD_PORT from the
# environment when set, else picks free ports.
set -euo pipefail

usage() { sed -n '5,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

need_packages() {
  local missing=()
  command -v rabbitmq-server >/dev/null 2>&1 || missing+=(rabbitmq-server)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "servers: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

free_port() {
  python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
PY
}

wait_port() { # port seconds what
  local deadline=$((SECONDS + $2))
  until (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then echo "servers: $3 did not listen on port $1 within $2 s" >&2; return 1; fi
    sleep 0.2
  done
}

load() { # DIR
  # shellcheck disable=SC1091
  [ -f "$1/ports" ] && . "$1/ports"
  return 0
}

start_redis() {
  local dir=$1
  mkdir -p "$dir/redis"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$dir/redis" \
    --appendonly yes --appendfsync always --save '' --daemonize yes \
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" >/dev/null
  wait_port "$REDIS_PORT" 30 redis
  # The pid file appears a moment after the port opens.
  for _ in $(seq 50); do [ -s "$dir/redis.pid" ] && break; sleep 0.1; done
}

start_nats() {
  local dir=$1
  mkdir -p "$dir/nats"
  # Envelopes may be up to 16 MiB (the bus limit); NATS defaults to 1 MiB.
  # Debian's nats-server 2.9 has no `sync_interval`: JetStream fsyncs every
  # 2 minutes, so a host crash (not a process crash) can lose the last ~2
  # minutes of confirmed messages (docs/OPERATIONS.md, Durability).
  echo 'max_payload: 16MB' >"$dir/nats.conf"
  # setsid: a server (re)started from inside a test must not die with the
  # test's process group.
  setsid nats-server -c "$dir/nats.conf" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$dir/nats" -P "$dir/nats.pid" \
    >>"$dir/nats.log" 2>&1 &
  wait_port "$NATS_PORT" 30 nats
}

rabbit_env() {
  local dir=$1
  export RABBITMQ_NODENAME="devfleet-$RABBIT_PORT@localhost"
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=$RABBIT_PORT
  export RABBITMQ_DIST_PORT=$RABBIT_DIST_PORT
  export RABBITMQ_MNESIA_BASE=$dir/rabbitmq/mnesia
  export RABBITMQ_LOG_BASE=$dir/rabbitmq/log
  export RABBITMQ_PID_FILE=$dir/rabbitmq/rabbit.pid
  export RABBITMQ_ENABLED_PLUGINS_FILE=$dir/rabbitmq/enabled_plugins
  export RABBITMQ_CONFIG_FILE=$dir/rabbitmq/rabbitmq
  # Optional (Erlang terms): settings rabbitmq.conf has no key for.
  export RABBITMQ_ADVANCED_CONFIG_FILE=$dir/rabbitmq/advanced.config
  export ERL_EPMD_PORT=$EPMD_PORT
  # Sourced by rabbitmq-server after it drops to the rabbitmq user.
  export RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq/rabbitmq-env.conf
}

start_rabbitmq() {
  local dir=$1
  mkdir -p "$dir/rabbitmq/mnesia" "$dir/rabbitmq/log"
  [ -f "$dir/rabbitmq/enabled_plugins" ] || echo '[].' >"$dir/rabbitmq/enabled_plugins"
  # No disk-space alarm on small test disks; quiet logs.
  [ -f "$dir/rabbitmq/rabbitmq.conf" ] || printf 'disk_free_limit.absolute = 50MB\nlog.console = false\n' >"$dir/rabbitmq/rabbitmq.conf"
  # Every quorum queue reserves file handles in the broker's handle cache,
  # which is sized from the open-file limit; once reservations reach it, new
  # connections wait for a socket handle and the broker looks hung. `su`
  # leaves the rabbitmq user a soft limit of 1024: raise it to the hard one.
  printf 'ulimit -n "$(ulimit -Hn)" 2>/dev/null || true\n' >"$dir/rabbitmq/rabbitmq-env.conf"
  # rabbitmq-server drops to the rabbitmq user: it must own its data and
  # traverse every parent directory.
  chmod o+x "$dir" "$(dirname "$dir")" 2>/dev/null || true
  id rabbitmq >/dev/null 2>&1 && chown -R rabbitmq:rabbitmq "$dir/rabbitmq"
  ( rabbit_env "$dir"; exec setsid rabbitmq-server >>"$dir/rabbitmq.log" 2>&1 ) &
  wait_port "$RABBIT_PORT" 90 rabbitmq
  ( rabbit_env "$dir"
    local deadline=$((SECONDS + 60))
    until rabbitmqctl -n "$RABBITMQ_NODENAME" -q await_startup >/dev/null 2>&1; do
      if [ $SECONDS -ge $deadline ]; then echo "servers: rabbitmq did not finish booting" >&2; exit 1; fi
      sleep 0.5
    done
    # Each test works in its own namespace and leaves its queues behind:
    # a queue nobody used for 10 minutes goes, so a long suite does not
    # pile up thousands of quorum queues (each a Raft member to tick).
    rabbitmqctl -n "$RABBITMQ_NODENAME" -q set_policy --apply-to queues \
      devfleet-test-expiry '.*' '{"expires": 600000}' >/dev/null )
}

pid_of() { # dir name
  case $2 in
    redis) cat "$1/redis.pid" 2>/dev/null || true ;;
    nats) cat "$1/nats.pid" 2>/dev/null || true ;;
    rabbitmq) cat "$1/rabbitmq/rabbit.pid" 2>/dev/null || true ;;
  esac
}

port_of() {
  case $1 in redis) echo "$REDIS_PORT" ;; nats) echo "$NATS_PORT" ;; rabbitmq) echo "$RABBIT_PORT" ;; esac
}

# True when $1 is a live process running the program of server $2 (a pid
# file can outlive its process, and the pid be reused by another).
is_server_pid() {
  [ -n "$1" ] && [ -r "/proc/$1/cmdline" ] || return 1
  local cmd; cmd=$(tr '\0' ' ' <"/proc/$1/cmdline")
  case $2 in
    redis) [[ $cmd == *redis-server* ]] ;;
    nats) [[ $cmd == *nats-server* ]] ;;
    rabbitmq) [[ $cmd == *beam* ]] ;;
  esac
}

stop_one() { # dir name signal
  local pid; pid=$(pid_of "$1" "$2")
  is_server_pid "$pid" "$2" || pid=
  if [ "$2" = rabbitmq ] && [ "$3" = TERM ]; then
    ( rabbit_env "$1"; rabbitmqctl -n "$RABBITMQ_NODENAME" -q stop >/dev/null 2>&1 ) || true
  fi
  if [ -n "$pid" ]; then
    kill -s "$3" "$pid" 2>/dev/null || true
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  if [ "$2" = rabbitmq ]; then
    # The Erlang VM's helpers (epmd, inet_gethost) belong to this node's ports.
    pkill -f "ERL_EPMD_PORT=$EPMD_PORT" 2>/dev/null || true
    pkill -f "epmd.*-port $EPMD_PORT" 2>/dev/null || true
  fi
  local port; port=$(port_of "$2")
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null || return 0; sleep 0.1; done
}

start_one() {
  case $2 in
    redis) start_redis "$1" ;;
    nats) start_nats "$1" ;;
    rabbitmq) start_rabbitmq "$1" ;;
    *) usage ;;
  esac
}

cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || usage
case $cmd in
  start)
    need_packages
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    # Ports preset in the environment are kept (scripts/stack.sh pins them
    # so a stack keeps its addresses and data across down/up); the rest are
    # free ports.
    cat >"$dir/ports" <<PORTS
REDIS_PORT=${REDIS_PORT:-$(free_port)}
NATS_PORT=${NATS_PORT:-$(free_port)}
RABBIT_PORT=${RABBIT_PORT:-$(free_port)}
RABBIT_DIST_PORT=${RABBIT_DIST_PORT:-$(free_port)}
EPMD_PORT=${EPMD_PORT:-$(free_port)}
PORTS
    load "$dir"
    start_redis "$dir" &
    r=$!
    start_nats "$dir" &
    n=$!
    start_rabbitmq "$dir"
    wait $r; wait $n
    cat >"$dir/env" <<ENV
export DEVFLEET_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/
export DEVFLEET_NATS_URL=nats://127.0.0.1:$NATS_PORT
export DEVFLEET_AMQP_URL=amqp://guest:guest@127.0.0.1:$RABBIT_PORT/%2f
export DEVFLEET_SERVERS_DIR=$dir
export DEVFLEET_SERVERS_CTL=$(cd "$(dirname "$0")" && pwd)/servers.sh
ENV
    echo "servers: redis :$REDIS_PORT, nats :$NATS_PORT, rabbitmq :$RABBIT_PORT (data in $dir)" >&2
    ;;
  stop)
    load "$dir"
    [ -f "$dir/ports" ] || exit 0
    for s in redis nats rabbitmq; do stop_one "$dir" "$s" TERM || true; done
    ;;
  restart)
    load "$dir"; stop_one "$dir" "${3:?name}" TERM; start_one "$dir" "$3" ;;
  kill)
    load "$dir"; stop_one "$dir" "${3:?name}" KILL ;;
  up)
    load "$dir"; start_one "$dir" "${3:?name}" ;;
  *) usage ;;
esac
