//! The cluster's controllers, acting by themselves a tick after the API calls (KUBE-API.md
//! 9-12): the garbage collector, the Deployment and ReplicaSet controllers, the scheduler, the
//! kubelet of the one node and the node lifecycle controller. Each writes only when what it
//! computes differs from what is stored, as the real ones do (no resourceVersion churn).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::ssa;
use super::{delete_pod, parse_rfc3339, rfc3339, schema, Container, Key, Node, State, NODE};

/// What the controllers remember between ticks.
#[derive(Default)]
pub struct Memory {
    /// Deployment uid → (its rollout's progress as last seen, when it last changed).
    progress: BTreeMap<String, (String, f64)>,
    ticks: u64,
    pod_ips: u64,
}

/// How often (in ticks) a crash-looping container is restarted again.
const CRASH_EVERY: u64 = 50;

pub fn tick(st: &mut State) {
    st.controllers.ticks += 1;
    garbage_collector(st);
    deployment_controller(st);
    replicaset_controller(st);
    scheduler(st);
    kubelet(st);
}

/// The uid of the object's controlling owner.
pub fn owner_uid(o: &Value) -> Option<&Value> {
    o["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["controller"] == true)
        .map(|r| &r["uid"])
}

fn terminating(o: &Value) -> bool {
    !o["metadata"]["deletionTimestamp"].is_null()
}

/// Objects of `plural` in `ns` controlled by the owner with `uid`.
fn owned(st: &State, plural: &str, ns: &str, uid: &Value) -> Vec<(Key, Value)> {
    st.of_plural(plural)
        .filter(|(k, o)| k.1 == ns && owner_uid(&o.obj) == Some(uid))
        .map(|(k, o)| (k.clone(), o.obj.clone()))
        .collect()
}

pub fn pods_of_deployment(st: &State, ns: &str, name: &str) -> Vec<Value> {
    let key = ("deployments".to_string(), ns.to_string(), name.to_string());
    let Some(d) = st.objects.get(&key) else {
        return Vec::new();
    };
    let uid = d.obj["metadata"]["uid"].clone();
    owned(st, "replicasets", ns, &uid)
        .into_iter()
        .flat_map(|(_, rs)| owned(st, "pods", ns, &rs["metadata"]["uid"]))
        .map(|(_, p)| p)
        .collect()
}

/// Writes a controller's change of `status` (when it is one).
fn write_status(st: &mut State, key: &Key, obj: Value, manager: &str) {
    let Some(stored) = st.objects.get(key).cloned() else {
        return;
    };
    if stored.obj == obj {
        return;
    }
    let mut managers = stored.managers;
    let api_version = if key.0 == "pods" { "v1" } else { "apps/v1" };
    let now = st.now_str();
    ssa::status_written(&obj, &mut managers, manager, api_version, &now);
    st.write(key.clone(), obj, managers);
}

/// Writes a controller's change of the object itself (an `Update`).
fn write_update(st: &mut State, key: &Key, mut obj: Value, manager: &str) {
    let Some(stored) = st.objects.get(key).cloned() else {
        return;
    };
    if stored.obj == obj {
        return;
    }
    if stored.obj["spec"] != obj["spec"] {
        let g = stored.obj["metadata"]["generation"].as_i64().unwrap_or(0);
        obj["metadata"]["generation"] = json!(g + 1);
    }
    let mut managers = stored.managers;
    let api_version = if key.0 == "pods" { "v1" } else { "apps/v1" };
    let now = st.now_str();
    ssa::update(&stored.obj, &obj, &mut managers, manager, api_version, &now);
    st.write(key.clone(), obj, managers);
}

fn exists_uid(st: &State, ns: &str, uid: &Value) -> bool {
    st.objects
        .iter()
        .any(|(k, o)| k.1 == ns && o.obj["metadata"]["uid"] == *uid)
}

// ---------------------------------------------------------------------------
// Garbage collector
// ---------------------------------------------------------------------------

/// Dependents whose owner is gone are deleted (Background propagation); an owner deleted in
/// the foreground goes once its dependents are gone.
fn garbage_collector(st: &mut State) {
    let orphans: Vec<Key> = st
        .objects
        .iter()
        .filter(|(_, o)| !terminating(&o.obj))
        .filter(|(k, o)| owner_uid(&o.obj).is_some_and(|u| !exists_uid(st, &k.1, u)))
        .map(|(k, _)| k.clone())
        .collect();
    for key in orphans {
        if key.0 == "pods" {
            delete_pod(st, &key, None);
        } else {
            st.objects.remove(&key);
            st.resource_version += 1;
        }
    }
    let foreground: Vec<(Key, Value)> = st
        .objects
        .iter()
        .filter(|(_, o)| {
            o.obj["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "foregroundDeletion"))
        })
        .map(|(k, o)| (k.clone(), o.obj["metadata"]["uid"].clone()))
        .collect();
    for (key, uid) in foreground {
        let dependents: Vec<Key> = st
            .objects
            .iter()
            .filter(|(k, o)| k.1 == key.1 && owner_uid(&o.obj) == Some(&uid))
            .map(|(k, _)| k.clone())
            .collect();
        if dependents.is_empty() {
            st.objects.remove(&key);
            st.resource_version += 1;
        }
        for d in dependents {
            if d.0 == "pods" {
                delete_pod(st, &d, None);
            } else if let Some(o) = st.objects.get(&d).cloned() {
                if !terminating(&o.obj) {
                    let mut obj = o.obj;
                    obj["metadata"]["deletionTimestamp"] = json!(st.now_str());
                    obj["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
                    st.write(d, obj, o.managers);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Deployment controller
// ---------------------------------------------------------------------------

/// The `pod-template-hash` of a template: FNV-32a, its decimal form safe-encoded as the
/// Deployment controller does.
pub fn template_hash(template: &Value) -> String {
    let mut h: u32 = 0x811c9dc5;
    for b in template.to_string().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x01000193);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    h.to_string()
        .bytes()
        .map(|c| ALPHABET[usize::from(c) % ALPHABET.len()] as char)
        .collect()
}

fn revision(o: &Value) -> i64 {
    o["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn deployment_controller(st: &mut State) {
    let keys: Vec<Key> = st
        .of_plural("deployments")
        .map(|(k, _)| k.clone())
        .collect();
    for key in keys {
        let Some(d) = st.objects.get(&key).map(|s| s.obj.clone()) else {
            continue;
        };
        if terminating(&d) {
            continue;
        }
        let ns = key.1.clone();
        let uid = d["metadata"]["uid"].clone();
        let hash = template_hash(&d["spec"]["template"]);
        let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
        let recreate = d["spec"]["strategy"]["type"] == "Recreate";
        let rss = owned(st, "replicasets", &ns, &uid);
        let new_rs = rss
            .iter()
            .find(|(_, rs)| rs["metadata"]["labels"]["pod-template-hash"] == hash.as_str())
            .cloned();
        let old: Vec<(Key, Value)> = rss
            .iter()
            .filter(|(k, _)| new_rs.as_ref().map(|n| &n.0) != Some(k))
            .cloned()
            .collect();
        for (k, rs) in &old {
            if rs["spec"]["replicas"].as_i64() != Some(0) {
                let mut rs = rs.clone();
                rs["spec"]["replicas"] = json!(0);
                write_update(st, k, rs, "kube-controller-manager");
            }
        }
        let old_pods = old
            .iter()
            .any(|(_, rs)| !owned(st, "pods", &ns, &rs["metadata"]["uid"]).is_empty());
        // Recreate: the new pods wait until every old one is gone.
        let want = if recreate && old_pods { 0 } else { replicas };
        let next_revision = rss.iter().map(|(_, rs)| revision(rs)).max().unwrap_or(0) + 1;
        let mut created = false;
        let new_key = match &new_rs {
            Some((k, rs)) => {
                if rs["spec"]["replicas"].as_i64() != Some(want) {
                    let mut rs = rs.clone();
                    rs["spec"]["replicas"] = json!(want);
                    write_update(st, k, rs, "kube-controller-manager");
                }
                Some(k.clone())
            }
            None if !(recreate && old_pods) => {
                created = true;
                Some(create_replicaset(st, &d, &hash, want, next_revision))
            }
            None => None,
        };
        if let Some(k) = &new_key {
            let rev = st
                .objects
                .get(k)
                .map(|s| revision(&s.obj))
                .unwrap_or(next_revision);
            if revision(&d) != rev {
                let mut d2 = d.clone();
                d2["metadata"]["annotations"]["deployment.kubernetes.io/revision"] =
                    json!(rev.to_string());
                write_update(st, &key, d2, "kube-controller-manager");
            }
        }
        prune_history(st, &d, &ns, &uid, new_key.as_ref());
        deployment_status(st, &key, new_key.as_ref(), created);
    }
}

fn create_replicaset(st: &mut State, d: &Value, hash: &str, replicas: i64, rev: i64) -> Key {
    let ns = d["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = format!(
        "{}-{hash}",
        d["metadata"]["name"].as_str().unwrap_or_default()
    );
    let mut template = d["spec"]["template"].clone();
    template["metadata"]["labels"]["pod-template-hash"] = json!(hash);
    let mut selector = d["spec"]["selector"].clone();
    selector["matchLabels"]["pod-template-hash"] = json!(hash);
    let uid = st.next_uid();
    let now = st.now_str();
    let mut labels = template["metadata"]["labels"].clone();
    labels["pod-template-hash"] = json!(hash);
    let mut rs = json!({
        "metadata": {
            "name": name, "namespace": ns, "uid": uid, "creationTimestamp": now,
            "generation": 1, "labels": labels,
            "annotations": {"deployment.kubernetes.io/desired-replicas": d["spec"]["replicas"].to_string(),
                            "deployment.kubernetes.io/max-replicas": d["spec"]["replicas"].to_string(),
                            "deployment.kubernetes.io/revision": rev.to_string()},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                 "name": d["metadata"]["name"], "uid": d["metadata"]["uid"],
                                 "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {"replicas": replicas, "selector": selector, "template": template},
        "status": {"replicas": 0},
    });
    schema::default("ReplicaSet", &mut rs);
    let mut managers = Vec::new();
    ssa::update(
        &json!({}),
        &rs,
        &mut managers,
        "kube-controller-manager",
        "apps/v1",
        &now,
    );
    let key = ("replicasets".to_string(), ns.to_string(), name);
    st.write(key.clone(), rs, managers);
    key
}

/// Old ReplicaSets beyond `revisionHistoryLimit` go (only scaled-down ones without pods).
fn prune_history(st: &mut State, d: &Value, ns: &str, uid: &Value, new: Option<&Key>) {
    let limit = d["spec"]["revisionHistoryLimit"]
        .as_i64()
        .unwrap_or(10)
        .max(0) as usize;
    let mut old: Vec<(i64, Key)> = owned(st, "replicasets", ns, uid)
        .into_iter()
        .filter(|(k, rs)| {
            Some(k) != new
                && rs["spec"]["replicas"].as_i64() == Some(0)
                && owned(st, "pods", ns, &rs["metadata"]["uid"]).is_empty()
        })
        .map(|(k, rs)| (revision(&rs), k))
        .collect();
    old.sort();
    while old.len() > limit {
        let (_, k) = old.remove(0);
        st.objects.remove(&k);
        st.resource_version += 1;
    }
}

fn condition(
    previous: Option<&Value>,
    ty: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: &str,
) -> Value {
    let transition = match previous {
        Some(p) if p["status"] == status => p["lastTransitionTime"].clone(),
        _ => json!(now),
    };
    let update = match previous {
        Some(p) if p["status"] == status && p["reason"] == reason && p["message"] == message => {
            p["lastUpdateTime"].clone()
        }
        _ => json!(now),
    };
    json!({"type": ty, "status": status, "lastUpdateTime": update,
           "lastTransitionTime": transition, "reason": reason, "message": message})
}

fn deployment_status(st: &mut State, key: &Key, new: Option<&Key>, created: bool) {
    let Some(d) = st.objects.get(key).map(|s| s.obj.clone()) else {
        return;
    };
    let ns = key.1.as_str();
    let uid = d["metadata"]["uid"].clone();
    let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
    let (mut total, mut updated, mut ready) = (0i64, 0i64, 0i64);
    let mut new_rs = None;
    for (k, rs) in owned(st, "replicasets", ns, &uid) {
        let pods: Vec<Value> = owned(st, "pods", ns, &rs["metadata"]["uid"])
            .into_iter()
            .map(|(_, p)| p)
            .filter(|p| !terminating(p))
            .collect();
        total += pods.len() as i64;
        ready += pods.iter().filter(|p| is_ready(p)).count() as i64;
        if Some(&k) == new {
            updated += pods.len() as i64;
            new_rs = Some(rs);
        }
    }
    let available = ready;
    let now = st.now();
    let now_str = rfc3339(now as i64);
    let signature = format!(
        "{}:{total}:{updated}:{ready}",
        new.map(|k| k.2.as_str()).unwrap_or("")
    );
    let uid_s = uid.as_str().unwrap_or_default().to_string();
    let last_progress = match st.controllers.progress.get(&uid_s) {
        Some((sig, at)) if *sig == signature => *at,
        _ => {
            st.controllers.progress.insert(uid_s, (signature, now));
            now
        }
    };
    let previous: Vec<Value> = d["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let prev = |ty: &str| previous.iter().find(|c| c["type"] == ty);
    let mut conditions = Vec::new();
    conditions.push(if available >= replicas {
        condition(
            prev("Available"),
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.",
            &now_str,
        )
    } else {
        condition(
            prev("Available"),
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.",
            &now_str,
        )
    });
    let rs_name = new.map(|k| k.2.clone()).unwrap_or_default();
    let complete =
        new.is_some() && updated == replicas && available == replicas && total == replicas;
    let deadline = d["spec"]["progressDeadlineSeconds"]
        .as_f64()
        .unwrap_or(600.0);
    let progressing = if created {
        Some(condition(
            prev("Progressing"),
            "Progressing",
            "True",
            "NewReplicaSetCreated",
            &format!("Created new replica set \"{rs_name}\""),
            &now_str,
        ))
    } else if complete {
        Some(condition(
            prev("Progressing"),
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            &format!("ReplicaSet \"{rs_name}\" has successfully progressed."),
            &now_str,
        ))
    } else if now - last_progress > deadline {
        Some(condition(
            prev("Progressing"),
            "Progressing",
            "False",
            "ProgressDeadlineExceeded",
            &format!("ReplicaSet \"{rs_name}\" has timed out progressing."),
            &now_str,
        ))
    } else if new.is_some() && last_progress == now {
        Some(condition(
            prev("Progressing"),
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            &format!("ReplicaSet \"{rs_name}\" is progressing."),
            &now_str,
        ))
    } else {
        prev("Progressing").cloned()
    };
    conditions.extend(progressing);
    let failure = new_rs.as_ref().and_then(|rs| {
        rs["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "ReplicaFailure" && c["status"] == "True")
            .cloned()
    });
    if let Some(f) = failure {
        conditions.push(condition(
            prev("ReplicaFailure"),
            "ReplicaFailure",
            "True",
            f["reason"].as_str().unwrap_or("FailedCreate"),
            f["message"].as_str().unwrap_or_default(),
            &now_str,
        ));
    }
    let mut status =
        json!({"observedGeneration": d["metadata"]["generation"], "conditions": conditions});
    // Counts are omitted when 0, as the API server serializes them.
    for (k, v) in [
        ("replicas", total),
        ("updatedReplicas", updated),
        ("readyReplicas", ready),
        ("availableReplicas", available),
        ("unavailableReplicas", (replicas - available).max(0)),
    ] {
        if v != 0 {
            status[k] = json!(v);
        }
    }
    let mut d2 = d.clone();
    d2["status"] = status;
    write_status(st, key, d2, "kube-controller-manager");
}

// ---------------------------------------------------------------------------
// ReplicaSet controller
// ---------------------------------------------------------------------------

fn replicaset_controller(st: &mut State) {
    let keys: Vec<Key> = st
        .of_plural("replicasets")
        .map(|(k, _)| k.clone())
        .collect();
    for key in keys {
        let Some(rs) = st.objects.get(&key).map(|s| s.obj.clone()) else {
            continue;
        };
        if terminating(&rs) {
            continue;
        }
        let ns = key.1.clone();
        let uid = rs["metadata"]["uid"].clone();
        let want = rs["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
        let live: Vec<(Key, Value)> = owned(st, "pods", &ns, &uid)
            .into_iter()
            .filter(|(_, p)| !terminating(p))
            .collect();
        let mut failure = None;
        for _ in live.len()..want {
            let used = st
                .of_plural("pods")
                .filter(|(k, p)| k.1 == ns && !terminating(&p.obj))
                .count() as u64;
            if let Some(&max) = st.quotas.get(&ns) {
                if used >= max {
                    failure = Some(format!(
                        "pods \"{}-{}\" is forbidden: exceeded quota: pod-quota, requested: pods=1, used: pods={used}, limited: pods={max}",
                        key.2,
                        st.random_suffix(5)
                    ));
                    break;
                }
            }
            create_pod(st, &rs);
        }
        if live.len() > want {
            // Pods not yet on a node go first, then those not ready.
            let mut extra = live.clone();
            extra.sort_by_key(|(_, p)| (p["spec"]["nodeName"].is_string(), is_ready(p)));
            for (k, _) in extra.into_iter().take(live.len() - want) {
                delete_pod(st, &k, None);
            }
        }
        let pods: Vec<Value> = owned(st, "pods", &ns, &uid)
            .into_iter()
            .map(|(_, p)| p)
            .filter(|p| !terminating(p))
            .collect();
        let ready = pods.iter().filter(|p| is_ready(p)).count() as i64;
        let now = st.now_str();
        let prev = rs["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "ReplicaFailure"))
            .cloned();
        let mut status =
            json!({"replicas": pods.len(), "observedGeneration": rs["metadata"]["generation"]});
        for (k, v) in [
            ("fullyLabeledReplicas", pods.len() as i64),
            ("readyReplicas", ready),
            ("availableReplicas", ready),
        ] {
            if v != 0 {
                status[k] = json!(v);
            }
        }
        if let Some(message) = failure {
            status["conditions"] = json!([{"type": "ReplicaFailure", "status": "True",
                "lastTransitionTime": prev.as_ref().map_or(json!(now), |p| p["lastTransitionTime"].clone()),
                "reason": "FailedCreate", "message": message}]);
        }
        // The quota message names a random pod name: keep the condition while it holds.
        if let (Some(p), Some(c)) = (&prev, status["conditions"].get_mut(0)) {
            c["message"] = p["message"].clone();
        }
        let mut rs2 = rs.clone();
        rs2["status"] = status;
        write_status(st, &key, rs2, "kube-controller-manager");
    }
}

fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let any = containers.iter().any(|c| {
        c["resources"]["limits"]
            .as_object()
            .is_some_and(|m| !m.is_empty())
            || c["resources"]["requests"]
                .as_object()
                .is_some_and(|m| !m.is_empty())
    });
    if !any {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        let l = &c["resources"]["limits"];
        let r = &c["resources"]["requests"];
        ["cpu", "memory"]
            .iter()
            .all(|k| !l[k].is_null() && (r[k].is_null() || r[k] == l[k]))
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

fn create_pod(st: &mut State, rs: &Value) {
    let ns = rs["metadata"]["namespace"].as_str().unwrap_or_default();
    let rs_name = rs["metadata"]["name"].as_str().unwrap_or_default();
    let name = format!("{rs_name}-{}", st.random_suffix(5));
    let template = &rs["spec"]["template"];
    let uid = st.next_uid();
    let now = st.now_str();
    let mut meta = json!({
        "name": name, "generateName": format!("{rs_name}-"), "namespace": ns, "uid": uid,
        "creationTimestamp": now, "labels": template["metadata"]["labels"],
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs_name,
                             "uid": rs["metadata"]["uid"], "controller": true,
                             "blockOwnerDeletion": true}],
    });
    if !template["metadata"]["annotations"].is_null() {
        meta["annotations"] = template["metadata"]["annotations"].clone();
    }
    let mut pod = json!({"metadata": meta, "spec": template["spec"]});
    schema::default("Pod", &mut pod);
    pod["status"] = json!({"phase": "Pending", "qosClass": qos_class(&pod["spec"])});
    let mut managers = Vec::new();
    ssa::update(
        &json!({}),
        &pod,
        &mut managers,
        "kube-controller-manager",
        "v1",
        &now,
    );
    st.write(("pods".into(), ns.into(), name), pod, managers);
}

// ---------------------------------------------------------------------------
// Scheduler
// ---------------------------------------------------------------------------

fn scheduler(st: &mut State) {
    let pending: Vec<Key> = st
        .of_plural("pods")
        .filter(|(_, p)| !terminating(&p.obj) && p.obj["spec"]["nodeName"].is_null())
        .map(|(k, _)| k.clone())
        .collect();
    let now = st.now_str();
    for key in pending {
        let Some(mut pod) = st.objects.get(&key).map(|s| s.obj.clone()) else {
            continue;
        };
        let unschedulable = match st.node {
            Node::Ready | Node::NoKubelet => None,
            Node::Absent => Some("no nodes available to schedule pods".to_string()),
            Node::NotReady => Some("0/1 nodes are available: 1 node(s) had untolerated taint {node.kubernetes.io/unreachable: }. preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.".to_string()),
        };
        match unschedulable {
            None => {
                pod["spec"]["nodeName"] = json!(NODE);
                pod["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "True",
                    "lastProbeTime": null, "lastTransitionTime": now}]);
                write_status(st, &key, pod, "kube-scheduler");
            }
            Some(message) => {
                let prev = pod["status"]["conditions"][0].clone();
                if prev["message"] == message.as_str() {
                    continue;
                }
                pod["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "False",
                    "lastProbeTime": null, "lastTransitionTime": now,
                    "reason": "Unschedulable", "message": message}]);
                write_status(st, &key, pod, "kube-scheduler");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Kubelet and node lifecycle
// ---------------------------------------------------------------------------

fn kubelet(st: &mut State) {
    let on_node: Vec<Key> = st
        .of_plural("pods")
        .filter(|(_, p)| p.obj["spec"]["nodeName"] == NODE)
        .map(|(k, _)| k.clone())
        .collect();
    for key in on_node {
        let Some(pod) = st.objects.get(&key).map(|s| s.obj.clone()) else {
            continue;
        };
        match st.node {
            Node::Ready => {
                if terminating(&pod) {
                    let stubborn = containers(&pod).iter().any(|c| {
                        st.ignores_sigterm
                            .contains(c["image"].as_str().unwrap_or(""))
                    });
                    let deadline = pod["metadata"]["deletionTimestamp"]
                        .as_str()
                        .and_then(parse_rfc3339)
                        .unwrap_or(0);
                    if !stubborn || st.now() >= deadline as f64 {
                        // The containers are gone: the kubelet's final delete.
                        st.objects.remove(&key);
                        st.resource_version += 1;
                    }
                } else {
                    let status = pod_status(st, &pod);
                    let mut p2 = pod.clone();
                    p2["status"] = status;
                    write_status(st, &key, p2, "kubelet");
                }
            }
            // The node lifecycle controller: the kubelet stopped reporting.
            Node::NotReady | Node::Absent => {
                let mut p2 = pod.clone();
                let mut changed = false;
                for c in p2["status"]["conditions"]
                    .as_array_mut()
                    .into_iter()
                    .flatten()
                {
                    if (c["type"] == "Ready" || c["type"] == "ContainersReady")
                        && c["status"] == "True"
                    {
                        c["status"] = json!("False");
                        c["lastTransitionTime"] = json!(st.now_str());
                        changed = true;
                    }
                }
                if changed {
                    write_status(st, &key, p2, "node-controller");
                }
            }
            Node::NoKubelet => {}
        }
    }
}

fn containers(pod: &Value) -> Vec<Value> {
    pod["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The pod's status as the kubelet reports it, from what each container's image does.
fn pod_status(st: &mut State, pod: &Value) -> Value {
    let now = st.now_str();
    let ticks = st.controllers.ticks;
    let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let prev = &pod["status"];
    let mut statuses = Vec::new();
    let (mut all_ready, mut started_any) = (true, false);
    let mut unready = Vec::new();
    for c in containers(pod) {
        let name = c["name"].as_str().unwrap_or("?").to_string();
        let image = c["image"].as_str().unwrap_or_default().to_string();
        let before = prev["containerStatuses"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == name.as_str()))
            .cloned()
            .unwrap_or(Value::Null);
        let restarts = before["restartCount"].as_i64().unwrap_or(0);
        let behaviour = st.images.get(&image).cloned().unwrap_or(Container::Runs);
        let running_since = before["state"]["running"]["startedAt"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| now.clone());
        let image_id = format!("{image}@sha256:{:064x}", image.len());
        let container_id = format!("cri-o://{:064x}", restarts + 1);
        let s = match &behaviour {
            Container::Runs => json!({"name": name, "image": image, "imageID": image_id,
                "containerID": container_id, "ready": true, "started": true,
                "restartCount": restarts, "state": {"running": {"startedAt": running_since}},
                "lastState": before.get("lastState").cloned().unwrap_or(json!({}))}),
            Container::Pulling => json!({"name": name, "image": image, "imageID": "",
                "ready": false, "started": false, "restartCount": restarts,
                "state": {"waiting": {"reason": "ContainerCreating"}}, "lastState": {}}),
            Container::PullFails => json!({"name": name, "image": image, "imageID": "",
                "ready": false, "started": false, "restartCount": restarts,
                "state": {"waiting": {"reason": "ImagePullBackOff",
                          "message": format!("Back-off pulling image \"{image}\"")}},
                "lastState": {}}),
            Container::Crashes { exit_code, reason } => {
                let n = if restarts == 0 || ticks % CRASH_EVERY == 0 {
                    restarts + 1
                } else {
                    restarts
                };
                json!({"name": name, "image": image, "imageID": image_id,
                    "containerID": container_id, "ready": false, "started": false,
                    "restartCount": n,
                    "state": {"waiting": {"reason": "CrashLoopBackOff",
                              "message": format!("back-off 10s restarting failed container={name} pod={pod_name}")}},
                    "lastState": {"terminated": {"exitCode": exit_code, "reason": reason,
                                  "startedAt": now, "finishedAt": now, "containerID": container_id}}})
            }
            Container::RestartedOnce { exit_code, reason } => {
                let last = if before["lastState"]["terminated"].is_null() {
                    json!({"terminated": {"exitCode": exit_code, "reason": reason,
                           "startedAt": now, "finishedAt": now}})
                } else {
                    before["lastState"].clone()
                };
                json!({"name": name, "image": image, "imageID": image_id,
                    "containerID": container_id, "ready": true, "started": true,
                    "restartCount": restarts.max(1),
                    "state": {"running": {"startedAt": running_since}}, "lastState": last})
            }
        };
        if s["ready"] != true {
            all_ready = false;
            unready.push(name);
        }
        if !s["state"]["running"].is_null() || !s["lastState"]["terminated"].is_null() {
            started_any = true;
        }
        statuses.push(s);
    }
    let ip = match prev["podIP"].as_str() {
        Some(ip) => ip.to_string(),
        None => {
            st.controllers.pod_ips += 1;
            format!("10.42.0.{}", st.controllers.pod_ips % 250 + 2)
        }
    };
    let transition = |ty: &str, status: &str| -> Value {
        let p = prev["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == ty));
        match p {
            Some(p) if p["status"] == status => p["lastTransitionTime"].clone(),
            _ => json!(now),
        }
    };
    let ready = if all_ready { "True" } else { "False" };
    let mut ready_c = json!({"type": "Ready", "status": ready, "lastProbeTime": null,
                             "lastTransitionTime": transition("Ready", ready)});
    let mut containers_ready = json!({"type": "ContainersReady", "status": ready,
        "lastProbeTime": null, "lastTransitionTime": transition("ContainersReady", ready)});
    if !all_ready {
        let why = format!("containers with unready status: [{}]", unready.join(" "));
        for c in [&mut ready_c, &mut containers_ready] {
            c["reason"] = json!("ContainersNotReady");
            c["message"] = json!(why);
        }
    }
    json!({
        "phase": if started_any { "Running" } else { "Pending" },
        "conditions": [
            {"type": "Initialized", "status": "True", "lastProbeTime": null,
             "lastTransitionTime": transition("Initialized", "True")},
            ready_c, containers_ready,
            {"type": "PodScheduled", "status": "True", "lastProbeTime": null,
             "lastTransitionTime": transition("PodScheduled", "True")},
        ],
        "hostIP": "192.168.122.10", "podIP": ip, "podIPs": [{"ip": ip}],
        "startTime": prev["startTime"].as_str().map_or(json!(now), |s| json!(s)),
        "containerStatuses": statuses,
        "qosClass": prev["qosClass"],
    })
}
