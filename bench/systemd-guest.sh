#!/usr/bin/env bash
# The agent's memory under the systemd cgroup driver (zbus connection to systemd, one unit per
# workload), measured in the Debian 12 systemd guest (tests/vm/systemd/guest.sh, qemu TCG):
#  - resident memory idle (no workloads) and with N shell workloads running as units [<= 8 MiB]
#  - how long until they all ran (emulated: slow; for orientation only; gives up after 600 polls)
# Prints a table, asserts nothing. Needs root and what guest.sh needs.
#
#   sudo bench/systemd-guest.sh [N=50]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-50}
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
cargo build --release --quiet
PAYLOAD=$(mktemp -d /tmp/dwng-bench-sd.XXXXXX)
trap 'rm -rf "$PAYLOAD"' EXIT
cp target/release/device-worker-ng "$PAYLOAD/"
cat > "$PAYLOAD/run" <<EOF
#!/bin/bash
# In the guest: the agent (serverless, systemd driver picked by itself) with $N shell
# workloads; VmRSS idle, then with all of them running.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
N=$N
EOF
cat >> "$PAYLOAD/run" <<'EOF'
BIN=/root/payload/device-worker-ng
W=/run/dwng-bench; mkdir -p $W
export EDGE_DEVICE_STATE_DIR=$W/state EDGE_DEVICE_DESIRED_STATE=$W/desired.yaml \
  EDGE_DEVICE_CONTROL_SOCKET=$W/control.sock EDGE_DEVICE_LOG_LEVEL=warn
echo "workloads: []" > $W/desired.yaml
$BIN run 2> $W/agent.log &
AGENT=$!
for _ in $(seq 200); do $BIN status >/dev/null 2>&1 && break; sleep 0.1; done
sleep 3
idle=$(awk '/VmRSS/ {print $2}' /proc/$AGENT/status)
driver=$($BIN status --json | grep -o '"cgroup_driver":"[a-z]*"')
{
  echo "workloads:"
  for i in $(seq 1 $N); do
    printf '  - name: w%s\n    kind: shell\n    specification: |\n      command: ["/bin/sleep", "100000"]\n      user: root\n      resources:\n        limits: {memory: 16Mi, cpu: 50m, pids: 4}\n        requests: {memory: 1Mi, cpu: 1m}\n' $i
  done
} > $W/d.tmp && mv $W/d.tmp $W/desired.yaml
t0=$(date +%s.%N)
running() { $BIN status --json 2>/dev/null | grep -o '"state":"running"' | wc -l; }
for _ in $(seq 600); do [ "$(running)" -ge "$N" ] && break; sleep 0.5; done
t1=$(date +%s.%N)
n=$(running)
sleep 5
rss=$(awk '/VmRSS/ {print $2}' /proc/$AGENT/status)
hwm=$(awk '/VmHWM/ {print $2}' /proc/$AGENT/status)
units=$(systemctl list-units --plain --no-legend 'device-worker-ng-*.service' | wc -l)
echo "BENCH driver $driver"
echo "BENCH workloads_running $n of $N ($units units)"
echo "BENCH rss_idle_kib $idle"
echo "BENCH rss_kib $rss"
echo "BENCH hwm_kib $hwm"
echo "BENCH all_running_s $(awk -v a=$t0 -v b=$t1 'BEGIN { printf "%.1f", b - a }')"
echo "workloads: []" > $W/d.tmp && mv $W/d.tmp $W/desired.yaml
for _ in $(seq 600); do [ "$(systemctl list-units --all --plain --no-legend 'device-worker-ng-*' | wc -l)" = 0 ] && break; sleep 0.5; done
kill $AGENT; wait $AGENT 2>/dev/null
echo PROBE-EXIT=0
EOF
chmod +x "$PAYLOAD/run"
out=$(PAYLOAD=$PAYLOAD tests/vm/systemd/guest.sh 2>/dev/null | tr -d '\r')
get() { echo "$out" | awk -v k="$1" '$1 == "BENCH" && $2 == k { $1 = ""; $2 = ""; sub(/^  /, ""); print }'; }
[ -n "$(get rss_kib)" ] || { echo "$out" | tail -n 40; echo "no figures from the guest" >&2; exit 1; }
printf '\n%-62s %12s %10s\n' "measure (systemd guest, qemu TCG)" "value" "target"
printf '%-62s %12s %10s\n' "cgroup driver" "$(get driver | sed 's/.*:"//; s/"//')" "systemd"
printf '%-62s %12s %10s\n' "workloads running as units" "$(get workloads_running)" "-"
printf '%-62s %8s KiB %10s\n' "agent RSS idle, no workloads (VmRSS)" "$(get rss_idle_kib)" "-"
printf '%-62s %8s KiB %10s\n' "agent RSS with $N shell workloads as units (VmRSS)" "$(get rss_kib)" "8192 KiB"
printf '%-62s %8s KiB %10s\n' "agent peak RSS (VmHWM)" "$(get hwm_kib)" "-"
printf '%-62s %10s s %10s\n' "desired state -> all $N running (emulated CPU, orientation only)" "$(get all_running_s)" "-"
