use super::*;

fn snapshot(state: &str, problems: &[&str], server: Option<ServerInfo>) -> Snapshot {
    Snapshot {
        agent: AgentInfo {
            version: "0.1.0".into(),
            pid: 1,
            uptime_seconds: 5,
            cgroup_layout: "v2".into(),
            cgroup_base: "/sys/fs/cgroup/dwng".into(),
            state_dir: "/var/lib/device-worker-ng".into(),
            desired_state: None,
            server: server.as_ref().map(|s| s.url.clone()),
            rss_bytes: None,
            longest_handler_ms: 0.25,
            longest_handler_event: "status".into(),
            evictions_total: 0,
        },
        device: DeviceInfo {
            state: state.into(),
            reason: problems.join("; "),
            problems: problems.iter().map(|p| p.to_string()).collect(),
        },
        budget: BudgetInfo::default(),
        server,
        profiles: ProfilesInfo::default(),
        workloads: Vec::new(),
        transitions: Vec::new(),
    }
}

fn server(now: u64) -> ServerInfo {
    ServerInfo {
        url: "https://flotta.example:8043".into(),
        device_id: "edge-1".into(),
        registration: "enrolling with the bootstrap certificate".into(),
        session_state: "enrolling".into(),
        last_contact_unix: None,
        last_answer: None,
        failures: 3,
        last_failure: Some(
            "enrolment: POST data/edge-1/out (enrolment): network error: io: Connection refused"
                .into(),
        ),
        last_failure_unix: Some(now - 2),
        next_attempt: Some(("enrol".into(), now + 4)),
        certificate_expires_unix: None,
        certificate_unproven: false,
        applied_version: String::new(),
        outbox_length: 2,
        heartbeat_period_seconds: 60,
    }
}

#[test]
fn every_device_state_has_a_health_and_its_own_exit_status() {
    let mut codes = std::collections::BTreeMap::new();
    for (_, (_, state)) in crate::machines::device::sample_states() {
        let h = Health::of_state(state.name());
        assert_ne!(h, Health::Unknown, "{} has no health", state.name());
        codes.insert(state.name(), h.exit_code());
    }
    assert_eq!(codes["reconciling"], 0);
    assert_eq!(codes["enrolled"], 0);
    assert_eq!(codes["degraded"], 4);
    assert_eq!(codes["over-budget"], 5);
    assert_eq!(codes["registering"], 6);
    assert_eq!(codes["disconnected"], 7);
    // None collides with "not running", "cannot tell", clap's usage error or a config error.
    for code in codes.values().filter(|c| **c != 0) {
        assert!(![1, 2, EXIT_NOT_RUNNING, 78].contains(code), "{code}");
    }
    assert_eq!(Health::of_state("someday-new").exit_code(), EXIT_UNKNOWN);
}

#[test]
fn problems_and_server_blocks_fit_an_80_column_console() {
    let now = crate::controller::unix_now();
    let s = snapshot(
        "degraded",
        &[
            "server unreachable for 130s (12 failed requests in a row), last: poll: GET data/edge-1/in: network error: io: Connection refused (os error 111)",
            "workload web is broken after 5 failures: exit status 1",
        ],
        Some(server(now)),
    );
    let text = s.render();
    let head: Vec<&str> = text.lines().skip(1).take_while(|l| !l.is_empty()).collect();
    for l in &head {
        assert!(
            l.chars().count() <= 80,
            "wider than 80 columns: {l:?}\n{text}"
        );
    }
    assert!(
        text.contains("problems 2\n  - server unreachable for 130s"),
        "{text}"
    );
    assert!(text.contains("Connection refused"), "{text}");
    assert!(
        text.contains("server   enrolling: enrolling with the bootstrap certificate"),
        "{text}"
    );
    assert!(text.contains("  contact      never answered"), "{text}");
    assert!(text.contains("  failures     3 in a row, last "), "{text}");
    assert!(text.contains("(2s ago)"), "{text}");
    assert!(text.contains("  next         enrol at "), "{text}");
    assert!(text.contains("  certificate  none yet"), "{text}");
    assert!(
        text.contains("  config       none applied yet   outbox 2 events"),
        "{text}"
    );
    // A healthy serverless device has neither block.
    let quiet = snapshot("reconciling", &[], None).render();
    assert!(
        !quiet.contains("problems") && !quiet.contains("server "),
        "{quiet}"
    );
}

#[test]
fn certificate_expiry_is_a_date_and_a_countdown() {
    let now = crate::controller::unix_now();
    let mut sv = server(now);
    sv.session_state = "registered".into();
    sv.registration = "registered".into();
    sv.failures = 0;
    sv.last_contact_unix = Some(now - 1);
    sv.last_answer = Some("heartbeat: ok".into());
    sv.certificate_expires_unix = Some(now as i64 + 29 * 86400 + 3600 + 30);
    sv.applied_version = "42".into();
    sv.outbox_length = 1;
    let text = snapshot("reconciling", &[], Some(sv.clone())).render();
    assert!(text.contains("(in 29d01h)"), "{text}");
    assert!(text.contains("heartbeat: ok"), "{text}");
    assert!(text.contains("version 42   outbox 1 event\n"), "{text}");
    assert!(!text.contains("failures"), "{text}");
    sv.certificate_expires_unix = Some(now as i64 - 120);
    let text = snapshot("reconciling", &[], Some(sv)).render();
    assert!(text.contains("(EXPIRED 2m00s ago)"), "{text}");
    assert_eq!(date(0), "1970-01-01 00:00 UTC");
}

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
    let mut snap = snapshot("reconciling", &[], None);
    snap.workloads = vec![pod, shell];
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
