#!/usr/bin/env bash
# How fast the agent reacts to a budget breach and to an OOM kill, measured from outside it
# (issue 15; targets: breach -> eviction started p99 <= 100 ms and median <= 50 ms from a calm
# device, OOM kill -> workload machine p99 <= 50 ms, idle cpu <= 0.1 % of a core). Prints a
# table; asserts nothing. Needs root (and gcc with a static libc).
#
#   sudo bench/budget.sh [RUNS=20]            on this host's cgroups (v1 on the CI machines)
#   sudo bench/budget.sh --guest [RUNS=20]    inside the cgroup v2 qemu guest (tests/vm)
#
# How it measures: bench/budget-run.sh (the same script in both places).
set -euo pipefail
cd "$(dirname "$0")/.."
GUEST=0
if [ "${1:-}" = --guest ]; then GUEST=1; shift; fi
RUNS=${1:-20}
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
cargo build --release --quiet
DIR=$(mktemp -d /tmp/dwng-budget-bin.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
cp target/release/device-worker-ng bench/budget-run.sh "$DIR/"
gcc -O2 -static -o "$DIR/poller" bench/poller.c
gcc -O2 -static -o "$DIR/hog" tests/vm/hog.c
if [ "$GUEST" = 0 ]; then
  sh bench/budget-run.sh "$DIR" "$RUNS"
else
  # The poller at 2 ms (the most the measurement allows): every emulated cycle is dear.
  printf '#!/bin/sh\nexec sh /payload/budget-run.sh /payload %s 2000\n' "$RUNS" > "$DIR/run"
  chmod +x "$DIR/run"
  # Two vCPUs like the host; each run takes a few seconds of (emulated) time.
  MEM=1024 SMP=2 TIMEOUT=$((300 + RUNS * 60)) bash tests/vm/guest.sh "$DIR" \
    | sed -n '/^cgroup v/,/^raw (ms): adopted/p'
fi
