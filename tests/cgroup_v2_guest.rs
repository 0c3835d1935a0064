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
//! busybox-static, gcc or cpio, or with `DWNG_SKIP_VM=1`, the tests print a
//! loud `SKIPPED:` line on stderr (bypassing the test harness's output capture)
//! and return.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

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

/// Loud skip notice that shows even when libtest captures the test's output.
fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn have_kernel() -> bool {
    fs::read_dir("/boot")
        .map(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("vmlinuz-") && name.ends_with("-amd64")
            })
        })
        .unwrap_or(false)
}

/// Returns false (after printing the SKIPPED line) if the guest cannot run here.
fn vm_available(test: &str) -> bool {
    if std::env::var("DWNG_SKIP_VM")
        .map(|v| v == "1")
        .unwrap_or(false)
    {
        skip(test, "DWNG_SKIP_VM=1 is set");
        return false;
    }
    let mut missing: Vec<String> = Vec::new();
    match effective_uid() {
        Some(0) => {}
        Some(uid) => missing.push(format!("root (running as uid {uid})")),
        None => missing.push("root (uid unknown)".into()),
    }
    if !on_path("qemu-system-x86_64") {
        missing.push("qemu-system-x86_64 (qemu-system-x86)".into());
    }
    if !have_kernel() {
        missing.push("a kernel /boot/vmlinuz-*-amd64 (linux-image-amd64)".into());
    }
    if !Path::new("/bin/busybox").is_file() {
        missing.push("/bin/busybox (busybox-static)".into());
    }
    if !on_path("gcc") {
        missing.push("gcc".into());
    }
    if !on_path("cpio") {
        missing.push("cpio".into());
    }
    if missing.is_empty() {
        return true;
    }
    skip(
        test,
        &format!(
            "missing {} (CI installs it: see .ci/run)",
            missing.join(", ")
        ),
    );
    false
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

struct GuestRun {
    code: Option<i32>,
    console: String,
}

/// Runs `tests/vm/guest.sh payload_dir`, echoing everything it printed
/// (shown by libtest when the test fails, or with --nocapture).
fn run_guest(payload_dir: &Path) -> GuestRun {
    run_guest_with(payload_dir, &[])
}

fn run_guest_with(payload_dir: &Path, env: &[(&str, &str)]) -> GuestRun {
    let script = repo().join("tests/vm/guest.sh");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .arg(payload_dir)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{console}");
    println!(
        "---- guest.sh stderr ----\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "guest.sh exited {:?} after {:.1} s",
        out.status.code(),
        started.elapsed().as_secs_f64()
    );
    GuestRun {
        code: out.status.code(),
        console,
    }
}

fn assert_passed(run: &GuestRun, what: &str, required: &[&str]) {
    let lines: Vec<&str> = run.console.lines().collect();
    let fails: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("FAIL "))
        .collect();
    assert!(
        fails.is_empty(),
        "{what}: failed checks:\n{}",
        fails.join("\n")
    );
    for want in required {
        assert!(
            lines.iter().any(|l| l.starts_with(want)),
            "{what}: no line starting with {want:?} in the guest console"
        );
    }
    assert!(
        lines.contains(&"GUEST-PAYLOAD-EXIT=0"),
        "{what}: guest never printed GUEST-PAYLOAD-EXIT=0 (exit {:?})",
        run.code
    );
    assert_eq!(run.code, Some(0), "{what}: guest.sh exit status");
}

#[test]
fn smoke_limits_enforced_in_cgroup_v2_guest() {
    if !vm_available("smoke_limits_enforced_in_cgroup_v2_guest") {
        return;
    }
    let run = run_guest(&repo().join("tests/vm/smoke"));
    assert_passed(&run, "smoke payload", SMOKE_PASSES);
}

#[test]
fn agent_limits_in_cgroup_v2_guest() {
    if !vm_available("agent_limits_in_cgroup_v2_guest") {
        return;
    }
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
    let run = run_guest(&payload.0);
    assert_passed(&run, "agent scenario", AGENT_PASSES);
}

/// Issue 5 in the guest: the kernel cap on all workloads, eviction of the lowest priority
/// when the workloads together use more than the budget, re-admission after the hold time;
/// issue 15: memory.high at the budget, and an eviction caused by its notification while the
/// sampler's period is 30 s.
#[test]
fn agent_budget_in_cgroup_v2_guest() {
    if !vm_available("agent_budget_in_cgroup_v2_guest") {
        return;
    }
    let payload = TempDir::new("budget-payload");
    let agent = env!("CARGO_BIN_EXE_device-worker-ng");
    for (from, to) in [
        (PathBuf::from(agent), "device-worker-ng"),
        (repo().join("tests/vm/budget/run"), "run"),
    ] {
        fs::copy(&from, payload.0.join(to))
            .unwrap_or_else(|e| panic!("copy {} into the payload: {e}", from.display()));
    }
    let run = run_guest_with(&payload.0, &[("MEM", "1024")]);
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
