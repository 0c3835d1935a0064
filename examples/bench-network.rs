//! Idle network cost of one device (issue 3's benchmark; prints figures, asserts nothing):
//! the release agent against the mTLS Flotta test server at default settings (POLL_INTERVAL
//! 5 s, heartbeat every 60 s) with 50 shell workloads, counting requests, HTTP bytes and TLS
//! connections, then extrapolating to an hour; and the agent's RSS meanwhile.
//! Run as root: `bench/network.sh [SECONDS=180]`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dwng_test_support::flotta_server::{self, FlottaTestServer, ServerOptions};
use serde_json::json;

const ID: &str = "bench-1";

fn config(n: usize) -> device_worker_ng::flotta::messages::DeviceConfigurationMessage {
    let w: Vec<_> = (0..n)
        .map(|i| {
            json!({"name": format!("w{i}"), "namespace": "default", "kind": "shell",
                   "specification": "command: [\"/bin/sleep\", \"100000\"]\nuser: root\nresources:\n  limits: {memory: 16Mi, cpu: 50m, pids: 4}\n  requests: {memory: 1Mi, cpu: 1m}\n"})
        })
        .collect();
    serde_json::from_value(json!({
        "configuration": {"heartbeat": {"hardware_profile": {"include": true, "scope": "delta"}, "period_seconds": 60},
                          "metrics": {"receiver": {"request_num_samples": 30000, "timeout_seconds": 10}}, "mounts": []},
        "workloads": w
    }))
    .unwrap()
}

fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(180);
    let bin = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/release/device-worker-ng"
    );
    let server = FlottaTestServer::start(ServerOptions {
        auto_approve_after: Some(1),
        ..ServerOptions::default()
    });
    server.set_configuration(ID, config(50));
    let dir = tempfile::tempdir().unwrap();
    let cgroup_root = format!("device-worker-ng-bench-{}", std::process::id());
    let mut agent = Command::new(bin)
        .arg("run")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("EDGE_DEVICE_SERVER", server.url())
        .env("EDGE_DEVICE_CA_ROOT", server.ca_path())
        .env("EDGE_DEVICE_CERT", server.register_cert_path())
        .env("EDGE_DEVICE_KEY", server.register_key_path())
        .env("EDGE_DEVICE_DEVICE_ID", ID)
        .env("EDGE_DEVICE_STATE_DIR", dir.path().join("state"))
        .env(
            "EDGE_DEVICE_CONTROL_SOCKET",
            dir.path().join("control.sock"),
        )
        .env("EDGE_DEVICE_CGROUP_ROOT", &cgroup_root)
        .env("EDGE_DEVICE_LOG_LEVEL", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .expect("build the release agent first: cargo build --release");
    // Warm-up: enrolment, registration, 50 workloads started, first heartbeat sent.
    let t0 = Instant::now();
    while server.heartbeats().is_empty() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let running =
        device_worker_ng::status::socket::request_status(&dir.path().join("control.sock"))
            .map(|(s, _)| s.workloads.iter().filter(|w| w.state == "running").count())
            .unwrap_or(0);
    println!("{running} of 50 workloads running");
    let base = server.requests().len();
    let base_conns = server.connections();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let elapsed = start.elapsed().as_secs_f64();
    let reqs: Vec<_> = server.requests().into_iter().skip(base).collect();
    let conns = server.connections() - base_conns;
    let rss = std::fs::read_to_string(format!("/proc/{}/status", agent.id()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(String::from))
        })
        .unwrap_or_default();
    let per_hour = 3600.0 / elapsed;
    let count = |f: &dyn Fn(&flotta_server::RequestRecord) -> bool| {
        let r: Vec<_> = reqs.iter().filter(|r| f(r)).collect();
        let bytes: usize = r.iter().map(|r| r.request_bytes + r.response_bytes).sum();
        (r.len() as f64 * per_hour, bytes as f64 * per_hour / 1024.0)
    };
    println!("measured for {elapsed:.0} s at default settings, 50 shell workloads; per hour:");
    println!("{:<34} {:>10} {:>12}", "request", "requests", "HTTP KiB");
    for (name, f) in [
        (
            "GET data/in (configuration)",
            &(|r: &flotta_server::RequestRecord| r.method == "GET" && r.path.contains("/data/"))
                as &dyn Fn(&_) -> bool,
        ),
        ("GET control/in", &|r: &flotta_server::RequestRecord| {
            r.method == "GET" && r.path.contains("/control/")
        }),
        ("POST heartbeat", &|r: &flotta_server::RequestRecord| {
            r.directive.as_deref() == Some("heartbeat")
        }),
        ("all", &|_: &flotta_server::RequestRecord| true),
    ] {
        let (n, kib) = count(f);
        println!("{name:<34} {n:>10.0} {kib:>12.1}");
    }
    println!(
        "{:<34} {:>10.1}",
        "TLS connections (handshakes)",
        conns as f64 * per_hour
    );
    println!("agent RSS while polling with 50 workloads: {rss} KiB (target 8192 KiB)");
    if std::env::var_os("SMAPS").is_some() {
        let smaps =
            std::fs::read_to_string(format!("/proc/{}/smaps", agent.id())).unwrap_or_default();
        let mut cur = String::new();
        let mut per: std::collections::BTreeMap<String, u64> = Default::default();
        for l in smaps.lines() {
            if l.contains('-')
                && l.split_whitespace().count() >= 5
                && !l.starts_with(|c: char| c.is_ascii_uppercase())
            {
                cur = l.split_whitespace().nth(5).unwrap_or("[anon]").to_string();
            } else if let Some(v) = l.strip_prefix("Rss:") {
                *per.entry(cur.clone()).or_default() += v
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        println!("{per:#?}");
    }

    // Clean up: remove the workloads, stop the agent, remove its cgroups.
    server.set_configuration(ID, config(0));
    std::thread::sleep(Duration::from_secs(12));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = agent.wait();
    if let Ok(layout) = device_worker_ng::cgroup::detect() {
        let _ = device_worker_ng::cgroup::Hierarchy::new(layout, &cgroup_root, None).remove_all();
    }
}
