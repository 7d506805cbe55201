#!/usr/bin/env bash
# shellcheck disable=SC2016  # single-quoted bodies of `bash -c`/`sh -c` expand in the child, on purpose
# The real devfleet stack as plain processes on loopback: RabbitMQ, Redis
# (AOF on) and NATS with JetStream (via scripts/servers.sh), and every
# service binary as its own process. State (ports, pids, logs, data) lives in
# $DEVFLEET_STACK_DIR (default .devfleet/stack in the checkout).
#
# usage: scripts/stack.sh up [SERVICE=N ...]   build, start servers and services
#        scripts/stack.sh down [--purge]       stop everything (--purge: delete the state)
#        scripts/stack.sh status               processes alive/dead, queue depths, plans
#        scripts/stack.sh scale SERVICE N      run N replicas of SERVICE
#        scripts/stack.sh logs SERVICE [-f]    logs of SERVICE (all replicas), or of
#                                              SERVICE.N, rabbitmq, redis, nats
#        scripts/stack.sh env                  print the DEVFLEET_* exports
#        scripts/stack.sh restart WHAT [--kill] stop WHAT (SIGTERM with the grace, or
#                                              SIGKILL) and start it again: SERVICE.N
#                                              (same replica and log), SERVICE (every
#                                              replica), rabbitmq, redis or nats
#        scripts/stack.sh signal SERVICE.N SIG send a signal (STOP, CONT, KILL...) to a replica
# SERVICE: analyzer scheduler dev-worker qa-worker router canary metrics-gateway
#
# Environment: DEVFLEET_STACK_DIR (state), DEVFLEET_PROFILE=release|debug
# (cargo profile, default release), DEVFLEET_BIN_DIR (prebuilt binaries; no
# build), DEVFLEET_GATEWAY_ADDR (default 127.0.0.1:7070, else a free port),
# REDIS_PORT/NATS_PORT/RABBIT_PORT (pin server ports), DEVFLEET_STACK_STOP_SECONDS
# (grace before SIGKILL, default 40; DEVFLEET_STACK_STOP_SECS is its old name). Every other DEVFLEET_* variable set at
# `up` (executor, OpenAI key, namespace, bus...) is handed to every service.
set -euo pipefail

SERVICES=(analyzer scheduler dev-worker qa-worker router canary metrics-gateway)

usage() { sed -n '8,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
say() { echo "stack: $*" >&2; }
die() { say "$*"; exit 1; }

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${DEVFLEET_STACK_DIR:-$root/.devfleet/stack}
stop_seconds=${DEVFLEET_STACK_STOP_SECONDS:-${DEVFLEET_STACK_STOP_SECS:-40}}
servers_ctl=$root/scripts/servers.sh

is_service() { local s; for s in "${SERVICES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
# A zombie (killed, not yet reaped by whoever adopted it) counts as dead.
alive() {
  [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
  local stat; stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}
pid_in() { cat "$1" 2>/dev/null || true; }

need_tools() {
  local missing=()
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  command -v setsid >/dev/null 2>&1 || missing+=(util-linux)
  # The QA sandbox; without it qa-worker refuses to start.
  command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

port_free() { ! (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; }

# The binaries: DEVFLEET_BIN_DIR as given, else built with cargo.
build() {
  if [ -n "${DEVFLEET_BIN_DIR:-}" ]; then
    bin=$(cd "$DEVFLEET_BIN_DIR" && pwd)
  else
    command -v cargo >/dev/null 2>&1 || die "cargo is needed to build the services (https://rustup.rs), or set DEVFLEET_BIN_DIR"
    local profile=${DEVFLEET_PROFILE:-release} flag=()
    case $profile in
      release) flag=(--release) ;;
      debug | dev) profile=debug ;;
      *) die "DEVFLEET_PROFILE must be release or debug, got '$profile'" ;;
    esac
    say "building the service binaries ($profile)"
    (cd "$root" && cargo build -q "${flag[@]}" --workspace --bins) >&2
    bin=${CARGO_TARGET_DIR:-$root/target}/$profile
  fi
  local s
  for s in "${SERVICES[@]}" devfleet; do
    [ -x "$bin/$s" ] || die "no binary $bin/$s (build with: cargo build --release --workspace --bins)"
  done
  echo "$bin" >"$dir/bin"
}

load_state() {
  [ -f "$dir/env" ] || die "no stack in $dir; start one with: scripts/stack.sh up"
  bin=$(cat "$dir/bin")
}

# Runs "$@" with the environment the services get.
with_stack_env() {
  (
    # shellcheck disable=SC1091
    [ -f "$dir/service.env" ] && . "$dir/service.env"
    # shellcheck disable=SC1091
    . "$dir/env"
    "$@"
  )
}

pidfile() { echo "$dir/run/$1.$2.pid"; }
# The end of a log since the replica's last start.
last_run() { tac "$1" | sed '/^---- .* start /q' | tac | tail -n 20; }
logfile() { echo "$dir/logs/$1.$2.log"; }

# Replica indices of SERVICE with a pid file, ascending.
replicas() {
  local f
  for f in "$dir/run/$1".*.pid; do
    [ -e "$f" ] || continue
    f=${f##*/}; f=${f%.pid}; echo "${f##*.}"
  done | sort -n
}

start_replica() { # service index
  local svc=$1 i=$2 log; log=$(logfile "$1" "$2")
  echo "---- $(date -Is) start $svc.$i" >>"$log"
  (
    # shellcheck disable=SC1091
    [ -f "$dir/service.env" ] && . "$dir/service.env"
    # shellcheck disable=SC1091
    . "$dir/env"
    # The router runs, so the scheduler must not route too.
    [ "$svc" = scheduler ] && export DEVFLEET_SCHEDULER_DIRECT_ROUTING=false
    # Relative programs of canary profiles (examples/…/shift.sh) resolve
    # against the checkout.
    cd "$root"
    exec setsid "$bin/$svc" </dev/null >>"$log" 2>&1
  ) &
  echo $! >"$(pidfile "$svc" "$i")"
}

stop_pids() { # pid... : SIGTERM, wait for the grace, then SIGKILL
  local p left deadline=$((SECONDS + stop_seconds))
  # CONT: a stopped process (SIGSTOP) acts on the TERM only once resumed.
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; kill -CONT "$p" 2>/dev/null || true; done
  while :; do
    left=()
    for p in "$@"; do alive "$p" && left+=("$p"); done
    [ ${#left[@]} -eq 0 ] && return 0
    if [ $SECONDS -ge $deadline ]; then
      say "killing ${left[*]} (still running after $stop_seconds s)"
      kill -KILL "${left[@]}" 2>/dev/null || true
      return 0
    fi
    sleep 0.2
  done
}

stop_replica() { # service index
  local f; f=$(pidfile "$1" "$2")
  local p; p=$(pid_in "$f")
  alive "$p" && stop_pids "$p"
  rm -f "$f"
}

scale_to() { # service count
  local svc=$1 want=$2 i have=() next=1
  is_service "$svc" || die "unknown service '$svc' (one of: ${SERVICES[*]})"
  [[ $want =~ ^[0-9]+$ ]] || die "replica count must be a number, got '$want'"
  if [ "$svc" = metrics-gateway ] && [ "$want" -gt 1 ]; then
    die "metrics-gateway binds DEVFLEET_GATEWAY_ADDR: run one (0 or 1)"
  fi
  # Forget replicas that died; their logs stay.
  for i in $(replicas "$svc"); do
    if alive "$(pid_in "$(pidfile "$svc" "$i")")"; then have+=("$i"); else rm -f "$(pidfile "$svc" "$i")"; fi
  done
  for i in "${have[@]}"; do [ "$i" -ge "$next" ] && next=$((i + 1)); done
  while [ ${#have[@]} -lt "$want" ]; do
    start_replica "$svc" "$next"; have+=("$next"); next=$((next + 1))
  done
  if [ ${#have[@]} -gt "$want" ]; then
    # The newest replicas go first; SIGTERM lets them hand back their work.
    local stop=("${have[@]:$want}") pids=()
    for i in "${stop[@]}"; do pids+=("$(pid_in "$(pidfile "$svc" "$i")")"); done
    stop_pids "${pids[@]}"
    for i in "${stop[@]}"; do rm -f "$(pidfile "$svc" "$i")"; done
  fi
}

gateway_addr() { with_stack_env sh -c 'echo "$DEVFLEET_GATEWAY_ADDR"'; }

curl_gateway() { # path
  # The token goes to curl on its standard input (-H @-), never in its
  # arguments, which every user of the host sees in `ps`.
  with_stack_env sh -c 'token=${DEVFLEET_GATEWAY_TOKEN:-}
    if [ -z "$token" ] && [ -n "${DEVFLEET_GATEWAY_TOKEN_FILE:-}" ]; then
      token=$(head -n 1 "$DEVFLEET_GATEWAY_TOKEN_FILE")
    fi
    if [ -n "$token" ]; then
      printf "Authorization: Bearer %s\n" "$token" | curl -fsS --max-time 5 -H @- "http://$DEVFLEET_GATEWAY_ADDR$1"
    else exec curl -fsS --max-time 5 "http://$DEVFLEET_GATEWAY_ADDR$1"; fi' sh "$1"
}

wait_started() { # seconds: every replica alive, the gateway healthy
  local deadline=$((SECONDS + $1)) svc i p addr; addr=$(gateway_addr)
  until curl -fsS --max-time 2 "http://$addr/healthz" >/dev/null 2>&1; do
    [ $SECONDS -ge $deadline ] && { say "the gateway did not answer on http://$addr/healthz within $1 s"; return 1; }
    sleep 0.3
  done
  # Services that cannot connect or are misconfigured exit at once.
  sleep 1
  for svc in "${SERVICES[@]}"; do
    for i in $(replicas "$svc"); do
      p=$(pid_in "$(pidfile "$svc" "$i")")
      if ! alive "$p"; then
        say "$svc.$i exited at start; the end of its log:"
        last_run "$(logfile "$svc" "$i")" >&2
        return 1
      fi
    done
  done
}

print_env() {
  cat "$dir/env"
  # The namespace given at `up` applies to the CLI too.
  grep '^declare -x DEVFLEET_NAMESPACE=' "$dir/service.env" 2>/dev/null | sed 's/^declare -x/export/' || true
  echo "# dashboard: http://$(gateway_addr)/"
}

cmd_up() {
  local counts=() arg svc n
  for arg in "$@"; do
    [[ $arg =~ ^([a-z-]+)=([0-9]+)$ ]] || die "expected SERVICE=N, got '$arg'"
    is_service "${BASH_REMATCH[1]}" || die "unknown service '${BASH_REMATCH[1]}' (one of: ${SERVICES[*]})"
    counts+=("$arg")
  done
  mkdir -p "$dir/run" "$dir/logs"
  dir=$(cd "$dir" && pwd)
  for svc in "${SERVICES[@]}"; do
    for n in $(replicas "$svc"); do
      alive "$(pid_in "$(pidfile "$svc" "$n")")" && die "a stack is already running in $dir (scripts/stack.sh status; down first)"
    done
  done
  need_tools
  build

  # From here on a failure (or Ctrl-C) takes down whatever was started.
  up_done=0
  # shellcheck disable=SC2154
  trap 'rc=$?; if [ "$up_done" = 0 ]; then say "up failed; stopping what was started"; cmd_down >/dev/null 2>&1 || true; fi; exit $rc' EXIT
  trap 'exit 130' INT TERM

  # A stack that ran here before gets its ports (and so its data) back.
  if [ -f "$dir/servers/ports" ]; then
    # shellcheck disable=SC1091
    . "$dir/servers/ports"
    export REDIS_PORT NATS_PORT RABBIT_PORT RABBIT_DIST_PORT EPMD_PORT
  fi
  local gateway=${DEVFLEET_GATEWAY_ADDR:-}
  if [ -z "$gateway" ] && [ -f "$dir/gateway" ]; then gateway=$(cat "$dir/gateway"); fi
  if [ -z "$gateway" ]; then
    if port_free 7070; then gateway=127.0.0.1:7070; else gateway=127.0.0.1:$(free_port); fi
  fi
  echo "$gateway" >"$dir/gateway"
  "$servers_ctl" start "$dir/servers"

  # A stack on loopback, like `devfleet up`: plans' health sources are local
  # unless the operator says otherwise.
  export DEVFLEET_CANARY_ALLOWED_NETWORKS=${DEVFLEET_CANARY_ALLOWED_NETWORKS:-127.0.0.0/8,::1/128}
  # What every service gets: the settings given at `up` (kept for `scale`),
  # then the stack's own connection settings.
  (umask 077; export -p | grep -E '^declare -x (DEVFLEET_[A-Z0-9_]+|OPENAI_API_KEY|RUST_LOG|OTEL_[A-Z_]+)=' \
    | grep -vE '^declare -x DEVFLEET_(AMQP_URL|NATS_URL|REDIS_URL|GATEWAY_ADDR|SERVERS_DIR|SERVERS_CTL|STACK_DIR|BIN_DIR|PROFILE)=' \
    >"$dir/service.env" || true)
  {
    sed -e '/DEVFLEET_SERVERS_/d' "$dir/servers/env"
    echo "export DEVFLEET_BUS=${DEVFLEET_BUS:-amqp}"
    echo "export DEVFLEET_GATEWAY_ADDR=$gateway"
  } >"$dir/env"

  for svc in "${SERVICES[@]}"; do scale_to "$svc" 1; done
  for arg in ${counts[@]+"${counts[@]}"}; do scale_to "${arg%%=*}" "${arg#*=}"; done
  wait_started 60
  up_done=1
  trap - EXIT INT TERM

  say "up: $(for s in "${SERVICES[@]}"; do printf '%s=%s ' "$s" "$(replicas "$s" | wc -l)"; done)"
  say "logs and state in $dir"
  echo "# devfleet stack: source these (or: eval \"\$(scripts/stack.sh env)\") to use the CLI against it"
  print_env
}

cmd_down() {
  local purge=${1:-} svc i pids=()
  [ -d "$dir" ] || return 0
  for svc in "${SERVICES[@]}"; do
    for i in $(replicas "$svc"); do
      local p; p=$(pid_in "$(pidfile "$svc" "$i")")
      alive "$p" && pids+=("$p")
    done
  done
  if [ ${#pids[@]} -gt 0 ]; then
    say "stopping ${#pids[@]} service processes"
    stop_pids "${pids[@]}"
  fi
  rm -f "$dir"/run/*.pid
  if [ -f "$dir/servers/ports" ]; then
    say "stopping rabbitmq, redis, nats"
    "$servers_ctl" stop "$dir/servers" || true
  fi
  if [ "$purge" = --purge ]; then
    rm -rf "$dir"
    say "removed $dir"
  fi
}

cmd_status() {
  load_state
  local svc i p state any_dead=0 s servers_down=0
  printf '%-22s %-8s %-6s %s\n' PROCESS PID STATE LOG
  for s in rabbitmq redis nats; do
    case $s in
      rabbitmq) p=$(pid_in "$dir/servers/rabbitmq/rabbit.pid") ;;
      *) p=$(pid_in "$dir/servers/$s.pid") ;;
    esac
    if alive "$p"; then state=alive; else state=dead; any_dead=1; servers_down=1; fi
    printf '%-22s %-8s %-6s %s\n' "$s" "${p:--}" "$state" "$dir/servers/$s.log"
  done
  for svc in "${SERVICES[@]}"; do
    for i in $(replicas "$svc"); do
      p=$(pid_in "$(pidfile "$svc" "$i")")
      if alive "$p"; then state=alive; else state=dead; any_dead=1; fi
      printf '%-22s %-8s %-6s %s\n' "$svc.$i" "$p" "$state" "$(logfile "$svc" "$i")"
    done
  done
  echo
  if [ "$servers_down" = 1 ]; then
    echo "the servers are down: scripts/stack.sh up starts the stack again"
    return 1
  fi
  local bus; bus=$(with_stack_env sh -c 'echo "${DEVFLEET_BUS:-amqp}"')
  if [ "$bus" = amqp ]; then
    # shellcheck disable=SC1091
    . "$dir/servers/ports"
    echo "queues (RabbitMQ: waiting, unacknowledged, consumers):"
    RABBITMQ_NODENAME="devfleet-$RABBIT_PORT@localhost" ERL_EPMD_PORT=$EPMD_PORT \
      rabbitmqctl -n "devfleet-$RABBIT_PORT@localhost" -q list_queues name messages messages_unacknowledged consumers 2>/dev/null \
      | sed 1d | sort | awk '{ printf "  %-44s %8s %8s %8s\n", $1, $2, $3, $4 }' \
      || echo "  (rabbitmq not reachable)"
  else
    echo "queues (from the gateway: waiting):"
    curl_gateway /metrics 2>/dev/null | sed -nE 's/^devfleet_queue_depth\{queue="([^"]+)"\} (.*)$/\1 \2/p' \
      | awk '{ printf "  %-44s %8s\n", $1, $2 }' || echo "  (gateway not reachable)"
  fi
  echo
  with_stack_env "$bin/devfleet" status || true
  echo
  echo "dashboard: http://$(gateway_addr)/"
  return $any_dead
}

cmd_logs() {
  load_state
  local what=${1:-} follow=${2:-} files=() i
  [ -n "$what" ] || usage
  case $what in
    rabbitmq | redis | nats) files=("$dir/servers/$what.log") ;;
    *.[0-9]*) files=("$dir/logs/$what.log") ;;
    *)
      is_service "$what" || die "unknown service '$what' (one of: ${SERVICES[*]} rabbitmq redis nats, or SERVICE.N)"
      for i in "$dir/logs/$what".*.log; do [ -e "$i" ] && files+=("$i"); done
      ;;
  esac
  if [ ${#files[@]} -eq 0 ] || [ ! -e "${files[0]}" ]; then die "no log for '$what' in $dir/logs"; fi
  if [ "$follow" = -f ]; then
    exec tail -n 50 -F "${files[@]}"
  elif [ -n "$follow" ]; then
    usage
  else
    tail -n 200 "${files[@]}"
  fi
}

# The replicas WHAT names, as "SERVICE INDEX" lines: SERVICE.N, or every
# replica of SERVICE.
targets() {
  local what=$1 svc i
  if [[ $what =~ ^([a-z-]+)\.([0-9]+)$ ]]; then
    svc=${BASH_REMATCH[1]}; i=${BASH_REMATCH[2]}
    is_service "$svc" || die "unknown service '$svc' (one of: ${SERVICES[*]})"
    [ -f "$(pidfile "$svc" "$i")" ] || die "no replica $what (scripts/stack.sh status lists them)"
    echo "$svc $i"
  else
    is_service "$what" || die "unknown service '$what' (one of: ${SERVICES[*]} rabbitmq redis nats, or SERVICE.N)"
    for i in $(replicas "$what"); do echo "$what $i"; done
  fi
}

# Fails, with the end of its log, when a replica just started is dead.
check_started() { # "SERVICE INDEX"...
  local t svc i
  sleep 1
  for t in "$@"; do
    svc=${t% *}; i=${t#* }
    alive "$(pid_in "$(pidfile "$svc" "$i")")" || { say "$svc.$i exited at start:"; last_run "$(logfile "$svc" "$i")" >&2; return 1; }
  done
}

cmd_restart() { # WHAT [--kill]
  local what=${1:-} how=${2:-} t p pids=() list=()
  if [ -z "$what" ] || [ $# -gt 2 ]; then usage; fi
  [ -z "$how" ] || [ "$how" = --kill ] || usage
  load_state
  case $what in
    rabbitmq | redis | nats)
      if [ "$how" = --kill ]; then
        "$servers_ctl" kill "$dir/servers" "$what" && "$servers_ctl" up "$dir/servers" "$what"
      else
        "$servers_ctl" restart "$dir/servers" "$what"
      fi
      say "restarted $what"
      return
      ;;
  esac
  local found; found=$(targets "$what") || exit 1
  [ -z "$found" ] || mapfile -t list <<<"$found"
  [ ${#list[@]} -gt 0 ] || die "no replica of $what is running (scripts/stack.sh scale $what 1)"
  for t in "${list[@]}"; do
    p=$(pid_in "$(pidfile "${t% *}" "${t#* }")")
    alive "$p" && pids+=("$p")
  done
  if [ ${#pids[@]} -gt 0 ]; then
    if [ "$how" = --kill ]; then
      kill -KILL "${pids[@]}" 2>/dev/null || true
      for p in "${pids[@]}"; do while alive "$p"; do sleep 0.05; done; done
    else
      stop_pids "${pids[@]}"
    fi
  fi
  for t in "${list[@]}"; do start_replica "${t% *}" "${t#* }"; done
  check_started "${list[@]}"
  say "restarted ${list[*]/ /.}"
}

cmd_signal() { # SERVICE.N SIGNAL
  [ $# -eq 2 ] || usage
  load_state
  [[ $1 =~ ^[a-z-]+\.[0-9]+$ ]] || die "signal takes one replica, SERVICE.N (got '$1')"
  local t p; t=$(targets "$1") || exit 1; p=$(pid_in "$(pidfile "${t% *}" "${t#* }")")
  alive "$p" || die "$1 is not running"
  kill -s "$2" "$p" || die "cannot send $2 to $1 (pid $p)"
}

cmd=${1:-}
[ -n "$cmd" ] || usage
shift
case $cmd in
  up) cmd_up "$@" ;;
  down) [ $# -le 1 ] || usage; [ "${1:---purge}" = --purge ] || usage; cmd_down "${1:-}" ;;
  status) cmd_status ;;
  scale)
    [ $# -eq 2 ] || usage
    load_state
    scale_to "$1" "$2"
    mapfile -t started < <(for i in $(replicas "$1"); do echo "$1 $i"; done)
    check_started ${started[@]+"${started[@]}"}
    say "$1: $(replicas "$1" | wc -l) replicas"
    ;;
  logs) cmd_logs "$@" ;;
  env) load_state; print_env ;;
  restart) cmd_restart "$@" ;;
  signal) cmd_signal "$@" ;;
  -h | --help | help) usage ;;
  *) usage ;;
esac
