//! What an operator does with the installed agent, with the real binary: the Go agent's
//! command lines, the default configuration file and its drop-ins, `status` and `check` in
//! every device state, the server reached through a real CONNECT proxy (tinyproxy), the
//! metrics served by a real node_exporter. Root only (the agent runs workloads in cgroups).

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use device_worker_ng::flotta::messages::DeviceConfigurationMessage;
use dwng_test_support::agent::Agent;
use dwng_test_support::flotta_server;
use dwng_test_support::flotta_server::{FlottaTestServer, ServerOptions};
use dwng_test_support::harness::{self, test, Need, Needs, ROOT_CGROUPS};
use dwng_test_support::wait::poll_until;

const BIN: &str = env!("CARGO_BIN_EXE_device-worker-ng");
const WITH_UNSHARE: Needs = &[
    Need::Root,
    Need::Cgroups,
    Need::tool("unshare", "util-linux"),
];
const WITH_TINYPROXY: Needs = &[
    Need::Root,
    Need::Cgroups,
    Need::tool("tinyproxy", "tinyproxy-bin"),
];
const WITH_NODE_EXPORTER: Needs = &[
    Need::Root,
    Need::Cgroups,
    Need::tool("prometheus-node-exporter", "prometheus-node-exporter"),
];

fn main() {
    harness::main(&[
        test(
            "go_agent_command_lines_start_the_daemon",
            ROOT_CGROUPS,
            go_agent_command_lines_start_the_daemon,
        ),
        test(
            "default_config_file_and_its_dropins",
            WITH_UNSHARE,
            default_config_file_and_its_dropins,
        ),
        test(
            "status_and_check_in_each_serverless_state",
            ROOT_CGROUPS,
            status_and_check_in_each_serverless_state,
        ),
        test(
            "status_and_check_with_a_server",
            ROOT_CGROUPS,
            status_and_check_with_a_server,
        ),
        test(
            "the_server_is_reached_through_a_connect_proxy",
            WITH_TINYPROXY,
            the_server_is_reached_through_a_connect_proxy,
        ),
        test(
            "node_exporter_serves_the_agent_metrics",
            WITH_NODE_EXPORTER,
            node_exporter_serves_the_agent_metrics,
        ),
    ])
}

const TICKER: &str = "workloads:\n  - name: ticker\n    kind: shell\n    specification: |\n      command: [\"/bin/sh\", \"-c\", \"while sleep 1; do :; done\"]\n      user: root\n      resources: {limits: {memory: 16Mi, cpu: 100m, pids: 8}}\n";

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `device-worker-ng ARGS` as a client of the test's agent (environment cleared).
fn client(a: &Agent, args: &[&str]) -> Output {
    Command::new(BIN)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("EDGE_DEVICE_CONTROL_SOCKET", a.socket())
        .args(args)
        .output()
        .unwrap()
}

/// The greenboot script both packages install, run against the test's agent.
fn greenboot(a: &Agent, wait_secs: u32) -> (i32, String) {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/greenboot/40-device-worker-ng.sh");
    let bin_dir = Path::new(BIN).parent().unwrap();
    let o = Command::new("sh")
        .arg(script)
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", bin_dir.display()))
        .env("EDGE_DEVICE_CONTROL_SOCKET", a.socket())
        .env("DEVICE_WORKER_NG_GREENBOOT_WAIT", wait_secs.to_string())
        .output()
        .unwrap();
    (o.status.code().unwrap_or(-1), text(&o))
}

/// `check`'s exit status and line.
fn check(a: &Agent) -> (i32, String) {
    let o = client(a, &["check"]);
    (o.status.code().unwrap_or(-1), text(&o))
}

/// Spawns the agent as `cmd` (its own command line), logging to the agent's log.
fn spawn(a: &mut Agent, mut cmd: Command) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(a.log_path())
        .unwrap();
    let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
    a.child = Some(child);
}

fn go_agent_command_lines_start_the_daemon() {
    // The Go device-worker-ng's README: `device-worker-ng --config config.yaml`, with its
    // keys in the file...
    let mut a = Agent::new(BIN, TICKER);
    let cfg = a.dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "LOG_LEVEL: debug\nSTATE_DIR: {}\nCONTROL_SOCKET: {}\nDESIRED_STATE: {}\nCGROUP_ROOT: {}\n",
            a.state_dir().display(),
            a.socket().display(),
            a.desired_path().display(),
            a.cgroup_root
        ),
    )
    .unwrap();
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .arg("--config")
        .arg(&cfg);
    spawn(&mut a, cmd);
    a.wait_for("ticker running", Duration::from_secs(15), |s| {
        Agent::workload(s, "ticker").is_some_and(|w| w.state == "running")
    });
    assert!(
        a.log().contains("DEBUG"),
        "LOG_LEVEL from the file: {}",
        a.log()
    );
    a.terminate();

    // ...and a bare `device-worker-ng` with EDGE_DEVICE_* variables only (plus the Go
    // agent's --log-level).
    let mut b = Agent::new(BIN, TICKER);
    let mut cmd = b.command();
    cmd.args(["--log-level", "warn"]);
    spawn(&mut b, cmd);
    b.wait_for("ticker running", Duration::from_secs(15), |s| {
        Agent::workload(s, "ticker").is_some_and(|w| w.state == "running")
    });
    assert!(
        !b.log().contains(" INFO "),
        "--log-level warn beats EDGE_DEVICE_LOG_LEVEL=debug: {}",
        b.log()
    );
}

/// `device-worker-ng ARGS` in a private mount namespace whose /etc has `etc_extra` laid over
/// it (read-only overlay): the packaged default path, without touching the host's /etc.
fn in_namespace(etc_extra: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("unshare");
    c.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t overlay overlay -o lowerdir={}:/etc /etc && exec \"$@\"",
            etc_extra.display()
        ))
        .arg("sh")
        .arg(BIN)
        .args(args);
    c
}

fn default_config_file_and_its_dropins() {
    let mut a = Agent::new(BIN, TICKER);
    let etc = a.dir.path().join("etc");
    let conf = etc.join("device-worker-ng");
    std::fs::create_dir_all(conf.join("config.d")).unwrap();
    std::fs::write(
        conf.join("config.yaml"),
        format!(
            "LOG_LEVEL: warn\nSTATE_DIR: {}\nCONTROL_SOCKET: {}\nDESIRED_STATE: {}\nCGROUP_ROOT: {}\n",
            a.state_dir().display(),
            a.socket().display(),
            a.desired_path().display(),
            a.cgroup_root
        ),
    )
    .unwrap();
    std::fs::write(conf.join("config.d/10-image.yaml"), "LOG_LEVEL: info\n").unwrap();
    // Kubernetes' quantity example, from the last drop-in.
    std::fs::write(
        conf.join("config.d/20-site.yaml"),
        "RESERVED_MEMORY: 129e6\n",
    )
    .unwrap();
    std::fs::write(
        conf.join("config.d/30-bad.yaml"),
        "RESTART_BACKOFF_MAX: soon\n",
    )
    .unwrap();

    // A bad drop-in: exit 78, one line naming the drop-in and the key.
    let out = in_namespace(&etc, &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/etc/device-worker-ng/config.d/30-bad.yaml")
            && err.contains("RESTART_BACKOFF_MAX"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    std::fs::remove_file(conf.join("config.d/30-bad.yaml")).unwrap();
    spawn(&mut a, in_namespace(&etc, &[]));
    let s = a.wait_for("ticker running", Duration::from_secs(15), |s| {
        Agent::workload(s, "ticker").is_some_and(|w| w.state == "running")
    });
    assert_eq!(
        s.budget.memory_reserved_bytes, 129_000_000,
        "from 20-site.yaml"
    );
    let log = a.log();
    assert!(
        log.contains("configuration read from /etc/device-worker-ng/config.yaml, /etc/device-worker-ng/config.d/10-image.yaml, /etc/device-worker-ng/config.d/20-site.yaml"),
        "{log}"
    );
    // A hand-run client finds the control socket through the same files.
    let out = in_namespace(&etc, &["status", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"ticker\""));
}

fn mem_total() -> u64 {
    let t = std::fs::read_to_string("/proc/meminfo").unwrap();
    device_worker_ng::sampler::parse_meminfo(&t).0
}

fn status_and_check_in_each_serverless_state() {
    let mut a = Agent::new(BIN, "workloads: [\n");
    // A 40 MiB budget that stays over-budget a while once exceeded.
    let reserved = mem_total() - (40 << 20);
    a.extra_env.extend([
        ("EDGE_DEVICE_RESERVED_MEMORY".into(), reserved.to_string()),
        ("EDGE_DEVICE_SAMPLE_INTERVAL".into(), "200ms".into()),
        ("EDGE_DEVICE_BUDGET_HOLD".into(), "10m".into()),
    ]);
    a.start();

    // degraded: the desired-state file is malformed.
    a.wait_for("degraded", Duration::from_secs(10), |s| {
        s.device.state == "degraded"
    });
    let (code, line) = check(&a);
    assert_eq!(code, 4, "{line}");
    assert!(line.starts_with("degraded: device degraded: "), "{line}");
    let status = text(&client(&a, &["status"]));
    assert!(status.contains("problems 1\n  - "), "{status}");
    assert!(status.contains("desired"), "{status}");
    // A degraded device is no reason for greenboot to roll an OS update back.
    let (code, out) = greenboot(&a, 5);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no reason to roll back"), "{out}");

    // reconciling
    a.set_desired(TICKER);
    a.wait_for("reconciling", Duration::from_secs(10), |s| {
        s.device.state == "reconciling"
    });
    let (code, line) = check(&a);
    assert_eq!(code, 0, "{line}");
    assert!(line.starts_with("healthy: device reconciling"), "{line}");
    let (code, out) = greenboot(&a, 5);
    assert_eq!(code, 0, "{out}");
    let status = text(&client(&a, &["status"]));
    assert!(!status.contains("problems"), "{status}");

    // over-budget: a workload holds 70 MB of a 40 MiB budget and is evicted.
    let hog = "  - name: hog\n    kind: shell\n    specification: |\n      command: [\"/bin/sh\", \"-c\", \"big=$(head -c 70000000 /dev/zero | tr '\\\\0' x); sleep 600\"]\n      user: root\n      resources: {requests: {memory: 8Mi}, limits: {memory: 200Mi}}\n";
    a.set_desired(&format!("{TICKER}{hog}"));
    a.wait_for("over-budget", Duration::from_secs(30), |s| {
        s.device.state == "over-budget"
    });
    let (code, line) = check(&a);
    assert_eq!(code, 5, "{line}");

    // Not root: told so, not "not running".
    let o = Command::new(BIN)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("EDGE_DEVICE_CONTROL_SOCKET", a.socket())
        .arg("status")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("permission denied") && err.contains("root"),
        "{err}"
    );
    assert!(!err.contains("not running"), "{err}");
    assert_eq!(err.matches("device-worker-ng").count(), 1, "{err}");

    // not running: greenboot's check fails once its wait is over.
    a.terminate();
    let (code, line) = check(&a);
    assert_eq!(code, 3, "{line}");
    let (code, out) = greenboot(&a, 1);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no healthy agent after 1s"), "{out}");
}

fn config(workloads: &[(&str, &str)]) -> DeviceConfigurationMessage {
    flotta_server::shell_configuration(workloads, false)
}

fn agent_for(server: &FlottaTestServer, id: &str) -> Agent {
    let mut a = Agent::new(BIN, "workloads: []\n");
    a.extra_env.extend(server.agent_env(id));
    for (k, v) in [
        ("EDGE_DEVICE_POLL_INTERVAL", "200ms"),
        ("EDGE_DEVICE_SERVER_TIMEOUT", "2s"),
        // Long: the cause of a failure must show before the outage becomes a problem.
        ("EDGE_DEVICE_SERVER_OUTAGE_THRESHOLD", "10m"),
    ] {
        a.extra_env.push((k.to_string(), v.to_string()));
    }
    a
}

fn status_and_check_with_a_server() {
    // Server unreachable: registering, and the cause is in the server block at once.
    let server = FlottaTestServer::start(ServerOptions::default());
    let mut a = agent_for(&server, "edge-ops-down");
    let keep = tempfile::tempdir().unwrap();
    for f in ["ca.pem", "register.crt", "register.key"] {
        std::fs::copy(server.dir().join(f), keep.path().join(f)).unwrap();
    }
    for (k, f) in [
        ("EDGE_DEVICE_CA_ROOT", "ca.pem"),
        ("EDGE_DEVICE_CERT", "register.crt"),
        ("EDGE_DEVICE_KEY", "register.key"),
    ] {
        a.extra_env
            .push((k.into(), keep.path().join(f).display().to_string()));
    }
    server.stop();
    a.start();
    let s = a.wait_for("a failed enrolment", Duration::from_secs(10), |s| {
        s.server.as_ref().is_some_and(|sv| sv.failures > 0)
    });
    assert_eq!(s.device.state, "registering");
    let status = text(&client(&a, &["status"]));
    // Wrapped for 80 columns: compare the words.
    let flat = status.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains("network error: io: Connection refused"),
        "{status}"
    );
    let block = status
        .lines()
        .skip_while(|l| !l.starts_with("server "))
        .take_while(|l| !l.starts_with("budget "));
    assert!(block.clone().count() >= 6, "{status}");
    for l in block {
        assert!(l.chars().count() <= 80, "wider than 80 columns: {l}");
    }
    assert!(status.contains("server   enrolling: "), "{status}");
    assert!(status.contains("never answered"), "{status}");
    assert!(status.contains("  next         enrol at "), "{status}");
    let (code, line) = check(&a);
    assert_eq!(code, 6, "{line}");
    let json = String::from_utf8_lossy(&client(&a, &["status", "--json"]).stdout).to_string();
    assert!(json.contains("Connection refused"), "{json}");
    drop(a);

    // Registered and configured: healthy, with the certificate and the version shown.
    let server = FlottaTestServer::start(ServerOptions {
        auto_approve_after: Some(1),
        ..ServerOptions::default()
    });
    let id = "edge-ops-up";
    server.set_configuration(id, config(&[("web", "sleep 600")]));
    let mut a = agent_for(&server, id);
    a.start();
    a.wait_for("reconciling", Duration::from_secs(30), |s| {
        s.device.state == "reconciling"
    });
    let (code, line) = check(&a);
    assert_eq!(code, 0, "{line}");
    let status = text(&client(&a, &["status"]));
    assert!(
        status.contains("server   registered: registered (device edge-ops-up)"),
        "{status}"
    );
    assert!(status.contains("  certificate  expires "), "{status}");
    assert!(status.contains("  config       version "), "{status}");

    // Disconnected by the server.
    server.set_disconnect(id, true);
    a.wait_for("disconnected", Duration::from_secs(15), |s| {
        s.device.state == "disconnected"
    });
    let (code, line) = check(&a);
    assert_eq!(code, 7, "{line}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn the_server_is_reached_through_a_connect_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = dir.path().join("tinyproxy.log");
    let conf = dir.path().join("tinyproxy.conf");
    // No ConnectPort line: CONNECT to any port (the test server's is random).
    std::fs::write(
        &conf,
        format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{}\"\nLogLevel Connect\nMaxClients 10\nAllow 127.0.0.1\n",
            log.display()
        ),
    )
    .unwrap();
    let _proxy = Daemon(
        Command::new("tinyproxy")
            .args(["-d", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .expect("tinyproxy listens");

    let server = FlottaTestServer::start(ServerOptions {
        auto_approve_after: Some(1),
        ..ServerOptions::default()
    });
    let id = "edge-ops-proxied";
    server.set_configuration(id, config(&[("web", "sleep 600")]));
    let mut a = agent_for(&server, id);
    a.extra_env.extend([
        (
            "EDGE_DEVICE_HTTPS_PROXY".into(),
            format!("http://127.0.0.1:{port}"),
        ),
        // The process environment's proxy variables are never used.
        ("HTTPS_PROXY".into(), "http://127.0.0.1:9".into()),
        ("https_proxy".into(), "http://127.0.0.1:9".into()),
    ]);
    a.start();
    a.wait_for(
        "reconciling through the proxy",
        Duration::from_secs(30),
        |s| s.device.state == "reconciling",
    );
    let server_port = server.url().rsplit(':').next().unwrap().to_string();
    let proxied = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        proxied.contains("CONNECT") && proxied.contains(&format!("127.0.0.1:{server_port}")),
        "tinyproxy saw no CONNECT to the server:\n{proxied}"
    );
    drop(a);

    // NO_PROXY: the same server reached directly; the proxy sees nothing new.
    let before = std::fs::read_to_string(&log).unwrap_or_default().len();
    let mut b = agent_for(&server, "edge-ops-direct");
    b.extra_env.extend([
        (
            "EDGE_DEVICE_HTTPS_PROXY".into(),
            format!("http://127.0.0.1:{port}"),
        ),
        ("EDGE_DEVICE_NO_PROXY".into(), "localhost,127.0.0.1".into()),
    ]);
    server.set_configuration("edge-ops-direct", config(&[]));
    b.start();
    b.wait_for("registered directly", Duration::from_secs(30), |s| {
        s.device.state == "reconciling" || s.device.state == "enrolled"
    });
    let after = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !after[before..].contains("CONNECT"),
        "NO_PROXY host went through the proxy:\n{}",
        &after[before..]
    );
}

/// GET http://127.0.0.1:PORT/metrics (plain HTTP/1.0).
fn scrape(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

fn node_exporter_serves_the_agent_metrics() {
    let mut a = Agent::new(BIN, TICKER);
    let textfiles: PathBuf = a.dir.path().join("textfiles");
    std::fs::create_dir(&textfiles).unwrap();
    a.extra_env.push((
        "EDGE_DEVICE_METRICS_TEXTFILE".into(),
        textfiles
            .join("device-worker-ng.prom")
            .display()
            .to_string(),
    ));
    a.start();
    a.wait_for("ticker running", Duration::from_secs(10), |s| {
        Agent::workload(s, "ticker").is_some_and(|w| w.state == "running")
    });
    let port = free_port();
    let _exporter = Daemon(
        Command::new("prometheus-node-exporter")
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--collector.disable-defaults")
            .arg("--collector.textfile")
            .arg(format!(
                "--collector.textfile.directory={}",
                textfiles.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let want = [
        "device_worker_ng_device_state{state=\"reconciling\"} 1",
        "device_worker_ng_workload_memory_limit_bytes{kind=\"shell\",workload=\"ticker\"} 1.6777216e+07",
        "device_worker_ng_workload_cpu_limit_cores{kind=\"shell\",workload=\"ticker\"} 0.1",
        "device_worker_ng_workload_restarts_total{kind=\"shell\",workload=\"ticker\"} 0",
        "device_worker_ng_workload_state{kind=\"shell\",state=\"running\",workload=\"ticker\"} 1",
        "device_worker_ng_budget_memory_bytes ",
        "device_worker_ng_evictions_total 0",
        "node_textfile_scrape_error 0",
    ];
    let mut last = String::new();
    let found = poll_until(Duration::from_secs(15), Duration::from_millis(200), || {
        last = scrape(port)?;
        want.iter().all(|w| last.contains(w)).then_some(())
    });
    assert!(
        found.is_some(),
        "node_exporter does not serve {:?}:\n{}",
        want.iter()
            .filter(|w| !last.contains(*w))
            .collect::<Vec<_>>(),
        last.lines()
            .filter(|l| l.contains("device_worker_ng") || l.contains("textfile"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Usage follows the samples.
    assert!(
        last.contains("device_worker_ng_workload_memory_bytes{kind=\"shell\",workload=\"ticker\"}"),
        "{last}"
    );
}
