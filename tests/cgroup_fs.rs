//! The cgroupfs layer (`cgroup::WorkloadCgroup` over cgroups-rs) on this host's real cgroups
//! (v1 on CI's machines): a limit the kernel refuses is an error, never ignored; limits read
//! back as the kernel keeps them; a running process attached from outside; removal kills and
//! leaves no directory. Root only.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use device_worker_ng::cgroup::{self, CgroupError, Hierarchy, Layout, Limits};
use device_worker_ng::workload::WorkloadName;
use dwng_test_support::harness::{self, test, ROOT_CGROUPS};

fn main() {
    harness::main(&[
        test(
            "memory_limit_below_usage_is_refused_or_enforced",
            ROOT_CGROUPS,
            memory_limit_below_usage_is_refused_or_enforced,
        ),
        test(
            "limits_read_back_as_whole_pages",
            ROOT_CGROUPS,
            limits_read_back_as_whole_pages,
        ),
        test(
            "attach_then_remove_kills_and_leaves_nothing",
            ROOT_CGROUPS,
            attach_then_remove_kills_and_leaves_nothing,
        ),
    ])
}

fn name(s: &str) -> WorkloadName {
    WorkloadName::parse(s).unwrap()
}

/// A subtree of its own, removed on drop.
struct Subtree(Hierarchy);

impl Subtree {
    fn new(test: &str) -> Subtree {
        let name = format!("dwng-test-fs-{test}-{}", std::process::id());
        let h = Hierarchy::new(cgroup::detect().unwrap(), &name, None);
        h.setup().unwrap();
        Subtree(h)
    }
}

impl Drop for Subtree {
    fn drop(&mut self) {
        let _ = self.0.remove_all();
    }
}

/// A shell holding about `mb` MB of anonymous memory, then sleeping; prints "held" when done.
fn holder(mb: u32) -> Child {
    let script = format!(
        "big=$(head -c {}000000 /dev/zero | tr '\\0' x); echo held; sleep 60; echo ${{#big}}",
        mb
    );
    Command::new("/bin/sh")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_held(child: &mut Child) {
    use std::io::BufRead;
    let out = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "held");
}

fn is_v1(h: &Hierarchy) -> bool {
    !matches!(h.layout, Layout::Unified { .. })
}

/// cgroup v1 refuses a memory limit below what the cgroup uses and cannot reclaim (EBUSY):
/// that must be an error, not ignored (cgroups-rs' own `apply()` would report success). On
/// v2 the kernel takes the limit and OOM-kills instead.
fn memory_limit_below_usage_is_refused_or_enforced() {
    let t = Subtree::new("below");
    let cg = t.0.workload(&name("holder"));
    cg.create().unwrap();
    let mut child = holder(48);
    cg.attach(child.id()).unwrap();
    wait_held(&mut child);
    assert!(cg.pids().unwrap().contains(&(child.id() as i32)));
    let applied = cg.apply(&Limits {
        memory_bytes: Some(4 << 20),
        ..Limits::default()
    });
    if is_v1(&t.0) {
        // No swap here: the shell's 48 MB cannot be reclaimed.
        let e = applied.unwrap_err();
        assert!(
            matches!(
                e,
                CgroupError::Kernel { .. } | CgroupError::NotApplied { .. }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("memory"), "{e}");
        let _ = child.kill();
        let _ = child.wait();
    } else {
        applied.unwrap();
        let status = child.wait().unwrap();
        assert!(cg.oom_kills() >= 1, "the holder was OOM-killed: {status:?}");
    }
}

fn limits_read_back_as_whole_pages() {
    let t = Subtree::new("pages");
    let cg = t.0.workload(&name("w"));
    cg.create().unwrap();
    // 50 000 000 is not a multiple of the page size: the kernel keeps 49 999 872.
    cg.apply(&Limits {
        memory_bytes: Some(50_000_000),
        cpu_millicores: Some(250),
        pids: Some(7),
    })
    .unwrap();
    let dir = cg.display_path().to_path_buf();
    let mem = ["memory.limit_in_bytes", "memory.max"]
        .iter()
        .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .unwrap();
    assert_eq!(mem.trim(), "49999872");
    cg.apply(&Limits::default()).unwrap();
}

fn attach_then_remove_kills_and_leaves_nothing() {
    let t = Subtree::new("remove");
    let cg = t.0.workload(&name("w"));
    cg.create().unwrap();
    let mut child = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = child.id() as i32;
    cg.attach(child.id()).unwrap();
    let procs = cg.procs_files();
    for f in &procs {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(text.lines().any(|l| l == pid.to_string()), "{f:?}: {text}");
    }
    cg.remove().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        child.try_wait().unwrap().is_some(),
        "the process was killed"
    );
    for f in &procs {
        assert!(!f.parent().unwrap().exists(), "{f:?} removed");
    }
}
