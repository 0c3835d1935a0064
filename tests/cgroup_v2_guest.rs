//! Limit tests inside a qemu guest with a pure cgroup v2 hierarchy.
//!
//! The hosts (developer machines and CI runners) only have cgroup v1 with
//! enforced controllers, so these tests boot a small guest via
//! `tests/vm/guest.sh` (Debian kernel, busybox initramfs, cgroup2 with
//! memory/cpu/pids) and run a payload in it:
//!
//! * `smoke_limits_enforced_in_cgroup_v2_guest`: `tests/vm/smoke/run` proves
//!   the guest enforces memory.max, cpu.max and pids.max at all;
//! * `agent_limits_in_cgroup_v2_guest`: the agent binary runs
//!   `tests/vm/agent/desired.yaml` and `tests/vm/agent/run` checks, through
//!   `status --json` and the cgroup files, that it applied and observed the
//!   limits, and that it exits on SIGTERM.
//!
//! Each boots a TCG guest (~10 s for the smoke test, up to ~60 s for the agent
//! scenario). Without root, qemu-system-x86_64, a kernel in /boot,
//! busybox-static, gcc or cpio, or with `DWNG_SKIP_VM=1`, the tests show as
//! ignored, with what is missing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use dwng_test_support::guest::GuestRun;
use dwng_test_support::harness::{self, test, Need, Needs};

/// tests/vm/guest.sh and its payloads' static helpers.
const GUEST: Needs = &[
    Need::QemuGuests,
    Need::Root,
    Need::tool("qemu-system-x86_64", "qemu-system-x86"),
    Need::GuestKernel,
    Need::file("/bin/busybox", "busybox-static"),
    Need::tool("gcc", "gcc"),
    Need::tool("cpio", "cpio"),
];

fn main() {
    harness::main(&[
        test(
            "smoke_limits_enforced_in_cgroup_v2_guest",
            GUEST,
            smoke_limits_enforced_in_cgroup_v2_guest,
        ),
        test(
            "agent_limits_in_cgroup_v2_guest",
            GUEST,
            agent_limits_in_cgroup_v2_guest,
        ),
        test(
            "agent_budget_in_cgroup_v2_guest",
            GUEST,
            agent_budget_in_cgroup_v2_guest,
        ),
    ])
}

/// PASS lines the smoke payload must print (prefixes).
const SMOKE_PASSES: &[&str] = &[
    "PASS cgroup2: /sys/fs/cgroup is a cgroup2 mount",
    "PASS cgroup2: root subtree_control",
    "PASS memory: hog 200 MiB under memory.max 64M was OOM-killed",
    "PASS cpu: spin 2 s under cpu.max 20000/100000 throttled",
    "PASS pids: forker 50 under pids.max 10",
];

/// PASS lines the agent scenario must print (prefixes); the check names are
/// defined in tests/vm/agent/run.
const AGENT_PASSES: &[&str] = &[
    "PASS status_without_agent:",
    "PASS status_json:",
    "PASS cgroup_layout:",
    "PASS hog_memory_max:",
    "PASS hog_oom_killed:",
    "PASS hog_restarted:",
    "PASS spinner_cpu_max:",
    "PASS spinner_throttled:",
    "PASS forker_forks_failed:",
    "PASS status_table:",
    "PASS sigterm_exit:",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A payload directory that is removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("dwng-{tag}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).expect("create payload dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `tests/vm/guest.sh payload_dir` with `env`.
fn run_guest(payload_dir: &Path, env: &[(&str, &str)]) -> GuestRun {
    GuestRun::of(
        Command::new("bash")
            .arg(repo().join("tests/vm/guest.sh"))
            .arg(payload_dir)
            .envs(env.iter().copied()),
    )
}

/// The payload's checks passed and it ran to its end.
fn assert_passed(run: &GuestRun, what: &str, required: &[&str]) {
    run.assert_passed(what, required);
    assert!(
        run.console.lines().any(|l| l == "GUEST-PAYLOAD-EXIT=0"),
        "{what}: guest never printed GUEST-PAYLOAD-EXIT=0\n{}",
        run.transcript()
    );
}

fn smoke_limits_enforced_in_cgroup_v2_guest() {
    let run = run_guest(&repo().join("tests/vm/smoke"), &[]);
    assert_passed(&run, "smoke payload", SMOKE_PASSES);
}

fn agent_limits_in_cgroup_v2_guest() {
    let payload = TempDir::new("agent-payload");
    let agent = env!("CARGO_BIN_EXE_device-worker-ng");
    let vm = repo().join("tests/vm/agent");
    for (from, to) in [
        (PathBuf::from(agent), "device-worker-ng"),
        (vm.join("run"), "run"),
        (vm.join("desired.yaml"), "desired.yaml"),
    ] {
        fs::copy(&from, payload.0.join(to))
            .unwrap_or_else(|e| panic!("copy {} into the payload: {e}", from.display()));
    }
    let run = run_guest(&payload.0, &[]);
    assert_passed(&run, "agent scenario", AGENT_PASSES);
}

/// Issue 5 in the guest: the kernel cap on all workloads, eviction of the lowest priority
/// when the workloads together use more than the budget, re-admission after the hold time;
/// issue 15: memory.high at the budget, and an eviction caused by its notification while the
/// sampler's period is 30 s.
fn agent_budget_in_cgroup_v2_guest() {
    let payload = TempDir::new("budget-payload");
    let agent = env!("CARGO_BIN_EXE_device-worker-ng");
    for (from, to) in [
        (PathBuf::from(agent), "device-worker-ng"),
        (repo().join("tests/vm/budget/run"), "run"),
    ] {
        fs::copy(&from, payload.0.join(to))
            .unwrap_or_else(|e| panic!("copy {} into the payload: {e}", from.display()));
    }
    let run = run_guest(&payload.0, &[("MEM", "1024")]);
    assert_passed(
        &run,
        "budget scenario",
        &[
            "PASS workloads_cap:",
            "PASS expendable_evicted:",
            "PASS others_untouched:",
            "PASS device_over_budget",
            "PASS expendable_readmitted",
            "PASS memory_high_at_budget:",
            "PASS evicted_by_notification:",
            "PASS memory_high_event",
            "PASS steady_untouched",
        ],
    );
}
