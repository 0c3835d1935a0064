#!/usr/bin/env bash
# What the agent's dependencies cost: clean release build time, binary size, number of
# crates compiled; optionally the same for another git revision, to compare (e.g. before a
# dependency was added). Prints a table, asserts nothing.
#
#   bench/cost.sh [REV]        e.g. bench/cost.sh 30e87e6
#   KEEP=DIR bench/cost.sh ... keeps the binaries as DIR/device-worker-ng-<tree>, e.g. for
#                              BIN=DIR/device-worker-ng-worktree bench/agent.sh (RSS)
#
# Each tree (the working tree, and REV exported with `git archive`) is built from scratch in
# its own fresh CARGO_TARGET_DIR (`cargo build --release --locked`), dependencies fetched
# beforehand so the download is not timed. The clock starts right before `cargo build` and
# stops when it returns. On a shared machine the build time depends on what else runs: the
# load average at the start of each build is printed next to it. RSS is measured by
# bench/agent.sh (it prints idle and with-N-workloads figures).
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:-}
WORK=$(mktemp -d /tmp/dwng-cost.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# measure NAME SRC_DIR: prints "name|seconds|bytes|crates|load"
measure() {
  local name=$1 src=$2 target=$WORK/target-$1
  (cd "$src" && cargo fetch --locked --quiet)
  local load t0 t1
  load=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(date +%s.%N)
  (cd "$src" && CARGO_TARGET_DIR=$target cargo build --release --locked --quiet)
  t1=$(date +%s.%N)
  local secs bytes crates
  secs=$(echo "$t1 - $t0" | bc)
  bytes=$(stat -c %s "$target/release/device-worker-ng")
  # crates in the binary's dependency graph (normal dependencies, the agent itself included)
  crates=$(cd "$src" && cargo tree --locked -e normal --prefix none 2>/dev/null \
    | sed 's/ (\*)$//; s/ (proc-macro)$//' | sort -u | wc -l)
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP" && cp "$target/release/device-worker-ng" "$KEEP/device-worker-ng-$name"
  fi
  echo "$name|$secs|$bytes|$crates|$load"
}

rows=()
if [ -n "$REV" ]; then
  mkdir -p "$WORK/rev"
  git archive "$REV" | tar -x -C "$WORK/rev"
  rows+=("$(measure "$(git rev-parse --short "$REV")" "$WORK/rev")")
fi
rows+=("$(measure worktree "$PWD")")

printf '\n%-10s %14s %16s %8s %14s\n' "tree" "clean build s" "binary bytes" "crates" "load at start"
for r in "${rows[@]}"; do
  IFS='|' read -r n s b c l <<<"$r"
  printf '%-10s %14.1f %16s %8s %14s\n' "$n" "$s" "$b" "$c" "$l"
done
