#!/bin/sh
# The measurement behind bench/budget.sh, in POSIX sh + awk so that it runs on the host and in
# the busybox cgroup v2 guest alike. Needs root. Prints a table; asserts nothing.
#
#   budget-run.sh DIR RUNS [POLL_US=1000]
#
# DIR holds device-worker-ng, poller (bench/poller.c) and hog (tests/vm/hog.c). The agent
# runs at its default SAMPLE_INTERVAL and BUDGET_WINDOW with a 150 MiB workload budget
# (BUDGET_HOLD=2s only shortens the wait for re-admission between runs) and a steady
# workload holding 100 MiB (2/3 of the budget: under the near-budget mark). Both it and the
# breaching workload declare a 200Mi limit: the budget, not DEFAULT_LIMITS (half the budget),
# is what they run into. The poller, outside the agent, sums the workloads' memory every
# POLL_US (and prints how often it really did). Before every run the device is calm: within
# its budget and sampling at SAMPLE_INTERVAL again (the agent logs both).
#
# - breach: a workload allocating 80 MiB is added (how fast its allocator runs alone is
#   printed); the clock starts when the poller first sees the sum over the budget and stops
#   at the agent's `running -> stopping` of it (the eviction started; `starting -> stopping`
#   counts too: its process may run before the driver has reported it started);
# - OOM: a workload allocating 64 MiB under a 32 MiB limit; from the poller first seeing its
#   OOM kill count rise to the agent's `running -> backoff`, split where the poller sees its
#   cgroup empty (the killed process gone);
# - OOM, adopted: the same, but the agent was restarted after the workload started, so it
#   cannot wait(2) for it (a run the new agent did not adopt counts as missed);
# - idle: the agent's cpu time over 60 s with the steady workload and nothing happening.
# Every clock starts at the poller's reading *before* the one that saw the event (which
# happened in between): figures may overstate by one poller gap, never understate.
set -u
DIR=$1
RUNS=${2:-20}
POLL_US=${3:-1000}
AGENT=$DIR/device-worker-ng
WORK=$(mktemp -d /tmp/dwng-budget.XXXXXX)
ROOT=dwng-bench-$$
SOCK=$WORK/control.sock
LOG=$WORK/agent.log
total=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 1024 ))
budget=$(( 150 * 1048576 ))
if grep -Eq ' - cgroup [^ ]+ [^ ]*memory' /proc/self/mountinfo; then
  PARENT=/sys/fs/cgroup/memory/$ROOT/workloads; layout="cgroup v1"
else
  PARENT=/sys/fs/cgroup/$ROOT/workloads; layout="cgroup v2"
fi
export EDGE_DEVICE_STATE_DIR=$WORK/state EDGE_DEVICE_DESIRED_STATE=$WORK/desired.yaml \
  EDGE_DEVICE_CONTROL_SOCKET=$SOCK EDGE_DEVICE_CGROUP_ROOT=$ROOT \
  EDGE_DEVICE_RESERVED_MEMORY=$(( total - budget )) EDGE_DEVICE_BUDGET_HOLD=2s \
  EDGE_DEVICE_LOG_LEVEL=info

workload() { # NAME PRIORITY LIMIT COMMAND...
  name=$1 prio=$2 limit=$3; shift 3
  printf '  - name: %s\n    kind: shell\n    labels: {device-worker-ng/priority: "%s"}\n' "$name" "$prio"
  printf '    specification: |\n      command: [%s]\n      user: root\n' "$*"
  limits=""
  [ -n "$limit" ] && limits=", limits: {memory: $limit}"
  printf '      resources: {requests: {memory: 8Mi}%s}\n' "$limits"
}
steady=$(workload steady 10 200Mi "\"$DIR/hog\", \"100\", \"100000\"")
desire() { # WORKLOAD... (none: no workloads)
  { if [ $# -eq 0 ]; then echo "workloads: []"; else echo "workloads:"; printf '%s\n' "$@"; fi; } > "$WORK/desired.next"
  mv "$WORK/desired.next" "$WORK/desired.yaml"
}
status() { "$AGENT" status --json --socket "$SOCK" 2>/dev/null; }
device_state() { status | grep -o '"state":"[a-z-]*"' | head -1 | cut -d'"' -f4; }
start_agent() {
  "$AGENT" run 2>>"$LOG" &
  APID=$!
  _s=0; while [ $_s -lt 100 ] && ! status >/dev/null; do sleep 0.1; _s=$((_s + 1)); done
}
stop_agent() { kill "$APID" 2>/dev/null; wait "$APID" 2>/dev/null; }
# waits up to $2 seconds for a log line matching $1 (an extended regex); functions share the
# shell's variables, so their counters have names of their own
wait_log() {
  _t=0; while [ $_t -lt $(( $2 * 20 )) ]; do grep -qE "$1" "$LOG" && return 0; sleep 0.05; _t=$((_t + 1)); done
  return 1
}
# calm: within budget, and the agent sampling at SAMPLE_INTERVAL (its last word on sampling)
wait_calm() {
  _c=0
  while [ $_c -lt 600 ]; do
    last=$(grep -E 'sampling fast:|sampling at SAMPLE_INTERVAL again' "$LOG" | tail -n 1)
    if [ "$(device_state)" = reconciling ] && { [ -z "$last" ] || echo "$last" | grep -qF 'the device is calm'; }; then
      return 0
    fi
    sleep 0.1; _c=$((_c + 1))
  done
  echo "the device did not calm down" >&2; return 1
}
# microseconds since the epoch of an agent log line's timestamp (2026-11-30T11:38:16.739284Z)
# and of a poller stamp (ns), in awk without mktime (busybox)
AWK_TIME='
function log_us(ts,   y, m, d, era, yoe, doy, doe, days, s) {
  y = substr(ts, 1, 4) + 0; m = substr(ts, 6, 2) + 0; d = substr(ts, 9, 2) + 0
  y -= (m <= 2); era = int(y / 400); yoe = y - era * 400
  doy = int((153 * (m > 2 ? m - 3 : m + 9) + 2) / 5) + d - 1
  doe = yoe * 365 + int(yoe / 4) - int(yoe / 100) + doy
  days = era * 146097 + doe - 719468
  s = days * 86400 + substr(ts, 12, 2) * 3600 + substr(ts, 15, 2) * 60 + substr(ts, 18, 2)
  return s * 1000000 + substr(ts, 21, 6)
}
function ns_us(ns) { return substr(ns, 1, length(ns) - 9) * 1000000 + int(substr(ns, length(ns) - 8) / 1000) }'
# The poller's first `KIND [NAME]` line after line MARK: the time of its reading (`seen`) or
# of the reading before (`before`: the event happened in between).
poller_at() {
  tail -n +"$(( $3 + 1 ))" "$WORK/poller.out" | awk -v what="$1" -v name="$2" -v which="$4" \
    '$1 == what && (name == "" || $3 == name) { print (which == "before" ? $NF : $2); exit }'
}
log_at() { grep -E "$1" "$LOG" | head -n 1 | cut -d' ' -f1; }
# ms from A to B, each a poller stamp (ns) or an agent log timestamp; a missing one is a
# "miss": the poller's (it never saw the event: it lasted less than its gap) or the agent's
ms_between() {
  if [ -z "$1" ]; then echo miss-poller; return; fi
  if [ -z "$2" ]; then echo miss-agent; return; fi
  awk -v a="$1" -v b="$2" "$AWK_TIME"'
    function us(t) { return t ~ /T/ ? log_us(t) : ns_us(t) }
    BEGIN { printf "%.1f\n", (us(b) - us(a)) / 1000 }'
}
# OOM kill -> backoff of workload $1, split at the moment its cgroup emptied (the killed
# process gone: the kernel's part before, the agent's after)
oom_latencies() { # NAME MARK FILE
  kill=$(poller_at oom "$1" "$2" before)
  back=$(log_at "workload/$1 from=\"running\" to=\"backoff\"")
  ms_between "$kill" "$back" >> "$WORK/$3"
  ms_between "$kill" "$(poller_at gone "$1" "$2" seen)" >> "$WORK/$3.exit"
  ms_between "$(poller_at gone "$1" "$2" before)" "$back" >> "$WORK/$3.agent"
}
cleanup() {
  desire; sleep 2; stop_agent
  [ -n "${PPID_POLLER:-}" ] && kill "$PPID_POLLER" 2>/dev/null
  for d in $(find /sys/fs/cgroup -maxdepth 2 -type d -name "$ROOT" 2>/dev/null); do
    find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

desire "$steady"
start_agent
wait_log 'workload/steady from="starting" to="running"' 10
"$DIR/poller" "$PARENT" "$budget" "$POLL_US" > "$WORK/poller.out" &
PPID_POLLER=$!
sleep 2
wait_calm
# idle: nothing happens for 60 s
ticks() { awk '{ print $14 + $15 }' "/proc/$APID/stat"; }
IDLE_S=${IDLE_S:-60}
t0=$(ticks); sleep "$IDLE_S"; t1=$(ticks)
hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
idle=$(awk -v a="$t0" -v b="$t1" -v hz="$hz" -v s="$IDLE_S" 'BEGIN { printf "%.3f", (b - a) / hz / s * 100 }')

# How fast the breach's allocator grows (outside the agent's cgroups): what BUDGET_WINDOW's
# default is weighed against (README: the headroom between the budget and the kernel cap).
up() { cut -d' ' -f1 /proc/uptime; }
a0=$(up); "$DIR/hog" 512 > /dev/null; a1=$(up)
rate=$(awk -v a="$a0" -v b="$a1" 'BEGIN { if (b > a) printf "%.0f", 512 / (b - a); else print "over 51200" }')
load0=$(cut -d' ' -f1-3 /proc/loadavg)
for f in breach oom oom.exit oom.agent adopted adopted.exit adopted.agent; do : > "$WORK/$f"; done
for run in $(seq 1 "$RUNS"); do
  wait_calm
  sleep "1.$(( (run * 37) % 10 ))" # the breach at a different point of the sampling period each run
  mark=$(wc -l < "$WORK/poller.out")
  desire "$steady" "$(workload "spike$run" 0 200Mi "\"$DIR/hog\", \"80\", \"100000\"")"
  # a victim still starting is evicted too: its process may be allocating already
  evicted="workload/spike$run from=\"(running|starting)\" to=\"stopping\""
  wait_log "$evicted" 10
  ms_between "$(poller_at over "" "$mark" before)" "$(log_at "$evicted")" >> "$WORK/breach"
  desire "$steady"
  wait_log "workload/spike$run from=\"evicted\" to=\"removed\"" 10
done
for run in $(seq 1 "$RUNS"); do
  wait_calm
  mark=$(wc -l < "$WORK/poller.out")
  desire "$steady" "$(workload "oom$run" 0 32Mi "\"$DIR/hog\", \"64\", \"100000\"")"
  wait_log "workload/oom$run from=\"running\" to=\"backoff\"" 10
  oom_latencies "oom$run" "$mark" oom
  desire "$steady"
  wait_log "workload/oom$run from=\"backoff\" to=\"removed\"" 10
done
for run in $(seq 1 "$RUNS"); do
  wait_calm
  mark=$(wc -l < "$WORK/poller.out")
  desire "$steady" "$(workload "adopted$run" 0 32Mi "/bin/sh, -c, \"sleep 3; exec $DIR/hog 64 100000\"")"
  wait_log "workload/adopted$run from=\"starting\" to=\"running\"" 10
  # Restart only once its record is written: without one, the new agent starts it afresh.
  _r=0; while [ $_r -lt 100 ] && [ ! -e "$WORK/state/workloads/adopted$run.json" ]; do sleep 0.02; _r=$((_r + 1)); done
  stop_agent
  start_agent
  wait_log "workload/adopted$run from=\"running\" to=\"backoff\"" 10
  if grep -qE "workload/adopted$run from=\"-\" to=\"running\" reason=adopted" "$LOG"; then
    oom_latencies "adopted$run" "$mark" adopted
  else
    for f in adopted adopted.exit adopted.agent; do echo miss-not-adopted >> "$WORK/$f"; done
  fi
  desire "$steady"
  wait_log "workload/adopted$run from=\"backoff\" to=\"removed\"" 10
done
kill "$PPID_POLLER"; wait "$PPID_POLLER" 2>/dev/null; PPID_POLLER=
gaps=$(grep '^polls' "$WORK/poller.out")

row() { # LABEL FILE TARGET
  sort -n "$2" | awk -v label="$1" -v target="$3" '
    $1 ~ /^miss/ { miss++; why[substr($1, 6)]++; next }
    { v[n++] = $1 }
    END {
      missed = ""
      for (w in why) missed = missed sprintf(", %d missed (%s)", why[w], w)
      if (n == 0) { printf "| %s | - | - | - | %s | none%s |\n", label, target, missed; exit }
      p99 = int((99 * n + 99) / 100) - 1 # nearest rank
      printf "| %s | %.1f ms | %.1f ms | %.1f ms | %s | %d runs%s |\n", label, v[int((n - 1) / 2)], v[p99], v[n - 1], target, n, missed
    }'
}
echo
echo "$layout, $(uname -r), $(nproc) cpus; agent at default SAMPLE_INTERVAL and BUDGET_WINDOW"
echo "poller: $gaps (between its readings, µs)"
echo "load average (1/5/15 min) when the runs began: $load0, when they ended: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "the breach's allocator alone: $rate MiB/s (512 MiB, /proc/uptime's 10 ms resolution)"
echo
echo "| measure | median | p99 | max | target | runs |"
echo "|---|---|---|---|---|---|"
row "budget breach -> eviction started (calm device)" "$WORK/breach" "p99 <= 100 ms, median <= 50 ms"
row "OOM kill -> backoff (shell workload)" "$WORK/oom" "p99 <= 50 ms"
row "- of which the killed process exiting (kernel)" "$WORK/oom.exit" ""
row "- of which exit -> backoff (agent)" "$WORK/oom.agent" ""
row "OOM kill -> backoff (adopted workload)" "$WORK/adopted" "p99 <= 50 ms"
row "- of which the killed process exiting (kernel)" "$WORK/adopted.exit" ""
row "- of which exit -> backoff (agent)" "$WORK/adopted.agent" ""
echo "| agent cpu, idle (60 s, one workload, nothing happening) | $idle % of a core | | | <= 0.1 % | |"
echo
echo "raw (ms): breach $(tr '\n' ' ' < "$WORK/breach")"
echo "raw (ms): oom $(tr '\n' ' ' < "$WORK/oom")"
echo "raw (ms): adopted $(tr '\n' ' ' < "$WORK/adopted")"
