//! Issue 5 on the host's real cgroups: admission by requests against the device budget,
//! over-budget eviction by priority with re-admission, device profiles starting and stopping
//! a workload, cron runs; issue 15: an eviction caused by a kernel notification while the
//! sampler's period is 30 s. Root only.

use std::time::{Duration, Instant};

use dwng_test_support::agent::Agent;
use dwng_test_support::harness::{self, test, ROOT_CGROUPS};
use dwng_test_support::wait::poll_until;

const BIN: &str = env!("CARGO_BIN_EXE_device-worker-ng");

fn main() {
    harness::main(&[
        test(
            "admission_waits_for_room_in_the_budget",
            ROOT_CGROUPS,
            admission_waits_for_room_in_the_budget,
        ),
        test(
            "over_budget_evicts_the_lowest_priority_and_readmits_it_later",
            ROOT_CGROUPS,
            over_budget_evicts_the_lowest_priority_and_readmits_it_later,
        ),
        test(
            "a_kernel_notification_evicts_while_the_sampler_sleeps",
            ROOT_CGROUPS,
            a_kernel_notification_evicts_while_the_sampler_sleeps,
        ),
        test(
            "a_profile_condition_starts_and_stops_its_workload",
            ROOT_CGROUPS,
            a_profile_condition_starts_and_stops_its_workload,
        ),
        test(
            "cron_runs_on_schedule_and_never_twice_at_once",
            ROOT_CGROUPS,
            cron_runs_on_schedule_and_never_twice_at_once,
        ),
        test(
            "a_profile_quota_limits_cpu_while_its_condition_holds",
            ROOT_CGROUPS,
            a_profile_quota_limits_cpu_while_its_condition_holds,
        ),
    ])
}

fn mem_total() -> u64 {
    let t = std::fs::read_to_string("/proc/meminfo").unwrap();
    device_worker_ng::sampler::parse_meminfo(&t).0
}

/// An agent whose workload budget is `budget_mib` of memory.
fn agent_with_budget(desired: &str, budget_mib: u64) -> Agent {
    let mut a = Agent::new(BIN, desired);
    let reserved = mem_total() - (budget_mib << 20);
    a.extra_env
        .push(("EDGE_DEVICE_RESERVED_MEMORY".into(), reserved.to_string()));
    a.extra_env
        .push(("EDGE_DEVICE_SAMPLE_INTERVAL".into(), "200ms".into()));
    a
}

fn workload(name: &str, command: &str, priority: i32, resources: &str) -> String {
    format!(
        "  - name: {name}\n    kind: shell\n    labels: {{device-worker-ng/priority: \"{priority}\"}}\n    specification: |\n      command: [\"/bin/sh\", \"-c\", {command:?}]\n      user: root\n      resources:\n{resources}"
    )
}

fn admission_waits_for_room_in_the_budget() {
    let req = "        requests: {memory: 60Mi}\n";
    let a_w = workload("first", "sleep 600", 0, req);
    let b_w = workload("second", "sleep 600", 0, req);
    let mut a = agent_with_budget(&format!("workloads:\n{a_w}{b_w}"), 100);
    a.start();
    let s = a.wait_for("one admitted, one pending", Duration::from_secs(10), |s| {
        Agent::workload(s, "first").is_some_and(|w| w.state == "running")
            && Agent::workload(s, "second").is_some_and(|w| w.state == "pending")
    });
    // All workloads together are capped by the kernel at the budget (cpu) and the budget plus
    // half the reservation (memory): the OS and the agent keep the rest whatever they do.
    let parent = a.hierarchy().workloads_parent();
    let reserved = mem_total() - (100 << 20);
    let want_mem = (100u64 << 20) + reserved / 2;
    let read_caps = || {
        let read = |d: &std::path::Path, f: &str| {
            std::fs::read_to_string(d.join(f))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        match &parent {
            device_worker_ng::cgroup::WorkloadCgroup::V1 { memory, cpu, .. } => (
                read(memory, "memory.limit_in_bytes"),
                read(cpu, "cpu.cfs_quota_us")
                    .parse::<u64>()
                    .is_ok_and(|q| q > 0),
            ),
            device_worker_ng::cgroup::WorkloadCgroup::V2 { dir, .. } => (
                read(dir, "memory.max"),
                !read(dir, "cpu.max").starts_with("max"),
            ),
        }
    };
    let (mem_file, cpu_ok) = poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
        let (m, c) = read_caps();
        m.parse::<u64>().is_ok().then_some((m, c))
    })
    .unwrap_or_else(read_caps);
    let got: u64 = mem_file.parse().unwrap();
    // The kernel rounds limits to pages.
    assert!(got.abs_diff(want_mem) < 8192, "cap {got}, want {want_mem}");
    assert!(cpu_ok, "cpu capped at the budget");
    let reason = &Agent::workload(&s, "second").unwrap().reason;
    assert!(
        reason.contains("needs 60.0Mi memory, 40.0Mi free"),
        "{reason}"
    );
    // Room appears: the waiting workload is admitted by itself.
    a.set_desired(&format!("workloads:\n{b_w}"));
    a.wait_for("second admitted", Duration::from_secs(10), |s| {
        Agent::workload(s, "second").is_some_and(|w| w.state == "running")
    });
}

fn over_budget_evicts_the_lowest_priority_and_readmits_it_later() {
    // Each holds about 70 MB; the budget is 160 MiB: the three together do not fit.
    let hold = "big=$(head -c 70000000 /dev/zero | tr '\\0' x); sleep 600";
    let res = "        requests: {memory: 8Mi}\n        limits: {memory: 200Mi}\n";
    let desired = format!(
        "workloads:\n{}{}{}",
        workload("important", hold, 10, res),
        workload("normal", hold, 5, res),
        workload("expendable", hold, 0, res)
    );
    let mut a = agent_with_budget(&desired, 160);
    a.extra_env
        .push(("EDGE_DEVICE_BUDGET_HOLD".into(), "2s".into()));
    a.start();
    let t = Instant::now();
    let s = a.wait_for("expendable evicted", Duration::from_secs(30), |s| {
        Agent::workload(s, "expendable").is_some_and(|w| w.state == "evicted")
    });
    eprintln!("evicted {:?} after the agent started", t.elapsed());
    assert!(s
        .transitions
        .iter()
        .any(|t| t.machine == "device" && t.to == "over-budget"));
    let w = Agent::workload(&s, "expendable").unwrap();
    assert!(w.reason.contains("over budget"), "{}", w.reason);
    // The higher priorities still run the processes they started with (the kernel's
    // notification can evict before a first look at the status shows all three running).
    for name in ["important", "normal"] {
        let machine = format!("workload/{name}");
        let started = s
            .transitions
            .iter()
            .find(|t| t.machine == machine && t.from == "starting" && t.to == "running")
            .map(|t| t.reason.clone());
        let now = Agent::workload(&s, name).and_then(|w| w.pid);
        assert_eq!(
            started,
            now.map(|p| format!("pid {p}")),
            "{name} is untouched"
        );
        assert!(
            !s.transitions
                .iter()
                .any(|t| t.machine == machine && t.to == "stopping"),
            "{name} was never stopped"
        );
    }
    // Usage is now under the low watermark: after the hold time it is admitted again.
    a.wait_for("expendable re-admitted", Duration::from_secs(30), |s| {
        s.transitions.iter().any(|t| {
            t.machine == "workload/expendable" && t.from == "evicted" && t.to == "starting"
        })
    });
}

fn a_kernel_notification_evicts_while_the_sampler_sleeps() {
    // The agent samples once at start and then every 30 s: an eviction within seconds of the
    // breach cannot have come from its sampling period.
    let hold = |mb: u32| format!("big=$(head -c {mb}000000 /dev/zero | tr '\\0' x); sleep 600");
    // The budget, not DEFAULT_LIMITS (half of it), is what the spike must run into.
    let res = "        requests: {memory: 8Mi}\n        limits: {memory: 200Mi}\n";
    let steady = workload("steady", &hold(40), 10, res);
    let mut a = agent_with_budget(&format!("workloads:\n{steady}"), 100);
    a.extra_env
        .push(("EDGE_DEVICE_SAMPLE_INTERVAL".into(), "30s".into()));
    a.start();
    let started = Instant::now();
    let s = a.wait_for("steady running", Duration::from_secs(10), |s| {
        Agent::workload(s, "steady").is_some_and(|w| w.state == "running")
    });
    let steady_pid = Agent::workload(&s, "steady").unwrap().pid;
    // Let it hold its memory (a fraction of a second) before the spike.
    std::thread::sleep(Duration::from_secs(1));
    let spike = workload("spike", &hold(80), 0, res);
    a.set_desired(&format!("workloads:\n{steady}{spike}"));
    let s = a.wait_for("spike evicted", Duration::from_secs(15), |s| {
        Agent::workload(s, "spike").is_some_and(|w| w.state == "evicted")
    });
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "evicted only after {:?}: the sampler's period, not a notification",
        started.elapsed()
    );
    assert_eq!(
        Agent::workload(&s, "steady").unwrap().pid,
        steady_pid,
        "the higher priority is untouched"
    );
    let log = a.log();
    assert!(
        log.contains("kernel alert: sampling now alert=MemoryMark(Budget)")
            || log.contains("kernel alert: sampling now alert=MemoryMark(NearBudget)"),
        "no memory notification in the log:\n{log}"
    );
}

/// An agent reading profile variables from its own VARIABLES_FILE, sampling fast.
fn agent_with_variables(desired: &str) -> (Agent, std::path::PathBuf) {
    let mut a = Agent::new(BIN, desired);
    let vars = a.dir.path().join("variables.yaml");
    a.extra_env.push((
        "EDGE_DEVICE_VARIABLES_FILE".into(),
        vars.display().to_string(),
    ));
    a.extra_env
        .push(("EDGE_DEVICE_SAMPLE_INTERVAL".into(), "200ms".into()));
    (a, vars)
}

/// Feeds `temperature` like a probe would: the file replaced atomically.
fn set_temperature(vars: &std::path::Path, t: u32) {
    let tmp = vars.with_extension("tmp");
    std::fs::write(&tmp, format!("temperature: {t}\n")).unwrap();
    std::fs::rename(&tmp, vars).unwrap();
}

fn a_profile_condition_starts_and_stops_its_workload() {
    let desired = "configuration:\n  profiles:\n  - name: env\n    conditions:\n    - {name: cool, expression: 'temperature < 70 && memory < 90%'}\nworkloads:\n  - name: fan-sensitive\n    kind: shell\n    profiles: [{name: env, conditions: [{name: cool}]}]\n    specification: |\n      command: [/bin/sleep, '600']\n      user: root\n";
    let (mut a, vars) = agent_with_variables(desired);
    let write = |t: u32| set_temperature(&vars, t);
    a.start();
    // No temperature yet: the condition is false (missing variable), the workload waits.
    let s = a.wait_for("waiting for its profile", Duration::from_secs(10), |s| {
        Agent::workload(s, "fan-sensitive").is_some_and(|w| w.state == "pending")
    });
    assert!(
        Agent::workload(&s, "fan-sensitive")
            .unwrap()
            .reason
            .contains("profile"),
        "{}",
        s.render()
    );
    write(50);
    let s = a.wait_for("running while cool", Duration::from_secs(10), |s| {
        Agent::workload(s, "fan-sensitive").is_some_and(|w| w.state == "running")
    });
    assert!(s.profiles.conditions["env"]["cool"]);
    write(80);
    a.wait_for("stopped while hot", Duration::from_secs(10), |s| {
        Agent::workload(s, "fan-sensitive").is_some_and(|w| w.state == "evicted")
    });
    write(55);
    a.wait_for("running again", Duration::from_secs(10), |s| {
        Agent::workload(s, "fan-sensitive").is_some_and(|w| w.state == "running")
    });
}

fn cron_runs_on_schedule_and_never_twice_at_once() {
    let mut a = Agent::new(BIN, "");
    let out = a.dir.path().join("runs");
    let cmd = format!("date +%s >> {}; sleep 3", out.display());
    a.set_desired(&format!(
        "workloads:\n  - name: job\n    kind: shell\n    cron: '@every 2s'\n    specification: |\n      command: [\"/bin/sh\", \"-c\", {cmd:?}]\n      user: root\n"
    ));
    a.start();
    let s = a.wait_for("job waiting for its time", Duration::from_secs(5), |s| {
        Agent::workload(s, "job").is_some()
    });
    assert!(Agent::workload(&s, "job").is_some());
    std::thread::sleep(Duration::from_secs(11));
    let runs = std::fs::read_to_string(&out).unwrap_or_default();
    let n = runs.lines().count();
    // Every 2 s, but each run takes 3 s: runs do not overlap, so at most every 4 s.
    assert!((2..=4).contains(&n), "{n} runs: {runs}\n{}", a.log());
    assert!(
        a.log().contains("previous run is still going"),
        "{}",
        a.log()
    );
}

fn a_profile_quota_limits_cpu_while_its_condition_holds() {
    // Always allowed (one of the two conditions is always true); only 'hot' carries a quota.
    let desired = "configuration:\n  profiles:\n  - name: thermal\n    conditions:\n    - {name: hot, expression: 'temperature >= 60'}\n    - {name: cool, expression: 'temperature < 60'}\nworkloads:\n  - name: worker\n    kind: shell\n    profiles: [{name: thermal, conditions: [{name: hot, cpu: {cpu: 20000}}, {name: cool}]}]\n    specification: |\n      command: [/bin/sleep, '600']\n      user: root\n";
    let (mut a, vars) = agent_with_variables(desired);
    let write = |t: u32| set_temperature(&vars, t);
    write(40);
    a.start();
    let s = a.wait_for("running while cool", Duration::from_secs(10), |s| {
        Agent::workload(s, "worker").is_some_and(|w| w.state == "running")
    });
    let pid = Agent::workload(&s, "worker").unwrap().pid;
    let quota = || {
        let q = a.cgroup_file("worker", "cpu.cfs_quota_us");
        if q.is_empty() {
            a.cgroup_file("worker", "cpu.max")
        } else {
            q
        }
    };
    assert!(quota() == "-1" || quota().starts_with("max"), "{}", quota());
    let quota_becomes = |done: &dyn Fn(&str) -> bool| {
        let q = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
            Some(quota()).filter(|q| done(q))
        });
        assert!(q.is_some(), "quota {}", quota());
    };
    write(75);
    quota_becomes(&|q| q == "20000" || q == "20000 100000");
    write(45);
    quota_becomes(&|q| q == "-1" || q.starts_with("max"));
    assert_eq!(
        Agent::workload(&a.status(), "worker").unwrap().pid,
        pid,
        "changed in place"
    );
}
