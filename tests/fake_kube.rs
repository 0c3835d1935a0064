//! The fake Kubernetes API server (tests/support/fake_kube.rs) itself: each behaviour of a
//! real API server it implements (`../shared/reference/KUBE-API.md`, items 1-15), shown with
//! raw HTTP requests as kubectl or the agent would send them. No root needed.

use std::time::Duration;

use dwng_test_support::fake_kube::{Container, FakeKube, Node, TOKEN};
use dwng_test_support::harness::{self, test};
use serde_json::{json, Value};

fn main() {
    harness::main(&[
        test(
            "ssa_keeps_other_managers_fields",
            &[],
            ssa_keeps_other_managers_fields,
        ),
        test(
            "conflicts_only_where_another_manager_owns_a_different_value",
            &[],
            conflicts_only_where_another_manager_owns_a_different_value,
        ),
        test(
            "managed_fields_carry_time_field_sets_and_status_writers",
            &[],
            managed_fields_carry_time_field_sets_and_status_writers,
        ),
        test(
            "apply_requests_are_checked_like_the_api_server_does",
            &[],
            apply_requests_are_checked_like_the_api_server_does,
        ),
        test(
            "defaults_are_filled_in_and_owned_by_nobody",
            &[],
            defaults_are_filled_in_and_owned_by_nobody,
        ),
        test(
            "validation_refuses_the_whole_object",
            &[],
            validation_refuses_the_whole_object,
        ),
        test(
            "status_comes_later_from_the_controllers",
            &[],
            status_comes_later_from_the_controllers,
        ),
        test(
            "replicasets_and_pods_are_named_and_history_is_kept",
            &[],
            replicasets_and_pods_are_named_and_history_is_kept,
        ),
        test("deletion_is_asynchronous", &[], deletion_is_asynchronous),
        test(
            "controllers_act_by_themselves",
            &[],
            controllers_act_by_themselves,
        ),
        test(
            "a_namespaced_role_is_denied_everywhere_else",
            &[],
            a_namespaced_role_is_denied_everywhere_else,
        ),
        test(
            "bodies_and_codes_match_the_real_server",
            &[],
            bodies_and_codes_match_the_real_server,
        ),
    ])
}

const DEPLOY: &str = "/apis/apps/v1/namespaces/default/deployments";
const CM: &str = "/api/v1/namespaces/default/configmaps";

fn deployment(name: &str, image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": "app", "image": image}]}}
        }
    })
}

/// Server-side apply as `manager` (admin credentials).
fn apply(fake: &FakeKube, path: &str, manager: &str, force: bool, body: &Value) -> (u16, Value) {
    fake.call(
        None,
        "PATCH",
        &format!("{path}?fieldManager={manager}&force={force}"),
        Some("application/apply-patch+yaml"),
        body.to_string().as_bytes(),
    )
}

fn merge_patch(fake: &FakeKube, path: &str, manager: &str, patch: &Value) -> (u16, Value) {
    fake.call(
        None,
        "PATCH",
        &format!("{path}?fieldManager={manager}"),
        Some("application/merge-patch+json"),
        patch.to_string().as_bytes(),
    )
}

fn get(fake: &FakeKube, path: &str) -> (u16, Value) {
    fake.call(None, "GET", path, None, b"")
}

fn managers(obj: &Value) -> Vec<(String, String)> {
    obj["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["manager"].as_str().unwrap_or_default().to_string(),
                m["operation"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn fields_of<'a>(obj: &'a Value, manager: &str, operation: &str) -> &'a Value {
    obj["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["manager"] == manager && m["operation"] == operation)
        .map(|m| &m["fieldsV1"])
        .unwrap_or(&Value::Null)
}

fn rv(v: &Value) -> String {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// KUBE-API 1: a forced apply takes only the fields it sends; others' fields survive, the
/// applier's dropped fields go, and managers left owning nothing are dropped.
fn ssa_keeps_other_managers_fields() {
    let fake = FakeKube::start();
    let cm = |data: Value| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "web-config", "labels": {"app": "web"}}, "data": data})
    };
    let path = format!("{CM}/web-config");
    let (code, _) = apply(
        &fake,
        &path,
        "device-worker-ng",
        true,
        &cm(json!({"A": "1"})),
    );
    assert_eq!(code, 201);
    let (code, _) = merge_patch(
        &fake,
        &path,
        "kubectl-edit",
        &json!({"metadata": {"annotations": {"note": "by hand"}}, "data": {"EXTRA": "x"}}),
    );
    assert_eq!(code, 200);
    let (_, edited) = get(&fake, &path);

    // The same apply again: nothing changes, not even the resourceVersion.
    let (code, same) = apply(
        &fake,
        &path,
        "device-worker-ng",
        true,
        &cm(json!({"A": "1"})),
    );
    assert_eq!(code, 200);
    assert_eq!(rv(&same), rv(&edited));
    assert_eq!(same["data"], json!({"A": "1", "EXTRA": "x"}));
    assert_eq!(same["metadata"]["annotations"]["note"], "by hand");

    // A changed and a dropped field of the applier; the edit's fields stay.
    let (_, v) = apply(
        &fake,
        &path,
        "device-worker-ng",
        true,
        &cm(json!({"B": "2"})),
    );
    assert_eq!(v["data"], json!({"B": "2", "EXTRA": "x"}), "{v}");
    assert_eq!(v["metadata"]["annotations"]["note"], "by hand");
    assert_eq!(
        fields_of(&v, "device-worker-ng", "Apply")["f:data"],
        json!({"f:B": {}})
    );

    // Taking over every field of the edit (force) leaves it owning nothing: it is dropped.
    let mut all = cm(json!({"B": "2", "EXTRA": "mine"}));
    all["metadata"]["annotations"] = json!({"note": "mine"});
    let (_, v) = apply(&fake, &path, "device-worker-ng", true, &all);
    assert_eq!(
        managers(&v),
        [("device-worker-ng".to_string(), "Apply".to_string())]
    );

    // A Deployment field another manager set survives the agent's forced apply.
    let dpath = format!("{DEPLOY}/web");
    apply(
        &fake,
        &dpath,
        "device-worker-ng",
        true,
        &deployment("web", "img:1"),
    );
    merge_patch(
        &fake,
        &dpath,
        "kubectl-patch",
        &json!({"spec": {"progressDeadlineSeconds": 1200}}),
    );
    let (_, d) = apply(
        &fake,
        &dpath,
        "device-worker-ng",
        true,
        &deployment("web", "img:2"),
    );
    assert_eq!(d["spec"]["progressDeadlineSeconds"], 1200);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "img:2"
    );
}

/// KUBE-API 2: 409 only where another manager owns the field and the value differs, with the
/// real message and one cause per field.
fn conflicts_only_where_another_manager_owns_a_different_value() {
    let fake = FakeKube::start();
    let path = format!("{DEPLOY}/web");
    assert_eq!(
        apply(&fake, &path, "alice", false, &deployment("web", "img:1")).0,
        201
    );
    // The same values: shared ownership, no conflict.
    let (code, v) = apply(&fake, &path, "bob", false, &deployment("web", "img:1"));
    assert_eq!(code, 200, "{v}");
    assert!(fields_of(&v, "bob", "Apply")["f:spec"]["f:replicas"].is_object());
    assert!(fields_of(&v, "alice", "Apply")["f:spec"]["f:replicas"].is_object());
    // Disjoint fields: no conflict.
    let label_only = json!({"apiVersion": "apps/v1", "kind": "Deployment",
                            "metadata": {"name": "web", "labels": {"team": "edge"}}});
    assert_eq!(apply(&fake, &path, "carol", false, &label_only).0, 200);

    let mut two = deployment("web", "img:2");
    two["spec"]["replicas"] = json!(2);
    let (code, v) = apply(&fake, &path, "dave", false, &two);
    assert_eq!(code, 409, "{v}");
    assert_eq!(v["reason"], "Conflict");
    assert_eq!(
        v["message"],
        "Apply failed with 4 conflicts: conflicts with \"alice\":\n- .spec.replicas\n- .spec.template.spec.containers[name=\"app\"].image\nconflicts with \"bob\":\n- .spec.replicas\n- .spec.template.spec.containers[name=\"app\"].image"
    );
    let causes = v["details"]["causes"].as_array().unwrap();
    assert_eq!(causes.len(), 4);
    assert_eq!(causes[0]["reason"], "FieldManagerConflict");
    assert_eq!(causes[0]["field"], ".spec.replicas");
    assert_eq!(causes[0]["message"], "conflict with \"alice\"");

    // Forced: the fields change hands.
    let (code, v) = apply(&fake, &path, "dave", true, &two);
    assert_eq!(code, 200);
    assert_eq!(v["spec"]["replicas"], 2);
    assert!(fields_of(&v, "alice", "Apply")["f:spec"]["f:replicas"].is_null());
    assert!(fields_of(&v, "dave", "Apply")["f:spec"]["f:replicas"].is_object());

    // An Update's fields conflict too, named with its API version.
    merge_patch(
        &fake,
        &path,
        "kubectl-scale",
        &json!({"spec": {"replicas": 3}}),
    );
    let (code, v) = apply(&fake, &path, "dave", false, &two);
    assert_eq!(code, 409);
    assert_eq!(
        v["message"],
        "Apply failed with 1 conflict: conflict with \"kubectl-scale\" using apps/v1: .spec.replicas"
    );
}

/// KUBE-API 3: managedFields entries carry time and fieldsV1; status writers appear with
/// `subresource: status`.
fn managed_fields_carry_time_field_sets_and_status_writers() {
    let fake = FakeKube::start();
    let path = format!("{DEPLOY}/web");
    apply(
        &fake,
        &path,
        "device-worker-ng",
        true,
        &deployment("web", "img:1"),
    );
    fake.wait("the controller writes the status", |f| {
        f.get("deployments", "default", "web").unwrap()["status"]["readyReplicas"] == 1
    });
    let (_, d) = get(&fake, &path);
    let entries = d["metadata"]["managedFields"].as_array().unwrap();
    for e in entries {
        assert!(e["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{e}");
        assert_eq!(e["fieldsType"], "FieldsV1");
        assert!(e["fieldsV1"].is_object());
    }
    let apply_fields = fields_of(&d, "device-worker-ng", "Apply");
    assert!(
        apply_fields["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"app\"}"]
            ["f:image"]
            .is_object()
    );
    assert!(
        apply_fields["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"app\"}"]["."]
            .is_object()
    );
    let status = entries
        .iter()
        .find(|e| e["manager"] == "kube-controller-manager" && e["subresource"] == "status")
        .unwrap_or_else(|| panic!("a status writer in {entries:?}"));
    assert_eq!(status["operation"], "Update");
    assert!(status["fieldsV1"]["f:status"]["f:readyReplicas"].is_object());
}

/// KUBE-API 4, 5, 6 and 15: what an apply request must get right.
fn apply_requests_are_checked_like_the_api_server_does() {
    let fake = FakeKube::start();
    let path = format!("{DEPLOY}/web");
    let body = deployment("web", "img:1").to_string();
    // 4: no fieldManager
    let (code, v) = fake.call(
        None,
        "PATCH",
        &path,
        Some("application/apply-patch+yaml"),
        body.as_bytes(),
    );
    assert_eq!(code, 422, "{v}");
    assert_eq!(v["reason"], "Invalid");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .starts_with("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value"));
    assert_eq!(v["details"]["causes"][0]["field"], "fieldManager");
    // 5: kind mismatch, name and namespace mismatch
    let mut wrong = deployment("web", "img:1");
    wrong["kind"] = json!("ReplicaSet");
    let (code, v) = apply(&fake, &path, "m", true, &wrong);
    assert_eq!(code, 500);
    assert_eq!(
        v["message"],
        "failed to merge config: expected objects of the same type"
    );
    let (code, v) = apply(
        &fake,
        &format!("{DEPLOY}/other"),
        "m",
        true,
        &deployment("web", "x"),
    );
    assert_eq!(code, 400);
    assert_eq!(
        v["message"],
        "the name of the object (web) does not match the name on the URL (other)"
    );
    let mut elsewhere = deployment("web", "img:1");
    elsewhere["metadata"]["namespace"] = json!("kube-system");
    assert_eq!(apply(&fake, &path, "m", true, &elsewhere).0, 400);
    // 6: a namespace that does not exist
    let (code, v) = apply(
        &fake,
        "/apis/apps/v1/namespaces/edge/deployments/web",
        "m",
        true,
        &deployment("web", "img:1"),
    );
    assert_eq!(code, 404);
    assert_eq!(v["message"], "namespaces \"edge\" not found");
    assert_eq!(v["details"]["kind"], "namespaces");
    assert!(fake.names("deployments").is_empty());
    fake.create_namespace("edge");
    let (code, _) = apply(
        &fake,
        "/apis/apps/v1/namespaces/edge/deployments/web",
        "m",
        true,
        &deployment("web", "img:1"),
    );
    assert_eq!(code, 201);
    // 15: 201 then 200; a stale resourceVersion is a conflict; a YAML body works too
    assert_eq!(
        apply(&fake, &path, "m", true, &deployment("web", "img:1")).0,
        201
    );
    assert_eq!(
        apply(&fake, &path, "m", true, &deployment("web", "img:2")).0,
        200
    );
    let mut stale = deployment("web", "img:3");
    stale["metadata"]["resourceVersion"] = json!("1");
    let (code, v) = apply(&fake, &path, "m", true, &stale);
    assert_eq!(code, 409);
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("the object has been modified"));
    let yaml = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: y\ndata:\n  k: v\n";
    let (code, v) = fake.call(
        None,
        "PATCH",
        &format!("{CM}/y?fieldManager=m"),
        Some("application/apply-patch+yaml"),
        yaml.as_bytes(),
    );
    assert_eq!((code, &v["data"]["k"]), (201, &json!("v")));
}

/// KUBE-API 7: what the API server fills in; nobody owns a default.
fn defaults_are_filled_in_and_owned_by_nobody() {
    let fake = FakeKube::start();
    let mut d = deployment("web", "nginx");
    d["spec"].as_object_mut().unwrap().remove("strategy");
    d["spec"]["template"]["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "side", "image": "quay.io/x/side:1.2"}));
    let (code, v) = apply(&fake, &format!("{DEPLOY}/web"), "m", true, &d);
    assert_eq!(code, 201);
    let spec = &v["spec"];
    assert_eq!(spec["progressDeadlineSeconds"], 600);
    assert_eq!(spec["revisionHistoryLimit"], 10);
    assert_eq!(
        spec["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}})
    );
    let t = &spec["template"];
    assert!(t["metadata"]
        .as_object()
        .unwrap()
        .get("creationTimestamp")
        .is_some_and(Value::is_null));
    assert_eq!(t["spec"]["terminationGracePeriodSeconds"], 30);
    assert_eq!(t["spec"]["dnsPolicy"], "ClusterFirst");
    assert_eq!(t["spec"]["schedulerName"], "default-scheduler");
    assert_eq!(t["spec"]["securityContext"], json!({}));
    let c = &t["spec"]["containers"];
    assert_eq!(c[0]["imagePullPolicy"], "Always", "untagged");
    assert_eq!(c[1]["imagePullPolicy"], "IfNotPresent", "tagged");
    assert_eq!(c[0]["terminationMessagePath"], "/dev/termination-log");
    assert_eq!(c[0]["terminationMessagePolicy"], "File");
    assert!(fields_of(&v, "m", "Apply")["f:spec"]["f:progressDeadlineSeconds"].is_null());
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                        "data": {"k": "dg=="}});
    let (_, s) = apply(
        &fake,
        "/api/v1/namespaces/default/secrets/s",
        "m",
        true,
        &secret,
    );
    assert_eq!(s["type"], "Opaque");
}

/// KUBE-API 8: the merged object is validated whole, requests ≤ limits included.
fn validation_refuses_the_whole_object() {
    let fake = FakeKube::start();
    let path = format!("{DEPLOY}/web");
    let mut d = deployment("web", "img:1");
    d["spec"]["template"]["spec"]["containers"][0]["resources"] =
        json!({"limits": {"memory": "64Mi", "cpu": "250m"}, "requests": {"memory": "128Mi"}});
    let (code, v) = apply(&fake, &path, "m", true, &d);
    assert_eq!(code, 422, "{v}");
    assert_eq!(
        v["message"],
        "Deployment.apps \"web\" is invalid: spec.template.spec.containers[0].resources.requests: Invalid value: \"128Mi\": must be less than or equal to memory limit"
    );
    assert_eq!(
        v["details"]["causes"][0]["field"],
        "spec.template.spec.containers[0].resources.requests"
    );
    assert!(fake.names("deployments").is_empty(), "nothing stored");
    let mut d = deployment("web", "img:1");
    d["spec"]["template"]["spec"]["containers"][0]["resources"] =
        json!({"limits": {"memory": "lots"}});
    d["spec"]["template"]["spec"]["containers"][0]["ports"] = json!([{"containerPort": 70000}]);
    d["spec"]["template"]["spec"]["restartPolicy"] = json!("Never");
    let (code, v) = apply(&fake, &path, "m", true, &d);
    assert_eq!(code, 422);
    let fields: Vec<&str> = v["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "spec.template.spec.restartPolicy",
            "spec.template.spec.containers[0].ports[0].containerPort",
            "spec.template.spec.containers[0].resources.limits[memory]",
        ]
    );
    // The selector is immutable.
    assert_eq!(
        apply(&fake, &path, "m", true, &deployment("web", "img:1")).0,
        201
    );
    let mut moved = deployment("web", "img:1");
    moved["spec"]["selector"]["matchLabels"] = json!({"app": "web", "tier": "x"});
    moved["spec"]["template"]["metadata"]["labels"]["tier"] = json!("x");
    let (code, v) = apply(&fake, &path, "m", true, &moved);
    assert_eq!(code, 422);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("field is immutable"),
        "{v}"
    );
    let bad_key = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
                         "data": {"a b": "x"}});
    assert_eq!(apply(&fake, &format!("{CM}/c"), "m", true, &bad_key).0, 422);
}

/// KUBE-API 9: the Deployment's status is `{}` at first and written by the controller later;
/// counts that are 0 are absent; pods are Pending without conditions until the scheduler
/// says why not, and a bound pod without a kubelet has no container statuses.
fn status_comes_later_from_the_controllers() {
    let fake = FakeKube::start();
    fake.set_node(Node::Absent);
    let path = format!("{DEPLOY}/web");
    let (_, created) = apply(&fake, &path, "m", true, &deployment("web", "img:1"));
    assert_eq!(created["status"], json!({}));
    fake.wait("the pod is unschedulable", |f| {
        f.pods_of("default", "web").iter().any(|p| {
            p["status"]["conditions"][0]["reason"] == "Unschedulable"
                && p["status"]["conditions"][0]["message"] == "no nodes available to schedule pods"
        })
    });
    let d = fake.get("deployments", "default", "web").unwrap();
    assert_eq!(d["status"]["observedGeneration"], 1);
    assert!(
        d["status"].get("readyReplicas").is_none(),
        "{}",
        d["status"]
    );
    assert!(d["status"].get("availableReplicas").is_none());
    assert_eq!(d["status"]["unavailableReplicas"], 1);
    let progressing = d["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Progressing")
        .unwrap();
    assert_eq!(progressing["status"], "True");

    fake.set_node(Node::NoKubelet);
    fake.wait("the pod is bound", |f| {
        f.pods_of("default", "web")
            .iter()
            .any(|p| p["spec"]["nodeName"].is_string())
    });
    let pod = &fake.pods_of("default", "web")[0];
    assert_eq!(pod["status"]["phase"], "Pending");
    assert_eq!(pod["status"]["conditions"][0]["type"], "PodScheduled");
    assert_eq!(pod["status"]["conditions"][0]["status"], "True");
    assert!(pod["status"].get("containerStatuses").is_none(), "{pod}");

    fake.set_node(Node::Ready);
    fake.wait("the Deployment is available", |f| {
        let d = f.get("deployments", "default", "web").unwrap();
        d["status"]["availableReplicas"] == 1
    });
    let d = fake.get("deployments", "default", "web").unwrap();
    let reasons: Vec<&str> = d["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        ["MinimumReplicasAvailable", "NewReplicaSetAvailable"]
    );
    let pod = &fake.pods_of("default", "web")[0];
    assert_eq!(pod["status"]["phase"], "Running");
    assert_eq!(pod["status"]["containerStatuses"][0]["ready"], true);
}

/// KUBE-API 10: ReplicaSets `<deploy>-<hash>`, pods `<rs>-<5 chars>`, old ReplicaSets kept
/// per revisionHistoryLimit.
fn replicasets_and_pods_are_named_and_history_is_kept() {
    let fake = FakeKube::start();
    let path = format!("{DEPLOY}/web");
    for i in 1..=4 {
        let mut d = deployment("web", &format!("img:{i}"));
        d["spec"]["revisionHistoryLimit"] = json!(2);
        apply(&fake, &path, "m", true, &d);
        fake.wait("the new pod runs", |f| {
            f.pods_of("default", "web").iter().any(|p| {
                p["spec"]["containers"][0]["image"] == format!("img:{i}").as_str()
                    && p["status"]["phase"] == "Running"
            })
        });
    }
    fake.wait("history is pruned", |f| f.names("replicasets").len() == 3);
    let (_, list) = get(&fake, "/apis/apps/v1/namespaces/default/replicasets");
    let rss = list["items"].as_array().unwrap();
    for rs in rss {
        let name = rs["metadata"]["name"].as_str().unwrap();
        let hash = rs["metadata"]["labels"]["pod-template-hash"]
            .as_str()
            .unwrap();
        assert_eq!(name, format!("web-{hash}"));
        assert_eq!(rs["metadata"]["ownerReferences"][0]["kind"], "Deployment");
    }
    let revisions: Vec<&str> = rss
        .iter()
        .map(|r| {
            r["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
                .as_str()
                .unwrap()
        })
        .collect();
    let mut sorted = revisions.clone();
    sorted.sort();
    assert_eq!(sorted, ["2", "3", "4"]);
    let pods = fake.pods_of("default", "web");
    assert_eq!(pods.len(), 1);
    let pod = pods[0]["metadata"]["name"].as_str().unwrap();
    let hash = pods[0]["metadata"]["labels"]["pod-template-hash"]
        .as_str()
        .unwrap();
    let suffix = pod.strip_prefix(&format!("web-{hash}-")).unwrap();
    assert_eq!(suffix.len(), 5);
}

/// KUBE-API 11: scaling to 0 leaves bound pods Terminating until the kubelet confirms (or a
/// force delete); unscheduled pods vanish; a pod DELETE answers the Pod; a Deployment's
/// dependents go later through the garbage collector.
fn deletion_is_asynchronous() {
    let fake = FakeKube::start();
    let path = format!("{DEPLOY}/web");
    fake.set_node(Node::NoKubelet);
    apply(&fake, &path, "m", true, &deployment("web", "img:1"));
    fake.wait("the pod is bound", |f| {
        f.pods_of("default", "web")
            .iter()
            .any(|p| p["spec"]["nodeName"].is_string())
    });
    merge_patch(
        &fake,
        &path,
        "kubectl-scale",
        &json!({"spec": {"replicas": 0}}),
    );
    fake.wait("the pod is Terminating", |f| {
        f.pods_of("default", "web")
            .iter()
            .any(|p| p["metadata"]["deletionTimestamp"].is_string())
    });
    std::thread::sleep(Duration::from_millis(200));
    let pods = fake.pods_of("default", "web");
    assert_eq!(pods.len(), 1, "no kubelet confirms: it stays");
    assert_eq!(pods[0]["metadata"]["deletionGracePeriodSeconds"], 30);
    let name = pods[0]["metadata"]["name"].as_str().unwrap().to_string();
    let (_, list) = get(&fake, "/api/v1/namespaces/default/pods");
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        1,
        "listed while Terminating"
    );
    let pod_path = format!("/api/v1/namespaces/default/pods/{name}");
    let (code, v) = fake.call(None, "DELETE", &pod_path, None, b"");
    assert_eq!((code, v["kind"].as_str()), (200, Some("Pod")), "{v}");
    assert!(fake.get("pods", "default", &name).is_some());
    let (code, v) = fake.call(
        None,
        "DELETE",
        &format!("{pod_path}?gracePeriodSeconds=0"),
        None,
        b"",
    );
    assert_eq!(
        (code, v["kind"].as_str()),
        (200, Some("Pod")),
        "a force delete too"
    );
    assert!(fake.get("pods", "default", &name).is_none());

    // Unscheduled pods go at once.
    fake.set_node(Node::Absent);
    merge_patch(
        &fake,
        &path,
        "kubectl-scale",
        &json!({"spec": {"replicas": 1}}),
    );
    fake.wait("a pending pod", |f| f.pods_of("default", "web").len() == 1);
    merge_patch(
        &fake,
        &path,
        "kubectl-scale",
        &json!({"spec": {"replicas": 0}}),
    );
    fake.wait("the pending pod vanishes", |f| {
        f.pods_of("default", "web").is_empty()
    });

    // A Deployment's delete answers a Status; its ReplicaSet and pods go later.
    fake.set_node(Node::Ready);
    merge_patch(
        &fake,
        &path,
        "kubectl-scale",
        &json!({"spec": {"replicas": 1}}),
    );
    fake.wait("a running pod", |f| {
        f.pods_of("default", "web")
            .iter()
            .any(|p| p["status"]["phase"] == "Running")
    });
    let (code, v) = fake.call(None, "DELETE", &path, None, b"");
    assert_eq!(code, 200);
    assert_eq!(
        (v["kind"].as_str(), v["status"].as_str()),
        (Some("Status"), Some("Success"))
    );
    assert!(!fake.names("replicasets").is_empty() || !fake.names("pods").is_empty());
    fake.wait("the garbage collector removes the rest", |f| {
        f.names("replicasets").is_empty() && f.names("pods").is_empty()
    });
}

/// KUBE-API 12: the node lifecycle controller, the progress deadline and quota admission.
fn controllers_act_by_themselves() {
    let fake = FakeKube::start();
    let path = format!("{DEPLOY}/web");
    apply(&fake, &path, "m", true, &deployment("web", "img:1"));
    let available = |f: &FakeKube, want: &str| {
        f.get("deployments", "default", "web").unwrap()["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Available" && c["status"] == want)
    };
    fake.wait("available", |f| available(f, "True"));
    fake.set_node(Node::NotReady);
    fake.wait("unavailable when the node stops", |f| available(f, "False"));
    let pod = &fake.pods_of("default", "web")[0];
    assert_eq!(pod["status"]["phase"], "Running");
    assert!(pod["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["type"] == "Ready" && c["status"] == "False"));

    // A rollout that cannot progress (image never pulled) passes its deadline.
    fake.set_node(Node::Ready);
    fake.image("img:slow", Container::Pulling);
    apply(&fake, &path, "m", true, &deployment("web", "img:slow"));
    fake.wait("the slow pod exists", |f| {
        f.pods_of("default", "web")
            .iter()
            .any(|p| p["spec"]["containers"][0]["image"] == "img:slow")
    });
    std::thread::sleep(Duration::from_millis(200));
    fake.advance(Duration::from_secs(601));
    fake.wait("ProgressDeadlineExceeded", |f| {
        f.get("deployments", "default", "web").unwrap()["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["reason"] == "ProgressDeadlineExceeded" && c["status"] == "False")
    });

    // Quota admission refuses the pod: ReplicaFailure on the ReplicaSet and the Deployment.
    fake.quota("default", Some(0));
    apply(&fake, &path, "m", true, &deployment("web", "img:3"));
    fake.wait("ReplicaFailure", |f| {
        f.get("deployments", "default", "web").unwrap()["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| {
                c["type"] == "ReplicaFailure"
                    && c["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains("exceeded quota")
            })
    });
    fake.quota("default", None);
    fake.wait("created once the quota allows", |f| {
        f.pods_of("default", "web")
            .iter()
            .any(|p| p["spec"]["containers"][0]["image"] == "img:3")
    });
}

/// KUBE-API 13 and 14: a namespaced Role denies every other namespace, `default` included,
/// and the cluster scope (details without a name); an apply that creates is also a `create`.
fn a_namespaced_role_is_denied_everywhere_else() {
    let fake = FakeKube::start();
    fake.create_namespace("edge");
    fake.add_token(
        "edge-token",
        "system:serviceaccount:edge:agent",
        Some(&["edge"]),
    );
    let call = |path: &str| fake.call(Some("edge-token"), "GET", path, None, b"");
    assert_eq!(call("/apis/apps/v1/namespaces/edge/deployments").0, 200);
    let (code, v) = call("/apis/apps/v1/namespaces/default/deployments");
    assert_eq!(code, 403);
    assert_eq!(
        v["message"],
        "deployments.apps is forbidden: User \"system:serviceaccount:edge:agent\" cannot list resource \"deployments\" in API group \"apps\" in the namespace \"default\""
    );
    let (code, v) = call("/apis/apps/v1/deployments");
    assert_eq!(code, 403);
    assert!(v["message"]
        .as_str()
        .unwrap()
        .ends_with("at the cluster scope"));
    assert_eq!(
        v["details"],
        json!({"group": "apps", "kind": "deployments"})
    );
    let (code, v) = call("/api/v1/namespaces/default/configmaps/x");
    assert_eq!(code, 403);
    assert_eq!(v["details"]["name"], "x");
    // An apply that creates an object needs `create` as well as `patch`.
    fake.forbid("create", "configmaps");
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
    let (code, v) = apply(&fake, &format!("{CM}/c"), "m", true, &cm);
    assert_eq!(code, 403);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("cannot create resource \"configmaps\""),
        "{v}"
    );
    fake.allow_all();
    assert_eq!(apply(&fake, &format!("{CM}/c"), "m", true, &cm).0, 201);
    fake.forbid("create", "configmaps");
    assert_eq!(
        apply(&fake, &format!("{CM}/c"), "m", true, &cm).0,
        200,
        "an update needs no create"
    );
    // The cluster-wide token is not limited.
    assert_eq!(
        fake.call(Some(TOKEN), "GET", "/apis/apps/v1/deployments", None, b"")
            .0,
        200
    );
}

/// KUBE-API 14 and 15: the bodies both agree on, and the small differences made real.
fn bodies_and_codes_match_the_real_server() {
    let fake = FakeKube::start();
    let (code, v) = fake.call(Some("nope"), "GET", DEPLOY, None, b"");
    assert_eq!(code, 401);
    assert_eq!(
        v,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "Unauthorized", "reason": "Unauthorized", "code": 401})
    );
    let missing = format!("{DEPLOY}/x");
    for (method, ct) in [
        ("GET", None),
        ("DELETE", None),
        ("PATCH", Some("application/merge-patch+json")),
    ] {
        let (code, v) = fake.call(None, method, &missing, ct, b"{}");
        assert_eq!(code, 404, "{method}");
        assert_eq!(v["message"], "deployments.apps \"x\" not found");
        assert_eq!(
            v["details"],
            json!({"name": "x", "group": "apps", "kind": "deployments"})
        );
    }
    apply(
        &fake,
        &format!("{DEPLOY}/web"),
        "m",
        true,
        &deployment("web", "img:1"),
    );
    let (code, list) = get(&fake, &format!("{DEPLOY}?labelSelector=app%3Dweb"));
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "DeploymentList");
    assert_eq!(list["apiVersion"], "apps/v1");
    assert!(list["metadata"]["resourceVersion"].is_string());
    let item = &list["items"][0];
    assert!(item.get("kind").is_none() && item.get("apiVersion").is_none());
    let (code, v) = get(&fake, &format!("{DEPLOY}?labelSelector=a%20b"));
    assert_eq!(code, 400);
    assert_eq!(
        v["message"],
        "unable to parse requirement: found 'b', expected: in, notin, =, ==, !=, gt, lt"
    );
    let (_, none) = get(
        &fake,
        &format!("{DEPLOY}?labelSelector=app%20notin%20(web)"),
    );
    assert!(none["items"].as_array().unwrap().is_empty());
    let (code, v) = fake.call(
        None,
        "PATCH",
        &format!("{DEPLOY}/web"),
        Some("text/plain"),
        b"x",
    );
    assert_eq!(code, 415);
    assert_eq!(v["message"], "415: Unsupported Media Type");
    assert_eq!(v["details"], json!({}));
    // Pretty-printed for curl, compact for the agent.
    let (_, curl) = fake.call_as("curl/7.88.1", None, "GET", DEPLOY, None, b"");
    assert!(curl.contains("\n  \"kind\": \"DeploymentList\""), "{curl}");
    let (_, agent) = fake.call_as("device-worker-ng/0.1.0", None, "GET", DEPLOY, None, b"");
    assert!(agent.starts_with("{\"") && !agent.contains('\n'), "{agent}");
}
