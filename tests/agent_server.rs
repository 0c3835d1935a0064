//! The whole agent against the mTLS Flotta test server (PROTOCOL.md): first boot, restart,
//! renewal, outages, faults, disconnect. Root only (the workloads run in real cgroups).
//!
//! The defects seen against the real edge API (issue 11, part 2), one test each:
//! 1. enrolment without backoff: `pending_enrolment_backs_off_exponentially`;
//! 2. a disconnect that did not stick: `disconnect_sticks_across_restarts_until_reset`;
//! 3. adopted pods without exit code: tests/agent_pod.rs
//!    `pod_from_the_server_runs_is_reported_adopted_and_removed`;
//! 4. an event twice around a disconnect:
//!    `the_heartbeat_in_flight_at_a_disconnect_delivers_its_events_once`;
//! 5. misleading messages, and 6. a long run of 500s:
//!    `server_errors_are_explained_and_messages_do_not_mislead` (the pod overhead shown in
//!    status: tests/operator.rs `rootless_and_limited_pods_by_annotation`);
//! 7. polling backed off after an outage: `polling_resumes_at_once_after_an_outage`;
//! 8. 401 → renew as the real server answers an expired certificate:
//!    `a_certificate_expiring_while_running_is_renewed_after_a_401`.

use std::time::{Duration, Instant};

use device_worker_ng::flotta::messages::{DeviceConfigurationMessage, WorkloadState};
use dwng_test_support::agent::Agent;
use dwng_test_support::flotta_server;
use dwng_test_support::flotta_server::{
    Fault, FlottaTestServer, RequestRecord, ServerOptions, Target,
};
use dwng_test_support::harness::{self, test, ROOT_CGROUPS};
use dwng_test_support::wait::{poll_until, wait_until};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_device-worker-ng");
const POLL: Duration = Duration::from_millis(100);

fn main() {
    harness::main(&[
        test(
            "first_boot_enrols_registers_runs_and_reports",
            ROOT_CGROUPS,
            first_boot_enrols_registers_runs_and_reports,
        ),
        test(
            "expired_certificate_is_renewed",
            ROOT_CGROUPS,
            expired_certificate_is_renewed,
        ),
        test(
            "outage_degrades_keeps_workloads_and_delivers_events_exactly_once",
            ROOT_CGROUPS,
            outage_degrades_keeps_workloads_and_delivers_events_exactly_once,
        ),
        test(
            "bad_answers_are_survived",
            ROOT_CGROUPS,
            bad_answers_are_survived,
        ),
        test(
            "forbidden_degrades_and_not_found_reenrols",
            ROOT_CGROUPS,
            forbidden_degrades_and_not_found_reenrols,
        ),
        test(
            "disconnect_sticks_across_restarts_until_reset",
            ROOT_CGROUPS,
            disconnect_sticks_across_restarts_until_reset,
        ),
        test(
            "pending_enrolment_backs_off_exponentially",
            ROOT_CGROUPS,
            pending_enrolment_backs_off_exponentially,
        ),
        test(
            "the_heartbeat_in_flight_at_a_disconnect_delivers_its_events_once",
            ROOT_CGROUPS,
            the_heartbeat_in_flight_at_a_disconnect_delivers_its_events_once,
        ),
        test(
            "server_errors_are_explained_and_messages_do_not_mislead",
            ROOT_CGROUPS,
            server_errors_are_explained_and_messages_do_not_mislead,
        ),
        test(
            "polling_resumes_at_once_after_an_outage",
            ROOT_CGROUPS,
            polling_resumes_at_once_after_an_outage,
        ),
        test(
            "a_certificate_expiring_while_running_is_renewed_after_a_401",
            ROOT_CGROUPS,
            a_certificate_expiring_while_running_is_renewed_after_a_401,
        ),
    ])
}

const ID: &str = "edge-1";

fn config(workloads: &[(&str, &str)]) -> DeviceConfigurationMessage {
    flotta_server::shell_configuration(workloads, true)
}

/// An agent configured for `server` (desired state from the server, fast timers).
fn agent_for(server: &FlottaTestServer) -> Agent {
    let mut a = Agent::new(BIN, "workloads: []\n");
    a.extra_env.extend(server.agent_env(ID));
    for (k, v) in [
        ("EDGE_DEVICE_POLL_INTERVAL", "200ms".into()),
        ("EDGE_DEVICE_SERVER_TIMEOUT", "1s".into()),
        ("EDGE_DEVICE_SERVER_OUTAGE_THRESHOLD", "1s".into()),
    ] {
        a.extra_env.push((k.to_string(), v));
    }
    a
}

fn count(server: &FlottaTestServer, directive: &str) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.directive.as_deref() == Some(directive))
        .count()
}

fn running(a: &Agent, name: &str) -> Option<i32> {
    a.try_status().and_then(|s| {
        Agent::workload(&s, name)
            .filter(|w| w.state == "running")
            .and_then(|w| w.pid)
    })
}

fn first_boot_enrols_registers_runs_and_reports() {
    // Approved during the first enrolment, so that one answers 200 (pending), the next 208.
    let server = FlottaTestServer::start(ServerOptions {
        auto_approve_after: Some(1),
        ..ServerOptions::default()
    });
    server.set_configuration(ID, config(&[("web", "sleep 600")]));
    let mut a = agent_for(&server);
    a.start();
    let s = a.wait_for("web running", Duration::from_secs(30), |s| {
        Agent::workload(s, "web").is_some_and(|w| w.state == "running")
    });
    assert_eq!(s.device.state, "reconciling");
    let sv = s.server.clone().expect("server info");
    assert_eq!(sv.device_id, ID);
    assert_eq!(sv.registration, "registered");
    assert!(sv.certificate_expires_unix.unwrap() > 0);
    // Enrolment answered 200 (pending) first, then 208; then one registration.
    let enrols: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.directive.as_deref() == Some("enrolment"))
        .map(|r| r.status)
        .collect();
    assert_eq!(enrols, vec![Some(200), Some(208)]);
    assert_eq!(count(&server, "registration"), 1);
    assert!(server.is_registered(ID));
    let key = a.state_dir().join("device.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A heartbeat lists the workload as running, with the applied version and hardware.
    wait_until(
        "heartbeat with web running",
        Duration::from_secs(10),
        POLL,
        || {
            server.heartbeats().iter().any(|(id, hb)| {
                id == ID
                    && hb
                        .workloads
                        .iter()
                        .any(|w| w.name == "web" && w.status == WorkloadState::Running)
            })
        },
    );
    let hbs = server.heartbeats();
    assert!(!hbs[0].1.version.is_empty());
    assert!(
        hbs[0].1.hardware.is_some(),
        "first heartbeat carries the hardware (include: true)"
    );

    // Restart with a valid certificate: no new enrolment, the workload is adopted.
    let pid = running(&a, "web").unwrap();
    assert!(a.terminate().unwrap().success());
    let before = count(&server, "enrolment");
    a.start();
    a.wait_for("web adopted", Duration::from_secs(15), |s| {
        Agent::workload(s, "web").is_some_and(|w| w.pid == Some(pid))
            && s.server
                .as_ref()
                .is_some_and(|v| v.last_contact_unix.is_some())
    });
    assert_eq!(
        count(&server, "enrolment"),
        before,
        "no re-enrolment with a valid certificate"
    );

    // A workload removed from the configuration is stopped and cleaned up.
    server.set_configuration(ID, config(&[]));
    a.wait_for("web removed", Duration::from_secs(15), |s| {
        Agent::workload(s, "web").is_none()
    });
    wait_until("cgroup gone", Duration::from_secs(5), POLL, || {
        !a.cgroup("web").exists()
    });
}

fn expired_certificate_is_renewed() {
    let server = FlottaTestServer::start(ServerOptions::default());
    server.set_configuration(ID, config(&[("web", "sleep 600")]));
    let expired = server.issue_device_cert(ID, -40, -10);
    let mut a = agent_for(&server);
    std::fs::create_dir_all(a.state_dir()).unwrap();
    std::fs::write(a.state_dir().join("device.crt"), &expired.cert_pem).unwrap();
    std::fs::write(a.state_dir().join("device.key"), &expired.key_pem).unwrap();
    a.start();
    let s = a.wait_for("web running after renewal", Duration::from_secs(30), |s| {
        Agent::workload(s, "web").is_some_and(|w| w.state == "running")
    });
    let exp = s.server.unwrap().certificate_expires_unix.unwrap();
    assert!(
        exp > device_worker_ng::controller::unix_now() as i64 + 86_400,
        "a fresh certificate"
    );
    assert_eq!(count(&server, "enrolment"), 0, "renewal, not re-enrolment");
    assert_eq!(count(&server, "registration"), 1);
    // Renewed with the expired device certificate itself (PROTOCOL §8 item 1).
    let reg = server
        .requests()
        .into_iter()
        .find(|r| r.directive.as_deref() == Some("registration"))
        .unwrap();
    assert_eq!(
        (reg.client_cn.as_deref(), reg.status),
        (Some(ID), Some(200))
    );

    // A 401 on a GET (the server stopped accepting the certificate): renew again.
    let pid = running(&a, "web").unwrap();
    server.inject_fault(Fault::Status(401), 1);
    wait_until("second renewal", Duration::from_secs(15), POLL, || {
        count(&server, "registration") == 2
    });
    a.wait_for("polling again", Duration::from_secs(10), |s| {
        s.server.as_ref().is_some_and(|v| !v.certificate_unproven)
    });
    assert_eq!(
        running(&a, "web"),
        Some(pid),
        "workloads untouched by the renewal"
    );
}

fn outage_degrades_keeps_workloads_and_delivers_events_exactly_once() {
    let server = FlottaTestServer::start(ServerOptions {
        auto_approve_after: Some(1),
        ..ServerOptions::default()
    });
    server.set_configuration(ID, config(&[("web", "sleep 600"), ("flaky", "sleep 600")]));
    let mut a = agent_for(&server);
    a.start();
    a.wait_for("both running", Duration::from_secs(30), |s| {
        s.workloads.iter().filter(|w| w.state == "running").count() == 2
    });
    let web = running(&a, "web").unwrap();
    server.inject_fault(Fault::Status(503), 100_000);
    a.wait_for("degraded", Duration::from_secs(15), |s| {
        s.device.state == "degraded"
    });
    // An event during the outage: the flaky workload's process dies and is restarted.
    let flaky = running(&a, "flaky").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(flaky),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    a.wait_for("flaky restarted", Duration::from_secs(15), |s| {
        Agent::workload(s, "flaky").is_some_and(|w| w.state == "running" && w.pid != Some(flaky))
    });
    let s = a.status();
    assert!(
        s.server.as_ref().unwrap().outbox_length >= 1,
        "queued while the server is down"
    );
    assert_eq!(running(&a, "web"), Some(web), "untouched by the outage");
    server.clear_faults();
    a.wait_for("recovered", Duration::from_secs(20), |s| {
        s.device.state == "reconciling" && s.server.as_ref().is_some_and(|v| v.outbox_length == 0)
    });
    std::thread::sleep(Duration::from_secs(2));
    let delivered = server
        .heartbeats()
        .iter()
        .flat_map(|(_, hb)| hb.events.clone())
        .filter(|e| e.message.contains("workload flaky") && e.message.contains("signal 9"))
        .count();
    assert_eq!(delivered, 1, "the event reached the server exactly once");
}

fn bad_answers_are_survived() {
    let server = FlottaTestServer::start(ServerOptions {
        auto_approve_after: Some(1),
        ..ServerOptions::default()
    });
    server.set_configuration(ID, config(&[("web", "sleep 600")]));
    let mut a = agent_for(&server);
    a.start();
    a.wait_for("web running", Duration::from_secs(30), |s| {
        Agent::workload(s, "web").is_some_and(|w| w.state == "running")
    });
    let pid = running(&a, "web").unwrap();
    for fault in [
        Fault::GarbageBody,
        Fault::HugeBody(2 << 20),
        Fault::Delay(Duration::from_secs(3)),
        Fault::DropConnection,
        Fault::Status(500),
    ] {
        let before = server.requests().len();
        server.inject_fault(fault.clone(), 2);
        wait_until(
            &format!("{fault:?} consumed"),
            Duration::from_secs(30),
            POLL,
            || server.requests().len() >= before + 2,
        );
    }
    let t = Instant::now();
    a.wait_for("recovered", Duration::from_secs(60), |s| {
        s.device.state == "reconciling"
    });
    eprintln!("RECOVERED after {:?}", t.elapsed());
    let s = a.status();
    assert_eq!(running(&a, "web"), Some(pid), "the workload never noticed");
    assert_eq!(
        s.device.state,
        "reconciling",
        "recovered: {}\n{}\n{:#?}",
        s.render(),
        a.log(),
        server.requests().iter().rev().take(8).collect::<Vec<_>>()
    );
    assert!(a.log().contains("keeping the last good configuration"));
}

fn forbidden_degrades_and_not_found_reenrols() {
    let server = FlottaTestServer::start(ServerOptions {
        auto_approve_after: Some(1),
        ..ServerOptions::default()
    });
    server.set_configuration(ID, config(&[]));
    // A certificate for another device: every GET is refused with 403.
    let other = server.issue_device_cert("someone-else", -1, 30);
    let mut a = agent_for(&server);
    std::fs::create_dir_all(a.state_dir()).unwrap();
    std::fs::write(a.state_dir().join("device.crt"), &other.cert_pem).unwrap();
    std::fs::write(a.state_dir().join("device.key"), &other.key_pem).unwrap();
    a.start();
    let s = a.wait_for("degraded by 403", Duration::from_secs(20), |s| {
        s.device.problems.iter().any(|p| p.contains("403"))
    });
    assert_eq!(s.device.state, "degraded");
    drop(a);

    // 404 on data/in or a heartbeat (not approved, or deleted): enrol again. (A real deletion
    // also makes control/in answer `disconnect`, covered below.)
    let mut a = agent_for(&server);
    a.start();
    a.wait_for("registered", Duration::from_secs(20), |s| {
        s.server
            .as_ref()
            .is_some_and(|v| v.registration == "registered" && v.last_contact_unix.is_some())
    });
    let enrols = count(&server, "enrolment");
    server.inject_fault(Fault::Status(404), 1);
    let reenrolled = poll_until(Duration::from_secs(20), POLL, || {
        (count(&server, "enrolment") > enrols).then_some(())
    });
    assert!(
        reenrolled.is_some(),
        "no re-enrolment after the device was deleted\n{}\n{}",
        a.status().render(),
        a.log()
    );
}

/// Requests the server saw after the `n`-th.
fn requests_since(server: &FlottaTestServer, n: usize) -> Vec<RequestRecord> {
    server.requests().into_iter().skip(n).collect()
}

/// `device-worker-ng reset` against the agent's socket.
fn reset(a: &Agent) -> String {
    let out = std::process::Command::new(BIN)
        .args(["reset", "--socket"])
        .arg(a.socket())
        .output()
        .unwrap();
    assert!(out.status.success(), "reset: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Defect 2: after `disconnect` the device is `disconnected` (its own, persisted state), runs
/// nothing and sends nothing with its old identity, across restarts, until an operator resets
/// it; the old agent fetched data/in first on every restart and deployed before tearing down.
fn disconnect_sticks_across_restarts_until_reset() {
    let server = FlottaTestServer::start(ServerOptions {
        auto_approve_after: Some(1),
        ..ServerOptions::default()
    });
    server.set_configuration(ID, config(&[("web", "sleep 600")]));
    let mut a = agent_for(&server);
    a.start();
    a.wait_for("web running", Duration::from_secs(30), |s| {
        Agent::workload(s, "web").is_some_and(|w| w.state == "running")
    });
    // Disconnected while the EdgeDevice still exists: data/in would still offer `web`.
    server.set_disconnect(ID, true);
    let s = a.wait_for("disconnected", Duration::from_secs(15), |s| {
        s.workloads.is_empty() && s.device.state == "disconnected"
    });
    assert!(s.server.unwrap().registration.contains("disconnected"));
    wait_until("cgroup gone", Duration::from_secs(5), POLL, || {
        !a.cgroup("web").exists()
    });
    let n = server.requests().len();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        server.requests().len(),
        n,
        "no request after the disconnect"
    );

    // Restarted, twice: still disconnected, nothing deployed, nothing sent.
    for _ in 0..2 {
        assert!(a.terminate().unwrap().success());
        a.start();
        std::thread::sleep(Duration::from_secs(2));
        let s = a.status();
        assert_eq!(s.device.state, "disconnected", "{}", s.render());
        assert!(s.workloads.is_empty(), "{}", s.render());
        assert!(
            !s.transitions.iter().any(|t| t.machine == "workload/web"),
            "nothing deployed: {}",
            s.render()
        );
        assert_eq!(
            requests_since(&server, n).len(),
            0,
            "nothing sent after a restart: {:?}",
            requests_since(&server, n)
        );
    }

    // The operator deletes the EdgeDevice and rejoins the device: it enrols afresh, with the
    // bootstrap certificate, and runs what the server says.
    server.set_disconnect(ID, false);
    server.delete_device(ID);
    assert!(reset(&a).contains("enrols afresh"));
    a.wait_for("web running again", Duration::from_secs(30), |s| {
        s.device.state == "reconciling"
            && Agent::workload(s, "web").is_some_and(|w| w.state == "running")
    });
    let again = requests_since(&server, n);
    let first = again.first().expect("requests after the reset");
    assert_eq!(
        (first.directive.as_deref(), first.client_cn.as_deref()),
        (Some("enrolment"), Some("register")),
        "{again:?}"
    );
}

/// Defect 1: while approval is pending, enrolment is asked again after exponentially growing
/// delays (with jitter), and the log says when; the old agent asked every 2 s, forever.
fn pending_enrolment_backs_off_exponentially() {
    let server = FlottaTestServer::start(ServerOptions::default());
    let mut a = agent_for(&server);
    a.start();
    let times = poll_until(Duration::from_secs(25), POLL, || {
        let t: Vec<Instant> = server
            .requests()
            .iter()
            .filter(|r| r.directive.as_deref() == Some("enrolment"))
            .map(|r| r.at)
            .collect();
        (t.len() >= 4).then_some(t)
    })
    .unwrap_or_else(|| panic!("four enrolments\n{}", a.log()));
    let gaps: Vec<f64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    // 2 s, 4 s, 8 s, each ±20 %.
    assert!(
        gaps[1] > gaps[0] && gaps[2] > gaps[1] && gaps[2] >= 2.0 * gaps[0],
        "gaps {gaps:?}"
    );
    assert!(
        a.log()
            .contains("enrolment pending or failing: asking again later attempt=3"),
        "the schedule is logged:\n{}",
        a.log()
    );
    a.wait_for(
        "status shows when it asks next",
        Duration::from_secs(5),
        |s| {
            s.server.as_ref().is_some_and(|v| {
                v.session_state == "enrolling"
                    && v.next_attempt.as_ref().is_some_and(|(t, _)| t == "enrol")
            })
        },
    );
}

/// Defect 4: the heartbeat that is on its way when the disconnect comes delivers its events,
/// and they leave the outbox: nothing is sent twice, and restarts add no event; the old agent
/// ignored that acknowledgement and queued a `Disconnected` event on every restart.
fn the_heartbeat_in_flight_at_a_disconnect_delivers_its_events_once() {
    let server = FlottaTestServer::start(ServerOptions {
        auto_approve_after: Some(1),
        ..ServerOptions::default()
    });
    server.set_configuration(ID, config(&[("flaky", "sleep 600")]));
    let mut a = agent_for(&server);
    // Longer than the slow answer below: the agent waits for it instead of giving up.
    a.extra_env
        .push(("EDGE_DEVICE_SERVER_TIMEOUT".into(), "10s".into()));
    a.start();
    let s = a.wait_for("flaky running", Duration::from_secs(30), |s| {
        Agent::workload(s, "flaky").is_some_and(|w| w.state == "running")
            && s.server.as_ref().is_some_and(|v| v.outbox_length == 0)
    });
    // Heartbeats fail for now: the event of the kill waits in the outbox.
    server.inject_fault_on(
        Target::Directive("heartbeat"),
        Fault::Status(503),
        1_000_000,
    );
    let flaky = Agent::workload(&s, "flaky").unwrap().pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(flaky),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    a.wait_for("the kill's event queued", Duration::from_secs(15), |s| {
        s.server.as_ref().is_some_and(|v| v.outbox_length >= 1)
    });
    let refused = |server: &FlottaTestServer| {
        server
            .requests()
            .iter()
            .filter(|r| r.status == Some(503))
            .count()
    };
    wait_until("a heartbeat refused", Duration::from_secs(5), POLL, || {
        refused(&server) >= 1
    });
    // The disconnect is answered slowly; while the agent waits for it, heartbeats are
    // answered again: the next one goes out on the heels of the disconnect.
    server.set_disconnect(ID, true);
    server.inject_fault_on(Target::ControlIn, Fault::Delay(Duration::from_secs(3)), 1);
    wait_until(
        "the agent waits for control/in",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || server.delayed() == 1,
    );
    server.clear_faults_on(Target::Directive("heartbeat"));
    let s = a.wait_for(
        "workloads removed, the outbox delivered",
        Duration::from_secs(20),
        |s| s.workloads.is_empty() && s.server.as_ref().is_some_and(|v| v.outbox_length == 0),
    );
    assert_eq!(s.device.state, "disconnected");
    let delivered = |server: &FlottaTestServer| {
        server
            .heartbeats()
            .iter()
            .flat_map(|(_, hb)| hb.events.clone())
            .filter(|e| e.message.contains("workload flaky") && e.message.contains("signal 9"))
            .count()
    };
    assert_eq!(delivered(&server), 1, "{}", s.render());
    // That heartbeat was answered after the disconnect: its acknowledgement counted.
    let reqs = server.requests();
    let disconnect_at = reqs
        .iter()
        .position(|r| {
            r.path.ends_with("/control/edge-1/in")
                && r.status == Some(200)
                && r.response_bytes > 200
        })
        .expect("the disconnect answer");
    assert!(
        reqs[disconnect_at..]
            .iter()
            .any(|r| r.directive.as_deref() == Some("heartbeat") && r.status == Some(200)),
        "a heartbeat after the disconnect: {:?}",
        &reqs[disconnect_at..]
    );

    let n = server.requests().len();
    for _ in 0..2 {
        assert!(a.terminate().unwrap().success());
        a.start();
        std::thread::sleep(Duration::from_secs(2));
        let s = a.status();
        assert_eq!(s.device.state, "disconnected");
        assert_eq!(
            s.server.unwrap().outbox_length,
            0,
            "no event queued by a restart"
        );
    }
    assert_eq!(requests_since(&server, n).len(), 0);
    assert_eq!(delivered(&server), 1, "exactly once");
    let outbox = std::fs::read_to_string(a.state_dir().join("outbox.json")).unwrap_or_default();
    assert!(!outbox.contains("Disconnected"), "{outbox}");
}

/// Defects 5 and 6: what the agent says while the server answers with errors, about the
/// certificate, about a configuration it already applied, about each request, about an
/// invalid workload; and a long run of 500s on every endpoint (what the real server answers
/// for a deleted device with a remote backend) is explained in status, the workloads kept.
fn server_errors_are_explained_and_messages_do_not_mislead() {
    let server = FlottaTestServer::start(ServerOptions {
        auto_approve_after: Some(1),
        ..ServerOptions::default()
    });
    let mut cfg = config(&[("web", "sleep 600")]);
    cfg.workloads.push(
        serde_json::from_value(json!({"name": "broken", "kind": "shell",
                                      "specification": "command: [relative]"}))
        .unwrap(),
    );
    server.set_configuration(ID, cfg);
    let mut a = agent_for(&server);
    a.start();
    a.wait_for("web running", Duration::from_secs(30), |s| {
        Agent::workload(s, "web").is_some_and(|w| w.state == "running")
    });
    // Polls go on while heartbeats move the version: the invalid workload is still said once.
    wait_until("heartbeats", Duration::from_secs(10), POLL, || {
        server.heartbeats().len() >= 3
    });
    let log = a.log();
    let said = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    assert_eq!(said("workload 'broken': specification.command"), 1, "{log}");
    assert_eq!(said("applying a new configuration"), 1, "{log}");
    // The certificate's expiry in RFC 3339, not `SystemTime { tv_sec: … }`.
    assert!(!log.contains("SystemTime"), "{log}");
    let installed = log
        .lines()
        .find(|l| l.contains("device certificate installed"))
        .unwrap_or_default();
    assert!(
        installed.contains(" expires=20") && installed.trim_end().ends_with('Z'),
        "{installed}"
    );
    // LOG_LEVEL=debug: each request with method, path, status and duration.
    assert!(
        log.lines().any(|l| l.contains("DEBUG")
            && l.contains("GET data/edge-1/in")
            && l.contains("status=200")
            && l.contains("took_ms=")),
        "{log}"
    );

    // A restart does not apply the configuration it already applied.
    let pid = running(&a, "web").unwrap();
    assert!(a.terminate().unwrap().success());
    let before = a.log().len();
    a.start();
    a.wait_for("polled again", Duration::from_secs(15), |s| {
        s.server
            .as_ref()
            .is_some_and(|v| v.last_answer.as_deref() == Some("poll: ok"))
    });
    std::thread::sleep(Duration::from_secs(1));
    let after = a.log()[before..].to_string();
    assert!(
        !after.contains("applying a new configuration"),
        "same version after a restart: {after}"
    );
    assert_eq!(running(&a, "web"), Some(pid));

    // 500 on every endpoint for a long time: the server answers (contact, last answer), with
    // errors (not "unreachable"), the device is degraded and says so; nothing is torn down.
    server.inject_fault(Fault::Status(500), 1_000_000);
    // (Degraded already: the refused workload is a problem of its own.)
    let s = a.wait_for("degraded by 500s", Duration::from_secs(20), |s| {
        s.device.state == "degraded" && s.device.problems.iter().any(|p| p.starts_with("server "))
    });
    let problem = s.device.problems.join("; ");
    assert!(
        problem.contains("answering with errors") && problem.contains("500"),
        "{problem}"
    );
    assert!(!problem.contains("unreachable"), "{problem}");
    let sv = s.server.clone().unwrap();
    assert!(
        sv.last_answer.as_deref().is_some_and(|a| a.contains("500")),
        "{sv:?}"
    );
    let contact = sv.last_contact_unix.expect("the server answers: contact");
    assert!(
        contact + 5 >= device_worker_ng::controller::unix_now(),
        "{sv:?}"
    );
    assert_eq!(running(&a, "web"), Some(pid), "workloads kept");
    server.clear_faults();
    a.wait_for("recovered", Duration::from_secs(60), |s| {
        !s.device.problems.iter().any(|p| p.starts_with("server "))
    });
}

/// Defect 7: once the server answers again, polling resumes at once, so a disconnect sent
/// meanwhile acts within a poll; the old agent kept its backed-off poll (35 s seen).
fn polling_resumes_at_once_after_an_outage() {
    let server = FlottaTestServer::start(ServerOptions {
        auto_approve_after: Some(1),
        ..ServerOptions::default()
    });
    server.set_configuration(ID, config(&[("web", "sleep 600")]));
    let mut a = agent_for(&server);
    a.start();
    a.wait_for("web running", Duration::from_secs(30), |s| {
        Agent::workload(s, "web").is_some_and(|w| w.state == "running")
    });
    // An outage long enough for the poll backoff to reach tens of seconds.
    server.inject_fault(Fault::Status(503), 1_000_000);
    wait_until(
        "eight refused requests",
        Duration::from_secs(30),
        POLL,
        || {
            server
                .requests()
                .iter()
                .filter(|r| r.status == Some(503))
                .count()
                >= 8
        },
    );
    let n = server.requests().len();
    server.set_disconnect(ID, true);
    server.clear_faults();
    let t = Instant::now();
    a.wait_for("the disconnect acted on", Duration::from_secs(10), |s| {
        s.workloads.is_empty()
    });
    eprintln!("disconnected {:?} after the server came back", t.elapsed());
    // The first answered heartbeat is followed by a poll, not by a backed-off wait.
    let after = requests_since(&server, n);
    let hb = after
        .iter()
        .position(|r| r.directive.as_deref() == Some("heartbeat") && r.status == Some(200));
    if let Some(i) = hb {
        assert!(
            after[i + 1..]
                .first()
                .is_some_and(|r| r.path.ends_with("/control/edge-1/in")),
            "{after:?}"
        );
    }
}

/// Defect 8: a device certificate that expires while the agent runs (its renewal failing
/// meanwhile) is refused by the server as the real one refuses it (401 on GETs, full auth;
/// heartbeats still accepted, signature-only: PROTOCOL §3.3, §8 item 1), and once the server
/// takes registrations again the agent renews with the expired certificate (§3.5), workloads
/// untouched.
fn a_certificate_expiring_while_running_is_renewed_after_a_401() {
    let server = FlottaTestServer::start(ServerOptions {
        auto_approve_after: Some(1),
        cert_validity: Duration::from_secs(4),
        ..ServerOptions::default()
    });
    server.set_configuration(ID, config(&[("web", "sleep 600")]));
    let mut a = agent_for(&server);
    a.start();
    a.wait_for("web running", Duration::from_secs(30), |s| {
        Agent::workload(s, "web").is_some_and(|w| w.state == "running")
    });
    let pid = running(&a, "web").unwrap();
    // Renewals fail (the certificate is due at once: backdated a day, valid for 4 s).
    server.inject_fault_on(
        Target::Directive("registration"),
        Fault::Status(500),
        1_000_000,
    );
    let refused = |server: &FlottaTestServer| {
        server.requests().iter().position(|r| {
            r.method == "GET" && r.status == Some(401) && r.client_cn.as_deref() == Some(ID)
        })
    };
    if poll_until(Duration::from_secs(20), POLL, || refused(&server)).is_none() {
        panic!("no GET refused with 401\n{}", a.log());
    }
    let s = a.wait_for("the renewal problem shown", Duration::from_secs(10), |s| {
        s.device
            .problems
            .iter()
            .any(|p| p.contains("certificate renewal failing"))
    });
    assert_eq!(s.device.state, "degraded");
    // Heartbeats with the expired certificate are accepted.
    wait_until(
        "a heartbeat accepted after the 401",
        Duration::from_secs(10),
        POLL,
        || {
            let reqs = server.requests();
            let i = refused(&server).unwrap_or(usize::MAX);
            reqs.iter()
                .skip(i)
                .any(|r| r.directive.as_deref() == Some("heartbeat") && r.status == Some(200))
        },
    );
    let n = server.requests().len();
    server.clear_faults_on(Target::Directive("registration"));
    let renewed = poll_until(Duration::from_secs(30), POLL, || {
        requests_since(&server, n)
            .into_iter()
            .find(|r| r.directive.as_deref() == Some("registration") && r.status == Some(200))
    })
    .unwrap_or_else(|| panic!("no renewal\n{}", a.log()));
    assert_eq!(
        renewed.client_cn.as_deref(),
        Some(ID),
        "renewed with the device certificate, not re-enrolled"
    );
    assert_eq!(count(&server, "enrolment"), 2, "the first boot's only");
    a.wait_for(
        "polling with the new certificate",
        Duration::from_secs(15),
        |s| {
            s.server
                .as_ref()
                .is_some_and(|v| v.last_answer.as_deref() == Some("poll: ok"))
                && !s
                    .device
                    .problems
                    .iter()
                    .any(|p| p.contains("certificate renewal failing"))
        },
    );
    assert_eq!(running(&a, "web"), Some(pid), "workloads untouched");
}
