//! The whole agent against the mTLS Flotta test server (PROTOCOL.md): first boot, restart,
//! renewal, outages, faults, disconnect. Root only (the workloads run in real cgroups).

use std::time::{Duration, Instant};

use device_worker_ng::flotta::messages::{DeviceConfigurationMessage, WorkloadState};
use dwng_test_support::agent::Agent;
use dwng_test_support::flotta_server::{Fault, FlottaTestServer, ServerOptions};
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
            "disconnect_removes_everything_and_stops_talking",
            ROOT_CGROUPS,
            disconnect_removes_everything_and_stops_talking,
        ),
    ])
}

const ID: &str = "edge-1";

fn config(workloads: &[(&str, &str)]) -> DeviceConfigurationMessage {
    let w: Vec<_> = workloads
        .iter()
        .map(|(name, cmd)| {
            json!({"name": name, "namespace": "default", "kind": "shell",
                   "specification": format!("command: [\"/bin/sh\", \"-c\", {cmd:?}]\nuser: root\n")})
        })
        .collect();
    serde_json::from_value(json!({
        "configuration": {"heartbeat": {"hardware_profile": {"include": true, "scope": "delta"}, "period_seconds": 1},
                          "metrics": {"receiver": {"request_num_samples": 30000, "timeout_seconds": 10}}, "mounts": []},
        "workloads": w
    }))
    .unwrap()
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

fn disconnect_removes_everything_and_stops_talking() {
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
        "no more requests after disconnect"
    );
    assert!(a.try_status().is_some(), "the agent keeps running");
}
