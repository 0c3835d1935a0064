#!/usr/bin/env bash
# Benchmarks of the core agent (issue targets in brackets); prints a table, asserts nothing.
#  - threads and resident memory idle, with 50 and 200 shell workloads, and after all 200
#    are removed                                   [<= 10 threads with 200; RSS after churn
#                                                    within 1 MiB of idle; <= 8 MiB with 50]
#  - agent CPU with no workload, and with 50        [<= 0.1 % idle; <= 0.5 % with 50]
#  - desired-state change -> workload process running              [<= 50 ms]
#  - memory of the log writers, one per shell workload (with 50)
# Needs root (cgroups). Usage: sudo bench/agent.sh [STEADY_SECONDS=30]
set -euo pipefail
cd "$(dirname "$0")/.."
STEADY=${1:-30}
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
cargo build --release --quiet
BIN=$PWD/target/release/device-worker-ng
WORK=$(mktemp -d /tmp/dwng-bench.XXXXXX)
ROOT=device-worker-ng-bench-$$
export EDGE_DEVICE_STATE_DIR=$WORK/state EDGE_DEVICE_DESIRED_STATE=$WORK/desired.yaml \
  EDGE_DEVICE_CONTROL_SOCKET=$WORK/control.sock EDGE_DEVICE_CGROUP_ROOT=$ROOT \
  EDGE_DEVICE_LOG_LEVEL=warn EDGE_DEVICE_MAX_WORKLOADS=1000

workload() { # name command
  printf '  - name: %s\n    kind: shell\n    specification: |\n      command: ["/bin/sh", "-c", "%s"]\n      user: root\n      resources:\n        limits: {memory: 16Mi, cpu: 50m, pids: 4}\n        requests: {memory: 1Mi, cpu: 1m}\n' "$1" "$2"
}
write_desired() { # content (atomic)
  printf '%s' "$1" > "$WORK/desired.tmp" && mv "$WORK/desired.tmp" "$WORK/desired.yaml"
}
workloads() { # n -> desired state with n sleepers
  local out="workloads:"$'\n'
  for i in $(seq 1 "$1"); do out+=$(workload "w$i" "exec sleep 100000"); out+=$'\n'; done
  [ "$1" = 0 ] && out="workloads: []"
  printf '%s' "$out"
}
write_desired "workloads: []"
"$BIN" run 2>"$WORK/agent.log" &
AGENT=$!
cleanup() {
  write_desired "workloads: []"
  for _ in $(seq 300); do "$BIN" status 2>/dev/null | grep -q "no workloads" && break; sleep 0.1; done
  kill $AGENT 2>/dev/null; wait $AGENT 2>/dev/null || true
  for c in memory cpu cpuacct pids; do
    [ -d /sys/fs/cgroup/$c/$ROOT ] && find /sys/fs/cgroup/$c/$ROOT -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

running() { "$BIN" status --json 2>/dev/null | grep -o '"state":"running"' | wc -l; }
threads() { ls "/proc/$AGENT/task" | wc -l; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$AGENT/status"; }
anon_kb() { awk '/RssAnon/ {print $2}' "/proc/$AGENT/status"; }
peak=0
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$AGENT/stat"; }
cpu_pct() { # seconds
  local c0 c1 t0 t1
  c0=$(cpu_ticks); t0=$(date +%s.%N); sleep "$1"; c1=$(cpu_ticks); t1=$(date +%s.%N)
  echo "scale=3; 100 * ($c1 - $c0) / $ticks / ($t1 - $t0)" | bc
}
settle() { # n: wait until n run (noting the most threads seen), then let idle threads leave
  peak=0
  for _ in $(seq 600); do
    t=$(threads); [ "$t" -gt "$peak" ] && peak=$t
    [ "$(running)" -ge "$1" ] && break; sleep 0.1
  done
  if [ "$1" = 0 ]; then
    for _ in $(seq 600); do "$BIN" status 2>/dev/null | grep -q "no workloads" && break; sleep 0.1; done
  fi
  sleep 5
}

for _ in $(seq 100); do "$BIN" status >/dev/null 2>&1 && break; sleep 0.1; done
settle 0
idle_threads=$(threads); idle_rss=$(rss_kb); idle_anon=$(anon_kb); idle_cpu=$(cpu_pct "$STEADY")

write_desired "$(workloads 50)"; settle 50
t50=$(threads); r50=$(rss_kb); c50=$(cpu_pct "$STEADY")

# The log writers (the agent's binary in its hidden mode, one per shell workload): resident
# and private memory of each (median), and all of them together by proportional share (PSS:
# the binary's and libc's pages they share with the agent and each other are split).
writer_rss=(); writer_priv=(); writer_pss=0
for d in /proc/[0-9]*; do
  { tr '\0' ' ' < "$d/cmdline"; } 2>/dev/null | grep -q "__log-writer $WORK/" || continue
  writer_rss+=($(awk '/^VmRSS/ {print $2}' "$d/status"))
  writer_priv+=($(awk '/^Private_(Clean|Dirty)/ {s += $2} END {print s}' "$d/smaps_rollup"))
  writer_pss=$(( writer_pss + $(awk '/^Pss:/ {print $2}' "$d/smaps_rollup") ))
done
median_of() { [ $# -gt 0 ] || { echo -; return; }; printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }

write_desired "$(workloads 200)"; settle 200
p200=$peak; t200=$(threads); r200=$(rss_kb); n200=$(running)

write_desired "workloads: []"; settle 0
tafter=$(threads); rafter=$(rss_kb); aafter=$(anon_kb)

# Latency: add one workload at a time; it records when its process starts running.
lat=(); base=""
for i in $(seq 1 10); do
  extra=$(workload "lat$i" "date +%s%N > $WORK/started$i; exec sleep 100000")
  t0=$(date +%s%N)
  write_desired "workloads:"$'\n'"$base$extra"$'\n'
  for _ in $(seq 500); do [ -s "$WORK/started$i" ] && break; sleep 0.01; done
  t1=$(cat "$WORK/started$i")
  lat+=($(( (t1 - t0) / 1000 )))
  base+="$extra"$'\n'
done
sorted=$(printf '%s\n' "${lat[@]}" | sort -n)
median=$(echo "$sorted" | sed -n 5p); max=$(echo "$sorted" | tail -1)

printf '\n%-62s %12s %12s\n' "measure" "value" "target"
printf '%-62s %12s %12s\n' "threads, idle (no workload)" "$idle_threads" "-"
printf '%-62s %8s KiB %12s\n' "RSS, idle" "$idle_rss" "-"
printf '%-62s %10s %% %12s\n' "CPU, idle, 1 s sampler (${STEADY}s)" "$idle_cpu" "0.1 %"
printf '%-62s %12s %12s\n' "threads, 50 shell workloads" "$t50" "-"
printf '%-62s %8s KiB %12s\n' "RSS, 50 shell workloads" "$r50" "8192 KiB"
printf '%-62s %10s %% %12s\n' "CPU, 50 workloads, steady state (${STEADY}s)" "$c50" "0.5 %"
printf '%-62s %8s KiB %12s\n' "log writer RSS, median of ${#writer_rss[@]} (VmRSS)" "$(median_of "${writer_rss[@]}")" "-"
printf '%-62s %8s KiB %12s\n' "log writer private memory, median (Private_*)" "$(median_of "${writer_priv[@]}")" "-"
printf '%-62s %8s KiB %12s\n' "all ${#writer_rss[@]} log writers together (sum of PSS)" "$writer_pss" "-"
printf '%-62s %12s %12s\n' "threads, most seen while 200 shell workloads start" "$p200" "10"
printf '%-62s %12s %12s\n' "threads, 200 shell workloads ($n200 running)" "$t200" "10"
printf '%-62s %8s KiB %12s\n' "RSS, 200 shell workloads" "$r200" "-"
printf '%-62s %12s %12s\n' "threads, after removing all 200" "$tafter" "-"
printf '%-62s %8s KiB %8s KiB\n' "RSS, after removing all 200" "$rafter" "$((idle_rss + 1024))"
printf '%-62s %8s KiB %12s\n' "  of which anonymous (heap, stacks), idle" "$idle_anon" "-"
printf '%-62s %8s KiB %12s\n' "  of which anonymous (heap, stacks), after removing all 200" "$aafter" "-"
printf '%-62s %9s us %12s\n' "desired-state change -> process running, median of 10" "$median" "50000 us"
printf '%-62s %9s us %12s\n' "desired-state change -> process running, max of 10" "$max" "-"
