use super::*;

const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

const RHEL8: &str = "\
30 23 0:26 / /sys/fs/cgroup ro,nosuid shared:4 - tmpfs tmpfs ro,mode=755
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:10 - cgroup cgroup rw,cpu,cpuacct
36 30 0:32 / /sys/fs/cgroup/memory rw,nosuid shared:11 - cgroup cgroup rw,memory
37 30 0:33 / /sys/fs/cgroup/pids rw,nosuid shared:12 - cgroup cgroup rw,pids
";

const UNIFIED: &str = "\
29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
";

#[test]
fn detects_hybrid_v1_with_separate_cpu_and_cpuacct() {
    let l = detect_from(HYBRID, |_| String::new()).unwrap();
    assert_eq!(
        l,
        Layout::Hybrid(V1Mounts {
            memory: "/sys/fs/cgroup/memory".into(),
            cpu: "/sys/fs/cgroup/cpu".into(),
            cpuacct: "/sys/fs/cgroup/cpuacct".into(),
            pids: "/sys/fs/cgroup/pids".into(),
        })
    );
    assert_eq!(l.name(), "v1-hybrid");
}

#[test]
fn detects_legacy_with_comounted_cpu_cpuacct() {
    let l = detect_from(RHEL8, |_| String::new()).unwrap();
    let Layout::Legacy(m) = l else {
        panic!("expected legacy")
    };
    assert_eq!(m.cpu, m.cpuacct);
    assert_eq!(m.cpu, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
}

#[test]
fn detects_unified_and_requires_controllers() {
    let l = detect_from(UNIFIED, |_| "cpuset cpu io memory hugetlb pids rdma".into()).unwrap();
    assert_eq!(
        l,
        Layout::Unified {
            root: "/sys/fs/cgroup".into()
        }
    );
    let e = detect_from(UNIFIED, |_| "cpuset io".into()).unwrap_err();
    assert!(e.to_string().contains("memory, cpu and pids"), "{e}");
}

#[test]
fn partial_v1_without_v2_is_an_error() {
    let text = "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
    let e = detect_from(text, |_| String::new()).unwrap_err();
    assert!(e.to_string().contains("cpu, cpuacct, pids"), "{e}");
    assert!(detect_from("", |_| String::new()).is_err());
}

#[test]
fn mountinfo_octal_escapes() {
    assert_eq!(layout_unescape("/a\\040b"), "/a b");
}

fn layout_unescape(s: &str) -> String {
    let text = format!("1 1 0:1 / {s} rw - cgroup2 cgroup2 rw\n");
    match detect_from(&text, |_| "memory cpu pids".into()).unwrap() {
        Layout::Unified { root } => root.display().to_string(),
        _ => unreachable!(),
    }
}

/// A temp dir laid out like a v2 workload cgroup.
fn fake_v2() -> (tempfile::TempDir, WorkloadCgroup) {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("w");
    std::fs::create_dir_all(&dir).unwrap();
    for (f, v) in [
        ("memory.current", "1048576\n"),
        ("memory.max", "max\n"),
        ("memory.swap.max", "max\n"),
        ("memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n"),
        ("cpu.stat", "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\nnr_periods 10\nnr_throttled 4\nthrottled_usec 100\n"),
        ("cpu.max", "max 100000\n"),
        ("pids.current", "3\n"),
        ("pids.max", "max\n"),
        ("pids.events", "max 2\n"),
        ("cgroup.procs", "10\n11\n12\n"),
    ] {
        std::fs::write(dir.join(f), v).unwrap();
    }
    (
        t,
        WorkloadCgroup::V2 {
            dir,
            sealed: Sealed(()),
        },
    )
}

#[test]
fn v2_counters_and_limits_on_a_fake_tree() {
    let (_t, cg) = fake_v2();
    let c = cg.counters().unwrap();
    assert_eq!(
        c,
        Counters {
            memory_bytes: 1 << 20,
            cpu_ns: 2_500_000,
            pids: 3,
            oom_kills: 1,
            cpu_throttled_periods: 4,
            pids_max_events: 2
        }
    );
    assert_eq!(cg.pids().unwrap(), vec![10, 11, 12]);
    cg.apply(&Limits {
        memory_bytes: Some(64 << 20),
        cpu_millicores: Some(250),
        pids: Some(10),
    })
    .unwrap();
    let dir = cg.display_path();
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    assert_eq!(read("memory.max"), "67108864");
    assert_eq!(read("memory.swap.max"), "0");
    assert_eq!(read("cpu.max"), "25000 100000");
    assert_eq!(read("pids.max"), "10");
    cg.apply(&Limits::default()).unwrap();
    assert_eq!(read("memory.max"), "max");
    assert_eq!(read("cpu.max"), "max 100000");
}

#[test]
fn v1_limits_on_a_fake_tree() {
    let t = tempfile::tempdir().unwrap();
    let mk = |c: &str| {
        let d = t.path().join(c).join("w");
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let cg = WorkloadCgroup::V1 {
        memory: mk("memory"),
        cpu: mk("cpu"),
        cpuacct: mk("cpuacct"),
        pids: mk("pids"),
        sealed: Sealed(()),
    };
    let WorkloadCgroup::V1 {
        memory,
        cpu,
        cpuacct,
        pids,
        ..
    } = &cg
    else {
        unreachable!()
    };
    for (d, f) in [
        (memory, "memory.limit_in_bytes"),
        (cpu, "cpu.cfs_period_us"),
        (cpu, "cpu.cfs_quota_us"),
        (pids, "pids.max"),
    ] {
        std::fs::write(d.join(f), "").unwrap();
    }
    cg.apply(&Limits {
        memory_bytes: Some(32 << 20),
        cpu_millicores: Some(1500),
        pids: None,
    })
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(memory.join("memory.limit_in_bytes")).unwrap(),
        "33554432"
    );
    assert_eq!(
        std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")).unwrap(),
        "150000"
    );
    assert_eq!(
        std::fs::read_to_string(pids.join("pids.max")).unwrap(),
        "max"
    );
    std::fs::write(memory.join("memory.usage_in_bytes"), "4096\n").unwrap();
    std::fs::write(
        memory.join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
    )
    .unwrap();
    std::fs::write(cpuacct.join("cpuacct.usage"), "123456\n").unwrap();
    std::fs::write(pids.join("pids.current"), "1\n").unwrap();
    std::fs::write(
        cpu.join("cpu.stat"),
        "nr_periods 5\nnr_throttled 5\nthrottled_time 9\n",
    )
    .unwrap();
    let c = cg.counters().unwrap();
    assert_eq!(c.memory_bytes, 4096);
    assert_eq!(c.cpu_ns, 123456);
    assert_eq!(c.oom_kills, 2);
    assert_eq!(c.cpu_throttled_periods, 5);
    assert_eq!(c.pids_max_events, 0, "missing pids.events reads as 0");
}

#[test]
fn missing_counter_file_names_the_path() {
    let (_t, cg) = fake_v2();
    std::fs::remove_file(cg.display_path().join("memory.current")).unwrap();
    let e = cg.counters().unwrap_err().to_string();
    assert!(e.contains("memory.current"), "{e}");
}

#[test]
fn hierarchy_paths() {
    let v1 = Hierarchy::new(
        detect_from(HYBRID, |_| String::new()).unwrap(),
        "dwng",
        None,
    );
    assert_eq!(
        v1.workload(&name("web")),
        WorkloadCgroup::V1 {
            memory: "/sys/fs/cgroup/memory/dwng/workloads/web".into(),
            cpu: "/sys/fs/cgroup/cpu/dwng/workloads/web".into(),
            cpuacct: "/sys/fs/cgroup/cpuacct/dwng/workloads/web".into(),
            pids: "/sys/fs/cgroup/pids/dwng/workloads/web".into(),
            sealed: Sealed(()),
        }
    );
    let v2 = Hierarchy::new(
        Layout::Unified {
            root: "/sys/fs/cgroup".into(),
        },
        "dwng",
        None,
    );
    assert_eq!(
        v2.workload(&name("web")).procs_files(),
        vec![PathBuf::from(
            "/sys/fs/cgroup/dwng/workloads/web/cgroup.procs"
        )]
    );
    let legacy = Hierarchy::new(detect_from(RHEL8, |_| String::new()).unwrap(), "dwng", None);
    assert_eq!(
        legacy.workload(&name("w")).procs_files().len(),
        3,
        "cpu,cpuacct deduplicated"
    );
}

#[test]
fn cpu_quota_has_a_floor() {
    assert_eq!(cpu_quota_us(250), 25_000);
    assert_eq!(cpu_quota_us(1), 1000);
}

#[test]
fn cached_reader_sees_fresh_content_and_sweeps_closed_files() {
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    let b = t.path().join("b");
    std::fs::write(&a, "1\n").unwrap();
    std::fs::write(&b, "max\n").unwrap();
    let mut r = CounterReader::cached();
    assert_eq!(r.read_u64(&a).unwrap(), 1);
    assert_eq!(r.read_u64(&b).unwrap(), u64::MAX);
    // Same inode, new content (as cgroupfs regenerates on every read at offset 0).
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&a)
        .unwrap();
    std::fs::write(&a, "12345\n").unwrap();
    assert_eq!(r.read_u64(&a).unwrap(), 12345);
    r.sweep();
    assert_eq!(r.open_files(), 2);
    assert_eq!(r.read_u64(&a).unwrap(), 12345);
    r.sweep();
    assert_eq!(r.open_files(), 1, "b was not read in the last round");
    assert!(r.read_u64(&t.path().join("missing")).is_err());
}

fn name(s: &str) -> WorkloadName {
    WorkloadName::parse(s).unwrap()
}

#[test]
fn only_valid_names_come_back_from_the_subtree_and_paths_stay_inside() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("dwng");
    let h = Hierarchy::new(
        Layout::Unified {
            root: t.path().to_path_buf(),
        },
        "dwng",
        Some(base.clone()),
    );
    for d in ["web", "..", "Bad_Name", "x.y"] {
        let _ = std::fs::create_dir_all(base.join("workloads").join(d));
    }
    let found = h.existing_workloads();
    let names: Vec<String> = found
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|n| n.to_string()))
        .collect();
    assert_eq!(names, vec!["web"]);
    assert_eq!(found.iter().filter(|r| r.is_err()).count(), 2, "{found:?}");
    let web = h.workload(&name("web"));
    assert!(web.display_path().starts_with(base.join("workloads")));
}
