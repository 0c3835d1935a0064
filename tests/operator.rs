//! Every device-worker-ng extension through a stock Flotta operator (issue 11): the mTLS test
//! server in its stock-operator delivery mode drops the extension fields, keeps only the
//! `podman/` labels and annotations (prefix stripped) and empties container `resources`, as
//! the real operator does; the EdgeWorkloads carry the extensions as annotations, and each
//! one is seen to take effect on the device. Root (and podman for the pods).

use std::process::Command;
use std::time::Duration;

use device_worker_ng::flotta::messages::DeviceConfigurationMessage;
use device_worker_ng::status::Snapshot;
use dwng_test_support::agent::Agent;
use dwng_test_support::flotta_server::{stock_operator, Delivery, FlottaTestServer, ServerOptions};
use dwng_test_support::harness::{self, test, Need, Needs, ROOT_CGROUPS};
use dwng_test_support::podman::{self, TEST_IMAGE as IMAGE};
use dwng_test_support::wait::wait_until;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_device-worker-ng");
const ID: &str = "edge-operator";
const POLL: Duration = Duration::from_millis(200);
const MI: u64 = 1 << 20;

/// Pods, one of them rootless (podman maps the user's subordinate ids with newuidmap).
const PODS: Needs = &[
    Need::Root,
    Need::Cgroups,
    Need::PodmanImage,
    Need::tool("newuidmap", "uidmap"),
];

fn main() {
    harness::main(&[
        test(
            "the_stock_operator_drops_what_the_real_one_drops",
            &[],
            the_stock_operator_drops_what_the_real_one_drops,
        ),
        test(
            "the_readme_s_edge_workloads_are_valid_through_a_stock_operator",
            &[],
            the_readme_s_edge_workloads_are_valid_through_a_stock_operator,
        ),
        test(
            "shell_cron_retry_priority_profile_and_limits_by_annotation",
            ROOT_CGROUPS,
            shell_cron_retry_priority_profile_and_limits_by_annotation,
        ),
        test(
            "rootless_and_limited_pods_by_annotation",
            PODS,
            rootless_and_limited_pods_by_annotation,
        ),
    ])
}

/// An EdgeWorkload as the fleet operator writes it: `type: pod`, a PodSpec, the extensions as
/// `podman/` annotations (the server's stock mode turns it into what the device receives).
fn edge_workload(name: &str, pod_spec: Value, annotations: &[(&str, String)]) -> Value {
    let annotations: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| {
            (
                format!("podman/device-worker-ng.{k}"),
                Value::from(v.as_str()),
            )
        })
        .collect();
    json!({"name": name, "namespace": "default", "annotations": annotations,
           "specification": serde_yaml_ng::to_string(&pod_spec).unwrap()})
}

/// A one-container PodSpec running `script` with `sh` (a shell workload's process).
fn process(script: &str, extra: Value) -> Value {
    let mut c = json!({"name": "main", "image": "ignored-by-shell-workloads",
                       "command": ["/bin/sh", "-c"], "args": [script]});
    if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
        c.extend(extra);
    }
    json!({"containers": [c]})
}

fn configuration(workloads: Vec<Value>) -> DeviceConfigurationMessage {
    serde_json::from_value(json!({
        "configuration": {"heartbeat": {"hardware_profile": {}, "period_seconds": 1}, "mounts": []},
        "workloads": workloads
    }))
    .unwrap()
}

fn the_stock_operator_drops_what_the_real_one_drops() {
    let sent: DeviceConfigurationMessage = serde_json::from_value(json!({
        "configuration": {"profiles": [{"name": "p", "conditions": [{"name": "c", "expression": "cpu > 1%"}]}]},
        "workloads": [{
            "name": "w", "kind": "shell", "cron": "@hourly", "rootless": true,
            "retry": {"backoff": "constantBackoff", "periodSeconds": 5},
            "profiles": [{"name": "p", "conditions": [{"name": "c"}]}],
            "labels": {"app": "w", "podman/tier": "edge"},
            "annotations": {"note": "x", "podman/device-worker-ng.kind": "shell"},
            "specification": "containers:\n- name: main\n  image: x\n  resources:\n    limits: {memory: 64Mi}\n"
        }]
    }))
    .unwrap();
    let got = stock_operator(sent).unwrap();
    assert!(got.configuration.profiles.is_empty());
    let w = &got.workloads[0];
    assert_eq!(
        (&w.kind, &w.cron, &w.rootless, &w.retry),
        (&None, &None, &None, &None)
    );
    assert!(w.profiles.is_empty());
    assert_eq!(
        serde_json::to_value(&w.labels).unwrap(),
        json!({"tier": "edge"})
    );
    assert_eq!(
        serde_json::to_value(&w.annotations).unwrap(),
        json!({"device-worker-ng.kind": "shell"})
    );
    // ghodss/yaml's PodSpec: sorted keys, `resources: {}`.
    assert_eq!(
        w.specification,
        "containers:\n- image: x\n  name: main\n  resources: {}\n"
    );
    // What no EdgeWorkload can say fails the test that says it.
    for bad in [
        json!({"name": "w", "annotations": {"podman/device-worker-ng/priority": "1"},
               "specification": "containers: [{name: a, image: x}]"}),
        json!({"name": "w", "labels": {"podman/device-worker-ng.priority": "-5"},
               "specification": "containers: [{name: a, image: x}]"}),
        json!({"name": "w", "specification": "command: [/bin/true]"}),
    ] {
        let cfg = serde_json::from_value(json!({"workloads": [bad]})).unwrap();
        assert!(stock_operator(cfg).is_err());
    }
}

/// README's "With the Flotta operator" EdgeWorkloads, as the device receives them.
fn the_readme_s_edge_workloads_are_valid_through_a_stock_operator() {
    use device_worker_ng::workload::{DesiredState, SpecDefaults, WorkloadKind};
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme
        .split("EdgeWorkloads, one per example")
        .nth(1)
        .and_then(|r| r.split("```yaml\n").nth(1))
        .and_then(|r| r.split("```").next())
        .expect("README's EdgeWorkload examples");
    let workloads: Vec<Value> = serde_yaml_ng::Deserializer::from_str(block)
        .map(|d| {
            let ew: Value = serde::Deserialize::deserialize(d).unwrap();
            assert_eq!(ew["kind"], "EdgeWorkload");
            assert_eq!(ew["spec"]["type"], "pod");
            json!({"name": ew["metadata"]["name"], "namespace": "default",
                   "labels": ew["metadata"].get("labels").cloned().unwrap_or(json!({})),
                   "annotations": ew["metadata"].get("annotations").cloned().unwrap_or(json!({})),
                   "specification": serde_yaml_ng::to_string(&ew["spec"]["pod"]["spec"]).unwrap()})
        })
        .collect();
    let delivered = stock_operator(configuration(workloads)).unwrap();
    let desired: DesiredState =
        serde_json::from_value(serde_json::to_value(&delivered).unwrap()).unwrap();
    let specs: Vec<_> = desired
        .validate(&SpecDefaults::default())
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("README's {e}")))
        .collect();
    let by = |n: &str| specs.iter().find(|s| s.name.as_str() == n).unwrap();
    assert_eq!(by("web").limits.memory_bytes, Some(96 * MI));
    assert_eq!(by("web").requests.memory_bytes, Some(32 * MI));
    assert_eq!(by("collector").kind, WorkloadKind::Shell);
    assert_eq!(
        by("collector").shell.as_ref().unwrap().user.as_deref(),
        Some("1000")
    );
    assert!(by("report").scheduling.cron.is_some());
    assert!(by("sandboxed").pod.as_ref().unwrap().rootless);
    assert_eq!((by("control").priority, by("batch").priority), (10, -5));
    assert_eq!(by("fan").scheduling.inline_profiles[0].name, "fan:thermal");
}

fn mem_total() -> u64 {
    let t = std::fs::read_to_string("/proc/meminfo").unwrap();
    device_worker_ng::sampler::parse_meminfo(&t).0
}

fn workload_state(s: &Snapshot, name: &str) -> String {
    Agent::workload(s, name).map_or("-".into(), |w| w.state.clone())
}

fn host_uid(pid: i32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX)
}

fn shell_cron_retry_priority_profile_and_limits_by_annotation() {
    let server = FlottaTestServer::start(ServerOptions {
        auto_approve_after: Some(1),
        delivery: Delivery::StockOperator,
        ..ServerOptions::default()
    });
    let mut a = Agent::new(BIN, "workloads: []\n");
    let runs = a.dir.path().join("cron-runs");
    let vars = a.dir.path().join("variables.yaml");
    // A workload budget of 160 MiB: three holders of 60 MB do not fit together.
    let reserved = mem_total() - 160 * MI;
    a.extra_env.extend(server.agent_env(ID));
    for (k, v) in [
        ("POLL_INTERVAL", "200ms".to_string()),
        ("SAMPLE_INTERVAL", "200ms".into()),
        ("RESERVED_MEMORY", reserved.to_string()),
        ("BUDGET_HOLD", "10m".into()),
        ("VARIABLES_FILE", vars.display().to_string()),
    ] {
        a.extra_env.push((format!("EDGE_DEVICE_{k}"), v));
    }
    let shell = || ("kind", "shell".to_string());
    let root = json!({"securityContext": {"runAsUser": 0}});
    let hold = "big=$(head -c 60000000 /dev/zero | tr '\\0' x); sleep 600";
    let holder = |name: &str, priority: &str| {
        edge_workload(
            name,
            process(hold, root.clone()),
            &[
                shell(),
                ("priority", priority.into()),
                (
                    "resources",
                    r#"{"limits": {"memory": "200Mi"}, "requests": {"memory": "8Mi"}}"#.into(),
                ),
            ],
        )
    };
    server.set_configuration(
        ID,
        configuration(vec![
            edge_workload(
                "app",
                process(
                    "echo started as $(id -u) in $(pwd) mode=$MODE; sleep 600",
                    json!({"env": [{"name": "MODE", "value": "edge"}], "workingDir": "/tmp",
                           "securityContext": {"runAsUser": 4242}}),
                ),
                &[
                    shell(),
                    (
                        "resources",
                        "limits: {memory: 32Mi, cpu: 200m, pids: 16}\nrequests: {memory: 8Mi}"
                            .into(),
                    ),
                ],
            ),
            edge_workload("plain", process("sleep 600", json!({})), &[shell()]),
            edge_workload(
                "job",
                process(&format!("date +%s >> {}", runs.display()), root.clone()),
                &[shell(), ("cron", "@every 2s".into())],
            ),
            edge_workload(
                "failing",
                process("exit 3", json!({})),
                &[
                    shell(),
                    (
                        "retry",
                        r#"{"backoff": "constantBackoff", "periodSeconds": 30}"#.into(),
                    ),
                ],
            ),
            edge_workload(
                "gated",
                process("sleep 600", json!({})),
                &[
                    shell(),
                    (
                        "profiles",
                        "[{name: env, conditions: [{name: cool, expression: 'temperature < 70'}]}]"
                            .into(),
                    ),
                ],
            ),
            // Oldest first: among equal priorities the newest would be evicted first.
            holder("expendable", "-5"),
            holder("normal", "5"),
            holder("important", "10"),
        ]),
    );
    a.start();

    // Priority: over the budget, the lowest priority goes, not the newest.
    let s = a.wait_for("expendable evicted", Duration::from_secs(60), |s| {
        workload_state(s, "expendable") == "evicted"
            && workload_state(s, "important") == "running"
            && workload_state(s, "normal") == "running"
    });
    let pids =
        |s: &Snapshot| ["important", "normal"].map(|n| Agent::workload(s, n).and_then(|w| w.pid));
    let before = pids(&s);
    assert_eq!(Agent::workload(&s, "expendable").unwrap().priority, -5);

    // The shell workload from a PodSpec: command, args, env, workingDir, runAsUser, limits.
    let app = Agent::workload(&s, "app").unwrap();
    assert_eq!(
        (app.kind.as_str(), app.state.as_str()),
        ("shell", "running")
    );
    assert_eq!(host_uid(app.pid.unwrap()), 4242, "runAsUser");
    assert_eq!(app.limits.memory_bytes, Some(32 * MI));
    assert_eq!(app.limits.cpu_millicores, Some(200));
    assert_eq!(app.limits.pids, Some(16));
    assert_eq!(a.cgroup_file("app", "pids.max"), "16");
    let log = std::path::PathBuf::from(app.log.clone().unwrap());
    wait_until("app's output", Duration::from_secs(10), POLL, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("started as 4242 in /tmp mode=edge")
    });

    // DEFAULT_LIMITS for the workload that declares none: half the budget, 1024 pids.
    let plain = Agent::workload(&s, "plain").unwrap();
    assert_eq!(plain.default_limits.memory_bytes, Some(80 * MI));
    assert_eq!(plain.default_limits.pids, Some(1024));
    assert_eq!(plain.limits.memory_bytes, Some(80 * MI));
    assert_eq!(a.cgroup_file("plain", "pids.max"), "1024");
    assert!(
        s.render().contains("* DEFAULT_LIMITS"),
        "status says which limits are defaults:\n{}",
        s.render()
    );

    // Retry: the annotation's constant 30 s, not RESTART_BACKOFF_INITIAL's 200 ms.
    let s = a.wait_for("failing backs off", Duration::from_secs(10), |s| {
        workload_state(s, "failing") == "backoff"
    });
    let reason = &Agent::workload(&s, "failing").unwrap().reason;
    assert!(
        reason.contains("exited with code 3; restart 1 in 30.0s"),
        "{reason}"
    );

    // Cron: runs every 2 s and waits in between.
    wait_until("two cron runs", Duration::from_secs(15), POLL, || {
        std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .count()
            >= 2
    });

    // The workload's own profile: waits without the variable, runs once it holds.
    let s = a.status();
    let gated = Agent::workload(&s, "gated").unwrap();
    assert_eq!(gated.state, "pending", "{}", gated.reason);
    assert!(gated.reason.contains("gated:env"), "{}", gated.reason);
    std::fs::write(&vars, "temperature: 50\n").unwrap();
    let s = a.wait_for("gated runs while cool", Duration::from_secs(15), |s| {
        workload_state(s, "gated") == "running"
    });
    assert!(s.profiles.conditions["gated:env"]["cool"]);

    assert_eq!(pids(&a.status()), before, "the higher priorities untouched");
}

fn podman_field(args: &[&str]) -> String {
    let o = Command::new("podman").args(args).output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

struct PodGuard(&'static str);

impl Drop for PodGuard {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["pod", "rm", "-f", self.0])
            .output();
    }
}

fn rootless_and_limited_pods_by_annotation() {
    let (user, uid) =
        podman::rootless_user().unwrap_or_else(|why| panic!("the rootless user: {why}"));
    let server = FlottaTestServer::start(ServerOptions {
        auto_approve_after: Some(1),
        delivery: Delivery::StockOperator,
        ..ServerOptions::default()
    });
    let mut a = Agent::new(BIN, "workloads: []\n");
    let _guard = PodGuard("op-limited");
    a.extra_env.extend(server.agent_env(ID));
    a.extra_env
        .push(("EDGE_DEVICE_POLL_INTERVAL".into(), "300ms".into()));
    a.extra_env
        .push(("EDGE_DEVICE_ROOTLESS_USER".into(), user.clone()));
    let sleeper = json!({"containers": [{"name": "app", "image": IMAGE,
                                        "command": ["sh", "-c", "sleep 600"]}]});
    server.set_configuration(
        ID,
        configuration(vec![
            edge_workload(
                "op-limited",
                sleeper.clone(),
                &[(
                    "resources.app",
                    r#"{"limits": {"memory": "32Mi", "cpu": "250m"}, "requests": {"memory": "16Mi"}}"#
                        .into(),
                )],
            ),
            edge_workload("op-rootless", sleeper, &[("rootless", "true".into())]),
        ]),
    );
    a.start();
    let s = a.wait_for("both pods running", Duration::from_secs(120), |s| {
        workload_state(s, "op-limited") == "running"
            && workload_state(s, "op-rootless") == "running"
    });

    // The container's own limit is podman's (from the annotation); the pod's cgroup holds
    // the containers' sum plus the pod's overhead, and status says so.
    assert_eq!(
        podman_field(&[
            "inspect",
            "--format",
            "{{.HostConfig.Memory}} {{.HostConfig.CpuQuota}}",
            "op-limited-app"
        ]),
        format!("{} 25000", 32 * MI)
    );
    let w = Agent::workload(&s, "op-limited").unwrap();
    assert_eq!(w.limits.memory_bytes, Some(64 * MI));
    assert_eq!(w.pod_overhead_bytes, Some(32 * MI));
    assert!(
        s.render().contains("/32.0Mi+32.0Mi"),
        "the overhead is shown:\n{}",
        s.render()
    );

    // Rootless: the container's root is the configured user on the host.
    let r = Agent::workload(&s, "op-rootless").unwrap();
    assert_eq!(host_uid(r.pid.unwrap()), uid, "runs as {user}");

    server.set_configuration(ID, configuration(vec![]));
    a.wait_for("removed", Duration::from_secs(60), |s| {
        s.workloads.is_empty()
    });
    let gone = || {
        !Command::new("runuser")
            .args(["-u", &user, "--", "env"])
            .arg(format!("XDG_RUNTIME_DIR=/run/user/{uid}"))
            .args(["podman", "pod", "exists", "op-rootless"])
            .current_dir("/")
            .status()
            .is_ok_and(|s| s.success())
    };
    wait_until(
        "the rootless pod is gone",
        Duration::from_secs(30),
        POLL,
        gone,
    );
}
