#!/bin/sh
# Time from a desired-state change to a pod running, with podman's own time separated.
# Root, podman (see .ci/run), the test image (tests/podman/build-image.sh). Not asserted.
#
#   bench/pod-start.sh [path/to/device-worker-ng] [runs]
#
# 1. podman alone: the same calls the driver makes (kube play --start=false, pod clone
#    --cgroup-parent, rename, pod start), timed directly.
# 2. through the agent: serverless mode, the desired-state file is replaced and `status --json`
#    polled (every 20 ms) until the workload is running. agent overhead = 2 - 1.
set -eu
BIN=${1:-target/release/device-worker-ng}
RUNS=${2:-5}
IMAGE=localhost/dwng-busybox:test
sh "$(dirname "$0")/../tests/podman/build-image.sh"
work=$(mktemp -d)
root="dwng-bench-$$"
now() { date +%s%N; }
ms() { echo $(( ($2 - $1) / 1000000 )); }
cleanup() {
  [ -n "${agent:-}" ] && kill "$agent" 2>/dev/null && wait "$agent" 2>/dev/null || true
  podman pod rm -f --ignore bench bench-direct bench-direct-staging >/dev/null 2>&1 || true
  for m in $(awk '$9 ~ /^cgroup/ {print $5}' /proc/self/mountinfo); do
    [ -d "$m/$root" ] && find "$m/$root" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

manifest() { # name
  cat <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  restartPolicy: Never
  containers:
  - {name: app, image: $IMAGE, command: [/bin/sleep, "600"], resources: {limits: {memory: 64Mi, cpu: 250m}}}
YAML
}

echo "== podman alone (ms): play clone rename start total"
for m in memory cpu,cpuacct pids; do mkdir -p "/sys/fs/cgroup/$m/$root/direct"; done
for i in $(seq "$RUNS"); do
  t0=$(now); manifest bench-direct-staging | podman kube play --quiet --start=false - >/dev/null
  t1=$(now); podman pod clone --destroy --cgroup-parent="/$root/direct" --name bench-direct bench-direct-staging >/dev/null
  t2=$(now); podman rename bench-direct-staging-app-clone bench-direct-app
  t3=$(now); podman pod start bench-direct >/dev/null
  t4=$(now)
  echo "$(ms $t0 $t1) $(ms $t1 $t2) $(ms $t2 $t3) $(ms $t3 $t4) $(ms $t0 $t4)"
  podman pod rm -f bench-direct >/dev/null
done

echo "== through the agent (ms): desired-state change -> status running"
export EDGE_DEVICE_STATE_DIR="$work/state" EDGE_DEVICE_CONTROL_SOCKET="$work/sock" \
  EDGE_DEVICE_DESIRED_STATE="$work/desired.yaml" EDGE_DEVICE_CGROUP_ROOT="$root/agent" \
  EDGE_DEVICE_LOG_LEVEL=warn
echo "workloads: []" > "$work/desired.yaml"
"$BIN" run 2>"$work/agent.log" & agent=$!
i=0; until "$BIN" status --json >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 200 ] || { cat "$work/agent.log"; exit 1; }; sleep 0.05; done
for i in $(seq "$RUNS"); do
  cat > "$work/desired.tmp" <<YAML
workloads:
- name: bench
  specification: |
    containers:
    - {name: app, image: $IMAGE, command: [/bin/sleep, "60$i"], resources: {limits: {memory: 64Mi, cpu: 250m}}}
YAML
  t0=$(now); mv "$work/desired.tmp" "$work/desired.yaml"
  until "$BIN" status --json 2>/dev/null | grep -q '"state": *"running"'; do sleep 0.02; done
  t1=$(now)
  echo "$(ms $t0 $t1)"
  echo "workloads: []" > "$work/desired.yaml"
  while "$BIN" status --json 2>/dev/null | grep -q '"name": *"bench"'; do sleep 0.05; done
done
