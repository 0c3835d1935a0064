//! A fake Kubernetes API server for the k8s driver's tests: no Kubernetes can run on the test
//! machines (TESTBED.md), so the driver is tested against this, not a live MicroShift.
//!
//! What it follows of the API conventions, for the calls the driver makes:
//! - HTTPS (rustls on the [`https`](crate::https) skeleton, a test CA, server cert for
//!   127.0.0.1); authentication by a client
//!   certificate signed by that CA or by a bearer token, else `401` with a `Status` body.
//! - Paths `/api/v1/[namespaces/{ns}/]{configmaps,secrets,pods}[/{name}]` and
//!   `/apis/apps/v1/[namespaces/{ns}/]deployments[/{name}]`; lists in one namespace or all,
//!   filtered by `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (..)`, `k notin (..)`),
//!   answered as `{kind: <Kind>List, metadata: {resourceVersion}, items}`.
//! - Server-side apply: `PATCH` with `Content-Type: application/apply-patch+yaml` only with
//!   `fieldManager` (else `400`), `force=true` needed to take fields another manager owns (else
//!   `409`); creates (`201`) or updates (`200`); kind/apiVersion/name/namespace must match the
//!   URL (`400`); a stale `metadata.resourceVersion` gives `409`; invalid objects `422` with
//!   `details.causes`. `application/merge-patch+json` (RFC 7386) for other patches; any other
//!   patch type `415`.
//! - `resourceVersion` is one cluster-wide counter bumped on every change (and only on a
//!   change: an identical apply is a no-op); a Deployment's `metadata.generation` is bumped
//!   when its `spec` changes; `metadata.managedFields` lists the managers.
//! - `DELETE` answers a `Status` `Success` (`404` when absent); a Deployment's pods go with it.
//! - RBAC denials (`403`, the API server's wording) per verb and resource, and injected
//!   faults per verb and resource, for the error classes.
//!
//! Simplified on purpose: apply replaces the whole configuration of the (single) applying
//! manager instead of merging per-field ownership; there are no ReplicaSets; the deployment
//! and ReplicaSet controllers are the test's calls ([`FakeKube::observe`], [`FakeKube::rollout`],
//! [`FakeKube::crash`], [`FakeKube::restart_container`]), except that scaling to 0 and deleting
//! a Deployment remove its pods at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::PrivateKeyDer;
use serde_json::{json, Map, Value};

use crate::https::{
    self, distinguished_name as dn, percent_decode, Client, HttpsServer, Limits, Request, Response,
};

pub const TOKEN: &str = "fake-token-123";

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub body: Option<Value>,
    pub status: u16,
}

#[derive(Default)]
struct State {
    /// (plural, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    resource_version: u64,
    requests: Vec<Recorded>,
    /// (verb, plural) → denied.
    forbidden: Vec<(String, String)>,
    /// (verb, plural, status, times) → an injected failure.
    faults: Vec<(String, String, u16, usize)>,
    uid: u64,
}

struct Shared {
    state: Mutex<State>,
}

pub struct FakeKube {
    http: HttpsServer,
    shared: Arc<Shared>,
    dir: tempfile::TempDir,
}

fn leaf(cn: &str, org: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(&[(DnType::CommonName, cn), (DnType::OrganizationName, org)]);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p
}

impl FakeKube {
    pub fn start() -> FakeKube {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = CertificateParams::default();
        ca.distinguished_name = dn(&[(DnType::CommonName, "kube-apiserver-test-ca")]);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let ca_der = ca_cert.der().clone();
        std::fs::write(dir.path().join("ca.crt"), ca_cert.pem()).unwrap();
        let issuer = Issuer::new(ca, ca_key);

        let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut sp = leaf("kube-apiserver", "kubernetes");
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        sp.subject_alt_names = vec![
            SanType::DnsName("kubernetes.default.svc".try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ];
        let server_cert = sp.signed_by(&server_key, &issuer).unwrap();

        // The admin client certificate, as in MicroShift's kubeconfig.
        let client_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut cp = leaf("system:admin", "system:masters");
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = cp.signed_by(&client_key, &issuer).unwrap();
        std::fs::write(dir.path().join("client.crt"), client_cert.pem()).unwrap();
        std::fs::write(dir.path().join("client.key"), client_key.serialize_pem()).unwrap();

        let provider = https::tls_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![server_cert.der().clone()],
                PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
            )
            .unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                resource_version: 1000,
                ..State::default()
            }),
        });
        let http = {
            let shared = shared.clone();
            HttpsServer::start(
                Arc::new(tls),
                Limits::default(),
                move |client: &Client<'_>, req: &Request| Some(handle(&shared, client, req)),
            )
        };
        FakeKube { http, shared, dir }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.http.addr().port())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A kubeconfig with the admin client certificate (files, like MicroShift's) or a token.
    pub fn kubeconfig(&self, token: Option<&str>) -> PathBuf {
        let user = match token {
            Some(t) => format!("    token: {t}\n"),
            None => "    client-certificate: client.crt\n    client-key: client.key\n".into(),
        };
        self.kubeconfig_for(&self.url(), &user)
    }

    pub fn kubeconfig_for(&self, server: &str, user: &str) -> PathBuf {
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: microshift\nclusters:\n- name: microshift\n  cluster:\n    server: {server}\n    certificate-authority: ca.crt\ncontexts:\n- name: microshift\n  context:\n    cluster: microshift\n    user: user\n    namespace: default\nusers:\n- name: user\n  user:\n{user}"
        );
        let n = self.state().uid;
        self.state().uid += 1;
        let p = self.dir.path().join(format!("kubeconfig-{n}"));
        std::fs::write(&p, text).unwrap();
        p
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.state().requests.clear();
    }

    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.state()
            .objects
            .get(&(plural.into(), ns.into(), name.into()))
            .cloned()
    }

    pub fn names(&self, plural: &str) -> Vec<String> {
        self.state()
            .objects
            .keys()
            .filter(|k| k.0 == plural)
            .map(|k| format!("{}/{}", k.1, k.2))
            .collect()
    }

    /// An object created by someone else (kubectl, another controller).
    pub fn put(&self, plural: &str, ns: &str, mut obj: Value) {
        let mut st = self.state();
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        st.resource_version += 1;
        obj["metadata"]["namespace"] = json!(ns);
        obj["metadata"]["resourceVersion"] = json!(st.resource_version.to_string());
        st.objects.insert((plural.into(), ns.into(), name), obj);
    }

    pub fn forbid(&self, verb: &str, plural: &str) {
        self.state().forbidden.push((verb.into(), plural.into()));
    }

    /// Listing in all namespaces is denied (a namespaced Role, no ClusterRole).
    pub fn forbid_all_namespaces(&self, plural: &str) {
        self.state()
            .forbidden
            .push(("list@cluster".into(), plural.into()));
    }

    pub fn allow_all(&self) {
        self.state().forbidden.clear();
    }

    /// The next `times` requests of this verb (`get`, `list`, `patch`, `delete`) on this
    /// resource fail with `status` (and its conventional `Status` body).
    pub fn fail(&self, verb: &str, plural: &str, status: u16, times: usize) {
        self.state()
            .faults
            .push((verb.into(), plural.into(), status, times));
    }

    /// The deployment controller has seen the Deployment; its pod is being created.
    pub fn observe(&self, ns: &str, name: &str) {
        self.set_pod(
            ns,
            name,
            |c| {
                json!({"name": c, "ready": false, "restartCount": 0,
                   "state": {"waiting": {"reason": "ContainerCreating"}}})
            },
            "Pending",
            false,
        );
    }

    /// The pod runs and is ready; the Deployment is available.
    pub fn rollout(&self, ns: &str, name: &str) {
        self.set_pod(
            ns,
            name,
            |c| {
                json!({"name": c, "ready": true, "restartCount": 0,
                   "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}})
            },
            "Running",
            true,
        );
    }

    /// The container keeps crashing (CrashLoopBackOff after `exit_code`, `reason`).
    pub fn crash(&self, ns: &str, name: &str, exit_code: i32, reason: &str) {
        let reason = reason.to_string();
        self.set_pod(
            ns,
            name,
            move |c| {
                json!({"name": c, "ready": false, "restartCount": 1,
                   "state": {"waiting": {"reason": "CrashLoopBackOff",
                             "message": format!("back-off 10s restarting failed container={c}")}},
                   "lastState": {"terminated": {"exitCode": exit_code, "reason": reason}}})
            },
            "Running",
            false,
        );
    }

    /// The kubelet restarted a container that is running again (a crash between two polls).
    pub fn restart_container(&self, ns: &str, name: &str, exit_code: i32, reason: &str) {
        let reason = reason.to_string();
        self.set_pod(
            ns,
            name,
            move |c| {
                json!({"name": c, "ready": true, "restartCount": 1,
                   "state": {"running": {"startedAt": "2024-01-01T00:01:00Z"}},
                   "lastState": {"terminated": {"exitCode": exit_code, "reason": reason}}})
            },
            "Running",
            true,
        );
    }

    fn set_pod(
        &self,
        ns: &str,
        name: &str,
        container: impl Fn(&str) -> Value,
        phase: &str,
        ready: bool,
    ) {
        let mut st = self.state();
        let key = ("deployments".to_string(), ns.to_string(), name.to_string());
        let Some(mut d) = st.objects.get(&key).cloned() else {
            panic!("no Deployment {ns}/{name}");
        };
        let generation = d["metadata"]["generation"].as_i64().unwrap_or(1);
        let template = d["spec"]["template"].clone();
        let hash = format!("{:08x}", fnv(template.to_string().as_bytes()) as u32);
        let pod_name = format!("{name}-{hash}-x7k2p");
        // Recreate: the pods of any older template go first.
        st.objects.retain(|k, p| {
            !(k.0 == "pods"
                && k.1 == ns
                && p["metadata"]["labels"]["device-worker-ng/workload"] == name)
        });
        let mut labels = template["metadata"]["labels"].clone();
        labels["pod-template-hash"] = json!(hash);
        let containers: Vec<Value> = template["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| container(c["name"].as_str().unwrap_or("c")))
            .collect();
        st.resource_version += 1;
        let rv = st.resource_version.to_string();
        let pod = json!({
            "metadata": {"name": pod_name, "namespace": ns, "labels": labels,
                         "resourceVersion": rv, "uid": format!("pod-{rv}"),
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                              "name": format!("{name}-{hash}"), "controller": true}]},
            "spec": template["spec"],
            "status": {"phase": phase,
                       "conditions": [{"type": "PodScheduled", "status": "True"},
                                      {"type": "Ready", "status": if ready { "True" } else { "False" }}],
                       "containerStatuses": containers},
        });
        st.objects.insert(("pods".into(), ns.into(), pod_name), pod);
        let n = i64::from(ready);
        d["status"] = json!({
            "observedGeneration": generation,
            "replicas": 1, "updatedReplicas": 1, "readyReplicas": n, "availableReplicas": n,
            "unavailableReplicas": 1 - n,
            "conditions": [
                {"type": "Available", "status": if ready { "True" } else { "False" },
                 "reason": if ready { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
                 "message": if ready { "Deployment has minimum availability." } else { "Deployment does not have minimum availability." }},
                {"type": "Progressing", "status": "True",
                 "reason": if ready { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" }},
            ],
        });
        st.resource_version += 1;
        d["metadata"]["resourceVersion"] = json!(st.resource_version.to_string());
        st.objects.insert(key, d);
    }

    pub fn stop(mut self) {
        self.http.shutdown();
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

/// A request as the API server routes it: path decoded, query parsed.
struct ApiRequest<'a> {
    http: &'a Request,
    method: &'a str,
    path: String,
    query: BTreeMap<String, String>,
    body: &'a [u8],
}

impl<'a> ApiRequest<'a> {
    fn new(http: &'a Request) -> Self {
        ApiRequest {
            http,
            method: &http.method,
            path: percent_decode(http.path()),
            query: http.query(),
            body: &http.body,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.http.header(name)
    }
}

// ---------------------------------------------------------------------------
// The API
// ---------------------------------------------------------------------------

/// A `Status` object as the API server writes it.
fn status(code: u16, reason: &str, message: &str, details: Value) -> (u16, Value) {
    let mut v = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    if !details.is_null() {
        v["details"] = details;
    }
    (code, v)
}

struct Route {
    plural: String,
    group: &'static str,
    kind: &'static str,
    api_version: &'static str,
    namespace: Option<String>,
    name: Option<String>,
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest): (&'static str, &[&str]) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", "apps", "v1", rest @ ..] => ("apps", rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name) = match rest {
        [p] => (*p, None),
        [p, n] => (*p, Some(n.to_string())),
        _ => return None,
    };
    let (kind, api_version) = match (group, plural) {
        ("apps", "deployments") => ("Deployment", "apps/v1"),
        ("", "configmaps") => ("ConfigMap", "v1"),
        ("", "secrets") => ("Secret", "v1"),
        ("", "pods") => ("Pod", "v1"),
        _ => return None,
    };
    if name.is_some() && namespace.is_none() {
        return None;
    }
    Some(Route {
        plural: plural.into(),
        group,
        kind,
        api_version,
        namespace,
        name,
    })
}

fn verb(method: &str, r: &Route) -> &'static str {
    match (method, r.name.is_some()) {
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        _ => "unknown",
    }
}

fn resource_name(r: &Route) -> String {
    if r.group.is_empty() {
        r.plural.clone()
    } else {
        format!("{}.{}", r.plural, r.group)
    }
}

/// Every answer is JSON (a `Status` for errors), as the API server's.
fn handle(shared: &Shared, client: &Client<'_>, req: &Request) -> Response {
    let req = &ApiRequest::new(req);
    let has_cert = !client.certificates.is_empty();
    let (code, body) = respond(shared, has_cert, req);
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let parsed_body = if req.body.is_empty() {
        None
    } else {
        serde_yaml_ng::from_slice::<Value>(req.body).ok()
    };
    st.requests.push(Recorded {
        method: req.method.to_string(),
        path: req.path.clone(),
        query: req.query.clone(),
        content_type: req.header("content-type").map(str::to_string),
        body: parsed_body,
        status: code,
    });
    Response::json(code, &body)
}

fn respond(shared: &Shared, has_cert: bool, req: &ApiRequest) -> (u16, Value) {
    let token_ok = req
        .header("authorization")
        .is_some_and(|a| a == format!("Bearer {TOKEN}"));
    if !has_cert && !token_ok {
        return status(401, "Unauthorized", "Unauthorized", Value::Null);
    }
    let user = if has_cert {
        "system:admin"
    } else {
        "system:serviceaccount:default:dwng"
    };
    let Some(r) = route(&req.path) else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            Value::Null,
        );
    };
    let verb = verb(req.method, &r);
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let denied =
        |v: &str| v == verb || (v == "list@cluster" && verb == "list" && r.namespace.is_none());
    if st
        .forbidden
        .iter()
        .any(|(v, p)| denied(v) && *p == r.plural)
    {
        let name = r.name.clone().unwrap_or_default();
        let scope = match &r.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".into(),
        };
        let what = if name.is_empty() {
            format!("{} is forbidden", resource_name(&r))
        } else {
            format!("{} \"{name}\" is forbidden", resource_name(&r))
        };
        return status(
            403,
            "Forbidden",
            &format!(
                "{what}: User \"{user}\" cannot {verb} resource \"{}\" in API group \"{}\" {scope}",
                r.plural, r.group
            ),
            json!({"name": name, "group": r.group, "kind": r.plural}),
        );
    }
    if let Some(i) = st
        .faults
        .iter()
        .position(|(v, p, _, n)| v == verb && *p == r.plural && *n > 0)
    {
        st.faults[i].3 -= 1;
        let code = st.faults[i].2;
        let name = r.name.clone().unwrap_or_default();
        let details = json!({"name": name, "group": r.group, "kind": r.plural});
        return match code {
            409 => status(409, "Conflict", &format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", resource_name(&r)), details),
            422 => status(422, "Invalid", &format!("{} \"{name}\" is invalid: spec.template.spec.containers[0].image: Required value", r.kind), json!({"name": name, "group": r.group, "kind": r.kind, "causes": [{"reason": "FieldValueRequired", "message": "Required value", "field": "spec.template.spec.containers[0].image"}]})),
            c => status(c, "InternalError", "Internal error occurred: injected", details),
        };
    }
    match verb {
        "get" => get(&st, &r),
        "list" => list(
            &st,
            &r,
            req.query
                .get("labelSelector")
                .map(String::as_str)
                .unwrap_or(""),
        ),
        "patch" => patch(&mut st, &r, req),
        "delete" => delete(&mut st, &r),
        _ => status(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            Value::Null,
        ),
    }
}

fn not_found(r: &Route) -> (u16, Value) {
    let name = r.name.clone().unwrap_or_default();
    status(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", resource_name(r)),
        json!({"name": name, "group": r.group, "kind": r.plural}),
    )
}

fn key(r: &Route) -> (String, String, String) {
    (
        r.plural.clone(),
        r.namespace.clone().unwrap_or_default(),
        r.name.clone().unwrap_or_default(),
    )
}

fn with_type(r: &Route, mut obj: Value) -> Value {
    obj["kind"] = json!(r.kind);
    obj["apiVersion"] = json!(r.api_version);
    obj
}

fn get(st: &State, r: &Route) -> (u16, Value) {
    match st.objects.get(&key(r)) {
        Some(o) => (200, with_type(r, o.clone())),
        None => not_found(r),
    }
}

fn list(st: &State, r: &Route, selector: &str) -> (u16, Value) {
    let Some(sel) = parse_selector(selector) else {
        return status(
            400,
            "BadRequest",
            &format!("unable to parse requirement: invalid label selector \"{selector}\""),
            Value::Null,
        );
    };
    let items: Vec<Value> = st
        .objects
        .iter()
        .filter(|(k, _)| k.0 == r.plural && r.namespace.as_ref().map_or(true, |ns| *ns == k.1))
        .filter(|(_, o)| sel.iter().all(|req| req.matches(&o["metadata"]["labels"])))
        .map(|(_, o)| o.clone())
        .collect();
    (
        200,
        json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version,
               "metadata": {"resourceVersion": st.resource_version.to_string()}, "items": items}),
    )
}

enum Req {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Req {
    fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels[k].as_str().map(str::to_string);
        match self {
            Req::Eq(k, v) => get(k).as_deref() == Some(v),
            Req::Ne(k, v) => get(k).as_deref() != Some(v),
            Req::Exists(k) => get(k).is_some(),
            Req::Absent(k) => get(k).is_none(),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.contains(&x)),
            Req::NotIn(k, vs) => get(k).map_or(true, |x| !vs.contains(&x)),
        }
    }
}

fn parse_selector(s: &str) -> Option<Vec<Req>> {
    let mut parts = Vec::new();
    let (mut depth, mut cur) = (0, String::new());
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    parts.push(cur);
    let set = |v: &str| -> Option<Vec<String>> {
        let v = v.trim().strip_prefix('(')?.strip_suffix(')')?;
        Some(v.split(',').map(|x| x.trim().to_string()).collect())
    };
    let mut out = Vec::new();
    for p in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let r = if let Some((k, v)) = p.split_once("!=") {
            Req::Ne(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = p.split_once("==") {
            Req::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = p.split_once('=') {
            Req::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = p.split_once(" notin ") {
            Req::NotIn(k.trim().into(), set(v)?)
        } else if let Some((k, v)) = p.split_once(" in ") {
            Req::In(k.trim().into(), set(v)?)
        } else if let Some(k) = p.strip_prefix('!') {
            Req::Absent(k.trim().into())
        } else if p.contains(' ') {
            return None;
        } else {
            Req::Exists(p.into())
        };
        out.push(r);
    }
    Some(out)
}

fn patch(st: &mut State, r: &Route, req: &ApiRequest) -> (u16, Value) {
    if r.name.is_none() {
        return status(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            Value::Null,
        );
    }
    let ct = req.header("content-type").unwrap_or("");
    let manager = req.query.get("fieldManager").cloned().unwrap_or_default();
    match ct {
        "application/apply-patch+yaml" => apply(st, r, req, &manager),
        "application/merge-patch+json" => merge(st, r, req, &manager),
        other => status(415, "UnsupportedMediaType", &format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"), Value::Null),
    }
}

fn apply(st: &mut State, r: &Route, req: &ApiRequest, manager: &str) -> (u16, Value) {
    let name = r.name.clone().unwrap_or_default();
    let ns = r.namespace.clone().unwrap_or_default();
    if manager.is_empty() {
        return status(400, "BadRequest", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch", Value::Null);
    }
    let body: Value = match serde_yaml_ng::from_slice(req.body) {
        Ok(v) => v,
        Err(e) => {
            return status(
                400,
                "BadRequest",
                &format!("error decoding YAML: {e}"),
                Value::Null,
            )
        }
    };
    if body["kind"] != r.kind || body["apiVersion"] != r.api_version {
        return status(400, "BadRequest", &format!("the API version in the data ({}) does not match the expected API version ({}) or kind ({}) does not match {}", body["apiVersion"], r.api_version, body["kind"], r.kind), Value::Null);
    }
    if body["metadata"]["name"] != name.as_str() {
        return status(
            400,
            "BadRequest",
            &format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                body["metadata"]["name"]
            ),
            Value::Null,
        );
    }
    if let Some(bns) = body["metadata"]["namespace"].as_str() {
        if bns != ns {
            return status(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request", Value::Null);
        }
    }
    let force = req.query.get("force").is_some_and(|f| f == "true");
    let k = key(r);
    let existing = st.objects.get(&k).cloned();
    if let Some(e) = &existing {
        if let Some(rv) = body["metadata"]["resourceVersion"].as_str() {
            if e["metadata"]["resourceVersion"] != rv {
                return status(409, "Conflict", &format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", resource_name(r)), json!({"name": name, "group": r.group, "kind": r.plural}));
            }
        }
        let others: Vec<String> = e["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["manager"] != manager)
            .filter_map(|m| m["manager"].as_str().map(str::to_string))
            .collect();
        if !force && !others.is_empty() {
            return status(
                409,
                "Conflict",
                &format!(
                    "Apply failed with 1 conflict: conflict with \"{}\": .metadata.labels",
                    others[0]
                ),
                json!({"name": name, "group": r.group, "kind": r.kind, "causes": [{"reason": "FieldManagerConflict", "message": format!("conflict with \"{}\"", others[0]), "field": ".metadata.labels"}]}),
            );
        }
    }
    if let Some(causes) = validate(r.kind, &body) {
        let msg = causes
            .iter()
            .map(|(f, m)| format!("{f}: {m}"))
            .collect::<Vec<_>>()
            .join(", ");
        return status(
            422,
            "Invalid",
            &format!(
                "{}{} \"{name}\" is invalid: {msg}",
                r.kind,
                if r.group.is_empty() {
                    String::new()
                } else {
                    format!(".{}", r.group)
                }
            ),
            json!({"name": name, "group": r.group, "kind": r.kind,
                   "causes": causes.iter().map(|(f, m)| json!({"reason": "FieldValueInvalid", "message": m, "field": f})).collect::<Vec<_>>()}),
        );
    }
    // The applied configuration replaces what the manager owned (one manager in these tests).
    let mut obj = existing.clone().unwrap_or_else(|| json!({"metadata": {}}));
    let Some(o) = obj.as_object_mut() else {
        return status(500, "InternalError", "corrupt object", Value::Null);
    };
    let status_before = o.remove("status");
    let meta_before = o.remove("metadata").unwrap_or(json!({}));
    o.retain(|_, _| false);
    for (k2, v) in body.as_object().into_iter().flatten() {
        if k2 != "metadata" && k2 != "status" && k2 != "kind" && k2 != "apiVersion" {
            o.insert(k2.clone(), v.clone());
        }
    }
    let mut meta = Map::new();
    for f in ["labels", "annotations"] {
        if let Some(v) = body["metadata"].get(f) {
            meta.insert(f.into(), v.clone());
        }
    }
    meta.insert("name".into(), json!(name));
    meta.insert("namespace".into(), json!(ns));
    let changed = match &existing {
        None => true,
        Some(e) => {
            let strip = |v: &Value| {
                let mut v = v.clone();
                if let Some(m) = v.as_object_mut() {
                    m.remove("status");
                    m.remove("kind");
                    m.remove("apiVersion");
                }
                v["metadata"] = json!({"labels": v["metadata"]["labels"], "annotations": v["metadata"]["annotations"]});
                v
            };
            let mut now = Value::Object(o.clone());
            now["metadata"] = Value::Object(meta.clone());
            strip(e) != strip(&now)
        }
    };
    let spec_changed = existing.as_ref().map_or(true, |e| {
        e["spec"] != o.get("spec").cloned().unwrap_or(Value::Null)
    });
    let mut generation = meta_before["generation"].as_i64().unwrap_or(0);
    if r.kind == "Deployment" && spec_changed {
        generation += 1;
    }
    if r.kind == "Deployment" {
        meta.insert("generation".into(), json!(generation));
    }
    let rv = if changed {
        st.resource_version += 1;
        st.resource_version.to_string()
    } else {
        meta_before["resourceVersion"]
            .as_str()
            .unwrap_or("0")
            .to_string()
    };
    meta.insert("resourceVersion".into(), json!(rv));
    let uid = match meta_before["uid"].as_str() {
        Some(u) => u.to_string(),
        None => {
            st.uid += 1;
            format!("00000000-0000-0000-0000-{:012}", st.uid)
        }
    };
    meta.insert("uid".into(), json!(uid));
    meta.insert(
        "creationTimestamp".into(),
        meta_before
            .get("creationTimestamp")
            .cloned()
            .unwrap_or(json!("2024-01-01T00:00:00Z")),
    );
    let mut managers: Vec<Value> = meta_before["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| !(m["manager"] == manager && m["operation"] == "Apply"))
        .filter(|m| !force || m["manager"] == manager)
        .collect();
    managers.push(json!({"manager": manager, "operation": "Apply", "apiVersion": r.api_version, "fieldsType": "FieldsV1"}));
    meta.insert("managedFields".into(), Value::Array(managers));
    o.insert("metadata".into(), Value::Object(meta));
    if let Some(s) = status_before {
        o.insert("status".into(), s);
    }
    let created = existing.is_none();
    st.objects.insert(k, obj.clone());
    (if created { 201 } else { 200 }, with_type(r, obj))
}

/// What the API server's validation would refuse, for the fields the driver writes.
fn validate(kind: &str, o: &Value) -> Option<Vec<(String, String)>> {
    let mut causes = Vec::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 253
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    if !o["metadata"]["name"].as_str().is_some_and(name_ok) {
        causes.push(("metadata.name".into(), "Invalid value: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'".into()));
    }
    match kind {
        "Deployment" => {
            let sel = &o["spec"]["selector"]["matchLabels"];
            let labels = &o["spec"]["template"]["metadata"]["labels"];
            if !sel.is_object() || sel.as_object().is_some_and(|m| m.is_empty()) {
                causes.push(("spec.selector".into(), "Required value".into()));
            } else if sel
                .as_object()
                .into_iter()
                .flatten()
                .any(|(k, v)| labels[k] != *v)
            {
                causes.push((
                    "spec.template.metadata.labels".into(),
                    "Invalid value: `selector` does not match template `labels`".into(),
                ));
            }
            let containers = o["spec"]["template"]["spec"]["containers"].as_array();
            if containers.map_or(true, |c| c.is_empty()) {
                causes.push((
                    "spec.template.spec.containers".into(),
                    "Required value".into(),
                ));
            }
            for (i, c) in containers.into_iter().flatten().enumerate() {
                if c["image"].as_str().map_or(true, |s| s.trim().is_empty()) {
                    causes.push((
                        format!("spec.template.spec.containers[{i}].image"),
                        "Required value".into(),
                    ));
                }
            }
            let rp = &o["spec"]["template"]["spec"]["restartPolicy"];
            if !rp.is_null() && *rp != "Always" {
                causes.push((
                    "spec.template.spec.restartPolicy".into(),
                    format!("Unsupported value: {rp}: supported values: \"Always\""),
                ));
            }
        }
        "Secret" => {
            for (k, v) in o["data"].as_object().into_iter().flatten() {
                let ok = v
                    .as_str()
                    .is_some_and(|s| base64::engine::general_purpose::STANDARD.decode(s).is_ok());
                if !ok {
                    causes.push((
                        format!("data[{k}]"),
                        "Invalid value: illegal base64 data".into(),
                    ));
                }
            }
        }
        _ => {}
    }
    (!causes.is_empty()).then_some(causes)
}

fn merge_into(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_into(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn merge(st: &mut State, r: &Route, req: &ApiRequest, manager: &str) -> (u16, Value) {
    let patch: Value = match serde_json::from_slice(req.body) {
        Ok(v) => v,
        Err(e) => {
            return status(
                400,
                "BadRequest",
                &format!("error decoding patch: {e}"),
                Value::Null,
            )
        }
    };
    let k = key(r);
    let Some(before) = st.objects.get(&k).cloned() else {
        return not_found(r);
    };
    let mut obj = before.clone();
    merge_into(&mut obj, &patch);
    if obj != before {
        st.resource_version += 1;
        obj["metadata"]["resourceVersion"] = json!(st.resource_version.to_string());
        if r.kind == "Deployment" && obj["spec"] != before["spec"] {
            obj["metadata"]["generation"] =
                json!(before["metadata"]["generation"].as_i64().unwrap_or(0) + 1);
        }
        if let Some(m) = obj["metadata"]["managedFields"].as_array_mut() {
            if !m
                .iter()
                .any(|x| x["manager"] == manager && x["operation"] == "Update")
            {
                m.push(
                    json!({"manager": manager, "operation": "Update", "apiVersion": r.api_version}),
                );
            }
        }
    }
    if r.kind == "Deployment" && obj["spec"]["replicas"] == 0 {
        // The ReplicaSet controller, collapsed to an instant.
        let name = r.name.clone().unwrap_or_default();
        delete_pods_of(st, &k.1, &name);
        obj["status"] = json!({"observedGeneration": obj["metadata"]["generation"], "replicas": 0});
    }
    st.objects.insert(k, obj.clone());
    (200, with_type(r, obj))
}

fn delete_pods_of(st: &mut State, ns: &str, deployment: &str) {
    let sel = st
        .objects
        .get(&("deployments".into(), ns.into(), deployment.into()))
        .map(|d| d["spec"]["selector"]["matchLabels"].clone())
        .unwrap_or(Value::Null);
    let Some(sel) = sel.as_object().cloned() else {
        return;
    };
    st.objects.retain(|k, p| {
        !(k.0 == "pods"
            && k.1 == ns
            && sel
                .iter()
                .all(|(lk, lv)| p["metadata"]["labels"][lk] == *lv))
    });
}

fn delete(st: &mut State, r: &Route) -> (u16, Value) {
    let k = key(r);
    let Some(obj) = st.objects.get(&k).cloned() else {
        return not_found(r);
    };
    if r.kind == "Deployment" {
        delete_pods_of(st, &k.1, &k.2);
    }
    st.objects.remove(&k);
    st.resource_version += 1;
    (
        200,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
               "details": {"name": k.2, "group": r.group, "kind": r.plural, "uid": obj["metadata"]["uid"]}}),
    )
}
