#!/usr/bin/env bash
# shellcheck disable=SC2317  # cleanup/table run from a trap, pause_worker as a fault command
# The fault suite: on the native stack of scripts/stack.sh (real RabbitMQ,
# Redis and NATS; every service its own process), one plan of a few hundred
# simulated tasks per bus runs while faults are injected one after another:
# every service SIGKILLed and restarted, a dev-worker SIGSTOPped past its
# lease and resumed, Redis restarted, and the broker that carries the work
# (RabbitMQ or NATS) restarted. After each fault every task that was in
# flight (leased or built) must move on within the recovery timeout
# and every process must be alive; each plan must then succeed with every
# task Done exactly once (Done transitions counted, not executions: a killed
# task may run twice), nothing dead-lettered and nothing left in a queue.
#
# usage: scripts/chaos.sh [BUS...]    BUS: amqp, nats (default: amqp nats)
#
# Environment: DEVFLEET_BIN_DIR (the binaries; default $CARGO_TARGET_DIR/debug,
# else target/debug; nothing is built: run `cargo build --workspace --bins`
# first), CHAOS_TASKS (tasks per plan, default 300), CHAOS_DIR (where stacks
# and logs go; default a new /tmp/devfleet-chaos.XXXXXX, kept: logs of every
# service and server), CHAOS_PLAN_TIMEOUT_SECONDS (per plan, default 360),
# CHAOS_RECOVER_TIMEOUT_SECONDS (for in-flight tasks to move on after a
# fault, default 45), CHAOS_BUSY_WAIT_SECONDS (how long to wait for the load
# a fault wants before any work in flight will do, default 15), CHAOS_ONLY
# (an extended regex: inject only the faults whose label matches, e.g.
# 'SIGSTOP|redis'), CHAOS_KEEP=1 (leave a failing
# stack running to look at; the script says how to stop it), CHAOS_RUST_LOG.
# Exit status 0 only when every fault and every check passed.
set -euo pipefail

usage() { sed -n '14,25p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
say() { echo "chaos: $*" >&2; }
die() { say "$*"; exit 1; }

root=$(cd "$(dirname "$0")/.." && pwd)
stack_ctl=$root/scripts/stack.sh

buses=("$@")
[ ${#buses[@]} -gt 0 ] || buses=(amqp nats)
for b in "${buses[@]}"; do
  case $b in amqp | nats) ;; -h | --help) usage ;; *) die "unknown bus '$b' (amqp or nats)" ;; esac
done

bin=${DEVFLEET_BIN_DIR:-${CARGO_TARGET_DIR:-$root/target}/debug}
for b in analyzer scheduler dev-worker qa-worker router canary metrics-gateway devfleet; do
  [ -x "$bin/$b" ] || die "no binary $bin/$b: build with \`cargo build --workspace --bins\` (or set DEVFLEET_BIN_DIR)"
done
bin=$(cd "$bin" && pwd)
tasks=${CHAOS_TASKS:-300}
if ! [[ $tasks =~ ^[0-9]+$ ]] || [ "$tasks" -lt 40 ]; then
  die "CHAOS_TASKS must be a number of at least 40, got '$tasks'"
fi
plan_timeout=${CHAOS_PLAN_TIMEOUT_SECONDS:-360}
recover_timeout=${CHAOS_RECOVER_TIMEOUT_SECONDS:-45}
busy_wait=${CHAOS_BUSY_WAIT_SECONDS:-15}
only=${CHAOS_ONLY:-}
keep=${CHAOS_KEEP:-0}
for t in "$plan_timeout" "$recover_timeout" "$busy_wait"; do [[ $t =~ ^[0-9]+$ ]] || die "timeouts are whole seconds, got '$t'"; done
command -v redis-cli >/dev/null 2>&1 || die "redis-cli is needed (apt-get install redis-tools)"
log_filter=${CHAOS_RUST_LOG:-info,devfleet_scheduler::completion=debug}

# Only the settings below reach the services: nothing inherited from the
# caller's shell (a namespace, another bus, a token) changes the run.
while read -r v; do unset "$v"; done < <(compgen -e | grep -E '^(DEVFLEET_|OTEL_)' || true)

work=${CHAOS_DIR:-$(mktemp -d /tmp/devfleet-chaos.XXXXXX)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
# RabbitMQ runs as its own user and must reach its data below (mktemp made
# the directory private).
chmod 755 "$work"

# The lease is short so a paused worker loses its tasks within seconds; the
# dispatch lease and the router's retry grace are short so work whose holder
# died comes back quickly; the executor and integration timeouts are short
# because they size the NATS consumers' ack_wait (what a killed consumer held
# comes back after it). A simulated task takes estimate × unit = 3 s, so
# faults land while tasks run, and the plan (about two minutes of work on
# eight slots) outlasts the faults and their recovery waits (on NATS, a
# killed qa-worker's checks come back after its 30 s ack_wait; with 1.5 s
# tasks the plan finished during that wait, before the last faults).
lease=3
export DEVFLEET_BIN_DIR=$bin
export DEVFLEET_EXECUTOR=simulate DEVFLEET_SIMULATE_UNIT_SECONDS=0.6
export DEVFLEET_DEV_MIN_SLOTS=4 DEVFLEET_DEV_MAX_SLOTS=4
export DEVFLEET_DEV_LEASE_SECONDS=$lease DEVFLEET_DEV_HEARTBEAT_TTL_SECONDS=3
export DEVFLEET_DEV_SHUTDOWN_GRACE_SECONDS=2 DEVFLEET_DEV_EXEC_TIMEOUT_SECONDS=10
export DEVFLEET_QA_INTEGRATION_TIMEOUT_SECONDS=10
export DEVFLEET_SCHEDULER_DISPATCH_LEASE_SECONDS=5
export DEVFLEET_ROUTER_RETRY_LEASE_GRACE_SECONDS=5 DEVFLEET_ROUTER_BREAKER_COOLDOWN_SECONDS=5
export DEVFLEET_STACK_STOP_SECONDS=10
# The scheduler logs each Done transition (debug, completion module).
export RUST_LOG=$log_filter

rows=()     # "bus|what|result|detail", for the table
failed=0
active=     # the stack directory that is up, for the trap
stopped=    # a replica under SIGSTOP, for the trap
windows=()  # "start_ms end_ms label" of each fault of the current plan

record() { # bus what result detail
  rows+=("$1|$2|$3|$4")
  printf 'chaos: [%s] %-40s %s%s\n' "$1" "$2" "$3" "${4:+  ($4)}" >&2
  [ "$3" = ok ] || failed=1
}

table() {
  [ ${#rows[@]} -gt 0 ] || return 0
  echo
  printf '%-5s %-42s %-6s %s\n' BUS FAULT/CHECK RESULT DETAIL
  local r bus what result detail
  for r in "${rows[@]}"; do
    IFS='|' read -r bus what result detail <<<"$r"
    printf '%-5s %-42s %-6s %s\n' "$bus" "$what" "$result" "$detail"
  done
  echo
}

# The script's own output, for the trap: it may fire while a fault's
# output is redirected to a file.
exec 3>&1 4>&2
cleanup() {
  local rc=$?
  set +e
  exec 1>&3 2>&4
  [ -n "$stopped" ] && DEVFLEET_STACK_DIR=$active "$stack_ctl" signal "$stopped" CONT >/dev/null 2>&1
  if [ -n "$active" ] && [ "$keep" = 1 ] && [ "$failed" = 1 ]; then
    say "the stack is still running: eval \"\$(DEVFLEET_STACK_DIR=$active scripts/stack.sh env)\"; stop it with DEVFLEET_STACK_DIR=$active scripts/stack.sh down"
  elif [ -n "$active" ]; then
    DEVFLEET_STACK_DIR=$active "$stack_ctl" down >/dev/null 2>&1
    drop_data "$active"
  fi
  table
  say "logs of every service and server: $work/*/logs, $work/*/servers/*.log"
  if [ "$rc" -eq 0 ] && [ "$failed" = 1 ]; then rc=1; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Server data is large and worthless after the run; logs stay.
drop_data() { rm -rf "$1/servers/rabbitmq/mnesia" "$1/servers/nats" "$1/servers/redis"; }

stack() { DEVFLEET_STACK_DIR=$dir "$stack_ctl" "$@"; }
# shellcheck disable=SC1091
cli() { (. "$dir/env"; "$bin/devfleet" "$@"); }
# The plan and its tasks as JSON, from the store alone (no broker, so it
# answers while one restarts).
# shellcheck disable=SC1091
plan_json() { (. "$dir/env"; DEVFLEET_BUS=memory DEVFLEET_NATS_URL='' "$bin/devfleet" status "$plan_id" --json); }

now_ms() { date +%s%3N; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# A plan of $tasks .py files in layers of 20, each task depending on two of
# the layer before, so work spreads over the whole run; the salt keeps the
# result cache from answering for a run before.
write_plan() { # file salt
  python3 - "$tasks" "$2" >"$1" <<'PY'
import random, sys
n, salt = int(sys.argv[1]), sys.argv[2]
width = 20
rng = random.Random(12)
name = lambda i: f"chaos/l{i // width:02d}/t{i:04d}.py"
print(f"name: chaos-{salt}\nexecutor: simulate\ntasks:")
for i in range(n):
    layer = i // width
    print(f"  - path: {name(i)}\n    spec: \"chaos task {i} ({salt})\"\n    estimate: 5")
    if layer > 0:
        deps = sorted(rng.sample(range((layer - 1) * width, layer * width), 2))
        print("    depends_on: [" + ", ".join(name(d) for d in deps) + "]")
PY
}

# Reads `devfleet status PLAN --json` on stdin:
#   inflight SINCE_MS    tasks leased or built, last changed after SINCE_MS
#                        ("path state attempt owner updated_ms" lines)
#   stuck FILE           the lines of FILE (an `inflight` answer) whose task has
#                        not changed since
#   busy STATES          how many tasks are in one of STATES (comma separated)
#   summary              "status total done states attempts"
#   notdone WINDOWS      the tasks not done, each with the fault it went
#                        still during (WINDOWS: "start_ms end_ms label" lines)
tasks_py() { python3 "$work/tasks.py" "$@"; }
cat >"$work/tasks.py" <<'PY'
import collections, json, sys, time

cmd, arg = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
d = json.load(sys.stdin)
plan, tasks = d["plan"], d["tasks"]


def key(t):
    owner = t.get("lease_owner") or "-"
    return f"{t['path']} {t['state']} {t['attempt']} {owner} {t['updated_ms']}"


def when(ms):
    return time.strftime("%H:%M:%S", time.gmtime(ms / 1000))


if cmd == "inflight":
    for t in tasks:
        if t["state"] in ("leased", "built") and t["updated_ms"] >= int(arg):
            print(key(t))
elif cmd == "stuck":
    now = {key(t) for t in tasks}
    for line in open(arg):
        if line.strip() in now:
            path, state, attempt, owner, ms = line.split()
            print(f"{path} {state} since {when(int(ms))} (attempt {attempt}, owner {owner})")
elif cmd == "busy":
    print(sum(t["state"] in arg.split(",") for t in tasks))
elif cmd == "summary":
    states = collections.Counter(t["state"] for t in tasks)
    print(plan["status"], plan["total"], states.get("done", 0),
          ",".join(f"{k}={v}" for k, v in sorted(states.items())),
          sum(t["attempt"] for t in tasks))
elif cmd == "notdone":
    windows = [line.split(" ", 2) for line in arg.splitlines() if line.strip()]
    for t in tasks:
        if t["state"] == "done":
            continue
        ms = t["updated_ms"]
        during = [w[2] for w in windows if int(w[0]) - 1000 <= ms <= int(w[1]) + 2000]
        line = f"  {t['path']}: {t['state']} since {when(ms)}, attempt {t['attempt']}, owner {t.get('lease_owner') or '-'}"
        if t.get("error"):
            line += f", error {t['error'][:120]!r}"
        if during:
            line += f"; unchanged since the fault {during[-1]!r}"
        print(line)
PY

# "done total status" of the plan, straight from Redis (empty while Redis
# is down).
counts() {
  redis-cli -p "$REDIS_PORT" HMGET "devfleet:plan:$plan_id" 'done' total status 2>/dev/null | paste -sd' ' || true
}

completed_counter() {
  redis-cli -p "$REDIS_PORT" GET devfleet:counter:scheduler.tasks_completed 2>/dev/null | grep -E '^[0-9]+$' || echo 0
}

done_now=0 status_now=
poll() { # sets done_now, status_now; false when Redis did not answer
  local c d s
  c=$(counts)
  read -r d _ s <<<"$c"
  [[ ${d:-} =~ ^[0-9]+$ ]] || return 1
  done_now=$d; status_now=$s
}

final() { case $1 in succeeded | failed | rejected | cancelled) return 0 ;; *) return 1 ;; esac; }

# Waits until the plan has at least $1 tasks Done (or ended); false on timeout.
wait_done() { # count seconds
  local deadline=$((SECONDS + $2))
  while [ $SECONDS -lt $deadline ]; do
    if poll && { [ "$done_now" -ge "$1" ] || final "$status_now"; }; then return 0; fi
    sleep 0.5
  done
  return 1
}

# Waits until at least $1 tasks are in one of the states $3 (e.g.
# leased,built), so a fault lands on work; false on timeout or when the
# plan ended.
wait_busy() { # count seconds states
  local deadline=$((SECONDS + $2)) n
  while [ $SECONDS -lt $deadline ]; do
    n=$(plan_json 2>/dev/null | tasks_py busy "$3" 2>/dev/null) || n=0
    [ "$n" -ge "$1" ] && return 0
    poll && final "$status_now" && return 1
    sleep 0.5
  done
  return 1
}

# Every replica's pid alive: a service that died of a server restart fails.
all_alive() {
  local f p dead=()
  for f in "$dir"/run/*.pid; do
    p=$(cat "$f" 2>/dev/null || true)
    # A zombie (killed, not yet reaped) is dead too.
    if ! kill -0 "$p" 2>/dev/null || grep -q '^[0-9]* (.*) Z' "/proc/$p/stat" 2>/dev/null; then
      dead+=("$(basename "$f" .pid)")
    fi
  done
  [ ${#dead[@]} -eq 0 ] && return 0
  echo "${dead[*]}"
  return 1
}

# A log line without its spans (the fields repeat in the event's own).
brief() { sed -E 's/^(\S+\s+\S+) (\S*\{[^ ]*( [^ ]*)*\}:)+ /\1 /' | cut -c1-300; }

# The end of the logs of what a fault or a check concerns.
show_logs() { # name... (SERVICE, SERVICE.N, rabbitmq, redis, nats)
  local n f files
  for n in "$@"; do
    case $n in
      rabbitmq | redis | nats) files=("$dir/servers/$n.log") ;;
      *.[0-9]*) files=("$dir/logs/$n.log") ;;
      *) files=("$dir/logs/$n".*.log) ;;
    esac
    for f in "${files[@]}"; do
      [ -f "$f" ] || continue
      echo "---- $f (warnings and errors, then the last lines)" >&2
      { grep -aE ' (WARN|ERROR) ' "$f" | tail -n 12 || true; echo "  ..."; tail -n 12 "$f"; } | brief >&2
    done
  done
}

# Runs fault $1 (a label) with the command "${@:3}"; the logs named in $2
# (space separated) are shown if it fails. Passes when every task in flight
# when the fault ended (leased or built, and changed since shortly before
# the fault began: older ones were not this fault's) has moved on within the
# recovery timeout, and every process is alive. (Ready tasks are left out:
# they may wait for a free slot; one a dead dispatcher claimed is leased.)
fault() { # label logs command...
  local label=$1 logs=$2 start=$SECONDS start_ms end_ms out dead stuck n=0 snap
  shift 2
  start_ms=$(now_ms)
  # Not in a subshell: the command may set `stopped` and `paused_*`.
  if ! "$@" >"$dir/fault.out" 2>&1; then
    out=$(cat "$dir/fault.out")
    windows+=("$start_ms $(now_ms) $label")
    record "$bus" "$label" FAIL "the fault itself failed: $(echo "$out" | tail -n 1)"
    echo "$out" | tail -n 20 >&2
    # shellcheck disable=SC2086
    show_logs $logs
    return 0
  fi
  end_ms=$(now_ms)
  windows+=("$start_ms $end_ms $label")
  snap=$dir/inflight.$start_ms
  local deadline=$((SECONDS + recover_timeout))
  # Redis may still be loading: the snapshot is retried.
  until plan_json 2>/dev/null | tasks_py inflight $((start_ms - 10000)) >"$snap" 2>/dev/null; do
    [ $SECONDS -lt "$deadline" ] || break
    sleep 0.5
  done
  n=$(wc -l <"$snap")
  while :; do
    stuck=$(plan_json 2>/dev/null | tasks_py stuck "$snap") || stuck="(cannot read the tasks)"
    [ -z "$stuck" ] || [ $SECONDS -ge "$deadline" ] && break
    sleep 1
  done
  poll || true
  if [ -n "$stuck" ]; then
    record "$bus" "$label" FAIL "$(echo "$stuck" | wc -l) of $n tasks in flight did not move on in ${recover_timeout} s: $(echo "$stuck" | head -n 3 | paste -sd';')"
    # shellcheck disable=SC2086
    show_logs $logs
  elif dead=$(all_alive); then
    paused_note
    record "$bus" "$label" ok "$n tasks in flight moved on in $((SECONDS - start)) s; $done_now/$tasks done$note"
  else
    record "$bus" "$label" FAIL "dead after the fault: $dead"
    # shellcheck disable=SC2086
    show_logs $logs $dead
  fi
}

selected() { [ -z "$only" ] || [[ $1 =~ $only ]]; }

# What the paused worker did with the tasks it lost, from its log, in
# `note` (empty after any other fault).
paused_log='' paused_from=0 note=''
paused_note() {
  note=''
  [ -n "$paused_log" ] || return 0
  local n
  n=$(tail -n +"$paused_from" "$paused_log" | grep -ac 'lost the lease' || true)
  paused_log=''
  note="; the resumed worker found $n leases lost"
}

pause_worker() { # replica: SIGSTOP for three leases, then SIGCONT
  paused_log=$dir/logs/$1.log
  paused_from=$(($(wc -l <"$paused_log") + 1))
  stack signal "$1" STOP || return 1
  stopped=$1
  sleep $((lease * 3))
  stack signal "$1" CONT
  stopped=
}

# The faults after the analyzer's, each injected once the plan is that far
# and enough tasks are in the states it concerns: "label|logs to show|
# count:states|command". The qa-worker is killed once several tasks are
# built, so it holds QA work when it dies.
mid_run_faults() {
  local any=4:leased,built
  echo "scheduler SIGKILL+restart|scheduler|$any|stack restart scheduler.1 --kill"
  echo "dev-worker.1 SIGKILL+restart|dev-worker.1 scheduler|4:leased|stack restart dev-worker.1 --kill"
  echo "qa-worker SIGKILL+restart|qa-worker router|3:built|stack restart qa-worker.1 --kill"
  echo "router SIGKILL+restart|router|$any|stack restart router.1 --kill"
  echo "metrics-gateway SIGKILL+restart|metrics-gateway|$any|stack restart metrics-gateway.1 --kill"
  echo "dev-worker.2 SIGSTOP $((lease * 3)) s (lease ${lease} s)|dev-worker.2 scheduler router|4:leased|pause_worker dev-worker.2"
  echo "redis restart|redis scheduler router dev-worker|$any|stack restart redis"
  case $bus in
    amqp) echo "rabbitmq restart|rabbitmq scheduler router dev-worker qa-worker|$any|stack restart rabbitmq" ;;
    nats) echo "nats restart|nats scheduler router dev-worker qa-worker|$any|stack restart nats" ;;
  esac
}

# What is still queued, unacknowledged, ready or leased, as one line.
leftovers() {
  {
    if [ "$bus" = amqp ]; then
      # RabbitMQ itself: the retry delay queues and unacknowledged messages too.
      RABBITMQ_NODENAME="devfleet-$RABBIT_PORT@localhost" ERL_EPMD_PORT=$EPMD_PORT \
        rabbitmqctl -n "devfleet-$RABBIT_PORT@localhost" -q list_queues name messages messages_unacknowledged 2>/dev/null \
        | awk 'NR > 1 && ($2 != 0 || $3 != 0) { printf "%s=%s+%s unacked\n", $1, $2, $3 }'
    fi
    curl -fsS --max-time 5 "http://$gateway/metrics" 2>/dev/null \
      | awk '/^devfleet_(queue_depth|dlq_depth|ready_tasks|tasks\{state="(leased|built|ready|pending)"\})/ && $2 != 0 { print $1 "=" $2 }'
  } | paste -sd' '
}

# The checks once the plan ended (or timed out).
check_plan() {
  local json status total n_done states executions
  if ! json=$(plan_json 2>"$dir/status.err"); then
    record "$bus" "plan status readable" FAIL "$(tail -n 1 "$dir/status.err")"
    return
  fi
  read -r status total n_done states executions < <(tasks_py summary <<<"$json")
  if [ "$status" = succeeded ]; then
    record "$bus" "plan succeeded" ok "$total tasks"
  else
    record "$bus" "plan succeeded" FAIL "status $status; tasks $states"
    tasks_py notdone "$(printf '%s\n' "${windows[@]}")" <<<"$json" | head -n 20 >&2
    show_logs scheduler router dev-worker qa-worker
  fi

  # Done transitions: the scheduler's counter and the plan's count move
  # once per transition in the store; the debug log names each task.
  # (A scheduler killed between a transition and its log line logs fewer;
  # none at all means the line changed and this check went blind.)
  local counted=$(($(completed_counter) - counter_before)) logged dup
  logged=$(cat "$dir"/logs/scheduler.*.log | { grep -a "completion: task done plan_id=\"$plan_id\"" || true; } \
    | sed -nE 's/.*completion: task done .*path="([^"]+)".*/\1/p')
  dup=$(echo "$logged" | sort | uniq -d | head -n 5 | paste -sd' ')
  logged=$(echo "$logged" | grep -c . || true)
  if [ "$n_done" = "$tasks" ] && [ "$counted" = "$tasks" ] && [ -z "$dup" ] && [ "$logged" -gt 0 ]; then
    record "$bus" "every task Done exactly once" ok "$counted Done transitions ($logged logged); $executions attempts"
  else
    record "$bus" "every task Done exactly once" FAIL "$n_done/$tasks tasks Done, $counted Done transitions counted, $logged logged${dup:+, twice: $dup}; $executions attempts"
  fi

  local dlq
  if ! dlq=$(cli dlq list --json 2>"$dir/dlq.err"); then
    record "$bus" "DLQ empty" FAIL "$(tail -n 1 "$dir/dlq.err")"
  elif [ "$(python3 -c 'import json, sys; print(len(json.load(sys.stdin)))' <<<"$dlq")" = 0 ]; then
    record "$bus" "DLQ empty" ok ""
  else
    record "$bus" "DLQ empty" FAIL "$(python3 -c '
import json, sys
e = json.load(sys.stdin)
print(len(e), "entries:", "; ".join(str(x.get("path") or x)[:80] + " " + str(x.get("reason", ""))[:120] for x in e[:3]))' <<<"$dlq")"
    show_logs router
  fi

  # Nothing left behind: every queue empty, nothing unacknowledged, nothing
  # ready or leased (acks of the last messages may trail the plan's end).
  local left deadline=$((SECONDS + 20))
  while :; do
    left=$(leftovers)
    [ -z "$left" ] || [ $SECONDS -ge $deadline ] && break
    sleep 1
  done
  if [ -z "$left" ]; then
    record "$bus" "nothing left in queues or leases" ok ""
  else
    record "$bus" "nothing left in queues or leases" FAIL "$left"
  fi

  local dead
  if dead=$(all_alive); then
    record "$bus" "every process alive" ok ""
  else
    record "$bus" "every process alive" FAIL "dead: $dead"
    # shellcheck disable=SC2086
    show_logs $dead
  fi
}

run_bus() {
  bus=$1 done_now=0 status_now='' windows=()
  dir=$work/$bus
  rm -rf "$dir"
  gateway=127.0.0.1:$(free_port)
  say "[$bus] starting the stack in $dir"
  active=$dir
  local t0=$SECONDS
  if ! DEVFLEET_BUS=$bus DEVFLEET_GATEWAY_ADDR=$gateway stack up dev-worker=2 >"$work/$bus-up.log" 2>&1; then
    tail -n 30 "$work/$bus-up.log" >&2
    record "$bus" "stack up" FAIL "see $work/$bus-up.log"
    return
  fi
  # shellcheck disable=SC1091
  . "$dir/servers/ports"
  say "[$bus] stack up in $((SECONDS - t0)) s; $tasks tasks, faults in turn"

  write_plan "$dir/plan.yaml" "$bus-$$-$RANDOM"
  counter_before=$(completed_counter)
  local submitted
  # The analyzer goes down, the plan is submitted, the analyzer comes back:
  # the submission waits in the broker.
  local analyzer="analyzer SIGKILL, plan submitted, restart"
  selected "$analyzer" && stack signal analyzer.1 KILL
  if ! submitted=$(cli publish "$dir/plan.yaml" --json 2>"$dir/publish.err"); then
    record "$bus" "publish" FAIL "$(tail -n 1 "$dir/publish.err")"
    return
  fi
  plan_id=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["plan_id"])' <<<"$submitted")
  say "[$bus] plan $plan_id"
  if selected "$analyzer"; then
    fault "$analyzer" "analyzer scheduler" stack restart analyzer.1
  fi

  local faults=() f i=0 n label logs busy action at
  mapfile -t faults < <(mid_run_faults)
  n=${#faults[@]}
  for f in "${faults[@]}"; do
    i=$((i + 1))
    IFS='|' read -r label logs busy action <<<"$f"
    selected "$label" || continue
    at=$((tasks * i / (n + 2)))
    # A fault before that stranded work can hold the plan up; the next one
    # still goes in when the plan gets that far.
    if ! wait_done "$at" $((plan_timeout - (SECONDS - t0))); then
      record "$bus" "$label" FAIL "not injected: the plan stalled at $done_now/$tasks done before it"
      continue
    fi
    # The wanted load (say, 3 tasks built for the qa-worker's kill) may not
    # come about when one stage keeps up with another; after a while any
    # work in flight will do, so the plan does not end before the faults
    # after this one.
    if ! wait_busy "${busy%%:*}" "$busy_wait" "${busy#*:}"; then
      if ! wait_busy 1 $((plan_timeout - (SECONDS - t0))) leased,built; then
        poll || true
        record "$bus" "$label" FAIL "not injected: never ${busy%%:*} tasks ${busy#*:} ($status_now, $done_now/$tasks done)"
        continue
      fi
      say "[$bus] $label: never ${busy%%:*} tasks ${busy#*:} within ${busy_wait} s; injected with work in flight"
    fi
    # shellcheck disable=SC2086
    fault "$label" "$logs" $action
  done

  local deadline=$((t0 + plan_timeout))
  until poll && final "$status_now"; do
    if [ $SECONDS -ge $deadline ]; then
      say "[$bus] the plan did not end within ${plan_timeout} s of the stack's start ($done_now/$tasks done)"
      break
    fi
    sleep 1
  done
  check_plan
  if [ "$keep" = 1 ] && [ "$failed" = 1 ]; then exit 1; fi
  say "[$bus] plan over in $((SECONDS - t0)) s; stopping the stack"
  stack down >/dev/null 2>&1 || true
  drop_data "$dir"
  active=
}

main() {
  for b in "${buses[@]}"; do run_bus "$b"; done
  [ "$failed" = 0 ] || exit 1
  say "every fault survived, every check passed"
}

# On one line, so that bash has read the whole script before it runs it.
main; exit
