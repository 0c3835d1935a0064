use super::*;

fn workload(name: &str, kind: &str, limits: Limits) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        kind: kind.into(),
        state: "running".into(),
        reason: String::new(),
        heartbeat_status: "running".into(),
        pid: Some(1),
        restarts: 0,
        oom_kills: 0,
        priority: 0,
        limits,
        usage: None,
        cgroup: None,
        log: None,
        notice: None,
        uid: None,
        default_limits: Limits::default(),
        pod_overhead_bytes: None,
    }
}

#[test]
fn the_table_shows_the_pod_overhead_and_which_limits_are_defaults() {
    let mut pod = workload(
        "web",
        "pod",
        Limits {
            memory_bytes: Some(64 << 20),
            cpu_millicores: Some(250),
            pids: Some(1024),
        },
    );
    pod.pod_overhead_bytes = Some(32 << 20);
    let defaults = Limits {
        memory_bytes: Some(128 << 20),
        cpu_millicores: None,
        pids: Some(1024),
    };
    let mut shell = workload("job", "shell", defaults);
    shell.default_limits = defaults;
    let snap = Snapshot {
        agent: AgentInfo {
            version: "0".into(),
            pid: 1,
            uptime_seconds: 1,
            cgroup_layout: "v2".into(),
            cgroup_base: "/".into(),
            state_dir: "/".into(),
            desired_state: None,
            server: None,
            rss_bytes: None,
            longest_handler_ms: 0.0,
            longest_handler_event: String::new(),
        },
        device: DeviceInfo {
            state: "reconciling".into(),
            reason: String::new(),
            problems: Vec::new(),
        },
        budget: BudgetInfo::default(),
        server: None,
        profiles: ProfilesInfo::default(),
        workloads: vec![pod, shell],
        transitions: Vec::new(),
    };
    let text = snap.render();
    assert!(text.contains("-/32.0Mi+32.0Mi "), "{text}");
    assert!(text.contains("-/128.0Mi* "), "{text}");
    assert!(text.contains("-/1024* "), "{text}");
    assert!(text.contains("-/1024 "), "the pod's own pids limit: {text}");
    assert!(text.contains("* DEFAULT_LIMITS"), "{text}");
    assert!(
        text.contains("pod memory: the containers' limits + 32.0Mi"),
        "{text}"
    );
    // JSON: the fields are there for machines, and absent when they say nothing.
    let json = serde_json::to_value(&snap).unwrap();
    assert_eq!(json["workloads"][0]["pod_overhead_bytes"], 32 << 20);
    assert_eq!(json["workloads"][1]["default_limits"]["pids"], 1024);
    assert!(json["workloads"][0].get("default_limits").is_none());
}
