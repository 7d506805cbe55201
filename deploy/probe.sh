#!/usr/bin/env bash
# shellcheck disable=SC2016  # single-quoted bodies of `bash -c`/`sh -c` expand in the child, on purpose
# Readiness probe for the devfleet services that serve no HTTP (installed in
# the image as /usr/local/bin/devfleet-probe): succeeds when this container
# can open a TCP connection to each backend its DEVFLEET_* settings name:
# RabbitMQ (when DEVFLEET_BUS is amqp, the default), NATS (when
# DEVFLEET_NATS_URL is set) and Redis. It says nothing about the process
# itself, so use it for readiness, not liveness: a broker outage must not
# restart every pod.
#
# usage: devfleet-probe            check the backends
#        devfleet-probe --http URL  GET URL (http only), succeed on 2xx
set -euo pipefail

timeout_s=${DEVFLEET_PROBE_TIMEOUT:-3}

# host and port of a URL (scheme://[user[:pass]@]host[:port][/path]).
endpoint() { # url default-port
  local rest=${1#*://}
  rest=${rest%%/*}
  rest=${rest##*@}
  local host=${rest%:*} port=${rest##*:}
  if [ "$host" = "$rest" ] || [ -z "$port" ] || [[ ! $port =~ ^[0-9]+$ ]]; then host=$rest; port=$2; fi
  host=${host#[}; host=${host%]}
  echo "$host $port"
}

tcp() { # name url default-port
  local host port
  read -r host port < <(endpoint "$2" "$3")
  if ! timeout "$timeout_s" bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "$port" 2>/dev/null; then
    echo "devfleet-probe: $1 at $host:$port is unreachable" >&2
    return 1
  fi
}

if [ "${1:-}" = --http ]; then
  url=${2:?usage: devfleet-probe --http URL}
  read -r host port < <(endpoint "$url" 80)
  path=/${url#*://*/}
  [ "$path" = "/$url" ] && path=/
  status=$(timeout "$timeout_s" bash -c '
    exec 3<>"/dev/tcp/$0/$1"
    printf "GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n" "$2" "$0" >&3
    head -n 1 <&3' "$host" "$port" "$path" 2>/dev/null | awk '{print $2}') || true
  case $status in
    2??) exit 0 ;;
    *) echo "devfleet-probe: GET $url answered '${status:-nothing}'" >&2; exit 1 ;;
  esac
fi

ok=0
if [ "${DEVFLEET_BUS:-amqp}" = amqp ]; then
  tcp RabbitMQ "${DEVFLEET_AMQP_URL:-amqp://127.0.0.1:5672/}" 5672 || ok=1
fi
if [ -n "${DEVFLEET_NATS_URL:-}" ]; then
  tcp NATS "$DEVFLEET_NATS_URL" 4222 || ok=1
fi
case ${DEVFLEET_REDIS_URL:-redis://127.0.0.1:6379/} in
  memory://*) ;;
  *) tcp Redis "${DEVFLEET_REDIS_URL:-redis://127.0.0.1:6379/}" 6379 || ok=1 ;;
esac
exit $ok
