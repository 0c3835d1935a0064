#!/usr/bin/env bash
# The serverless quick start: builds the agent, runs it against examples/serverless/desired.yaml
# (two shell workloads with limits, one a deliberate memory hog), waits until the hog has been
# OOM-killed and restarted, prints `status`, then removes the workloads and stops the agent.
# Needs root (cgroups). Everything lives under $WORK (default /tmp/dwng-example).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "run as root: the agent creates cgroups" >&2; exit 1; }
WORK=${WORK:-/tmp/dwng-example}
rm -rf "$WORK"; mkdir -p "$WORK"
cp examples/serverless/desired.yaml "$WORK/desired.yaml"

cargo build --release --quiet
BIN=$PWD/target/release/device-worker-ng

export EDGE_DEVICE_STATE_DIR=$WORK/state
export EDGE_DEVICE_DESIRED_STATE=$WORK/desired.yaml
export EDGE_DEVICE_CONTROL_SOCKET=$WORK/control.sock
export EDGE_DEVICE_CGROUP_ROOT=device-worker-ng-example
"$BIN" run 2>"$WORK/agent.log" &
AGENT=$!
trap 'kill $AGENT 2>/dev/null || true' EXIT
echo "agent pid $AGENT, log $WORK/agent.log, workload logs $WORK/state/logs/"

# Wait (at most 30 s) until the hog was OOM-killed and restarted at least twice.
for _ in $(seq 60); do
  if "$BIN" status --json 2>/dev/null | grep -q '"name":"hog"[^}]*"restarts":[2-9]'; then break; fi
  sleep 0.5
done
"$BIN" status
echo
echo "== workload log of the hog (OOM-killed each time it allocates past 32Mi):"
tail -n 3 "$WORK/state/logs/hog.log"

echo
echo "== removing the workloads (empty desired state) and stopping the agent"
echo "workloads: []" > "$WORK/desired.yaml.new" && mv "$WORK/desired.yaml.new" "$WORK/desired.yaml"
for _ in $(seq 50); do
  "$BIN" status 2>/dev/null | grep -q "no workloads" && break
  sleep 0.2
done
"$BIN" status | sed -n '3p;6p'
kill -TERM $AGENT; wait $AGENT || true
trap - EXIT
left=$(find /sys/fs/cgroup/*/device-worker-ng-example/workloads -mindepth 1 -type d 2>/dev/null | wc -l)
echo "agent stopped; workload cgroups left behind: $left"
