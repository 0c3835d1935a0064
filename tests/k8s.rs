//! The k8s (MicroShift) driver against a fake Kubernetes API server (tests/support/fake_kube.rs).
//! No Kubernetes can run on the test machines (TESTBED.md): these tests check that the driver
//! speaks the API conventions the fake follows, not that a live MicroShift accepts it.
//! No root needed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use device_worker_ng::cgroup::{Hierarchy, Layout};
use device_worker_ng::drivers::k8s::{self, Health, K8sDriver, K8sError, K8sSettings};
use device_worker_ng::drivers::{
    watch, Driver, DriverSettings, Drivers, Placement, Run, RunEnd, Started,
};
use device_worker_ng::workload::{
    parse_desired, BackoffPolicy, DesiredSecret, SpecDefaults, WorkloadName, WorkloadSpec,
};
use dwng_test_support::fake_kube::{FakeKube, TOKEN};
use dwng_test_support::harness::{self, test};

fn main() {
    harness::main(&[
        test(
            "a_workload_is_applied_deploying_then_running_and_reapplied_on_update",
            &[],
            a_workload_is_applied_deploying_then_running_and_reapplied_on_update,
        ),
        test(
            "removal_deletes_only_what_carries_our_label",
            &[],
            removal_deletes_only_what_carries_our_label,
        ),
        test(
            "the_waiter_reports_crashes_restarts_and_stops",
            &[],
            the_waiter_reports_crashes_restarts_and_stops,
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
    ])
}

const MANAGER_QUERY: &str = "device-worker-ng";

fn defaults() -> SpecDefaults {
    SpecDefaults {
        workload_user: Some("nobody".into()),
        backoff: BackoffPolicy::default(),
    }
}

/// A k8s workload `name` in `ns` using ConfigMap `<name>-config` and Secret `shared-creds`.
fn workload(name: &str, ns: &str, image: &str) -> (WorkloadSpec, Vec<DesiredSecret>) {
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
secrets:
- name: shared-creds
  data: '{{"password":"c2VjcmV0"}}'
- name: unrelated
  data: '{{"x":"eA=="}}'
"#
    );
    let desired = parse_desired(&doc).unwrap();
    let spec = desired.validate(&defaults()).remove(0).unwrap();
    (spec, desired.secrets)
}

fn driver(kubeconfig: PathBuf) -> Arc<K8sDriver> {
    Arc::new(K8sDriver::new(K8sSettings {
        kubeconfig: Some(kubeconfig),
        poll_interval: Duration::from_millis(50),
        api_patience: Duration::from_secs(2),
        timeouts: k8s::ApiTimeouts {
            connect: Duration::from_secs(2),
            request: Duration::from_secs(5),
        },
    }))
}

/// Applies; the run is then watched (the test plays the deployment controller).
fn start(d: &Arc<K8sDriver>, spec: &WorkloadSpec, secrets: &[DesiredSecret]) -> Started {
    d.start_workload(spec, secrets)
        .unwrap_or_else(|e| panic!("start: {e}"))
}

/// Awaits the run's end on a thread, as the agent does on its reactor.
fn watch_end(started: Started) -> std::thread::JoinHandle<RunEnd> {
    std::thread::spawn(move || smol::block_on(watch::until_end(started.watch, |_, _| {})))
}

/// Like [`watch_end`], returning once the watch has seen the run available.
fn watch_end_once_ready(started: Started) -> std::thread::JoinHandle<RunEnd> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        smol::block_on(watch::until_end(started.watch, move |ready, _| {
            if ready {
                let _ = tx.send(());
            }
        }))
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the watch sees the run available");
    h
}

fn rv(v: &serde_json::Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn a_workload_is_applied_deploying_then_running_and_reapplied_on_update() {
    let fake = FakeKube::start();
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
    assert!(matches!(d.health("web").unwrap(), Health::Deploying(_)));
    fake.observe("edge", "web");
    assert!(
        matches!(d.health("web").unwrap(), Health::Deploying(ref r) if r.contains("ContainerCreating"))
    );
    fake.rollout("edge", "web");
    assert_eq!(d.health("web").unwrap(), Health::Running);
    assert!(d.still_running("web"));

    // What went over the wire: server-side apply, our field manager, force.
    let applies: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    let paths: Vec<&str> = applies.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/namespaces/edge/configmaps/web-config",
            "/api/v1/namespaces/edge/secrets/shared-creds",
            "/apis/apps/v1/namespaces/edge/deployments/web",
        ],
        "ConfigMaps and Secrets before the Deployment; the unreferenced secret not at all"
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
    assert_eq!(
        dep["metadata"]["managedFields"][0]["manager"],
        "device-worker-ng"
    );
    let secret = fake.get("secrets", "edge", "shared-creds").unwrap();
    assert_eq!(secret["data"]["password"], "c2VjcmV0");
    assert_eq!(secret["type"], "Opaque");
    let cm = fake.get("configmaps", "edge", "web-config").unwrap();
    assert_eq!(cm["data"]["LOG_LEVEL"], "debug");
    assert!(fake.get("secrets", "edge", "unrelated").is_none());

    // The same spec again: no change, no new resourceVersion, no new generation.
    let before = rv(&fake.get("deployments", "edge", "web").unwrap());
    start(&d, &spec, &secrets);
    let same = fake.get("deployments", "edge", "web").unwrap();
    assert_eq!(rv(&same), before);
    assert_eq!(same["metadata"]["generation"], 1);

    // An update changes the object in place: new generation, deploying until rolled out.
    let (v2, _) = workload("web", "edge", "quay.io/x/web:2");
    assert_ne!(v2.fingerprint, spec.fingerprint);
    start(&d, &v2, &secrets);
    assert_eq!(
        fake.get("deployments", "edge", "web").unwrap()["metadata"]["generation"],
        2
    );
    let updated = fake.get("deployments", "edge", "web").unwrap();
    assert!(rv(&updated) > before);
    assert_eq!(updated["metadata"]["uid"], same["metadata"]["uid"]);
    assert_eq!(
        updated["spec"]["template"]["spec"]["containers"][0]["image"],
        "quay.io/x/web:2"
    );
    assert!(
        matches!(d.health("web").unwrap(), Health::Deploying(ref r) if r.contains("generation 2"))
    );
    fake.rollout("edge", "web");
    assert_eq!(d.health("web").unwrap(), Health::Running);
}

fn removal_deletes_only_what_carries_our_label() {
    let fake = FakeKube::start();
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
                           "spec": {"replicas": 1}}),
    );
    let (a, secrets) = workload("a", "edge", "img:1");
    let (b, _) = workload("b", "edge", "img:1");
    for s in [&a, &b] {
        start(&d, s, &secrets);
        fake.rollout("edge", s.name.as_str());
    }

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
    assert!(!d.still_running("a"));

    // The agent lost its state: everything of ours not desired goes, nothing else.
    let removed = d.prune(&Default::default()).unwrap();
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

    // An object of ours-to-be that someone else owns is not taken over.
    let (theirs, secrets) = workload("theirs", "edge", "img:1");
    let e = d.start_workload(&theirs, &secrets).expect_err("refused");
    assert!(matches!(e, K8sError::NotOurs { .. }), "{e}");
    assert!(
        e.to_string().contains("not managed by device-worker-ng"),
        "{e}"
    );
    assert_eq!(
        fake.get("deployments", "edge", "theirs").unwrap()["spec"],
        serde_json::json!({"replicas": 1})
    );
}

fn the_waiter_reports_crashes_restarts_and_stops() {
    let fake = FakeKube::start();
    let d = driver(fake.kubeconfig(None));
    let (spec, secrets) = workload("job", "default", "img:1");
    let run = |fake: &FakeKube| {
        let started = start(&d, &spec, &secrets);
        fake.rollout("default", "job");
        watch_end_once_ready(started)
    };

    // running → crashed (OOM kill in a crash loop)
    let w = run(&fake);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !w.is_finished(),
        "the waiter returns only when the run ends"
    );
    fake.crash("default", "job", 137, "OOMKilled");
    let end: RunEnd = w.join().unwrap();
    assert_eq!(end.code, Some(137));
    assert!(end.oom_killed);
    match d.health("job").unwrap() {
        Health::Crashed(c) => assert!(c.reason.contains("CrashLoopBackOff"), "{}", c.reason),
        other => panic!("expected crashed, got {other:?}"),
    }
    // A run of a workload that crashes at once ends at the first look.
    fake.crash("default", "job", 1, "Error");
    let end = watch_end(start(&d, &spec, &secrets)).join().unwrap();
    assert_eq!(end.code, Some(1), "{end:?}");

    // a container the kubelet restarted between two polls is a crash too
    let w = run(&fake);
    fake.restart_container("default", "job", 2, "Error");
    let end = w.join().unwrap();
    assert_eq!(end.code, Some(2));
    assert!(!end.oom_killed);

    // stopped: scaled to 0 by stop, then deleted by cleanup
    let w = run(&fake);
    d.stop_workload("job", Duration::from_secs(1)).unwrap();
    let end = w.join().unwrap();
    assert_eq!(end, RunEnd::default());
    assert!(!d.still_running("job"));
    let scale = fake
        .requests()
        .into_iter()
        .find(|r| r.content_type.as_deref() == Some("application/merge-patch+json"))
        .expect("a merge patch");
    assert_eq!(scale.body.unwrap()["spec"]["replicas"], 0);
    d.cleanup_workload("job").unwrap();
    assert_eq!(d.health("job").unwrap().heartbeat_status(), "stopped");
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

    // A failing workload leaves the others alone: after the errors, it applies cleanly.
    start(&d, &spec, &secrets);
    fake.rollout("default", "web");
    assert_eq!(d.health("web").unwrap(), Health::Running);

    // Listing in all namespaces forbidden: the driver falls back to the ones it used.
    fake.forbid_all_namespaces("deployments");
    assert!(d.still_running("web"));
    assert!(fake
        .requests()
        .iter()
        .any(|r| r.status == 403 && r.path == "/apis/apps/v1/deployments"));
    fake.allow_all();

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
    fake.rollout("default", "disp");
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
    let w = watch_end(started);
    let w2 = watch_end(adopted);
    d.stop(&at, Duration::from_secs(1)).unwrap();
    assert_eq!(w.join().unwrap(), RunEnd::default());
    assert_eq!(w2.join().unwrap(), RunEnd::default());
    d.cleanup(&at).unwrap();
    assert!(fake.get("deployments", "default", "disp").is_none());
    assert!(d.adopt(&at, &record).is_none());
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
