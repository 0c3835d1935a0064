#!/usr/bin/env bash
# Idle network cost of one device at default settings (issue 3): requests, HTTP bytes and TLS
# connections per hour against the mTLS Flotta test server, and the agent's RSS while polling
# with 50 workloads. Needs root (the workloads run in cgroups). Usage: bench/network.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
cargo run --release --quiet --example bench-network -- "${1:-180}"
