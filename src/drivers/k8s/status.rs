//! What a workload's Deployment and pods say about it, as the heartbeat's workload states
//! (`deploying|running|crashed|stopped`, PROTOCOL §5). Pure: the driver polls the objects and
//! asks [`assess`].

use std::collections::BTreeMap;

use serde_json::Value;

/// Container waiting reasons that mean the pod will not run without a change or a retry.
/// `ImagePullBackOff` and `ErrImagePull` are not among them: the kubelet retries pulls by
/// itself and a registry outage ends by itself, so they are why the workload is still
/// deploying, not failures that count towards RESTART_MAX_FAILURES.
const STUCK_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "PreStartHookError",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Being rolled out, scheduled, pulled, started: why it is not running yet.
    Deploying(String),
    Running,
    Crashed(Crash),
    /// Gone, being deleted, or scaled to zero.
    Stopped(String),
}

impl Health {
    /// The heartbeat's workload status.
    pub fn heartbeat_status(&self) -> &'static str {
        match self {
            Health::Deploying(_) => "deploying",
            Health::Running => "running",
            Health::Crashed(_) => "crashed",
            Health::Stopped(_) => "stopped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crash {
    pub reason: String,
    /// Exit code of the container's last termination, when it terminated.
    pub exit_code: Option<i32>,
    pub oom_killed: bool,
}

/// The state of a workload from its Deployment (`None`: it does not exist) and the pods that
/// carry its label.
pub fn assess(deployment: Option<&Value>, pods: &[Value]) -> Health {
    let Some(d) = deployment else {
        return Health::Stopped("its Deployment does not exist".into());
    };
    if !d["metadata"]["deletionTimestamp"].is_null() {
        return Health::Stopped("its Deployment is being deleted".into());
    }
    if d["spec"]["replicas"].as_i64() == Some(0) {
        return Health::Stopped("its Deployment is scaled to 0 replicas".into());
    }
    let live: Vec<&Value> = pods
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .collect();
    for p in &live {
        if let Some(c) = pod_crash(p) {
            return Health::Crashed(c);
        }
    }
    let generation = d["metadata"]["generation"].as_i64().unwrap_or(0);
    let observed = d["status"]["observedGeneration"].as_i64().unwrap_or(0);
    if observed < generation {
        return Health::Deploying(format!(
            "the Deployment controller has not yet seen generation {generation}"
        ));
    }
    let count = |k: &str| d["status"][k].as_i64().unwrap_or(0);
    let conditions: Vec<&Value> = d["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let available = conditions
        .iter()
        .any(|c| c["type"] == "Available" && c["status"] == "True");
    let ready_pod = live.iter().any(|p| pod_ready(p));
    if available && count("updatedReplicas") >= 1 && count("readyReplicas") >= 1 && ready_pod {
        return Health::Running;
    }
    // Not available. A quota refusing the pod and a rollout past its progress deadline are
    // retried by the cluster itself (and resolve by themselves): reasons, not crashes.
    let mut why = why_not_ready(&live, pods.len() - live.len());
    for c in &conditions {
        let message = c["message"].as_str().unwrap_or_default();
        if c["type"] == "ReplicaFailure" && c["status"] == "True" {
            why = format!("the Deployment cannot create its pod: {message}");
        }
    }
    for c in &conditions {
        if c["type"] == "Progressing"
            && c["status"] == "False"
            && c["reason"] == "ProgressDeadlineExceeded"
        {
            let message = c["message"].as_str().unwrap_or_default();
            why = format!("{why} (rollout past its progress deadline: {message})");
        }
    }
    Health::Deploying(why)
}

fn pod_ready(p: &Value) -> bool {
    p["status"]["phase"] == "Running"
        && p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn pod_name(p: &Value) -> &str {
    p["metadata"]["name"].as_str().unwrap_or("?")
}

fn statuses(p: &Value) -> impl Iterator<Item = &Value> {
    ["initContainerStatuses", "containerStatuses"]
        .into_iter()
        .flat_map(move |k| p["status"][k].as_array().into_iter().flatten())
}

/// A pod that failed or a container stuck in a state that needs a retry.
fn pod_crash(p: &Value) -> Option<Crash> {
    let pod = pod_name(p);
    if p["status"]["phase"] == "Failed" {
        let (code, oom) = last_termination(p);
        let why = [
            p["status"]["reason"].as_str(),
            p["status"]["message"].as_str(),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(": ");
        return Some(Crash {
            reason: format!(
                "pod {pod} failed{}",
                if why.is_empty() {
                    String::new()
                } else {
                    format!(": {why}")
                }
            ),
            exit_code: code,
            oom_killed: oom,
        });
    }
    for s in statuses(p) {
        let c = s["name"].as_str().unwrap_or("?");
        let waiting = &s["state"]["waiting"];
        if let Some(r) = waiting["reason"].as_str() {
            if STUCK_REASONS.contains(&r) {
                let term = &s["lastState"]["terminated"];
                let message = waiting["message"].as_str().unwrap_or_default();
                let last = match term["reason"].as_str() {
                    Some(t) => format!(
                        " (last exit: {t}, code {})",
                        term["exitCode"].as_i64().unwrap_or(-1)
                    ),
                    None => String::new(),
                };
                return Some(Crash {
                    reason: format!(
                        "pod {pod} container {c}: {r}{}{last}",
                        if message.is_empty() {
                            String::new()
                        } else {
                            format!(": {message}")
                        }
                    ),
                    exit_code: term["exitCode"].as_i64().map(|x| x as i32),
                    oom_killed: term["reason"] == "OOMKilled",
                });
            }
        }
        let term = &s["state"]["terminated"];
        if let Some(code) = term["exitCode"].as_i64() {
            if code != 0 || term["reason"] == "OOMKilled" {
                return Some(Crash {
                    reason: format!(
                        "pod {pod} container {c} exited with code {code} ({})",
                        term["reason"].as_str().unwrap_or("Error")
                    ),
                    exit_code: Some(code as i32),
                    oom_killed: term["reason"] == "OOMKilled",
                });
            }
        }
    }
    None
}

/// Exit code and OOM kill of the pod's most telling container termination.
fn last_termination(p: &Value) -> (Option<i32>, bool) {
    for s in statuses(p) {
        for t in [&s["state"]["terminated"], &s["lastState"]["terminated"]] {
            if let Some(code) = t["exitCode"].as_i64() {
                return (Some(code as i32), t["reason"] == "OOMKilled");
            }
        }
    }
    (None, false)
}

fn why_not_ready(pods: &[&Value], terminating: usize) -> String {
    let Some(p) = pods.first() else {
        return if terminating > 0 {
            "waiting for its old pod to terminate".into()
        } else {
            "waiting for its pod to be created".into()
        };
    };
    let pod = pod_name(p);
    let node = p["spec"]["nodeName"].as_str();
    let conditions: Vec<&Value> = p["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    for c in &conditions {
        if c["type"] == "PodScheduled" && c["status"] == "False" {
            return format!(
                "pod {pod} not scheduled: {}",
                c["message"].as_str().unwrap_or("no reason given")
            );
        }
    }
    for s in statuses(p) {
        if let Some(r) = s["state"]["waiting"]["reason"].as_str() {
            let message = s["state"]["waiting"]["message"]
                .as_str()
                .unwrap_or_default();
            return format!(
                "pod {pod} container {}: {r}{}",
                s["name"].as_str().unwrap_or("?"),
                if message.is_empty() {
                    String::new()
                } else {
                    format!(": {message}")
                }
            );
        }
    }
    let Some(node) = node else {
        return format!("pod {pod} is waiting to be scheduled");
    };
    if p["status"]["containerStatuses"].is_null() {
        return format!(
            "pod {pod} is scheduled on node {node}; waiting for its kubelet to start it"
        );
    }
    for c in &conditions {
        if c["type"] == "Ready" && c["status"] == "False" {
            return match (c["reason"].as_str(), c["message"].as_str()) {
                (Some(r), Some(m)) => format!("pod {pod} on node {node} is not ready: {r}: {m}"),
                (Some(r), None) => format!("pod {pod} on node {node} is not ready: {r}"),
                // The node lifecycle controller marks pods not ready without a reason.
                _ => format!(
                    "pod {pod} on node {node} is not ready (no reason given: its node may have stopped reporting)"
                ),
            };
        }
    }
    format!(
        "pod {pod} is {}",
        p["status"]["phase"].as_str().unwrap_or("Pending")
    )
}

/// Total container restarts per pod (the kubelet restarts a crashed container in place: a
/// rising count is a crash the agent would otherwise miss between two polls).
/// Each live pod's container restarts (summed over its containers), by pod name.
pub fn restarts_by_pod(pods: &[Value]) -> BTreeMap<String, u64> {
    pods.iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter_map(|p| {
            let name = p["metadata"]["name"].as_str()?.to_string();
            let n = p["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| s["restartCount"].as_u64().unwrap_or(0))
                .sum();
            Some((name, n))
        })
        .collect()
}

pub fn restart_counts(pods: &[Value]) -> u64 {
    pods.iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .flat_map(|p| {
            p["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| s["restartCount"].as_u64().unwrap_or(0))
                .collect::<Vec<_>>()
        })
        .sum()
}

/// The last termination of any container of the pods (after a restart the kubelet keeps it
/// in `lastState`).
pub fn last_crash(pods: &[Value]) -> Crash {
    for p in pods {
        for s in statuses(p) {
            let t = &s["lastState"]["terminated"];
            if let Some(code) = t["exitCode"].as_i64() {
                return Crash {
                    reason: format!(
                        "pod {} container {} restarted after exit code {code} ({})",
                        pod_name(p),
                        s["name"].as_str().unwrap_or("?"),
                        t["reason"].as_str().unwrap_or("Error")
                    ),
                    exit_code: Some(code as i32),
                    oom_killed: t["reason"] == "OOMKilled",
                };
            }
        }
    }
    Crash {
        reason: "a container restarted".into(),
        exit_code: None,
        oom_killed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(generation: i64, observed: i64, available: bool) -> Value {
        json!({
            "metadata": {"name": "web", "generation": generation},
            "spec": {"replicas": 1},
            "status": {
                "observedGeneration": observed,
                "replicas": 1, "updatedReplicas": 1,
                "readyReplicas": if available { 1 } else { 0 },
                "conditions": [
                    {"type": "Available", "status": if available { "True" } else { "False" },
                     "reason": "MinimumReplicasUnavailable", "message": "Deployment does not have minimum availability."},
                    {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}
                ]
            }
        })
    }

    fn pod(status: Value) -> Value {
        json!({"metadata": {"name": "web-5d9c-abcde"}, "status": status})
    }

    #[test]
    fn deploying_then_running() {
        assert!(
            matches!(assess(Some(&deployment(2, 1, true)), &[]), Health::Deploying(r) if r.contains("generation 2"))
        );
        let pending = pod(json!({"phase": "Pending", "containerStatuses": [
            {"name": "c", "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]}));
        let h = assess(Some(&deployment(1, 1, false)), &[pending]);
        assert_eq!(
            h,
            Health::Deploying("pod web-5d9c-abcde container c: ContainerCreating".into())
        );
        assert_eq!(h.heartbeat_status(), "deploying");
        let running = pod(json!({"phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "c", "restartCount": 0, "ready": true, "state": {"running": {}}}]}));
        assert_eq!(
            assess(Some(&deployment(1, 1, true)), &[running]),
            Health::Running
        );
    }

    #[test]
    fn crashes_carry_their_reason_and_exit() {
        let looping = pod(
            json!({"phase": "Running", "containerStatuses": [{"name": "c", "restartCount": 3,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
            "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}),
        );
        let Health::Crashed(c) = assess(Some(&deployment(1, 1, false)), &[looping]) else {
            panic!("expected a crash");
        };
        assert!(c.reason.contains("CrashLoopBackOff"), "{}", c.reason);
        assert!(c.reason.contains("OOMKilled"), "{}", c.reason);
        assert_eq!(c.exit_code, Some(137));
        assert!(c.oom_killed);
    }

    #[test]
    fn what_the_cluster_retries_by_itself_is_a_reason_not_a_crash() {
        let pull = pod(
            json!({"phase": "Pending", "containerStatuses": [{"name": "c", "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"nope\""}}}]}),
        );
        assert!(
            matches!(assess(Some(&deployment(1, 1, false)), &[pull]), Health::Deploying(why) if why.contains("ImagePullBackOff: Back-off pulling image")),
        );
        let mut d = deployment(1, 1, false);
        d["status"]["conditions"] = json!([{"type": "ReplicaFailure", "status": "True",
            "message": "pods \"web-x\" is forbidden: exceeded quota"}]);
        assert_eq!(
            assess(Some(&d), &[]),
            Health::Deploying(
                "the Deployment cannot create its pod: pods \"web-x\" is forbidden: exceeded quota"
                    .into()
            )
        );
        let pulling = pod(
            json!({"phase": "Pending", "containerStatuses": [{"name": "c", "restartCount": 0,
            "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
        );
        let mut d = deployment(1, 1, false);
        d["status"]["conditions"] = json!([{"type": "Progressing", "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "message": "ReplicaSet \"web-5d9c\" has timed out progressing."}]);
        assert_eq!(
            assess(Some(&d), &[pulling]),
            Health::Deploying("pod web-5d9c-abcde container c: ContainerCreating (rollout past its progress deadline: ReplicaSet \"web-5d9c\" has timed out progressing.)".into())
        );
        // The node stopped reporting: the pod is Running but not ready, with no reason.
        let stale = pod(json!({"phase": "Running",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "c", "restartCount": 0, "ready": true, "state": {"running": {}}}]}));
        let mut stale = stale;
        stale["spec"] = json!({"nodeName": "edge-node"});
        assert!(
            matches!(assess(Some(&deployment(1, 1, false)), &[stale]), Health::Deploying(r) if r.contains("on node edge-node is not ready"))
        );
        let unscheduled = pod(
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
            "status": "False", "reason": "Unschedulable", "message": "no nodes available to schedule pods"}]}),
        );
        assert_eq!(
            assess(Some(&deployment(1, 1, false)), &[unscheduled]),
            Health::Deploying(
                "pod web-5d9c-abcde not scheduled: no nodes available to schedule pods".into()
            )
        );
    }

    #[test]
    fn stopped_when_gone_deleted_or_scaled_down() {
        assert!(matches!(assess(None, &[]), Health::Stopped(_)));
        let mut d = deployment(1, 1, true);
        d["spec"]["replicas"] = json!(0);
        assert!(matches!(assess(Some(&d), &[]), Health::Stopped(r) if r.contains("0 replicas")));
        let mut d = deployment(1, 1, true);
        d["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
        assert_eq!(assess(Some(&d), &[]).heartbeat_status(), "stopped");
    }

    #[test]
    fn restarts_are_counted() {
        let p = pod(
            json!({"containerStatuses": [{"name": "c", "restartCount": 2,
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}),
        );
        assert_eq!(restart_counts(std::slice::from_ref(&p)), 2);
        assert_eq!(last_crash(&[p]).exit_code, Some(1));
    }
}
