#!/usr/bin/env bash
# How the controller scales with the number of workloads (issue 10's targets in brackets);
# prints a table, asserts nothing.
#  - 10, 100, 1000 shell workloads applied at once, then removed: the time until all run /
#    all are gone, and the longest the controller spent on one event meanwhile
#                                                 [1000 applied with no handler over 50 ms]
#  - 10 000 workloads in one desired state with MAX_WORKLOADS=256: the time until the excess
#    is refused (the problem shows), and the longest handler                  [< 100 ms]
# The clock starts when the desired-state file is renamed into place (the agent reads the
# file at once when it is renamed into place or closed after writing; other changes wait for
# a quiet moment of 150 ms). The longest handler is the
# controller thread's CPU time for one event (what the agent reports in `status`).
# Needs root (cgroups). Usage: sudo bench/scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
cargo build --release --quiet
BIN=$PWD/target/release/device-worker-ng
WORK=$(mktemp -d /tmp/dwng-scale.XXXXXX)
ROOT=device-worker-ng-scale-$$
AGENT=

workload() { # name
  printf '  - name: %s\n    kind: shell\n    specification: |\n      command: [/bin/sleep, "100000"]\n      user: root\n' "$1"
}
desired() { # n
  if [ "$1" = 0 ]; then echo "workloads: []"; return; fi
  echo "workloads:"
  for i in $(seq 1 "$1"); do workload "w$i"; done
}
write_desired() { # file of content
  mv "$1" "$WORK/desired.yaml"
}
start_agent() { # max_workloads
  printf 'workloads: []\n' > "$WORK/desired.yaml"
  EDGE_DEVICE_STATE_DIR=$WORK/state EDGE_DEVICE_DESIRED_STATE=$WORK/desired.yaml \
    EDGE_DEVICE_CONTROL_SOCKET=$WORK/control.sock EDGE_DEVICE_CGROUP_ROOT=$ROOT \
    EDGE_DEVICE_LOG_LEVEL=warn EDGE_DEVICE_MAX_WORKLOADS=$1 \
    "$BIN" run 2>>"$WORK/agent.log" &
  AGENT=$!
  for _ in $(seq 100); do status >/dev/null 2>&1 && break; sleep 0.1; done
}
status() { "$BIN" status --json --socket "$WORK/control.sock"; }
stop_agent() {
  printf 'workloads: []\n' > "$WORK/empty.yaml" && write_desired "$WORK/empty.yaml"
  for _ in $(seq 600); do [ "$(status | jq '.workloads | length')" = 0 ] && break; sleep 0.1; done
  kill "$AGENT" 2>/dev/null || true; wait "$AGENT" 2>/dev/null || true
  AGENT=
  rm -rf "$WORK/state"
}
cleanup() {
  if [ -n "$AGENT" ]; then kill "$AGENT" 2>/dev/null || true; wait "$AGENT" 2>/dev/null || true; fi
  for d in /sys/fs/cgroup/{memory,cpu,cpuacct,pids}/"$ROOT" "/sys/fs/cgroup/$ROOT"; do
    if [ -d "$d" ]; then find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true; fi
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
wait_for() { # jq condition, timeout s -> ms taken (or "timeout")
  local t0=$1 cond=$2 limit=$3
  while :; do
    if [ "$(status 2>/dev/null | jq -r "$cond" 2>/dev/null)" = true ]; then
      echo $(( $(now_ms) - t0 )); return
    fi
    [ $(( $(now_ms) - t0 )) -gt $(( limit * 1000 )) ] && { echo timeout; return; }
    sleep 0.02
  done
}
longest() { status | jq -r '"\(.agent.longest_handler_ms | . * 10 | round / 10) ms (\(.agent.longest_handler_event))"'; }

printf '%-44s %12s %12s %26s\n' "scenario" "apply" "remove" "longest handler"
for n in 10 100 1000; do
  start_agent 1000
  desired "$n" > "$WORK/next.yaml"
  t0=$(now_ms); write_desired "$WORK/next.yaml"
  up=$(wait_for "$t0" "[.workloads[] | select(.state == \"running\")] | length == $n" 300)
  desired 0 > "$WORK/next.yaml"
  t0=$(now_ms); write_desired "$WORK/next.yaml"
  gone=$(wait_for "$t0" ".workloads | length == 0" 300)
  printf '%-44s %9s ms %9s ms %26s\n' "$n shell workloads" "$up" "$gone" "$(longest)"
  stop_agent
done

# 10 000 workloads, as YAML and as JSON (the shape of a server message).
json() { # n
  jq -n --argjson n "$1" '{workloads: [range(1; $n + 1) | {name: "w\(.)", kind: "shell",
    specification: "command: [/bin/sleep, \"100000\"]\nuser: root\n"}]}'
}
for format in yaml json; do
  start_agent 256
  if [ "$format" = yaml ]; then desired 10000 > "$WORK/next.yaml"; else json 10000 > "$WORK/next.yaml"; fi
  bytes=$(stat -c %s "$WORK/next.yaml")
  t0=$(now_ms); write_desired "$WORK/next.yaml"
  refused=$(wait_for "$t0" "[.device.problems[] | select(test(\"past MAX_WORKLOADS\"))] | length == 1" 120)
  printf '%-44s %9s ms %12s %26s\n' "10000 in one $format file ($((bytes / 1024)) KiB), 9744 refused" "$refused" "-" "$(longest)"
  up=$(wait_for "$(now_ms)" "[.workloads[] | select(.state == \"running\")] | length == 256" 300)
  printf '%-44s %9s ms %12s %26s\n' "  ... and the first 256 running (after)" "$up" "-" "$(longest)"
  stop_agent
done
