#!/usr/bin/env bash
# Benchmarks of the core agent (issue targets in brackets); prints a table, asserts nothing.
#  - resident memory idle (no workloads) and with N shell workloads running [<= 8 MiB]
#  - agent CPU at steady state with N workloads and a 1 s sampler  [<= 0.5 % of one core]
#  - desired-state change -> workload process running              [<= 50 ms]
# Needs root (cgroups). Usage: sudo bench/agent.sh [N=50] [STEADY_SECONDS=30]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-50}; STEADY=${2:-30}
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
# BIN=path: measure that binary (e.g. one built by bench/cost.sh) instead of building
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=$PWD/target/release/device-worker-ng
fi
WORK=$(mktemp -d /tmp/dwng-bench.XXXXXX)
ROOT=device-worker-ng-bench-$$
export EDGE_DEVICE_STATE_DIR=$WORK/state EDGE_DEVICE_DESIRED_STATE=$WORK/desired.yaml \
  EDGE_DEVICE_CONTROL_SOCKET=$WORK/control.sock EDGE_DEVICE_CGROUP_ROOT=$ROOT EDGE_DEVICE_LOG_LEVEL=warn

workload() { # name command
  printf '  - name: %s\n    kind: shell\n    specification: |\n      command: ["/bin/sh", "-c", "%s"]\n      user: root\n      resources:\n        limits: {memory: 16Mi, cpu: 50m, pids: 4}\n        requests: {memory: 1Mi, cpu: 1m}\n' "$1" "$2"
}
write_desired() { # file content (atomic)
  printf '%s' "$2" > "$1.tmp" && mv "$1.tmp" "$1"
}
base=""
for i in $(seq 1 "$N"); do base+=$(workload "w$i" "exec sleep 100000"); base+=$'\n'; done
write_desired "$WORK/desired.yaml" "workloads: []"

"$BIN" run 2>"$WORK/agent.log" &
AGENT=$!
cleanup() {
  write_desired "$WORK/desired.yaml" "workloads: []"
  for _ in $(seq 100); do "$BIN" status 2>/dev/null | grep -q "no workloads" && break; sleep 0.1; done
  kill $AGENT 2>/dev/null; wait $AGENT 2>/dev/null || true
  for c in memory cpu cpuacct pids; do
    [ -d /sys/fs/cgroup/$c/$ROOT ] && find /sys/fs/cgroup/$c/$ROOT -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

running() { "$BIN" status --json 2>/dev/null | grep -o '"state":"running"' | wc -l; }
# idle: the agent up with no workloads, its sampler and control socket running
for _ in $(seq 100); do "$BIN" status >/dev/null 2>&1 && break; sleep 0.1; done
sleep 3
idle_kb=$(awk '/VmRSS/ {print $2}' "/proc/$AGENT/status")
write_desired "$WORK/desired.yaml" "workloads:"$'\n'"$base"
for _ in $(seq 300); do [ "$(running)" -ge "$N" ] && break; sleep 0.1; done
echo "$(running) of $N workloads running"
sleep 3

ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$AGENT/stat"; }
c0=$(cpu_ticks); t0=$(date +%s.%N)
sleep "$STEADY"
c1=$(cpu_ticks); t1=$(date +%s.%N)
cpu_pct=$(echo "scale=3; 100 * ($c1 - $c0) / $ticks / ($t1 - $t0)" | bc)
rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$AGENT/status")
hwm_kb=$(awk '/VmHWM/ {print $2}' "/proc/$AGENT/status")

# Latency: add one workload at a time; it records when its process starts running.
lat=()
for i in $(seq 1 10); do
  extra=$(workload "lat$i" "date +%s%N > $WORK/started$i; exec sleep 100000")
  t0=$(date +%s%N)
  write_desired "$WORK/desired.yaml" "workloads:"$'\n'"$base$extra"$'\n'
  for _ in $(seq 500); do [ -s "$WORK/started$i" ] && break; sleep 0.01; done
  t1=$(cat "$WORK/started$i")
  lat+=($(( (t1 - t0) / 1000 )))
  base+="$extra"$'\n'
done
sorted=$(printf '%s\n' "${lat[@]}" | sort -n)
median=$(echo "$sorted" | sed -n 5p); max=$(echo "$sorted" | tail -1)

printf '\n%-58s %12s %10s\n' "measure" "value" "target"
printf '%-58s %9s KiB %10s\n' "agent RSS idle, no workloads (VmRSS)" "$idle_kb" "-"
printf '%-58s %9s KiB %10s\n' "agent RSS with $N shell workloads running (VmRSS)" "$rss_kb" "8192 KiB"
printf '%-58s %9s KiB %10s\n' "agent peak RSS (VmHWM)" "$hwm_kb" "-"
printf '%-58s %10s %% %10s\n' "agent CPU, steady state, $N workloads, 1 s sampler (${STEADY}s)" "$cpu_pct" "0.5 %"
per_wl=$(echo "scale=1; $cpu_pct * 10000 / $N" | bc)
printf '%-58s %9s us %10s\n' "agent CPU per workload per second (sampler and all)" "$per_wl" "-"
printf '%-58s %9s us %10s\n' "desired-state change -> process running, median of 10" "$median" "50000 us"
printf '%-58s %9s us %10s\n' "desired-state change -> process running, max of 10" "$max" "-"
