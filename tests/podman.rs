//! The podman driver against real podman (root only). CI installs podman and writes the
//! containers.conf it needs (.ci/run, ../shared/reference/TESTBED.md); the test image is built
//! from the host's static busybox by tests/podman/build-image.sh (no registry is reachable).
//!
//! Each test uses its own cgroup root and pod names, and removes every pod, container,
//! secret and cgroup it created.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use device_worker_ng::cgroup::{self, Hierarchy, WorkloadCgroup};
use device_worker_ng::drivers::{podman, watch, Driver, DriverError, Placement, RunEnd, Started};
use device_worker_ng::store::WorkloadRecord;
use device_worker_ng::workload::{
    parse_desired, BackoffPolicy, DesiredSecret, SpecDefaults, WorkloadKind, WorkloadName,
    WorkloadSpec,
};
use dwng_test_support::harness::{self, test, PODMAN};
use dwng_test_support::podman::TEST_IMAGE as IMAGE;
use dwng_test_support::wait::wait_until;

fn main() {
    harness::main(&[
        test(
            "deploys_with_configmap_secret_and_limits_then_removes_everything",
            PODMAN,
            deploys_with_configmap_secret_and_limits_then_removes_everything,
        ),
        test(
            "memory_limit_oom_kills_with_137_and_the_agent_sees_it",
            PODMAN,
            memory_limit_oom_kills_with_137_and_the_agent_sees_it,
        ),
        test(
            "an_unpullable_image_fails_with_podmans_message_and_leaves_nothing",
            PODMAN,
            an_unpullable_image_fails_with_podmans_message_and_leaves_nothing,
        ),
        test(
            "a_pod_spec_podman_rejects_fails_cleanly",
            PODMAN,
            a_pod_spec_podman_rejects_fails_cleanly,
        ),
        test(
            "an_unchanged_spec_keeps_its_fingerprint_a_changed_one_does_not",
            &[],
            an_unchanged_spec_keeps_its_fingerprint_a_changed_one_does_not,
        ),
    ])
}

/// The desired state's secrets, the same in every test: starting a pod syncs the whole list,
/// and tests share one secrets ledger (one process).
fn secrets() -> Vec<DesiredSecret> {
    vec![DesiredSecret {
        name: "dwng-t-db-creds".into(),
        data: r#"{"password":"c2VjcmV0"}"#.into(),
    }]
}

/// The limit tests measure OOM kills and throttling: one pod at a time on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn state_dir() -> PathBuf {
    std::env::temp_dir().join(format!("dwng-podman-test-{}", std::process::id()))
}

/// The driver, once per process (the harness has built the image: [`PODMAN`]).
fn driver() -> &'static podman::PodDriver {
    static DRIVER: OnceLock<podman::PodDriver> = OnceLock::new();
    DRIVER.get_or_init(|| {
        podman::PodDriver::new(podman::PodmanSettings {
            state_dir: state_dir(),
            layout: cgroup::detect().unwrap(),
            rootless_user: None,
            xdg_runtime_dir: None,
        })
    })
}

fn setup() {
    driver();
}

fn name(s: &str) -> WorkloadName {
    WorkloadName::parse(s).unwrap()
}

fn start(spec: &WorkloadSpec, cg: &WorkloadCgroup, log: &Path) -> Result<Started, DriverError> {
    driver().start(&device_worker_ng::drivers::Run {
        spec,
        cgroup: cg,
        log,
        secrets: &secrets(),
        uid: None,
    })
}

fn at(n: &str, cg: &WorkloadCgroup) -> Placement {
    Placement {
        name: name(n),
        kind: WorkloadKind::Pod,
        cgroup: cg.clone(),
    }
}

/// Waits for the run's end the way the agent does (its watch, on the reactor).
fn end_of(started: Started) -> RunEnd {
    smol::block_on(watch::until_end(started.watch, |_, _| {}))
}

/// A cgroup subtree of its own, removed (in every hierarchy) on drop.
struct Tree {
    root: String,
    h: Hierarchy,
}

impl Tree {
    fn new(test: &str) -> Tree {
        let root = format!("device-worker-ng-test-pod-{test}-{}", std::process::id());
        let h = Hierarchy::new(cgroup::detect().unwrap(), &root, None);
        h.setup().unwrap();
        Tree { root, h }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        for n in self.h.existing_workloads().into_iter().flatten() {
            let cg = self.h.workload(&n);
            let _ = driver().cleanup(&at(n.as_str(), &cg));
        }
        let _ = self.h.remove_all();
        // podman creates the subtree in every hierarchy (blkio, devices, ...), not only in the
        // agent's four.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for l in mounts.lines() {
            let Some((left, right)) = l.split_once(" - ") else {
                continue;
            };
            if !right.starts_with("cgroup") {
                continue;
            }
            let mp = left.split_whitespace().nth(4).unwrap_or("");
            let base = Path::new(mp).join(&self.root);
            // The staging pod (played before the clone) leaves podman's empty default parent.
            let _ = std::fs::remove_dir(Path::new(mp).join("libpod_parent"));
            for d in [base.join("workloads"), base.clone()] {
                let _ = std::fs::remove_dir(&d);
            }
        }
    }
}

fn defaults() -> SpecDefaults {
    SpecDefaults {
        workload_user: Some("nobody".into()),
        backoff: BackoffPolicy::default(),
        ..Default::default()
    }
}

/// A pod workload from the wire shape (PROTOCOL §4.3).
fn pod_spec(name: &str, containers_yaml: &str, extra: &str) -> WorkloadSpec {
    let spec = containers_yaml.replace("IMAGE", IMAGE);
    let doc = format!(
        "workloads:\n- name: {name}\n  labels: {{app: {name}}}\n  specification: |\n{}\n{extra}",
        spec.lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let d = parse_desired(&doc).unwrap_or_else(|e| panic!("{e}\n{doc}"));
    d.validate(&defaults()).remove(0).unwrap()
}

fn podman_out(args: &[&str]) -> String {
    let o = Command::new("podman").args(args).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

fn pod_exists(name: &str) -> bool {
    Command::new("podman")
        .args(["pod", "exists", name])
        .status()
        .unwrap()
        .success()
}

/// The first container's cgroup directory in the memory (v1) or unified (v2) hierarchy.
fn container_cgroup(cg: &WorkloadCgroup, pid: i32) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    match cg {
        WorkloadCgroup::V1 { memory, cpu, .. } => {
            let rel = text
                .lines()
                .find_map(|l| {
                    let mut f = l.splitn(3, ':');
                    let (_, c, p) = (f.next()?, f.next()?, f.next()?);
                    c.split(',').any(|c| c == "cpu").then(|| p.to_string())
                })
                .unwrap();
            // cpu hierarchy root = the workload dir minus its own relative path.
            let _ = memory;
            let wl_rel = rel_of(cpu);
            let root = cpu.to_string_lossy().trim_end_matches(&wl_rel).to_string();
            PathBuf::from(format!("{root}{rel}"))
        }
        WorkloadCgroup::V2 { dir, .. } => {
            let rel = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
            let wl_rel = rel_of(dir);
            let root = dir.to_string_lossy().trim_end_matches(&wl_rel).to_string();
            PathBuf::from(format!("{root}{rel}"))
        }
    }
}

/// `/<root>/workloads/<name>` of a workload cgroup path.
fn rel_of(p: &Path) -> String {
    let s = p.to_string_lossy();
    let i = s.find("/device-worker-ng-test-pod-").unwrap();
    s[i..].to_string()
}

fn deploys_with_configmap_secret_and_limits_then_removes_everything() {
    setup();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tree = Tree::new("deploy");
    let name = "dwng-t-deploy";
    let secret = "dwng-t-db-creds";
    let rep = podman::secrets::sync(
        driver(),
        &[DesiredSecret {
            name: secret.into(),
            data: r#"{"password":"c2VjcmV0"}"#.into(),
        }],
    )
    .unwrap();
    // Created now, or already by an earlier pod start of this process (same list).
    assert!(rep.failed.is_empty(), "{rep:?}");
    assert!(podman_out(&["secret", "ls"]).contains(secret), "{rep:?}");
    let spec = pod_spec(
        name,
        &format!(
            "containers:\n- name: app\n  image: IMAGE\n  command: [/bin/sh, -c, 'echo PW=$PASSWORD LL=$LOG_LEVEL; exec sleep 600']\n  env:\n  - name: PASSWORD\n    valueFrom: {{secretKeyRef: {{name: {secret}, key: password}}}}\n  envFrom:\n  - configMapRef: {{name: app-config}}\n  resources:\n    limits: {{memory: 64Mi, cpu: 250m}}\n"
        ),
        "  configmaps:\n  - |\n    apiVersion: v1\n    kind: ConfigMap\n    metadata: {name: app-config, creationTimestamp: null}\n    data: {LOG_LEVEL: debug}\n",
    );
    let cg = tree.h.workload(&self::name(name));
    let log = state_dir().join("deploy.log");
    std::fs::create_dir_all(state_dir()).unwrap();
    let t = Instant::now();
    let started = start(&spec, &cg, &log).unwrap_or_else(|e| panic!("start: {e}"));
    eprintln!("pod started in {:?}", t.elapsed());
    let pid = started.pid.unwrap();
    assert!(pid > 0);
    assert!(pod_exists(name));
    // Adopted after an agent restart: found by its label, inside the workload's cgroup.
    let record = WorkloadRecord {
        name: self::name(name),
        kind: WorkloadKind::Pod,
        fingerprint: spec.fingerprint.clone(),
        pid: Some(pid),
        pid_start_ticks: started.start_ticks,
        started_at_unix: 0,
        restarts: 0,
        oom_kills_at_start: 0,
        uid: None,
        cgroup: None,
    };
    let adopted = driver()
        .adopt(&at(name, &cg), &record)
        .expect("the running pod is adopted");
    assert_eq!(adopted.pid, Some(pid));

    // podman's log files are written asynchronously.
    wait_until(
        "the container's output",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || podman_out(&["logs", &format!("{name}-app")]).contains("PW=secret LL=debug"),
    );
    // Limits: podman's on the container, the agent's (sum + overhead, pids) on the pod.
    let ccg = container_cgroup(&cg, pid);
    let quota = std::fs::read_to_string(ccg.join(match cg {
        WorkloadCgroup::V1 { .. } => "cpu.cfs_quota_us",
        WorkloadCgroup::V2 { .. } => "cpu.max",
    }))
    .unwrap();
    assert!(
        quota.trim().starts_with("25000"),
        "container cpu quota {quota}"
    );
    let counters = cg.counters().unwrap();
    assert!(
        counters.memory_bytes > 0 && counters.pids >= 2,
        "{counters:?}"
    );
    assert_eq!(spec.limits.cpu_millicores, Some(250));
    assert_eq!(
        spec.limits.pids,
        Some(device_worker_ng::workload::DEFAULT_POD_PIDS)
    );

    driver()
        .stop(&at(name, &cg), Duration::from_secs(2))
        .unwrap();
    let end = end_of(started);
    assert!(end.code.is_some(), "podman knows the exit code: {end:?}");
    // The adopted watch learns the same from podman (not "status unknown").
    let adopted_end = end_of(adopted);
    assert_eq!(adopted_end.code, end.code, "{adopted_end:?}");
    driver().cleanup(&at(name, &cg)).unwrap();
    assert!(!pod_exists(name));
    assert!(!podman_out(&["ps", "-a", "--format", "{{.Names}}"]).contains(name));
    assert!(!cg.display_path().exists());
    let rep = podman::secrets::sync(driver(), &[]).unwrap();
    assert_eq!(rep.removed, vec![secret.to_string()]);
    assert!(!podman_out(&["secret", "ls"]).contains(secret));
}

fn memory_limit_oom_kills_with_137_and_the_agent_sees_it() {
    setup();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tree = Tree::new("oom");
    let name = "dwng-t-oom";
    // dd allocates its block size: 200 MB against a 32 MiB limit.
    let spec = pod_spec(
        name,
        "containers:\n- name: hog\n  image: IMAGE\n  command: [/bin/sh, -c, 'sleep 1; dd if=/dev/zero of=/dev/null bs=200M count=1']\n  resources:\n    limits: {memory: 32Mi}\n",
        "",
    );
    let cg = tree.h.workload(&self::name(name));
    let log = state_dir().join("oom.log");
    let started = start(&spec, &cg, &log).unwrap();
    let first = started.pid;
    let end = end_of(started);
    assert_eq!(end.code, Some(137), "{end:?}");
    assert!(
        end.oom_killed || cg.oom_kills() > 0,
        "the OOM kill is visible to the agent: {end:?}"
    );
    // A restart (the workload machine's Start) replaces the pod.
    let again = start(&spec, &cg, &log).unwrap();
    assert!(pod_exists(name));
    assert_ne!(again.pid, first);
    driver()
        .stop(&at(name, &cg), Duration::from_secs(1))
        .unwrap();
    driver().cleanup(&at(name, &cg)).unwrap();
    assert!(!pod_exists(name));
}

fn an_unpullable_image_fails_with_podmans_message_and_leaves_nothing() {
    setup();
    // Starting a pod syncs the shared secrets list: one pod test at a time.
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tree = Tree::new("pull");
    let name = "dwng-t-pull";
    let spec = pod_spec(
        name,
        "containers:\n- name: app\n  image: localhost/does-not-exist:1\n",
        "",
    );
    let cg = tree.h.workload(&self::name(name));
    let err = match start(&spec, &cg, &state_dir().join("pull.log")) {
        Ok(_) => panic!("started a pod with an unpullable image"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("does-not-exist"), "{err}");
    assert!(
        !err.contains("podman kube"),
        "the reason is podman's message only: {err}"
    );
    assert!(!pod_exists(name));
    assert!(!pod_exists(&format!("{name}-dwng-staging")));
    driver().cleanup(&at(name, &cg)).unwrap();
}

fn a_pod_spec_podman_rejects_fails_cleanly() {
    setup();
    // Starting a pod syncs the shared secrets list: one pod test at a time.
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tree = Tree::new("reject");
    let name = "dwng-t-reject";
    // A hostPath volume whose path does not exist, with type Directory: podman refuses.
    let spec = pod_spec(
        name,
        "containers:\n- name: app\n  image: IMAGE\n  volumeMounts: [{name: v, mountPath: /v}]\nvolumes:\n- name: v\n  hostPath: {path: /nonexistent/dwng-test, type: Directory}\n",
        "",
    );
    let cg = tree.h.workload(&self::name(name));
    let err = start(&spec, &cg, &state_dir().join("reject.log"))
        .expect_err("podman accepted a missing hostPath directory")
        .to_string();
    assert!(err.contains("/nonexistent/dwng-test"), "{err}");
    assert!(!pod_exists(name));
    driver().cleanup(&at(name, &cg)).unwrap();
}

fn an_unchanged_spec_keeps_its_fingerprint_a_changed_one_does_not() {
    // Pure, but next to the podman tests because it is what decides a redeploy.
    let a = pod_spec(
        "w",
        "containers:\n- name: a\n  image: IMAGE\n",
        "  annotations: {x: y}\n",
    );
    let b = pod_spec(
        "w",
        "containers:\n- name: a\n  image: IMAGE\n",
        "  annotations: {x: y}\n",
    );
    let c = pod_spec(
        "w",
        "containers:\n- name: a\n  image: IMAGE\n  args: [x]\n",
        "  annotations: {x: y}\n",
    );
    let d = pod_spec(
        "w",
        "containers:\n- name: a\n  image: IMAGE\n",
        "  annotations: {x: y}\n  imageRegistries: {authFile: '{\"auths\":{}}'}\n",
    );
    assert_eq!(a.fingerprint, b.fingerprint);
    assert_ne!(a.fingerprint, c.fingerprint);
    assert_ne!(a.fingerprint, d.fingerprint);
}
