use super::*;
use crate::cgroup::{Sealed, V1Mounts};

fn prop<'a>(props: &'a [Property<'static>], name: &str) -> &'a Value<'static> {
    &props
        .iter()
        .find(|(k, _)| *k == name)
        .unwrap_or_else(|| panic!("no property {name} in {props:?}"))
        .1
}

#[test]
fn unit_names_derive_from_the_slice() {
    let n = UnitNames::of("device-worker-ng.slice", "my-pod");
    assert_eq!(n.agent_slice, "device-worker-ng.slice");
    assert_eq!(n.service, "device-worker-ng-my-pod.service");
    // a dash in a slice name means nesting: the workload's own dashes are escaped
    assert_eq!(n.slice, "device-worker-ng-my\\x2dpod.slice");
    assert_eq!(
        expand_slice(&n.slice).unwrap(),
        "device.slice/device-worker.slice/device-worker-ng.slice/device-worker-ng-my\\x2dpod.slice"
    );
    assert_eq!(
        UnitNames::of("dwng.slice", "web").service,
        "dwng-web.service"
    );
    assert_eq!(
        workload_of_slice("device-worker-ng.slice", &n.slice).as_deref(),
        Some("my-pod")
    );
    assert_eq!(
        workload_of_slice("dwng.slice", "dwng-web.slice").as_deref(),
        Some("web")
    );
    for other in [
        "dwng.slice",
        "dwng-web.service",
        "dwng-web-libpod_pod_1.slice",
        "other-web.slice",
        "dwng-bad\\x2.slice",
        "dwng-.slice",
    ] {
        assert_eq!(workload_of_slice("dwng.slice", other), None, "{other}");
    }
}

#[test]
fn escape_is_systemd_escape() {
    assert_eq!(escape("web"), "web");
    assert_eq!(escape("a-b-c"), "a\\x2db\\x2dc");
    assert_eq!(escape("a b/c"), "a\\x20b\\x2fc");
    assert_eq!(escape(".hidden"), "\\x2ehidden");
}

#[test]
fn slice_names_are_checked() {
    for ok in ["device-worker-ng.slice", "dwng.slice", "a\\x2db.slice"] {
        assert!(valid_slice_name(ok), "{ok}");
    }
    for bad in [
        "dwng",
        ".slice",
        "a--b.slice",
        "-a.slice",
        "a/b.slice",
        "a b.slice",
        "dwng.service",
    ] {
        assert!(!valid_slice_name(bad), "{bad}");
    }
}

#[test]
fn unit_cgroups_in_both_layouts() {
    let v2 = Layout::Unified {
        root: "/sys/fs/cgroup".into(),
    };
    assert_eq!(
        unit_cgroup(&v2, "device-worker-ng.slice", "device-worker-ng-web.service").unwrap(),
        WorkloadCgroup::V2 {
            dir: "/sys/fs/cgroup/device.slice/device-worker.slice/device-worker-ng.slice/device-worker-ng-web.service".into(),
            sealed: Sealed(()),
        }
    );
    assert_eq!(
        slice_cgroup(&v2, "dwng.slice").unwrap(),
        WorkloadCgroup::V2 {
            dir: "/sys/fs/cgroup/dwng.slice".into(),
            sealed: Sealed(()),
        }
    );
    let v1 = Layout::Hybrid(V1Mounts {
        memory: "/sys/fs/cgroup/memory".into(),
        cpu: "/sys/fs/cgroup/cpu,cpuacct".into(),
        cpuacct: "/sys/fs/cgroup/cpu,cpuacct".into(),
        pids: "/sys/fs/cgroup/pids".into(),
    });
    let WorkloadCgroup::V1 { memory, pids, .. } =
        unit_cgroup(&v1, "dwng.slice", "dwng-web.service").unwrap()
    else {
        panic!("v1")
    };
    assert_eq!(
        memory,
        PathBuf::from("/sys/fs/cgroup/memory/dwng.slice/dwng-web.service")
    );
    assert_eq!(
        pids,
        PathBuf::from("/sys/fs/cgroup/pids/dwng.slice/dwng-web.service")
    );
    assert!(unit_cgroup(&v2, "bad", "x.service").is_err());
}

#[test]
fn limits_become_resource_control_properties() {
    let l = Limits {
        memory_bytes: Some(64 << 20),
        cpu_millicores: Some(250),
        pids: Some(16),
    };
    let p = limit_properties(&l, true).unwrap();
    assert_eq!(prop(&p, "MemoryMax"), &Value::U64(64 << 20));
    assert_eq!(prop(&p, "MemorySwapMax"), &Value::U64(0));
    // 25 ms per 100 ms period = 250 ms per second, as the cgroupfs driver's cpu.max
    assert_eq!(prop(&p, "CPUQuotaPerSecUSec"), &Value::U64(250_000));
    assert_eq!(prop(&p, "CPUQuotaPeriodUSec"), &Value::U64(100_000));
    assert_eq!(prop(&p, "TasksMax"), &Value::U64(16));
    // the kernel's 1 ms floor per period holds here too
    let tiny = limit_properties(
        &Limits {
            cpu_millicores: Some(1),
            ..Limits::default()
        },
        true,
    )
    .unwrap();
    assert_eq!(prop(&tiny, "CPUQuotaPerSecUSec"), &Value::U64(10_000));
    // nothing set: every limit lifted (systemd's "infinity")
    let none = limit_properties(&Limits::default(), true).unwrap();
    for k in [
        "MemoryMax",
        "MemorySwapMax",
        "CPUQuotaPerSecUSec",
        "TasksMax",
    ] {
        assert_eq!(prop(&none, k), &Value::U64(u64::MAX), "{k}");
    }
    // cgroup v1: systemd's v1 memory property, no swap property
    let v1 = limit_properties(&l, false).unwrap();
    assert_eq!(prop(&v1, "MemoryLimit"), &Value::U64(64 << 20));
    assert!(v1
        .iter()
        .all(|(k, _)| *k != "MemorySwapMax" && *k != "MemoryMax"));
}

fn ticker() -> ServiceUnit {
    ServiceUnit {
        names: UnitNames::of("device-worker-ng.slice", "ticker"),
        description: "device-worker-ng workload ticker".into(),
        argv: vec!["/bin/sh".into(), "-c".into(), "sleep 1".into()],
        env: vec!["PATH=/usr/bin:/bin".into(), "WORKLOAD_NAME=ticker".into()],
        user: Some("nobody".into()),
        working_dir: None,
        limits: Limits {
            memory_bytes: Some(16 << 20),
            cpu_millicores: Some(100),
            pids: Some(8),
        },
        stop_timeout: Duration::from_secs(10),
        workload: "ticker".into(),
    }
}

#[test]
fn service_properties() {
    let p = ticker().properties(true).unwrap();
    let s = |k: &str| prop(&p, k).clone();
    assert_eq!(s("Type"), Value::from("exec"));
    assert_eq!(s("Slice"), Value::from("device-worker-ng-ticker.slice"));
    assert_eq!(s("Restart"), Value::from("no"));
    assert_eq!(s("RemainAfterExit"), Value::Bool(true));
    assert_eq!(s("OOMPolicy"), Value::from("kill"));
    assert_eq!(s("User"), Value::from("nobody"));
    assert_eq!(s("WorkingDirectory"), Value::from("/"));
    assert_eq!(s("SyslogIdentifier"), Value::from("ticker"));
    assert_eq!(s("StandardOutput"), Value::from("journal"));
    assert_eq!(s("TimeoutStopUSec"), Value::U64(10_000_000));
    assert_eq!(s("MemoryMax"), Value::U64(16 << 20));
    assert_eq!(
        s("ExecStart").value_signature().to_string(),
        "a(sasb)",
        "systemd's ExecStart signature"
    );
    assert_eq!(s("Environment").value_signature().to_string(), "as");
    assert_eq!(s("LogExtraFields").value_signature().to_string(), "aay");
    assert!(p.iter().all(|(k, _)| *k != "Delegate"), "no delegation");
    let mut root = ticker();
    root.user = None;
    assert!(root
        .properties(true)
        .unwrap()
        .iter()
        .all(|(k, _)| *k != "User"));
}

#[test]
fn unit_state_ends() {
    let running = UnitState {
        active_state: "active".into(),
        sub_state: "running".into(),
        main_pid: 42,
        ..UnitState::default()
    };
    assert!(running.is_running());
    assert_eq!(running.end(), None);
    let exited = UnitState {
        active_state: "active".into(),
        sub_state: "exited".into(),
        result: "success".into(),
        exec_main_code: 1,
        exec_main_status: 0,
        ..UnitState::default()
    };
    assert_eq!(
        exited.end(),
        Some(UnitEnd {
            code: Some(0),
            signal: None,
            oom_killed: false
        })
    );
    let oom = UnitState {
        active_state: "failed".into(),
        sub_state: "failed".into(),
        result: "oom-kill".into(),
        exec_main_code: 2,
        exec_main_status: 9,
        ..UnitState::default()
    };
    assert_eq!(
        oom.end(),
        Some(UnitEnd {
            code: None,
            signal: Some(9),
            oom_killed: true
        })
    );
    let bad_exec = UnitState {
        active_state: "failed".into(),
        sub_state: "failed".into(),
        result: "exit-code".into(),
        exec_main_code: 1,
        exec_main_status: 203,
        ..UnitState::default()
    };
    assert!(bad_exec.setup_failure().unwrap().contains("cannot execute"));
    assert_eq!(exited.setup_failure(), None);
}
