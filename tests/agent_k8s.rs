//! `k8s` workloads through the whole agent (the real binary, serverless) against the fake
//! Kubernetes API server (tests/support/fake_kube.rs): states that follow the cluster,
//! adoption, pruning at start and after each desired state, changes that do not wait for a
//! pending start. Root (the agent sets up its cgroups), no Kubernetes (TESTBED.md).

use std::time::Duration;

use device_worker_ng::status::Snapshot;
use dwng_test_support::agent::Agent;
use dwng_test_support::fake_kube::{Container, FakeKube, Node};
use dwng_test_support::harness::{self, test, ROOT_CGROUPS};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_device-worker-ng");
/// The driver looks every 2 s: a few looks.
const SOON: Duration = Duration::from_secs(15);

fn main() {
    harness::main(&[
        test(
            "defect1_k8s_states_follow_the_cluster",
            ROOT_CGROUPS,
            defect1_k8s_states_follow_the_cluster,
        ),
        test(
            "defect3_defect5_orphans_are_pruned_and_changes_do_not_wait_for_a_pending_start",
            ROOT_CGROUPS,
            defect3_defect5_orphans_are_pruned_and_changes_do_not_wait_for_a_pending_start,
        ),
    ])
}

fn k8s_workload(name: &str, image: &str) -> String {
    format!(
        "- name: {name}\n  kind: k8s\n  specification: |\n    containers:\n    - name: app\n      image: {image}\n      resources:\n        limits: {{memory: 64Mi, cpu: 100m}}\n"
    )
}

fn desired(workloads: &[String]) -> String {
    if workloads.is_empty() {
        return "workloads: []\n".into();
    }
    format!("workloads:\n{}", workloads.concat())
}

fn agent(fake: &FakeKube, desired: &str) -> Agent {
    let mut a = Agent::new(BIN, desired);
    a.extra_env.push((
        "EDGE_DEVICE_KUBECONFIG".into(),
        fake.kubeconfig(None).display().to_string(),
    ));
    a
}

fn state_is(
    name: &'static str,
    state: &'static str,
    reason: &'static str,
) -> impl Fn(&Snapshot) -> bool {
    move |s| Agent::workload(s, name).is_some_and(|w| w.state == state && w.reason.contains(reason))
}

/// Defect 1: `starting` with the scheduler's reason while not available, `running` once
/// available, `unavailable` with the reason when it stops being available or the API cannot
/// be reached, no pid; adoption after a restart follows the cluster too; a pod that crashes
/// before it was ever available is a failure, not a workload stuck `starting`.
fn defect1_k8s_states_follow_the_cluster() {
    let fake = FakeKube::start();
    fake.set_node(Node::Absent);
    let mut a = agent(&fake, &desired(&[k8s_workload("web", "img:1")]));
    a.start();
    let s = a.wait_for(
        "starting with the scheduler's reason",
        SOON,
        state_is("web", "starting", "no nodes available to schedule pods"),
    );
    let w = Agent::workload(&s, "web").unwrap();
    assert_eq!(w.pid, None);
    assert_eq!(w.heartbeat_status, "deploying");
    assert!(
        s.render()
            .lines()
            .any(|l| l.starts_with("web ") && l.split_whitespace().nth(3) == Some("-")),
        "no pid column value:\n{}",
        s.render()
    );

    fake.set_node(Node::Ready);
    let s = a.wait_for("running", SOON, state_is("web", "running", ""));
    let w = Agent::workload(&s, "web").unwrap();
    assert_eq!((w.pid, w.heartbeat_status.as_str()), (None, "running"));
    assert!(!w.reason.contains("pid"), "{}", w.reason);

    fake.set_node(Node::NotReady);
    let s = a.wait_for(
        "unavailable",
        SOON,
        state_is("web", "unavailable", "not ready"),
    );
    assert_eq!(
        Agent::workload(&s, "web").unwrap().heartbeat_status,
        "deploying"
    );
    fake.set_node(Node::Ready);
    a.wait_for("running again", SOON, state_is("web", "running", ""));

    fake.set_down(true);
    a.wait_for(
        "the API outage as the reason",
        SOON,
        state_is("web", "unavailable", "unreachable"),
    );
    fake.set_down(false);
    a.wait_for(
        "running after the outage",
        SOON,
        state_is("web", "running", ""),
    );

    // An agent restart adopts the Deployment: no new rollout, no pid, the cluster's state.
    let generation =
        fake.get("deployments", "default", "web").unwrap()["metadata"]["generation"].clone();
    a.kill9();
    a.start();
    let s = a.wait_for("adopted and running", SOON, state_is("web", "running", ""));
    assert!(
        s.transitions
            .iter()
            .any(|t| t.machine == "workload/web" && t.reason.contains("adopted")),
        "{:?}",
        s.transitions
    );
    assert_eq!(
        fake.get("deployments", "default", "web").unwrap()["metadata"]["generation"],
        generation
    );

    // A pod that crashes from the start: the run ends as a failure with its exit code.
    fake.image(
        "img:crash",
        Container::Crashes {
            exit_code: 4,
            reason: "Error".into(),
        },
    );
    // An image the kubelet cannot pull is retried by the kubelet: the workload is still
    // starting, with the kubelet's reason, and no failure is counted.
    fake.image("img:unpullable", Container::PullFails);
    a.set_desired(&desired(&[
        k8s_workload("web", "img:1"),
        k8s_workload("crashy", "img:crash"),
        k8s_workload("unpulled", "img:unpullable"),
    ]));
    let s = a.wait_for("the crash is a failure", SOON, |s| {
        Agent::workload(s, "crashy").is_some_and(|w| {
            (w.state == "backoff" || w.state == "failed") && w.reason.contains("code 4")
        })
    });
    assert!(Agent::workload(&s, "crashy").unwrap().restarts >= 1);
    let s = a.wait_for(
        "the pull failure is a reason",
        SOON,
        state_is("unpulled", "starting", "ImagePullBackOff"),
    );
    let w = Agent::workload(&s, "unpulled").unwrap();
    assert_eq!((w.restarts, w.heartbeat_status.as_str()), (0, "deploying"));

    a.set_desired(&desired(&[]));
    a.wait_for("removed", SOON, |s| s.workloads.is_empty());
    fake.wait("the Deployments are deleted", |f| {
        f.names("deployments").is_empty()
    });
}

/// Defects 3 and 5: Deployments of ours that no desired workload explains (an agent that
/// lost its state) are pruned once the desired state is applied, and after each change;
/// others' objects stay. An update and a removal of a workload whose pod cannot be scheduled
/// happen at once, not after a start timeout.
fn defect3_defect5_orphans_are_pruned_and_changes_do_not_wait_for_a_pending_start() {
    let fake = FakeKube::start();
    fake.set_node(Node::Absent);
    let ours = json!({"app.kubernetes.io/managed-by": "device-worker-ng",
                      "device-worker-ng/workload": "orphan"});
    fake.put(
        "configmaps",
        "default",
        json!({"metadata": {"name": "orphan-config", "labels": {"app.kubernetes.io/managed-by": "device-worker-ng"}},
               "data": {"A": "1"}}),
    );
    fake.put(
        "deployments",
        "default",
        json!({"metadata": {"name": "orphan", "labels": ours},
               "spec": {"replicas": 1, "selector": {"matchLabels": {"device-worker-ng/workload": "orphan"}},
                        "template": {"metadata": {"labels": ours},
                                     "spec": {"containers": [{"name": "app", "image": "img:1",
                                              "envFrom": [{"configMapRef": {"name": "orphan-config"}}]}]}}}}),
    );
    fake.put(
        "deployments",
        "default",
        json!({"metadata": {"name": "theirs", "labels": {"app": "theirs"}},
               "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "theirs"}},
                        "template": {"metadata": {"labels": {"app": "theirs"}},
                                     "spec": {"containers": [{"name": "app", "image": "img:1"}]}}}}),
    );
    let mut a = agent(&fake, &desired(&[k8s_workload("web", "img:1")]));
    a.start();
    fake.wait("the orphan is pruned", |f| {
        f.get("deployments", "default", "orphan").is_none()
            && f.get("configmaps", "default", "orphan-config").is_none()
    });
    assert!(fake.get("deployments", "default", "theirs").is_some());
    a.wait_for(
        "web pending on the cluster",
        SOON,
        state_is("web", "starting", "no nodes available"),
    );

    // An update while the pod cannot be scheduled: applied at once.
    a.set_desired(&desired(&[k8s_workload("web", "img:2")]));
    fake.wait("the update is applied", |f| {
        f.get("deployments", "default", "web").is_some_and(|d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] == "img:2"
                && d["spec"]["replicas"] == 1
        })
    });
    a.wait_for(
        "the updated run is starting",
        SOON,
        state_is("web", "starting", "no nodes available"),
    );

    // Another orphan appears (e.g. left by a crashed removal): the next desired state prunes it.
    fake.put(
        "deployments",
        "default",
        json!({"metadata": {"name": "orphan", "labels": ours},
               "spec": {"replicas": 1, "selector": {"matchLabels": {"device-worker-ng/workload": "orphan"}},
                        "template": {"metadata": {"labels": ours},
                                     "spec": {"containers": [{"name": "app", "image": "img:1"}]}}}}),
    );
    // A removal while pending: at once too.
    a.set_desired(&desired(&[]));
    fake.wait("web and the orphan are deleted", |f| {
        f.get("deployments", "default", "web").is_none()
            && f.get("deployments", "default", "orphan").is_none()
    });
    a.wait_for("web is gone from status", SOON, |s| s.workloads.is_empty());
    assert!(fake.get("deployments", "default", "theirs").is_some());
}
