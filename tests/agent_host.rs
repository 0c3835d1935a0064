//! The whole agent on this host's real cgroups (v1 on CI's machines): limits enforced, OOM
//! noticed and restarted with backoff, adoption after SIGKILL, clean removal. Root only.

use std::time::Duration;

use dwng_test_support::agent::Agent;
use dwng_test_support::harness::{self, test, ROOT_CGROUPS};
use dwng_test_support::wait::wait_until;

const BIN: &str = env!("CARGO_BIN_EXE_device-worker-ng");

fn main() {
    harness::main(&[
        test(
            "sighup_reloads_the_configuration_in_place",
            ROOT_CGROUPS,
            sighup_reloads_the_configuration_in_place,
        ),
        test(
            "the_agent_runs_without_glibcs_thread_cache_and_its_workloads_never_see_that",
            ROOT_CGROUPS,
            the_agent_runs_without_glibcs_thread_cache_and_its_workloads_never_see_that,
        ),
        test(
            "memory_hog_is_oom_killed_and_restarted_with_backoff",
            ROOT_CGROUPS,
            memory_hog_is_oom_killed_and_restarted_with_backoff,
        ),
        test("cpu_hog_is_throttled", ROOT_CGROUPS, cpu_hog_is_throttled),
        test(
            "fork_bomb_is_stopped_by_the_pids_limit",
            ROOT_CGROUPS,
            fork_bomb_is_stopped_by_the_pids_limit,
        ),
        test(
            "killed_agent_restarts_and_adopts_without_duplicates",
            ROOT_CGROUPS,
            killed_agent_restarts_and_adopts_without_duplicates,
        ),
        test(
            "removed_workload_leaves_no_cgroup_and_others_are_untouched",
            ROOT_CGROUPS,
            removed_workload_leaves_no_cgroup_and_others_are_untouched,
        ),
        test(
            "bad_input_is_rejected_and_the_rest_keeps_running",
            ROOT_CGROUPS,
            bad_input_is_rejected_and_the_rest_keeps_running,
        ),
        test(
            "status_table_and_json_from_a_running_agent",
            ROOT_CGROUPS,
            status_table_and_json_from_a_running_agent,
        ),
        test(
            "a_workload_desired_again_during_its_stop_runs_again",
            ROOT_CGROUPS,
            a_workload_desired_again_during_its_stop_runs_again,
        ),
    ])
}

fn shell(name: &str, command: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    kind: shell\n    specification: |\n      command: [\"/bin/sh\", \"-c\", {command:?}]\n      user: root\n{extra}"
    )
}

fn desired(workloads: &[String]) -> String {
    format!("workloads:\n{}", workloads.join(""))
}

/// Holds 200 MB in a shell variable (`tr` turns the NULs, which sh would drop, into x).
const HOG: &str = "echo allocating; big=$(head -c 200000000 /dev/zero | tr '\\0' x); echo survived";

fn memory_hog_is_oom_killed_and_restarted_with_backoff() {
    let mut a = Agent::new(
        BIN,
        &desired(&[shell(
            "hog",
            HOG,
            "      resources:\n        limits: {memory: 32Mi}\n",
        )]),
    );
    a.start();
    let s = a.wait_for("hog OOM-killed three times", Duration::from_secs(30), |s| {
        Agent::workload(s, "hog").is_some_and(|w| w.oom_kills >= 3)
    });
    let w = Agent::workload(&s, "hog").unwrap();
    assert!(w.restarts >= 3, "{w:?}");
    assert_eq!(
        a.cgroup_file("hog", "memory.limit_in_bytes")
            .parse::<u64>()
            .ok()
            .or_else(|| a.cgroup_file("hog", "memory.max").parse().ok()),
        Some(32 << 20)
    );
    // The reasons name the OOM kill and the delays grow (200ms, 400ms, 800ms...).
    let reasons: Vec<&str> = s
        .transitions
        .iter()
        .filter(|t| t.machine == "workload/hog" && t.to == "backoff")
        .map(|t| t.reason.as_str())
        .collect();
    assert!(reasons.len() >= 3, "{reasons:?}");
    assert!(
        reasons.iter().all(|r| r.starts_with("OOMKilled")),
        "{reasons:?}"
    );
    assert!(
        reasons[0].contains("in 0.2s") && reasons[1].contains("in 0.4s"),
        "{reasons:?}"
    );
    assert!(a.log().contains("OOMKilled"), "reported in the log");
}

fn cpu_hog_is_throttled() {
    let mut a = Agent::new(
        BIN,
        &desired(&[shell(
            "spin",
            "while :; do :; done",
            "      resources:\n        limits: {cpu: 100m}\n",
        )]),
    );
    a.start();
    let s = a.wait_for("spin throttled", Duration::from_secs(20), |s| {
        Agent::workload(s, "spin")
            .and_then(|w| w.usage.as_ref())
            .is_some_and(|u| u.cpu_throttled_periods >= 5 && u.cpu_millicores > 0)
    });
    let u = Agent::workload(&s, "spin").unwrap().usage.clone().unwrap();
    // 100m = 10 ms per 100 ms period; the sampler's figure must be near that, far below a core.
    assert!(u.cpu_millicores <= 200, "{u:?}");
    let quota = a.cgroup_file("spin", "cpu.cfs_quota_us");
    let max = a.cgroup_file("spin", "cpu.max");
    assert!(
        quota == "10000" || max == "10000 100000",
        "quota {quota:?} max {max:?}"
    );
}

fn fork_bomb_is_stopped_by_the_pids_limit() {
    let mut a = Agent::new(
        BIN,
        &desired(&[shell(
            "bomb",
            "for i in $(seq 60); do sleep 30 & done; wait",
            "      resources:\n        limits: {pids: 10}\n",
        )]),
    );
    a.start();
    let s = a.wait_for("pids limit hit", Duration::from_secs(20), |s| {
        Agent::workload(s, "bomb")
            .and_then(|w| w.usage.as_ref())
            .is_some_and(|u| u.pids_max_events > 0)
    });
    let u = Agent::workload(&s, "bomb").unwrap().usage.clone().unwrap();
    assert!(u.pids <= 10, "{u:?}");
    assert!(a.cgroup_procs("bomb").len() <= 10);
    assert_eq!(a.cgroup_file("bomb", "pids.max"), "10");
}

fn killed_agent_restarts_and_adopts_without_duplicates() {
    let mut a = Agent::new(BIN, &desired(&[shell("sleeper", "sleep 600", "")]));
    a.start();
    let s = a.wait_for("sleeper running", Duration::from_secs(10), |s| {
        Agent::workload(s, "sleeper").is_some_and(|w| w.state == "running")
    });
    let pid = Agent::workload(&s, "sleeper").unwrap().pid.unwrap();
    a.kill9();
    assert!(
        a.cgroup_procs("sleeper").contains(&pid),
        "survives the agent"
    );
    a.start();
    let s = a.wait_for("sleeper adopted", Duration::from_secs(10), |s| {
        Agent::workload(s, "sleeper").is_some_and(|w| w.state == "running")
    });
    let w = Agent::workload(&s, "sleeper").unwrap();
    assert_eq!(w.pid, Some(pid), "same pid after the restart");
    assert_eq!(w.restarts, 0);
    assert!(s.transitions.iter().any(|t| t.reason.contains("adopted")));
    // The shell and its sleep: no second copy was started.
    std::thread::sleep(Duration::from_millis(500));
    let procs = a.cgroup_procs("sleeper");
    assert!(procs.contains(&pid) && procs.len() <= 2, "{procs:?}");
    // And the adopted process is still watched: when it dies, the agent restarts it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let s = a.wait_for(
        "restarted after the adopted process died",
        Duration::from_secs(15),
        |s| {
            Agent::workload(s, "sleeper")
                .is_some_and(|w| w.state == "running" && w.pid != Some(pid))
        },
    );
    assert_eq!(Agent::workload(&s, "sleeper").unwrap().restarts, 1);
}

fn removed_workload_leaves_no_cgroup_and_others_are_untouched() {
    let keep = shell("keep", "sleep 600", "");
    let mut a = Agent::new(
        BIN,
        &desired(&[keep.clone(), shell("gone", "sleep 600", "")]),
    );
    a.start();
    let s = a.wait_for("both running", Duration::from_secs(10), |s| {
        s.workloads.iter().filter(|w| w.state == "running").count() == 2
    });
    let keep_pid = Agent::workload(&s, "keep").unwrap().pid;
    let gone_cg = a.cgroup("gone");
    assert!(gone_cg.exists());
    a.set_desired(&desired(&[keep]));
    a.wait_for("gone removed", Duration::from_secs(10), |s| {
        Agent::workload(s, "gone").is_none()
    });
    wait_until(
        "cgroup deleted",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || !gone_cg.exists(),
    );
    assert!(
        !a.state_dir().join("workloads/gone.json").exists(),
        "record deleted"
    );
    let s = a.status();
    assert_eq!(
        Agent::workload(&s, "keep").unwrap().pid,
        keep_pid,
        "keep untouched"
    );
}

fn bad_input_is_rejected_and_the_rest_keeps_running() {
    let good = shell("good", "sleep 600", "");
    let bad = "  - name: bad\n    kind: shell\n    specification: |\n      command: [relative]\n"
        .to_string();
    let mut a = Agent::new(BIN, &desired(&[good.clone(), bad]));
    a.start();
    let s = a.wait_for("good running, bad failed", Duration::from_secs(10), |s| {
        Agent::workload(s, "good").is_some_and(|w| w.state == "running")
            && Agent::workload(s, "bad").is_some_and(|w| w.state == "failed")
    });
    let bad = Agent::workload(&s, "bad").unwrap();
    assert!(
        bad.reason.contains("specification.command"),
        "{}",
        bad.reason
    );
    assert_eq!(s.device.state, "degraded");
    let pid = Agent::workload(&s, "good").unwrap().pid;

    // A malformed file: rejected as a whole, the last good state keeps running.
    a.set_desired("workloads: [unclosed\n");
    let s = a.wait_for("rejection visible", Duration::from_secs(10), |s| {
        s.device
            .problems
            .iter()
            .any(|p| p.contains("desired state"))
    });
    assert_eq!(Agent::workload(&s, "good").unwrap().pid, pid);

    // Fixed again: the problem clears and the device recovers.
    a.set_desired(&desired(&[good]));
    let s = a.wait_for("recovered", Duration::from_secs(10), |s| {
        s.device.state == "reconciling"
    });
    assert_eq!(
        Agent::workload(&s, "good").unwrap().pid,
        pid,
        "never restarted"
    );
    assert!(Agent::workload(&s, "bad").is_none());
}

fn status_table_and_json_from_a_running_agent() {
    let mut a = Agent::new(
        BIN,
        &desired(&[shell(
            "web",
            "sleep 600",
            "      resources:\n        limits: {memory: 64Mi, cpu: 250m, pids: 20}\n",
        )]),
    );
    a.start();
    a.wait_for("web running", Duration::from_secs(10), |s| {
        Agent::workload(s, "web").is_some_and(|w| w.state == "running" && w.usage.is_some())
    });
    let out = a
        .command()
        .args(["status", "--socket"])
        .arg(a.socket())
        .output()
        .unwrap();
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("device   reconciling"), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("{table}"));
    for cell in ["shell", "running", "/64.0Mi", "/250m", "/20"] {
        assert!(row.contains(cell), "{cell} in {row}");
    }
    let out = a
        .command()
        .args(["status", "--json", "--socket"])
        .arg(a.socket())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["device"]["state"], "reconciling");
    // No systemd here: the agent makes the cgroups itself, and no workload has a unit.
    assert_eq!(v["agent"]["cgroup_driver"], "cgroupfs");
    assert!(
        table.lines().next().unwrap().contains("driver cgroupfs"),
        "{table}"
    );
    assert!(v["workloads"][0].get("unit").is_none());
    assert_eq!(v["workloads"][0]["name"], "web");
    assert_eq!(v["workloads"][0]["limits"]["memory_bytes"], 64 << 20);
    assert_eq!(v["workloads"][0]["heartbeat_status"], "running");
    assert!(v["agent"]["uptime_seconds"].is_u64());

    // SIGTERM: the agent exits cleanly, the workload keeps running, the socket is gone.
    let st = a.terminate().unwrap();
    assert!(st.success(), "{st:?}");
    assert!(!a.socket().exists());
    assert!(
        !a.cgroup_procs("web").is_empty(),
        "workload survives a graceful stop"
    );
}

/// Desired and actual converge whatever the timing (issue 13): a workload that ignores
/// SIGTERM is removed, then desired again while its stop still waits for the grace time.
fn a_workload_desired_again_during_its_stop_runs_again() {
    let stubborn = shell("stubborn", "trap '' TERM; while :; do sleep 1; done", "");
    let mut a = Agent::new(BIN, &desired(std::slice::from_ref(&stubborn)));
    a.start();
    let s = a.wait_for("stubborn running", Duration::from_secs(10), |s| {
        Agent::workload(s, "stubborn").is_some_and(|w| w.state == "running")
    });
    let first = Agent::workload(&s, "stubborn").unwrap().pid;
    a.set_desired("workloads: []\n");
    a.wait_for("stopping", Duration::from_secs(10), |s| {
        Agent::workload(s, "stubborn").is_some_and(|w| w.state == "stopping")
    });
    // Desired again while the stop waits out STOP_TIMEOUT (2 s in these tests).
    a.set_desired(&desired(&[stubborn]));
    let s = a.wait_for("running again", Duration::from_secs(20), |s| {
        Agent::workload(s, "stubborn")
            .is_some_and(|w| w.state == "running" && w.pid.is_some() && w.pid != first)
    });
    // And it stays so: no late removal.
    std::thread::sleep(Duration::from_secs(2));
    let again = a.status();
    assert_eq!(
        Agent::workload(&again, "stubborn").map(|w| (w.state.clone(), w.pid)),
        Agent::workload(&s, "stubborn").map(|w| (w.state.clone(), w.pid)),
        "{}",
        again.render()
    );
    assert!(
        a.cgroup_procs("stubborn")
            .contains(&Agent::workload(&s, "stubborn").unwrap().pid.unwrap()),
        "the new run lives in its cgroup"
    );
}

/// `run` re-executes itself once with glibc's per-thread cache off (src/heap.rs): the same
/// pid and name, the tunable added to the user's own GLIBC_TUNABLES, and none of it in a
/// workload's environment.
fn the_agent_runs_without_glibcs_thread_cache_and_its_workloads_never_see_that() {
    let mut a = Agent::new(BIN, &desired(&[shell("web", "exec sleep 100000", "")]));
    a.extra_env = vec![("GLIBC_TUNABLES".into(), "glibc.malloc.check=0".into())];
    a.start();
    let s = a.wait_for("web running", Duration::from_secs(10), |s| {
        Agent::workload(s, "web").is_some_and(|w| w.state == "running")
    });
    let agent_pid = a.child.as_ref().unwrap().id();
    assert_eq!(s.agent.pid, agent_pid, "re-executed in place");
    // Under its own name for ps, top and pgrep (not `exe`), cut as the kernel cuts it.
    let comm = std::fs::read_to_string(format!("/proc/{agent_pid}/comm")).unwrap();
    assert_eq!(comm.trim_end(), "device-worker-n");
    let environ = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/environ"))
            .unwrap()
            .split(|b| *b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect::<Vec<_>>()
    };
    // As the kernel got it at the exec (glibc then splits the value in place, at the ':').
    let agent_env = environ(agent_pid);
    assert!(
        agent_env
            .iter()
            .any(|v| v == "GLIBC_TUNABLES=glibc.malloc.check=0")
            && agent_env
                .iter()
                .any(|v| v.ends_with("glibc.malloc.tcache_count=0")),
        "{agent_env:?}"
    );
    let web = Agent::workload(&s, "web").unwrap().pid.unwrap() as u32;
    let web_env = environ(web);
    assert!(
        !web_env
            .iter()
            .any(|v| v.starts_with("GLIBC_TUNABLES") || v.starts_with("DEVICE_WORKER_NG_")),
        "{web_env:?}"
    );
    let st = a.terminate().unwrap();
    assert!(st.success(), "{st:?}\n{}", a.log());
}

/// SIGHUP re-reads the configuration file: a workload without limits gets the new
/// DEFAULT_LIMITS in place (same process, the cgroup's limit moved); SIGTERM still stops the
/// agent cleanly after a burst of SIGHUPs.
fn sighup_reloads_the_configuration_in_place() {
    use nix::sys::signal::Signal;
    let mut a = Agent::new(BIN, &desired(&[shell("web", "exec sleep 100000", "")]));
    let conf = a.dir.path().join("config.yaml");
    std::fs::write(&conf, "DEFAULT_LIMITS: memory=64Mi\n").unwrap();
    a.extra_args = vec!["--config".into(), conf.clone().into()];
    a.start();
    let limit = |s: &device_worker_ng::status::Snapshot| {
        Agent::workload(s, "web")
            .filter(|w| w.state == "running")
            .and_then(|w| Some((w.limits.memory_bytes?, w.pid?)))
    };
    let s = a.wait_for("web running with 64Mi", Duration::from_secs(10), |s| {
        limit(s).is_some_and(|(m, _)| m == 64 << 20)
    });
    let (_, pid) = limit(&s).unwrap();
    let in_cgroup = || {
        a.cgroup_file("web", "memory.limit_in_bytes")
            .parse::<u64>()
            .ok()
            .or_else(|| a.cgroup_file("web", "memory.max").parse().ok())
    };
    assert_eq!(in_cgroup(), Some(64 << 20));

    std::fs::write(&conf, "DEFAULT_LIMITS: memory=48Mi\n").unwrap();
    a.signal(Signal::SIGHUP);
    let s = a.wait_for(
        "web's default limit is 48Mi",
        Duration::from_secs(10),
        |s| limit(s).is_some_and(|(m, _)| m == 48 << 20),
    );
    assert_eq!(limit(&s).unwrap().1, pid, "not restarted");
    wait_until(
        "the cgroup's limit moved",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || in_cgroup() == Some(48 << 20),
    );
    assert!(
        a.log().contains("DEFAULT_LIMITS") || a.log().contains("reload"),
        "{}",
        a.log()
    );

    for _ in 0..5 {
        a.signal(Signal::SIGHUP);
    }
    let st = a.terminate().unwrap();
    assert!(st.success(), "{st:?}\n{}", a.log());
}
