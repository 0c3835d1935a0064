//! The Kubernetes objects of one `k8s` workload: a Deployment (one replica, the workload's
//! PodSpec), its ConfigMaps (PROTOCOL §4.3 `configmaps`), the Secrets it references (PROTOCOL
//! §4.4) and, with `imageRegistries.authFile`, a pull secret.
//!
//! Rendered once when the spec is validated (so the fingerprint covers exactly what is
//! applied) as a YAML stream: the Deployment first, then the ConfigMaps and the pull secret.
//! The Secrets come from the desired state's top-level list at start.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::api::Resource;
use crate::workload::{DesiredSecret, WORKLOAD_LABEL};

/// On every object the agent applies: what it may later change or delete.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "device-worker-ng";

/// `progressDeadlineSeconds` of every Deployment. Kubernetes' default (600 s) marks a rollout
/// failed when an image pull over a slow edge link takes more than 10 minutes; the agent
/// treats the condition as a reason, never as a crash, so the deadline only decides when
/// `status` starts saying the rollout is stalled: after an hour without progress.
pub const PROGRESS_DEADLINE_SECONDS: u32 = 3600;

/// Label selector of everything the agent owns.
pub fn owned_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY}")
}

/// Label selector of one workload's Deployment and pods.
pub fn workload_selector(name: &str) -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY},{WORKLOAD_LABEL}={name}")
}

/// One object to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub resource: Resource,
    pub name: String,
    pub body: Value,
}

/// What [`render`] produced, parsed back for the driver.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadObjects {
    pub namespace: String,
    pub deployment: Object,
    /// ConfigMaps and the pull secret, in the order they are applied (before the Deployment).
    pub dependencies: Vec<Object>,
}

/// Renders the objects of a workload from the `Pod` document the pod parser produced (its
/// labels already carry [`WORKLOAD_LABEL`], its `pids` resources are stripped).
pub fn render(
    pod_document: &str,
    namespace: &str,
    configmaps: &[String],
    auth_file: Option<&str>,
) -> Result<String, (String, String)> {
    let e = |field: &str, why: String| (field.to_string(), why);
    let pod: Value = first_document(pod_document).map_err(|why| e("specification", why))?;
    let name = pod["metadata"]["name"]
        .as_str()
        .ok_or_else(|| e("name", "missing".into()))?
        .to_string();
    let mut labels = pod["metadata"]["labels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    labels.insert(WORKLOAD_LABEL.into(), name.clone().into());
    let annotations = pod["metadata"]["annotations"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let mut spec = pod["spec"].as_object().cloned().unwrap_or_default();
    requests_within_limits(&Value::Object(spec.clone()))?;
    // A Deployment's pods restart Always (the only policy it accepts); the kubelet restarts
    // a crashed container and the agent sees it through the pod's status.
    spec.insert("restartPolicy".into(), "Always".into());
    let pull_secret = format!("{name}-registry-auth");
    if auth_file.is_some() {
        let list = spec
            .entry("imagePullSecrets")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(l) = list {
            if !l.iter().any(|s| s["name"] == pull_secret.as_str()) {
                l.push(json!({ "name": pull_secret }));
            }
        }
    }
    let deployment = deployment(&name, namespace, labels, annotations, spec);

    let mut docs = vec![deployment];
    for (i, cm) in configmaps.iter().enumerate() {
        let field = format!("configmaps[{i}]");
        let (cm_name, v) = configmap(cm, namespace).map_err(|why| e(&field, why))?;
        if docs
            .iter()
            .skip(1)
            .any(|d| d["metadata"]["name"] == cm_name.as_str())
        {
            return Err(e(&field, format!("ConfigMap '{cm_name}' is listed twice")));
        }
        docs.push(v);
    }
    if let Some(auth) = auth_file {
        let data = base64::engine::general_purpose::STANDARD.encode(auth.as_bytes());
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": pull_secret,
                "namespace": namespace,
                "labels": { MANAGED_BY_LABEL: MANAGED_BY },
            },
            "type": "kubernetes.io/dockerconfigjson",
            "data": { ".dockerconfigjson": data },
        }));
    }
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(
            &serde_yaml_ng::to_string(&d).map_err(|err| e("specification", err.to_string()))?,
        );
    }
    Ok(out)
}

/// The Deployment running the pod: one replica, recreated (never two at once), its pods
/// labelled as the agent's.
fn deployment(
    name: &str,
    namespace: &str,
    labels: Map<String, Value>,
    annotations: Map<String, Value>,
    spec: Map<String, Value>,
) -> Value {
    let mut template_meta = Map::new();
    template_meta.insert("labels".into(), Value::Object(labels.clone()));
    if !annotations.is_empty() {
        template_meta.insert("annotations".into(), Value::Object(annotations.clone()));
    }
    let mut meta = Map::new();
    meta.insert("name".into(), name.into());
    meta.insert("namespace".into(), namespace.into());
    meta.insert("labels".into(), Value::Object(labels));
    if !annotations.is_empty() {
        meta.insert("annotations".into(), Value::Object(annotations));
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 2,
            "progressDeadlineSeconds": PROGRESS_DEADLINE_SECONDS,
            // One replica on one node: the old pod goes before the new one starts, so a
            // hostPort is never held twice and the device never runs both.
            "strategy": { "type": "Recreate" },
            "selector": { "matchLabels": { WORKLOAD_LABEL: name } },
            "template": { "metadata": template_meta, "spec": spec },
        }
    })
}

/// One ConfigMap of the workload, made the agent's: in the workload's namespace, labelled,
/// without the fields the server owns. Returns its name and the object.
fn configmap(document: &str, namespace: &str) -> Result<(String, Value), String> {
    let mut v = first_document(document)?;
    let cm_name = v["metadata"]["name"]
        .as_str()
        .filter(|n| is_subdomain(n))
        .ok_or_else(|| "metadata.name must be a DNS subdomain name".to_string())?
        .to_string();
    if let Some(other) = v["metadata"]["namespace"].as_str() {
        if other != namespace {
            return Err(format!(
                "namespace '{other}' differs from the workload's namespace '{namespace}'"
            ));
        }
    }
    let Some(obj) = v.as_object_mut() else {
        return Err("expected a mapping".into());
    };
    obj.insert("apiVersion".into(), "v1".into());
    obj.remove("status");
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(m) = meta {
        // `creationTimestamp: null` is what ghodss/yaml writes; the server owns it.
        m.remove("creationTimestamp");
        m.remove("resourceVersion");
        m.remove("uid");
        m.remove("managedFields");
        m.insert("namespace".into(), namespace.into());
        let labels = m
            .entry("labels")
            .or_insert_with(|| Value::Object(Map::new()));
        if !labels.is_object() {
            *labels = Value::Object(Map::new());
        }
        if let Value::Object(l) = labels {
            l.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
        }
    }
    Ok((cm_name, v))
}

/// Kubernetes refuses a container whose request of a resource exceeds its limit (422, after
/// the ConfigMaps would have been applied): refused here, with the field, before anything is.
fn requests_within_limits(pod_spec: &Value) -> Result<(), (String, String)> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for key in ["initContainers", "containers"] {
        for (i, c) in pod_spec[key].as_array().into_iter().flatten().enumerate() {
            let limits = &c["resources"]["limits"];
            for (name, req) in c["resources"]["requests"].as_object().into_iter().flatten() {
                let Some(lim) = limits.get(name) else {
                    continue;
                };
                let parse = |q: &str| match name.as_str() {
                    "cpu" => crate::units::parse_cpu(q).ok(),
                    n if n == "memory"
                        || n == "ephemeral-storage"
                        || n.starts_with("hugepages-") =>
                    {
                        crate::units::parse_memory(q).ok()
                    }
                    _ => None,
                };
                let (r, l) = (text(req), text(lim));
                if let (Some(rv), Some(lv)) = (parse(&r), parse(&l)) {
                    if rv > lv {
                        return Err((
                            format!("specification.{key}[{i}].resources.requests.{name}"),
                            format!("{r} is more than its limit {l} (Kubernetes refuses a request above the limit)"),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

fn first_document(text: &str) -> Result<Value, String> {
    crate::yaml::documents::<Value>(text)
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or_else(|| "empty document".to_string())
}

/// A DNS-1123 subdomain (ConfigMap and Secret names).
pub fn is_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl WorkloadObjects {
    /// Parses what [`render`] wrote.
    pub fn parse(manifest: &str) -> Result<WorkloadObjects, String> {
        let docs: Vec<Value> = crate::yaml::documents::<Value>(manifest)
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|v| !v.is_null())
            .collect();
        let mut objects = Vec::new();
        for d in docs {
            let resource = match d["kind"].as_str() {
                Some("Deployment") => Resource::Deployment,
                Some("ConfigMap") => Resource::ConfigMap,
                Some("Secret") => Resource::Secret,
                other => return Err(format!("unexpected kind {other:?} in the manifest")),
            };
            let name = d["metadata"]["name"]
                .as_str()
                .ok_or("an object without metadata.name")?
                .to_string();
            objects.push(Object {
                resource,
                name,
                body: d,
            });
        }
        let pos = objects
            .iter()
            .position(|o| o.resource == Resource::Deployment)
            .ok_or("no Deployment in the manifest")?;
        let deployment = objects.remove(pos);
        let namespace = deployment.body["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        Ok(WorkloadObjects {
            namespace,
            deployment,
            dependencies: objects,
        })
    }
}

/// A Secret of the desired state's `secrets` (PROTOCOL §4.4): `data` is a JSON string that
/// maps each key to the base64 of its value, which is a Secret's `data` as is.
pub fn secret_object(s: &DesiredSecret, namespace: &str) -> Result<Object, String> {
    if !is_subdomain(&s.name) {
        return Err("the name is not a DNS subdomain name".into());
    }
    let data: BTreeMap<String, String> = if s.data.trim().is_empty() {
        BTreeMap::new()
    } else {
        serde_json::from_str(&s.data)
            .map_err(|e| format!("data is not a JSON object of strings: {e}"))?
    };
    for (k, v) in &data {
        let key_ok = !k.is_empty()
            && k.len() <= 253
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !key_ok {
            return Err(format!("key '{k}' is not a valid Secret key"));
        }
        base64::engine::general_purpose::STANDARD
            .decode(v.as_bytes())
            .map_err(|e| format!("the value of '{k}' is not base64: {e}"))?;
    }
    Ok(Object {
        resource: Resource::Secret,
        name: s.name.clone(),
        body: json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": s.name,
                "namespace": namespace,
                "labels": { MANAGED_BY_LABEL: MANAGED_BY },
            },
            "type": "Opaque",
            "data": data,
        }),
    })
}

/// The ConfigMaps and Secrets a PodSpec (`spec.template.spec` of a Deployment, or a pod's
/// `spec`) refers to by name: env, envFrom, volumes (also projected), imagePullSecrets.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct References {
    pub configmaps: BTreeSet<String>,
    pub secrets: BTreeSet<String>,
}

pub fn references(pod_spec: &Value) -> References {
    let mut r = References::default();
    let add = |set: &mut BTreeSet<String>, v: &Value| {
        if let Some(n) = v.as_str() {
            set.insert(n.to_string());
        }
    };
    for key in ["containers", "initContainers", "ephemeralContainers"] {
        for c in pod_spec[key].as_array().into_iter().flatten() {
            for e in c["env"].as_array().into_iter().flatten() {
                add(
                    &mut r.configmaps,
                    &e["valueFrom"]["configMapKeyRef"]["name"],
                );
                add(&mut r.secrets, &e["valueFrom"]["secretKeyRef"]["name"]);
            }
            for e in c["envFrom"].as_array().into_iter().flatten() {
                add(&mut r.configmaps, &e["configMapRef"]["name"]);
                add(&mut r.secrets, &e["secretRef"]["name"]);
            }
        }
    }
    for v in pod_spec["volumes"].as_array().into_iter().flatten() {
        add(&mut r.configmaps, &v["configMap"]["name"]);
        add(&mut r.secrets, &v["secret"]["secretName"]);
        for s in v["projected"]["sources"].as_array().into_iter().flatten() {
            add(&mut r.configmaps, &s["configMap"]["name"]);
            add(&mut r.secrets, &s["secret"]["name"]);
        }
    }
    for s in pod_spec["imagePullSecrets"]
        .as_array()
        .into_iter()
        .flatten()
    {
        add(&mut r.secrets, &s["name"]);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  labels:\n    app: web\n    device-worker-ng/workload: web\nspec:\n  restartPolicy: Never\n  containers:\n  - name: c\n    image: nginx\n    envFrom:\n    - configMapRef: {name: web-config}\n    env:\n    - name: P\n      valueFrom: {secretKeyRef: {name: db, key: password}}\n";

    #[test]
    fn renders_a_deployment_its_configmaps_and_a_pull_secret() {
        let cms = vec![
            "apiVersion: v1\ndata:\n  A: b\nkind: ConfigMap\nmetadata:\n  creationTimestamp: null\n  name: web-config\n"
                .to_string(),
        ];
        let m = render(POD, "edge", &cms, Some("{\"auths\":{}}")).unwrap();
        let o = WorkloadObjects::parse(&m).unwrap();
        assert_eq!(o.namespace, "edge");
        let d = &o.deployment.body;
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["type"], "Recreate");
        assert_eq!(d["spec"]["selector"]["matchLabels"][WORKLOAD_LABEL], "web");
        let t = &d["spec"]["template"];
        assert_eq!(t["metadata"]["labels"][MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(t["metadata"]["labels"]["app"], "web");
        assert_eq!(t["spec"]["restartPolicy"], "Always");
        assert_eq!(
            t["spec"]["imagePullSecrets"][0]["name"],
            "web-registry-auth"
        );
        assert_eq!(o.dependencies.len(), 2);
        let cm = &o.dependencies[0];
        assert_eq!(cm.resource, Resource::ConfigMap);
        assert_eq!(cm.body["metadata"]["namespace"], "edge");
        assert!(cm.body["metadata"].get("creationTimestamp").is_none());
        assert_eq!(o.dependencies[1].resource, Resource::Secret);
        assert_eq!(
            o.dependencies[1].body["type"],
            "kubernetes.io/dockerconfigjson"
        );
        let refs = references(&t["spec"]);
        assert!(refs.configmaps.contains("web-config"));
        assert!(refs.secrets.contains("db"));
        assert!(refs.secrets.contains("web-registry-auth"));
    }

    #[test]
    fn a_request_above_its_limit_is_refused_before_anything_is_applied() {
        let pod = |res: &str| {
            format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: a\n    image: x\n  - name: b\n    image: y\n    resources: {res}\n")
        };
        let e = render(
            &pod("{limits: {memory: 64Mi, cpu: 250m}, requests: {memory: 128Mi}}"),
            "edge",
            &[],
            None,
        )
        .unwrap_err();
        assert_eq!(e.0, "specification.containers[1].resources.requests.memory");
        assert!(e.1.contains("128Mi is more than its limit 64Mi"), "{}", e.1);
        let e = render(
            &pod("{limits: {cpu: 0.5}, requests: {cpu: 600m}}"),
            "edge",
            &[],
            None,
        )
        .unwrap_err();
        assert_eq!(e.0, "specification.containers[1].resources.requests.cpu");
        assert!(render(
            &pod("{limits: {cpu: 500m, memory: 1Gi}, requests: {cpu: 0.5, memory: 1024Mi}}"),
            "edge",
            &[],
            None
        )
        .is_ok());
        let m = render(&pod("{}"), "edge", &[], None).unwrap();
        let d = WorkloadObjects::parse(&m).unwrap().deployment.body;
        assert_eq!(
            d["spec"]["progressDeadlineSeconds"],
            PROGRESS_DEADLINE_SECONDS
        );
    }

    #[test]
    fn bad_configmaps_and_secrets_are_refused() {
        let cm = vec!["kind: ConfigMap\nmetadata: {name: Bad_Name}\n".to_string()];
        assert_eq!(
            render(POD, "edge", &cm, None).unwrap_err().0,
            "configmaps[0]"
        );
        let cm = vec!["kind: ConfigMap\nmetadata: {name: a, namespace: other}\n".to_string()];
        assert!(render(POD, "edge", &cm, None)
            .unwrap_err()
            .1
            .contains("namespace"));
        let s = |data: &str| DesiredSecret {
            name: "db".into(),
            data: data.into(),
        };
        assert!(secret_object(&s("{\"password\":\"c2VjcmV0\"}"), "edge").is_ok());
        assert!(secret_object(&s("{\"password\":\"not base64!\"}"), "edge")
            .unwrap_err()
            .contains("not base64"));
        assert!(secret_object(&s("[1]"), "edge").is_err());
        assert!(secret_object(&s("{\"a b\":\"eA==\"}"), "edge").is_err());
    }
}
