//! The k8s (MicroShift) driver against the fake Kubernetes API server
//! (tests/support/fake_kube.rs, which follows what a real API server was seen doing:
//! KUBE-API.md). No Kubernetes can run on the test machines (TESTBED.md): these tests check
//! the driver against that behaviour, not against a live MicroShift. No root needed.
//! The `defectN_` tests are issue 16's defects; tests/agent_k8s.rs has those that need the
//! whole agent.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_worker_ng::cgroup::{Hierarchy, Layout};
use device_worker_ng::drivers::k8s::{self, Health, K8sDriver, K8sError, K8sSettings};
use device_worker_ng::drivers::{
    watch, Driver, DriverSettings, Drivers, Placement, Run, RunEnd, Started,
};
use device_worker_ng::workload::{
    parse_desired, BackoffPolicy, DesiredSecret, SpecDefaults, WorkloadName, WorkloadSpec,
};
use dwng_test_support::fake_kube::{Container, FakeKube, Node, TOKEN};
use dwng_test_support::harness::{self, test};
use dwng_test_support::wait::wait_until;
use serde_json::Value;

fn main() {
    harness::main(&[
        test(
            "a_workload_is_applied_then_followed_until_available",
            &[],
            a_workload_is_applied_then_followed_until_available,
        ),
        test(
            "removal_and_pruning_delete_only_what_carries_our_label",
            &[],
            removal_and_pruning_delete_only_what_carries_our_label,
        ),
        test(
            "the_watch_reports_crashes_restarts_and_stops",
            &[],
            the_watch_reports_crashes_restarts_and_stops,
        ),
        test(
            "api_errors_have_clear_typed_reasons",
            &[],
            api_errors_have_clear_typed_reasons,
        ),
        test(
            "the_driver_dispatch_runs_k8s_workloads_without_a_process",
            &[],
            the_driver_dispatch_runs_k8s_workloads_without_a_process,
        ),
        test(
            "k8s_specs_are_validated_like_pods_plus_deployment_rules",
            &[],
            k8s_specs_are_validated_like_pods_plus_deployment_rules,
        ),
        test(
            "defect1_the_watch_follows_the_cluster_with_its_reasons",
            &[],
            defect1_the_watch_follows_the_cluster_with_its_reasons,
        ),
        test(
            "defect2_a_role_in_the_workloads_namespace_is_enough",
            &[],
            defect2_a_role_in_the_workloads_namespace_is_enough,
        ),
        test(
            "defect2_an_agent_restarted_with_a_namespaced_role_adopts_and_prunes",
            &[],
            defect2_an_agent_restarted_with_a_namespaced_role_adopts_and_prunes,
        ),
        test(
            "defect4_nothing_of_a_refused_workload_reaches_the_cluster",
            &[],
            defect4_nothing_of_a_refused_workload_reaches_the_cluster,
        ),
        test(
            "defect6_a_stop_honours_the_pods_grace_period",
            &[],
            defect6_a_stop_honours_the_pods_grace_period,
        ),
        test(
            "defect6_a_rollout_past_its_deadline_is_a_reason_not_a_crash",
            &[],
            defect6_a_rollout_past_its_deadline_is_a_reason_not_a_crash,
        ),
        test(
            "defect7_a_missing_namespace_is_named_and_never_created",
            &[],
            defect7_a_missing_namespace_is_named_and_never_created,
        ),
        test(
            "defect8_a_rotated_credential_reaches_running_watches",
            &[],
            defect8_a_rotated_credential_reaches_running_watches,
        ),
    ])
}

const MANAGER_QUERY: &str = "device-worker-ng";

fn defaults() -> SpecDefaults {
    SpecDefaults {
        workload_user: Some("nobody".into()),
        backoff: BackoffPolicy::default(),
        ..Default::default()
    }
}

/// A k8s workload `name` in `ns` using ConfigMap `<name>-config` and Secret `shared-creds`;
/// `extra` is appended to its PodSpec.
fn workload_with(
    name: &str,
    ns: &str,
    image: &str,
    extra: &str,
) -> (WorkloadSpec, Vec<DesiredSecret>) {
    let doc = format!(
        r#"
workloads:
- name: {name}
  namespace: {ns}
  kind: microshift
  labels: {{app: {name}}}
  configmaps:
  - "apiVersion: v1\ndata:\n  LOG_LEVEL: debug\nkind: ConfigMap\nmetadata:\n  creationTimestamp: null\n  name: {name}-config\n"
  specification: |
    containers:
    - name: app
      image: {image}
      envFrom:
      - configMapRef: {{name: {name}-config}}
      env:
      - name: PASSWORD
        valueFrom: {{secretKeyRef: {{name: shared-creds, key: password}}}}
      resources:
        limits: {{memory: 64Mi, cpu: 250m}}
        requests: {{memory: 32Mi, cpu: 100m}}
{extra}
secrets:
- name: shared-creds
  data: '{{"password":"c2VjcmV0"}}'
- name: unrelated
  data: '{{"x":"eA=="}}'
"#,
        extra = extra
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    );
    let desired = parse_desired(&doc).unwrap();
    let spec = desired
        .validate(&defaults())
        .remove(0)
        .unwrap_or_else(|e| panic!("{e}"));
    (spec, desired.secrets)
}

fn workload(name: &str, ns: &str, image: &str) -> (WorkloadSpec, Vec<DesiredSecret>) {
    workload_with(name, ns, image, "")
}

fn driver(kubeconfig: PathBuf) -> Arc<K8sDriver> {
    Arc::new(K8sDriver::new(K8sSettings {
        kubeconfig: Some(kubeconfig),
        poll_interval: Duration::from_millis(50),
        timeouts: k8s::ApiTimeouts {
            connect: Duration::from_secs(2),
            request: Duration::from_secs(5),
        },
    }))
}

/// Applies; the run is then watched (the fake's controllers act by themselves).
fn start(d: &Arc<K8sDriver>, spec: &WorkloadSpec, secrets: &[DesiredSecret]) -> Started {
    d.start_workload(spec, secrets)
        .unwrap_or_else(|e| panic!("start: {e}"))
}

/// Awaits the run's end on a thread, as the agent does on its reactor; every progress
/// report (ready, reason) arrives on the receiver.
fn watch(started: Started) -> (std::thread::JoinHandle<RunEnd>, Receiver<(bool, String)>) {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        smol::block_on(watch::until_end(started.watch, move |ready, reason| {
            let _ = tx.send((ready, reason));
        }))
    });
    (h, rx)
}

/// Waits (10 s at most) for a progress report that satisfies `want`; returns it.
fn until_progress(
    rx: &Receiver<(bool, String)>,
    what: &str,
    want: impl Fn(bool, &str) -> bool,
) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok((ready, reason)) => {
                if want(ready, &reason) {
                    return (ready, reason);
                }
                seen.push((ready, reason));
            }
            Err(_) => break,
        }
    }
    panic!("no progress report {what}; seen: {seen:?}");
}

/// The run's end, within 10 s.
fn end_of(h: std::thread::JoinHandle<RunEnd>) -> RunEnd {
    wait_until(
        "the watch ends",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || h.is_finished(),
    );
    h.join().unwrap()
}

fn wait_health(d: &K8sDriver, name: &str, what: &str, want: impl Fn(&Health) -> bool) -> Health {
    let mut last = None;
    let found = dwng_test_support::wait::poll_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || {
            let h = d.health(name).ok()?;
            if want(&h) {
                return Some(h);
            }
            last = Some(h);
            None
        },
    );
    found.unwrap_or_else(|| panic!("{name} never {what}; last: {last:?}"))
}

fn rv(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn a_workload_is_applied_then_followed_until_available() {
    let fake = FakeKube::start();
    fake.create_namespace("edge");
    let d = driver(fake.kubeconfig(None));
    let (spec, secrets) = workload("web", "edge", "quay.io/x/web:1");
    assert_eq!(spec.requests.memory_bytes, Some(32 << 20));
    assert_eq!(spec.requests.cpu_millicores, Some(100));
    assert_eq!(spec.limits.memory_bytes, Some(64 << 20));

    let started = start(&d, &spec, &secrets);
    assert!(fake.get("deployments", "edge", "web").is_some());
    assert_eq!(started.pid, None, "no local process");
    assert!(started
        .notice
        .as_deref()
        .unwrap()
        .contains("no local process"));
    wait_health(&d, "web", "runs", |h| *h == Health::Running);

    // What went over the wire: server-side apply, our field manager, force; everything
    // validated by the server (dry run) before anything is stored.
    let applies: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    let paths: Vec<(&str, bool)> = applies
        .iter()
        .map(|r| (r.path.as_str(), r.query.contains_key("dryRun")))
        .collect();
    let order = [
        "/api/v1/namespaces/edge/configmaps/web-config",
        "/api/v1/namespaces/edge/secrets/shared-creds",
        "/apis/apps/v1/namespaces/edge/deployments/web",
    ];
    let want: Vec<(&str, bool)> = order
        .iter()
        .map(|p| (*p, true))
        .chain(order.iter().map(|p| (*p, false)))
        .collect();
    assert_eq!(
        paths, want,
        "dry runs, then ConfigMaps and Secrets before the Deployment; the unreferenced secret not at all"
    );
    for r in &applies {
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
        assert_eq!(
            r.query.get("fieldManager").map(String::as_str),
            Some(MANAGER_QUERY)
        );
        assert_eq!(r.query.get("force").map(String::as_str), Some("true"));
        assert_eq!(r.status, 201);
    }
    let dep = fake.get("deployments", "edge", "web").unwrap();
    assert_eq!(
        dep["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "device-worker-ng"
    );
    assert_eq!(
        dep["metadata"]["labels"]["device-worker-ng/workload"],
        "web"
    );
    assert_eq!(dep["spec"]["replicas"], 1);
    assert_eq!(dep["spec"]["template"]["spec"]["restartPolicy"], "Always");
    assert_eq!(dep["spec"]["template"]["metadata"]["labels"]["app"], "web");
    assert_eq!(dep["metadata"]["generation"], 1);
    let secret = fake.get("secrets", "edge", "shared-creds").unwrap();
    assert_eq!(secret["data"]["password"], "c2VjcmV0");
    assert_eq!(secret["type"], "Opaque");
    let cm = fake.get("configmaps", "edge", "web-config").unwrap();
    assert_eq!(cm["data"]["LOG_LEVEL"], "debug");
    assert!(fake.get("secrets", "edge", "unrelated").is_none());

    // Others' fields survive the agent's apply (server-side apply merges).
    fake.edit(
        "configmaps",
        "edge",
        "web-config",
        "kubectl-edit",
        serde_json::json!({"data": {"EXTRA": "by hand"}}),
    );
    // The same spec again: no change, no new resourceVersion, no new generation.
    let before = rv(&fake.get("deployments", "edge", "web").unwrap());
    start(&d, &spec, &secrets);
    let same = fake.get("deployments", "edge", "web").unwrap();
    assert_eq!(rv(&same), before);
    assert_eq!(same["metadata"]["generation"], 1);
    assert_eq!(
        fake.get("configmaps", "edge", "web-config").unwrap()["data"]["EXTRA"],
        "by hand"
    );

    // An update changes the object in place: new generation, deploying until rolled out.
    let (v2, _) = workload("web", "edge", "quay.io/x/web:2");
    assert_ne!(v2.fingerprint, spec.fingerprint);
    start(&d, &v2, &secrets);
    let updated = fake.get("deployments", "edge", "web").unwrap();
    assert_eq!(updated["metadata"]["generation"], 2);
    assert!(rv(&updated) > before);
    assert_eq!(updated["metadata"]["uid"], same["metadata"]["uid"]);
    assert_eq!(
        updated["spec"]["template"]["spec"]["containers"][0]["image"],
        "quay.io/x/web:2"
    );
    wait_health(&d, "web", "runs the update", |h| *h == Health::Running);
    let pods = fake.pods_of("edge", "web");
    assert_eq!(pods.len(), 1, "Recreate: the old pod is gone");
    assert_eq!(pods[0]["spec"]["containers"][0]["image"], "quay.io/x/web:2");
}

fn removal_and_pruning_delete_only_what_carries_our_label() {
    let fake = FakeKube::start();
    fake.create_namespace("edge");
    let d = driver(fake.kubeconfig(Some(TOKEN)));
    // Someone else's objects, one with the same name as ours would be.
    fake.put(
        "configmaps",
        "edge",
        serde_json::json!({"metadata": {"name": "foreign", "labels": {"app": "x"}}, "data": {}}),
    );
    fake.put(
        "deployments",
        "edge",
        serde_json::json!({"metadata": {"name": "theirs", "labels": {"device-worker-ng/workload": "theirs"}},
                           "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "theirs"}},
                                    "template": {"metadata": {"labels": {"app": "theirs"}},
                                                 "spec": {"containers": [{"name": "c", "image": "x"}]}}}}),
    );
    let (a, secrets) = workload("a", "edge", "img:1");
    let (b, _) = workload("b", "edge", "img:1");
    for s in [&a, &b] {
        start(&d, s, &secrets);
    }
    d.desire(
        [&a, &b]
            .iter()
            .map(|s| (s.name.to_string(), s.pod.as_ref().unwrap().manifest.clone()))
            .collect(),
    );
    assert!(d.prune().unwrap().is_empty(), "both are desired");

    // `a` goes: its Deployment and its own ConfigMap; the Secret `b` still uses stays.
    d.stop_workload("a", Duration::from_secs(1)).unwrap();
    assert_eq!(
        d.health("a").unwrap(),
        Health::Stopped("its Deployment is scaled to 0 replicas".into())
    );
    d.cleanup_workload("a").unwrap();
    assert!(fake.get("deployments", "edge", "a").is_none());
    assert!(fake.get("configmaps", "edge", "a-config").is_none());
    assert!(fake.get("secrets", "edge", "shared-creds").is_some());
    assert!(fake.get("deployments", "edge", "b").is_some());
    assert!(matches!(d.health("a").unwrap(), Health::Stopped(_)));

    // The agent lost its state: everything of ours not desired goes, nothing else.
    d.desire(Vec::new());
    let removed = d.prune().unwrap();
    assert_eq!(removed, ["edge/b"]);
    assert!(fake.get("secrets", "edge", "shared-creds").is_none());
    assert!(fake.get("configmaps", "edge", "b-config").is_none());
    assert!(fake.get("configmaps", "edge", "foreign").is_some());
    assert!(fake.get("deployments", "edge", "theirs").is_some());
    let deletes: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path)
        .collect();
    assert!(deletes
        .iter()
        .all(|p| !p.ends_with("/foreign") && !p.ends_with("/theirs")));
    // Lists went by label selector.
    assert!(fake.requests().iter().any(|r| r.method == "GET"
        && r.path == "/apis/apps/v1/deployments"
        && r.query.get("labelSelector").map(String::as_str)
            == Some("app.kubernetes.io/managed-by=device-worker-ng")));
    fake.wait("its pods are collected", |f| f.names("pods").len() == 1);

    // An object of ours-to-be that someone else owns is not taken over.
    let (theirs, secrets) = workload("theirs", "edge", "img:1");
    let e = d.start_workload(&theirs, &secrets).expect_err("refused");
    assert!(matches!(e, K8sError::NotOurs { .. }), "{e}");
    assert!(
        e.to_string().contains("not managed by device-worker-ng"),
        "{e}"
    );
    assert_eq!(
        fake.get("deployments", "edge", "theirs").unwrap()["spec"]["template"]["spec"]
            ["containers"][0]["image"],
        "x"
    );
}

fn the_watch_reports_crashes_restarts_and_stops() {
    let fake = FakeKube::start();
    let d = driver(fake.kubeconfig(None));

    // running → crashed (OOM kill in a crash loop)
    let (spec, secrets) = workload("job", "default", "img:oom");
    let (w, rx) = watch(start(&d, &spec, &secrets));
    until_progress(&rx, "available", |ready, _| ready);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!w.is_finished(), "the watch returns only when the run ends");
    fake.image(
        "img:oom",
        Container::Crashes {
            exit_code: 137,
            reason: "OOMKilled".into(),
        },
    );
    let end = end_of(w);
    assert_eq!(end.code, Some(137));
    assert!(end.oom_killed);
    match d.health("job").unwrap() {
        Health::Crashed(c) => assert!(c.reason.contains("CrashLoopBackOff"), "{}", c.reason),
        other => panic!("expected crashed, got {other:?}"),
    }
    // A run of a workload that keeps crashing ends at the first look that sees it.
    let end = end_of(watch(start(&d, &spec, &secrets)).0);
    assert_eq!(end.code, Some(137), "{end:?}");

    // a container the kubelet restarted between two polls is a crash too
    let (spec, secrets) = workload("flaky", "default", "img:flaky");
    let (w, rx) = watch(start(&d, &spec, &secrets));
    until_progress(&rx, "available", |ready, _| ready);
    fake.image(
        "img:flaky",
        Container::RestartedOnce {
            exit_code: 2,
            reason: "Error".into(),
        },
    );
    let end = end_of(w);
    assert_eq!(end.code, Some(2));
    assert!(!end.oom_killed);

    // stopped: scaled to 0 by stop, then deleted by cleanup
    let (spec, secrets) = workload("svc", "default", "img:1");
    let (w, rx) = watch(start(&d, &spec, &secrets));
    until_progress(&rx, "available", |ready, _| ready);
    d.stop_workload("svc", Duration::from_secs(1)).unwrap();
    assert_eq!(end_of(w), RunEnd::default());
    assert!(
        fake.pods_of("default", "svc").is_empty(),
        "stopped means gone"
    );
    let scale = fake
        .requests()
        .into_iter()
        .find(|r| r.content_type.as_deref() == Some("application/merge-patch+json"))
        .expect("a merge patch");
    assert_eq!(scale.body.unwrap()["spec"]["replicas"], 0);
    d.cleanup_workload("svc").unwrap();
    assert_eq!(d.health("svc").unwrap().heartbeat_status(), "stopped");
}

fn api_errors_have_clear_typed_reasons() {
    let fake = FakeKube::start();
    let (spec, secrets) = workload("web", "default", "img:1");

    // unreachable: nothing listens there
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let d = driver(fake.kubeconfig_for(
        &format!("https://127.0.0.1:{port}"),
        &format!("    token: {TOKEN}\n"),
    ));
    let e = d.start_workload(&spec, &secrets).expect_err("unreachable");
    assert!(matches!(e, K8sError::Unreachable { .. }), "{e}");
    assert!(e.is_retryable());
    assert!(e.to_string().contains("unreachable"), "{e}");

    // 401: a token the API does not know
    let d = driver(fake.kubeconfig(Some("wrong")));
    let e = d.start_workload(&spec, &secrets).expect_err("401");
    assert!(matches!(e, K8sError::Unauthorized { .. }), "{e}");
    assert!(e.to_string().contains("401 Unauthorized"), "{e}");
    assert!(!e.is_retryable());

    let d = driver(fake.kubeconfig(None));
    // 403: RBAC forbids patching Deployments
    fake.forbid("patch", "deployments");
    let e = d.start_workload(&spec, &secrets).expect_err("403");
    assert!(matches!(e, K8sError::Forbidden { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("cannot patch resource \"deployments\""),
        "{e}"
    );
    fake.allow_all();

    // 409: the object changed under us
    fake.fail("patch", "deployments", 409, 1);
    let e = d.start_workload(&spec, &secrets).expect_err("409");
    assert!(matches!(e, K8sError::Conflict { .. }), "{e}");
    assert!(e.is_retryable());

    // 422: the API refuses the object, the causes are in the reason
    fake.fail("patch", "deployments", 422, 1);
    let e = d.start_workload(&spec, &secrets).expect_err("422");
    assert!(matches!(e, K8sError::Invalid { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("spec.template.spec.containers[0].image"),
        "{e}"
    );
    assert!(
        fake.get("configmaps", "default", "web-config").is_none(),
        "nothing of a refused workload was stored"
    );

    // A failing workload leaves the others alone: after the errors, it applies cleanly.
    start(&d, &spec, &secrets);
    wait_health(&d, "web", "runs", |h| *h == Health::Running);

    // An unsupported kubeconfig says what is unsupported.
    let exec = fake.kubeconfig_for(&fake.url(), "    exec:\n      command: oc\n");
    let e = driver(exec)
        .start_workload(&spec, &secrets)
        .expect_err("exec");
    assert!(matches!(e, K8sError::Kubeconfig { .. }), "{e}");
    assert!(e.to_string().contains("exec credential plugins"), "{e}");
    let e = K8sDriver::new(K8sSettings::default())
        .start_workload(&spec, &secrets)
        .expect_err("no KUBECONFIG");
    assert!(matches!(e, K8sError::NotConfigured), "{e}");
}

/// The driver seam the controller uses (Drivers built from the settings, dispatched by kind)
/// for kind k8s: start, adopt, stop, cleanup.
fn the_driver_dispatch_runs_k8s_workloads_without_a_process() {
    let fake = FakeKube::start();
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::Unified {
        root: dir.path().to_path_buf(),
    };
    let drivers = Drivers::new(&DriverSettings {
        state_dir: dir.path().join("state"),
        layout: layout.clone(),
        rootless_user: None,
        xdg_runtime_dir: None,
        kubeconfig: Some(fake.kubeconfig(None)),
        log_max: 10 << 20,
    });
    let name = WorkloadName::parse("disp").unwrap();
    let cgroup = Hierarchy::new(layout, "dwng", Some(dir.path().join("dwng"))).workload(&name);
    let (spec, secrets) = workload("disp", "default", "img:1");
    let d = drivers.of(&spec.kind);
    let log = dir.path().join("disp.log");
    let started = d
        .start(&Run {
            spec: &spec,
            cgroup: &cgroup,
            log: &log,
            secrets: &secrets,
            uid: None,
        })
        .expect("started");
    assert_eq!(started.pid, None);
    assert!(started
        .notice
        .as_deref()
        .unwrap()
        .contains("no local process"));
    let at = Placement {
        name: name.clone(),
        kind: spec.kind.clone(),
        cgroup,
    };
    let record = device_worker_ng::store::WorkloadRecord {
        name,
        kind: spec.kind.clone(),
        fingerprint: spec.fingerprint.clone(),
        pid: None,
        pid_start_ticks: 0,
        started_at_unix: 0,
        restarts: 0,
        oom_kills_at_start: 0,
        uid: None,
        cgroup: None,
    };
    let adopted = d.adopt(&at, &record).expect("its Deployment is adopted");
    assert_eq!(adopted.pid, None);
    let (w, _) = watch(started);
    let (w2, rx2) = watch(adopted);
    until_progress(&rx2, "the adopted run available", |ready, _| ready);
    d.stop(&at, Duration::from_secs(1)).unwrap();
    assert_eq!(end_of(w), RunEnd::default());
    assert_eq!(end_of(w2), RunEnd::default());
    d.cleanup(&at).unwrap();
    assert!(fake.get("deployments", "default", "disp").is_none());
    assert!(d.adopt(&at, &record).is_none(), "gone: nothing to adopt");
}

fn k8s_specs_are_validated_like_pods_plus_deployment_rules() {
    let one = |extra: &str, spec: &str| {
        let doc = format!(
            "workloads:\n- name: w\n  kind: k8s\n{extra}  specification: |\n{}",
            spec.lines()
                .map(|l| format!("    {l}\n"))
                .collect::<String>()
        );
        parse_desired(&doc).unwrap().validate(&defaults()).remove(0)
    };
    let ok = one("", "containers:\n- name: a\n  image: x\n");
    let spec = ok.expect("valid");
    assert!(spec.pod.unwrap().manifest.contains("namespace: default"));
    let e = one(
        "",
        "containers:\n- name: a\n  image: x\nrestartPolicy: Never\n",
    )
    .unwrap_err();
    assert_eq!(e.field, "specification.restartPolicy");
    let e = one(
        "  namespace: Bad_NS\n",
        "containers:\n- name: a\n  image: x\n",
    )
    .unwrap_err();
    assert_eq!(e.field, "namespace");
    let e = one("", "containers:\n- name: a\n").unwrap_err();
    assert_eq!(e.field, "specification.containers[0].image");
}

/// Defect 1: while not available, the watch says why, with the scheduler's, the kubelet's or
/// the API's words; an API outage is a reason, not the end of the run.
fn defect1_the_watch_follows_the_cluster_with_its_reasons() {
    let fake = FakeKube::start();
    fake.set_node(Node::Absent);
    let d = driver(fake.kubeconfig(None));
    let (spec, secrets) = workload("web", "default", "img:1");
    let (w, rx) = watch(start(&d, &spec, &secrets));
    until_progress(&rx, "with the scheduler's reason", |ready, r| {
        !ready && r.contains("not scheduled: no nodes available to schedule pods")
    });
    fake.set_node(Node::NoKubelet);
    until_progress(&rx, "waiting for the kubelet", |ready, r| {
        !ready && r.contains("waiting for its kubelet")
    });
    fake.set_node(Node::Ready);
    until_progress(&rx, "available", |ready, _| ready);
    fake.set_node(Node::NotReady);
    until_progress(&rx, "not ready once the node stops", |ready, r| {
        !ready && r.contains("is not ready")
    });
    fake.set_node(Node::Ready);
    until_progress(&rx, "available again", |ready, _| ready);
    fake.set_down(true);
    until_progress(&rx, "the API's outage as the reason", |ready, r| {
        !ready && r.contains("unreachable")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!w.is_finished(), "an outage does not end the run");
    fake.set_down(false);
    until_progress(&rx, "available after the outage", |ready, _| ready);
    // A quota that refuses the pod is the reason too (the cluster retries by itself).
    fake.quota("default", Some(0));
    fake.edit(
        "deployments",
        "default",
        "web",
        "kubectl-rollout",
        serde_json::json!({"spec": {"template": {"metadata": {"annotations": {"restartedAt": "now"}}}}}),
    );
    until_progress(&rx, "the quota as the reason", |ready, r| {
        !ready && r.contains("exceeded quota")
    });
    assert!(!w.is_finished(), "a quota is not a crash");
    fake.quota("default", None);
    until_progress(&rx, "available once the quota allows", |ready, _| ready);
    d.stop_workload("web", Duration::from_secs(1)).unwrap();
    assert_eq!(end_of(w), RunEnd::default());
}

/// The Role README.md gives for the agent's kubeconfig (resources, verbs).
const README_ROLE: &[(&[&str], &[&str])] = &[
    (
        &["deployments", "configmaps", "secrets"],
        &["get", "list", "create", "patch", "delete"],
    ),
    (&["pods"], &["list", "delete"]),
];

/// Defect 2: a kubeconfig whose Role covers only the workloads' namespace starts, watches,
/// stops and removes them, and never asks about another namespace.
fn defect2_a_role_in_the_workloads_namespace_is_enough() {
    let fake = FakeKube::start();
    fake.create_namespace("edge");
    fake.add_token(
        "edge-token",
        "system:serviceaccount:edge:agent",
        Some(&["edge"]),
    );
    let d = driver(fake.kubeconfig(Some("edge-token")));
    let (spec, secrets) = workload("web", "edge", "img:1");
    let (w, rx) = watch(start(&d, &spec, &secrets));
    until_progress(&rx, "available", |ready, _| ready);
    d.stop_workload("web", Duration::from_secs(1)).unwrap();
    assert_eq!(end_of(w), RunEnd::default());
    d.cleanup_workload("web").unwrap();
    assert!(fake.get("deployments", "edge", "web").is_none());
    assert!(fake.get("configmaps", "edge", "web-config").is_none());
    let requests = fake.requests();
    let elsewhere: Vec<_> = requests
        .iter()
        .filter(|r| r.path.contains("/namespaces/") && !r.path.contains("/namespaces/edge/"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "asked about other namespaces: {elsewhere:?}"
    );
    // What the README's Role grants is all it uses.
    for r in &requests {
        let segs: Vec<&str> = r.path.split('/').collect();
        let at = segs
            .iter()
            .position(|s| ["deployments", "configmaps", "secrets", "pods"].contains(s))
            .unwrap_or_else(|| panic!("{}", r.path));
        let (res, named) = (segs[at], segs.len() > at + 1);
        let verbs: &[&str] = match (r.method.as_str(), named, r.status) {
            ("GET", false, _) => &["list"],
            ("GET", true, _) => &["get"],
            ("PATCH", _, 201) => &["patch", "create"],
            ("PATCH", _, _) => &["patch"],
            ("DELETE", _, _) => &["delete"],
            _ => &["?"],
        };
        for v in verbs {
            assert!(
                README_ROLE
                    .iter()
                    .any(|(rs, vs)| rs.contains(&res) && vs.contains(v)),
                "{v} {res} is not in the README's Role ({} {})",
                r.method,
                r.path
            );
        }
    }
    // The cluster scope is tried once per resource, then no more.
    let cluster: BTreeSet<String> = requests
        .iter()
        .filter(|r| r.status == 403)
        .map(|r| r.path.clone())
        .collect();
    let tries = requests.iter().filter(|r| r.status == 403).count();
    assert!(
        tries <= 3 && cluster.len() == tries,
        "403s: {tries} on {cluster:?}"
    );
}

/// Defect 2 after an agent restart: the driver is told the desired workloads before it can
/// list, adopts the running Deployment in the Role's namespace and prunes there.
fn defect2_an_agent_restarted_with_a_namespaced_role_adopts_and_prunes() {
    let fake = FakeKube::start();
    fake.create_namespace("edge");
    fake.add_token(
        "edge-token",
        "system:serviceaccount:edge:agent",
        Some(&["edge"]),
    );
    let kubeconfig = fake.kubeconfig(Some("edge-token"));
    let (spec, secrets) = workload("web", "edge", "img:1");
    let (orphan, _) = workload("orphan", "edge", "img:1");
    let first = driver(kubeconfig.clone());
    start(&first, &spec, &secrets);
    start(&first, &orphan, &secrets);
    drop(first);

    // A new agent: the desired state (only `web`) arrives after adoption has begun.
    let d = driver(kubeconfig);
    let adopted = d.adopt_workload("web").expect("cannot tell yet: adopted");
    let (w, rx) = watch(Started {
        pid: None,
        start_ticks: 0,
        oom_kills_at_start: 0,
        watch: adopted,
        notice: None,
    });
    until_progress(&rx, "looking for it", |ready, r| {
        !ready && r.contains("looking for its Deployment")
    });
    d.desire(vec![(
        "web".into(),
        spec.pod.as_ref().unwrap().manifest.clone(),
    )]);
    until_progress(&rx, "found and available", |ready, _| ready);
    assert_eq!(d.prune().unwrap(), ["edge/orphan"]);
    assert!(fake.get("configmaps", "edge", "orphan-config").is_none());
    assert!(fake.get("deployments", "edge", "web").is_some());
    d.stop_workload("web", Duration::from_secs(1)).unwrap();
    assert_eq!(end_of(w), RunEnd::default());
}

/// Defect 4: a workload Kubernetes would refuse leaves nothing on the cluster: a request
/// above its limit is refused at validation, anything else the server refuses at its dry run.
fn defect4_nothing_of_a_refused_workload_reaches_the_cluster() {
    let doc = "workloads:\n- name: w\n  kind: k8s\n  specification: |\n    containers:\n    - name: a\n      image: x\n      resources:\n        limits: {memory: 64Mi}\n        requests: {memory: 128Mi}\n";
    let e = parse_desired(doc)
        .unwrap()
        .validate(&defaults())
        .remove(0)
        .expect_err("requests above limits are refused");
    assert_eq!(
        e.field,
        "specification.containers[0].resources.requests.memory"
    );

    let fake = FakeKube::start();
    let d = driver(fake.kubeconfig(None));
    // The agent does not check ports; the API server does.
    let (spec, secrets) = workload_with(
        "web",
        "default",
        "img:1",
        "  ports: [{containerPort: 70000}]",
    );
    let e = d.start_workload(&spec, &secrets).expect_err("refused");
    assert!(matches!(e, K8sError::Invalid { .. }), "{e}");
    assert!(e.to_string().contains("containerPort"), "{e}");
    assert!(
        fake.names("configmaps").is_empty(),
        "{:?}",
        fake.names("configmaps")
    );
    assert!(fake.names("secrets").is_empty());
    assert!(fake.names("deployments").is_empty());
}

/// Defect 6: a stop waits for the pod's own termination grace (the kubelet's SIGTERM then
/// SIGKILL), not STOP_TIMEOUT; only a pod no kubelet confirms is deleted with grace 0.
fn defect6_a_stop_honours_the_pods_grace_period() {
    let fake = FakeKube::start();
    fake.ignore_sigterm("img:stubborn");
    let d = driver(fake.kubeconfig(None));
    let (spec, secrets) = workload_with(
        "web",
        "default",
        "img:stubborn",
        "terminationGracePeriodSeconds: 2",
    );
    let (w, rx) = watch(start(&d, &spec, &secrets));
    until_progress(&rx, "available", |ready, _| ready);
    fake.clear_requests();
    d.stop_workload("web", Duration::from_millis(300)).unwrap();
    assert!(
        fake.pods_of("default", "web").is_empty(),
        "the stop returns once the pod is gone"
    );
    let forced: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.method == "DELETE" && r.query.contains_key("gracePeriodSeconds"))
        .map(|r| r.path.clone())
        .collect();
    assert!(
        forced.is_empty(),
        "the pod's grace was cut short: {forced:?}"
    );
    assert_eq!(end_of(w), RunEnd::default());

    // No kubelet confirms (its node is gone): after the pod's grace and STOP_TIMEOUT, the
    // pod is deleted with grace 0 so the stop ends.
    fake.set_node(Node::NoKubelet);
    start(&d, &spec, &secrets);
    fake.wait("the pod is bound", |f| {
        f.pods_of("default", "web")
            .iter()
            .any(|p| p["spec"]["nodeName"].is_string())
    });
    d.stop_workload("web", Duration::from_millis(300)).unwrap();
    assert!(fake.pods_of("default", "web").is_empty());
    assert!(fake.requests().iter().any(|r| r.method == "DELETE"
        && r.path.starts_with("/api/v1/namespaces/default/pods/web-")
        && r.query.get("gracePeriodSeconds").map(String::as_str) == Some("0")));
}

/// Defect 6: the Deployment's progress deadline is chosen for slow edge links, and a rollout
/// past it is a reason the workload waits with, not a crash.
fn defect6_a_rollout_past_its_deadline_is_a_reason_not_a_crash() {
    let fake = FakeKube::start();
    fake.image("img:huge", Container::Pulling);
    let d = driver(fake.kubeconfig(None));
    let (spec, secrets) = workload("web", "default", "img:huge");
    let (w, rx) = watch(start(&d, &spec, &secrets));
    assert_eq!(
        fake.get("deployments", "default", "web").unwrap()["spec"]["progressDeadlineSeconds"],
        k8s::objects::PROGRESS_DEADLINE_SECONDS
    );
    until_progress(&rx, "pulling", |ready, r| {
        !ready && r.contains("ContainerCreating")
    });
    fake.advance(Duration::from_secs(
        u64::from(k8s::objects::PROGRESS_DEADLINE_SECONDS) + 1,
    ));
    until_progress(&rx, "past the deadline", |ready, r| {
        !ready && r.contains("progress deadline")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!w.is_finished(), "a slow pull is not a crash");
    fake.image("img:huge", Container::Runs);
    until_progress(&rx, "available once pulled", |ready, _| ready);
    d.stop_workload("web", Duration::from_secs(1)).unwrap();
    assert_eq!(end_of(w), RunEnd::default());
}

/// Defect 7: the agent never creates namespaces; a missing one is named in the reason and
/// nothing is created.
fn defect7_a_missing_namespace_is_named_and_never_created() {
    let fake = FakeKube::start();
    let d = driver(fake.kubeconfig(None));
    let (spec, secrets) = workload("web", "nowhere", "img:1");
    let e = d.start_workload(&spec, &secrets).expect_err("no namespace");
    assert!(matches!(e, K8sError::NamespaceMissing { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("namespace \"nowhere\" does not exist"),
        "{text}"
    );
    assert!(text.contains("never creates namespaces"), "{text}");
    assert!(fake.names("configmaps").is_empty() && fake.names("deployments").is_empty());
    assert!(!fake
        .requests()
        .iter()
        .any(|r| r.method == "POST" || r.path.ends_with("/namespaces/nowhere")));
}

/// Defect 8: a running watch uses the kubeconfig as it is at each look: a rotated token
/// keeps it seeing the cluster (here: the crash that ends the run).
fn defect8_a_rotated_credential_reaches_running_watches() {
    let fake = FakeKube::start();
    fake.add_token("token-1", "system:serviceaccount:kube-system:agent", None);
    let kubeconfig = fake.kubeconfig(Some("token-1"));
    let d = driver(kubeconfig.clone());
    let (spec, secrets) = workload("web", "default", "img:1");
    let (w, rx) = watch(start(&d, &spec, &secrets));
    until_progress(&rx, "available", |ready, _| ready);
    fake.add_token("token-2", "system:serviceaccount:kube-system:agent", None);
    fake.rewrite_kubeconfig(&kubeconfig, "token-2");
    fake.revoke_token("token-1");
    fake.image(
        "img:1",
        Container::Crashes {
            exit_code: 3,
            reason: "Error".into(),
        },
    );
    let end = end_of(w);
    assert_eq!(
        end.code,
        Some(3),
        "the watch saw the crash with the new token"
    );
    let unauthorized = fake.requests().iter().filter(|r| r.status == 401).count();
    assert!(
        unauthorized <= 1,
        "{unauthorized} requests with the revoked token"
    );
}
