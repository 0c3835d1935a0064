//! A fake Kubernetes API server for the k8s driver's tests: no Kubernetes can run on the test
//! machines (TESTBED.md), so the driver is tested against this, not a live MicroShift. It
//! follows `../shared/reference/KUBE-API.md`, what a real v1.24 API server with its controller
//! manager and scheduler was seen doing, for the resources a workload uses (Deployments,
//! ReplicaSets, Pods, ConfigMaps, Secrets; Namespaces read-only):
//!
//! - HTTPS with a test CA; a client certificate signed by it is `system:admin`, bearer tokens
//!   are users with cluster-wide or namespaced (Role-like) permissions; else `401`.
//!   A namespaced identity is denied every other namespace and the cluster scope (`403` with
//!   the API server's wording and details).
//! - Server-side apply with per-field ownership ([`ssa`]), `422` without `fieldManager`,
//!   `500` for a kind mismatch, `404` for a missing namespace, a stale resourceVersion `409`;
//!   JSON merge patch as an `Update`; `dryRun=All`; defaulting and validation of the whole
//!   object ([`schema`]); `resourceVersion` bumped on every change and only then,
//!   `generation` on spec changes, `managedFields` with `time` and `fieldsV1`.
//! - Controllers acting by themselves, later, on a clock the test may move ([`controllers`]):
//!   the Deployment controller (ReplicaSets `<deploy>-<hash>`, Recreate, history, status
//!   and conditions including `ProgressDeadlineExceeded` and `ReplicaFailure`), the
//!   ReplicaSet controller (pods `<rs>-<5 chars>`, quota), the scheduler (`Unschedulable`),
//!   a kubelet on one node (container states per image), the node lifecycle controller
//!   (Ready=False when the node stops), the garbage collector.
//! - Asynchronous deletion: unbound pods vanish, bound ones are Terminating until the kubelet
//!   confirms or a force delete; DELETE of a pod answers the Pod, of anything else a `Status`.
//! - JSON pretty-printed for curl's user agent, compact for everyone else.
//!
//! Not implemented: watches, strategic-merge and JSON patches (`415`), most of validation
//! beyond what a workload's objects meet, Services and everything else.

mod controllers;
mod schema;
mod ssa;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Map, Value};

use crate::https::{
    self, distinguished_name as dn, percent_decode, Client, HttpsServer, Limits, Request, Response,
};
use crate::wait::wait_until;
use ssa::Manager;

/// A token of a service account allowed everything everywhere.
pub const TOKEN: &str = "fake-token-123";

/// The one node the scheduler knows.
pub const NODE: &str = "edge-node";

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub body: Option<Value>,
    /// 0: the connection was dropped without an answer (the API server is down).
    pub status: u16,
}

/// The node and its kubelet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    /// Ready, with a kubelet that runs pods.
    Ready,
    /// Registered and schedulable, but no kubelet acts: bound pods stay Pending without
    /// container statuses; Terminating pods stay.
    NoKubelet,
    /// Stopped heartbeating: its pods turn Ready=False, new pods are unschedulable (taint).
    NotReady,
    /// No node at all: pods are unschedulable.
    Absent,
}

/// What the kubelet makes of a container, by image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Container {
    /// Running and ready.
    Runs,
    /// The image is being pulled: `ContainerCreating`.
    Pulling,
    /// `ImagePullBackOff`.
    PullFails,
    /// Exits at once, again and again: `CrashLoopBackOff`, restart count rising.
    Crashes { exit_code: i32, reason: String },
    /// Crashed once, was restarted by the kubelet and runs.
    RestartedOnce { exit_code: i32, reason: String },
}

#[derive(Debug, Clone)]
enum Scope {
    Cluster,
    Namespaces(BTreeSet<String>),
}

#[derive(Debug, Clone)]
struct Identity {
    user: String,
    scope: Scope,
}

/// (plural, namespace, name); namespace "" for cluster-scoped objects.
type Key = (String, String, String);

#[derive(Debug, Clone)]
struct Stored {
    obj: Value,
    managers: Vec<Manager>,
}

struct State {
    objects: BTreeMap<Key, Stored>,
    namespaces: BTreeSet<String>,
    resource_version: u64,
    uid: u64,
    /// For generated names.
    random: u64,
    requests: Vec<Recorded>,
    tokens: BTreeMap<String, Identity>,
    /// (verb, plural): denied to everyone.
    forbidden: Vec<(String, String)>,
    /// (verb, plural, status, times): injected failures.
    faults: Vec<(String, String, u16, usize)>,
    node: Node,
    images: BTreeMap<String, Container>,
    ignores_sigterm: BTreeSet<String>,
    /// namespace → most pods (a ResourceQuota).
    quotas: BTreeMap<String, u64>,
    /// Added to the wall clock (the test moves time forward).
    clock_offset: Duration,
    down: bool,
    kubeconfigs: u64,
    controllers: controllers::Memory,
}

impl State {
    fn now(&self) -> f64 {
        (SystemTime::now() + self.clock_offset)
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    }

    fn now_str(&self) -> String {
        rfc3339(self.now() as i64)
    }

    fn next_uid(&mut self) -> String {
        self.uid += 1;
        format!("6f1e7c1a-0000-4000-8000-{:012}", self.uid)
    }

    /// Five characters as the API server's generated names have them.
    fn random_suffix(&mut self, n: usize) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut out = String::new();
        for _ in 0..n {
            self.random = self
                .random
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.push(ALPHABET[((self.random >> 33) % ALPHABET.len() as u64) as usize] as char);
        }
        out
    }

    /// Stores a changed object: new resourceVersion, managedFields rendered.
    fn write(&mut self, key: Key, mut obj: Value, managers: Vec<Manager>) -> Value {
        self.resource_version += 1;
        obj["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        obj["metadata"]["managedFields"] =
            Value::Array(managers.iter().map(Manager::to_json).collect());
        self.objects.insert(
            key,
            Stored {
                obj: obj.clone(),
                managers,
            },
        );
        obj
    }

    fn of_plural<'a>(&'a self, plural: &'a str) -> impl Iterator<Item = (&'a Key, &'a Stored)> {
        self.objects.iter().filter(move |(k, _)| k.0 == plural)
    }
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct FakeKube {
    http: HttpsServer,
    shared: Arc<Shared>,
    dir: tempfile::TempDir,
    ca_der: CertificateDer<'static>,
    controllers: Option<JoinHandle<()>>,
}

fn leaf(cn: &str, org: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(&[(DnType::CommonName, cn), (DnType::OrganizationName, org)]);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p
}

/// How often the controllers look at the objects.
const TICK: Duration = Duration::from_millis(20);

impl FakeKube {
    /// A cluster with namespaces `default`, `kube-system`, `kube-public`, `kube-node-lease`
    /// and one Ready node whose kubelet runs every image.
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
        roots.add(ca_der.clone()).unwrap();
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
        let tokens = BTreeMap::from([(
            TOKEN.to_string(),
            Identity {
                user: "system:serviceaccount:kube-system:device-worker-ng".into(),
                scope: Scope::Cluster,
            },
        )]);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                objects: BTreeMap::new(),
                namespaces: ["default", "kube-system", "kube-public", "kube-node-lease"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
                resource_version: 1000,
                uid: 0,
                random: 0x5eed,
                requests: Vec::new(),
                tokens,
                forbidden: Vec::new(),
                faults: Vec::new(),
                node: Node::Ready,
                images: BTreeMap::new(),
                ignores_sigterm: BTreeSet::new(),
                quotas: BTreeMap::new(),
                clock_offset: Duration::ZERO,
                down: false,
                kubeconfigs: 0,
                controllers: controllers::Memory::default(),
            }),
            stop: AtomicBool::new(false),
        });
        let http = {
            let shared = shared.clone();
            HttpsServer::start(
                Arc::new(tls),
                Limits::default(),
                move |client: &Client<'_>, req: &Request| handle(&shared, client, req),
            )
        };
        let controllers = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("fake-kube-controllers".into())
                .spawn(move || {
                    while !shared.stop.load(Ordering::SeqCst) {
                        controllers::tick(&mut shared.lock());
                        std::thread::sleep(TICK);
                    }
                })
                .expect("spawn the controllers")
        };
        FakeKube {
            http,
            shared,
            dir,
            ca_der,
            controllers: Some(controllers),
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.http.addr().port())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
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
        let n = {
            let mut st = self.state();
            st.kubeconfigs += 1;
            st.kubeconfigs
        };
        let p = self.dir.path().join(format!("kubeconfig-{n}"));
        std::fs::write(&p, kubeconfig_text(server, user)).unwrap();
        p
    }

    /// Rewrites a kubeconfig in place to use `token` (a rotated credential).
    pub fn rewrite_kubeconfig(&self, path: &Path, token: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            kubeconfig_text(&self.url(), &format!("    token: {token}\n")),
        )
        .unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    /// A token of a user allowed everything in `namespaces` only (a Role and RoleBinding in
    /// each), or everywhere with `None` (a ClusterRoleBinding).
    pub fn add_token(&self, token: &str, user: &str, namespaces: Option<&[&str]>) {
        let scope = match namespaces {
            None => Scope::Cluster,
            Some(n) => Scope::Namespaces(n.iter().map(|s| s.to_string()).collect()),
        };
        self.state().tokens.insert(
            token.into(),
            Identity {
                user: user.into(),
                scope,
            },
        );
    }

    pub fn revoke_token(&self, token: &str) {
        self.state().tokens.remove(token);
    }

    pub fn create_namespace(&self, ns: &str) {
        self.state().namespaces.insert(ns.into());
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
            .map(|s| s.obj.clone())
    }

    /// `namespace/name` of every object of a resource.
    pub fn names(&self, plural: &str) -> Vec<String> {
        self.state()
            .objects
            .keys()
            .filter(|k| k.0 == plural)
            .map(|k| format!("{}/{}", k.1, k.2))
            .collect()
    }

    /// The pods of a Deployment (through its ReplicaSets), Terminating ones included.
    pub fn pods_of(&self, ns: &str, deployment: &str) -> Vec<Value> {
        let st = self.state();
        controllers::pods_of_deployment(&st, ns, deployment)
    }

    /// An object created by someone else (`kubectl create`).
    pub fn put(&self, plural: &str, ns: &str, obj: Value) {
        let mut st = self.state();
        let r = route(&format!("/{}/namespaces/{ns}/{plural}", api_prefix(plural)))
            .unwrap_or_else(|| panic!("no resource {plural}"));
        let (code, body) = create(&mut st, &r, obj, "kubectl-create", false);
        assert!(code == 201, "put {plural} {ns}: {code} {body}");
    }

    /// A merge patch by another manager (`kubectl edit`, `kubectl scale`).
    pub fn edit(&self, plural: &str, ns: &str, name: &str, manager: &str, patch: Value) {
        let mut st = self.state();
        let r = route(&format!(
            "/{}/namespaces/{ns}/{plural}/{name}",
            api_prefix(plural)
        ))
        .unwrap_or_else(|| panic!("no resource {plural}"));
        let (code, body) = merge(&mut st, &r, &patch, manager, false);
        assert!(code == 200, "edit {plural} {ns}/{name}: {code} {body}");
    }

    /// Denies one verb on one resource to everyone.
    pub fn forbid(&self, verb: &str, plural: &str) {
        self.state().forbidden.push((verb.into(), plural.into()));
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

    /// The API server goes away (every connection is dropped unanswered) or comes back.
    pub fn set_down(&self, down: bool) {
        self.state().down = down;
    }

    pub fn set_node(&self, node: Node) {
        self.state().node = node;
    }

    /// What the kubelet makes of containers running `image` (default: [`Container::Runs`]).
    pub fn image(&self, image: &str, behaviour: Container) {
        self.state().images.insert(image.into(), behaviour);
    }

    /// Containers of `image` do not stop on SIGTERM: the kubelet kills them when the pod's
    /// grace period ends.
    pub fn ignore_sigterm(&self, image: &str) {
        self.state().ignores_sigterm.insert(image.into());
    }

    /// A ResourceQuota of at most `pods` pods in `ns` (`None`: no quota).
    pub fn quota(&self, ns: &str, pods: Option<u64>) {
        let mut st = self.state();
        match pods {
            Some(p) => st.quotas.insert(ns.into(), p),
            None => st.quotas.remove(ns),
        };
    }

    /// Moves the cluster's clock forward (progress deadlines, grace periods).
    pub fn advance(&self, by: Duration) {
        self.state().clock_offset += by;
    }

    /// Waits (at most 10 s) until `done` holds for the cluster.
    pub fn wait(&self, what: &str, done: impl Fn(&FakeKube) -> bool) {
        wait_until(
            what,
            Duration::from_secs(10),
            Duration::from_millis(20),
            || done(self),
        );
    }

    /// One raw request as curl sends it, as the admin (`token: None`, the client
    /// certificate) or with a token. Returns the status and the JSON body (`Null` when it is
    /// not JSON).
    pub fn call(
        &self,
        token: Option<&str>,
        method: &str,
        path_and_query: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> (u16, Value) {
        let (status, text) = self.call_as(
            "curl/7.88.1",
            token,
            method,
            path_and_query,
            content_type,
            body,
        );
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// One raw request with the given User-Agent; the status and the body as sent.
    pub fn call_as(
        &self,
        user_agent: &str,
        token: Option<&str>,
        method: &str,
        path_and_query: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> (u16, String) {
        let provider = https::tls_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match token {
            Some(_) => builder.with_no_client_auth(),
            None => {
                let pem = |f: &str| std::fs::read(self.dir.path().join(f)).unwrap();
                use rustls::pki_types::pem::PemObject;
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(&pem("client.crt"))
                        .collect::<Result<_, _>>()
                        .unwrap();
                let key = PrivateKeyDer::from_pem_slice(&pem("client.key")).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
        };
        let conn = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::try_from("127.0.0.1").unwrap(),
        )
        .unwrap();
        let tcp = TcpStream::connect(self.http.addr()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut head = format!(
            "{method} {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nUser-Agent: {user_agent}\r\nAccept: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(t) = token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(ct) = content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        head.push_str("\r\n");
        tls.write_all(head.as_bytes()).unwrap();
        tls.write_all(body).unwrap();
        tls.flush().unwrap();
        let mut raw = Vec::new();
        // The server closes after answering (Connection: close); a missing close_notify is
        // fine here.
        let _ = tls.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, body.to_string())
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.http.shutdown();
        if let Some(h) = self.controllers.take() {
            let _ = h.join();
        }
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn kubeconfig_text(server: &str, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: microshift\nclusters:\n- name: microshift\n  cluster:\n    server: {server}\n    certificate-authority: ca.crt\ncontexts:\n- name: microshift\n  context:\n    cluster: microshift\n    user: user\n    namespace: default\nusers:\n- name: user\n  user:\n{user}"
    )
}

fn api_prefix(plural: &str) -> &'static str {
    match plural {
        "deployments" | "replicasets" => "apis/apps/v1",
        _ => "api/v1",
    }
}

// ---------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------

/// `2026-11-30T12:00:00Z` (what the API server writes: seconds, UTC).
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn parse_rfc3339(s: &str) -> Option<i64> {
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

// ---------------------------------------------------------------------------
// Requests
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

impl Route {
    /// `deployments.apps`, `pods`: how messages name the resource.
    fn resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    fn key(&self) -> Key {
        (
            self.plural.clone(),
            self.namespace.clone().unwrap_or_default(),
            self.name.clone().unwrap_or_default(),
        )
    }

    fn with_type(&self, mut obj: Value) -> Value {
        if let Some(m) = obj.as_object_mut() {
            m.insert("kind".into(), json!(self.kind));
            m.insert("apiVersion".into(), json!(self.api_version));
        }
        obj
    }

    fn not_found(&self) -> (u16, Value) {
        let name = self.name.clone().unwrap_or_default();
        status(
            404,
            "NotFound",
            &format!("{} \"{name}\" not found", self.resource()),
            json!({"name": name, "group": self.group, "kind": self.plural}),
        )
    }
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
        ("apps", "replicasets") => ("ReplicaSet", "apps/v1"),
        ("", "configmaps") => ("ConfigMap", "v1"),
        ("", "secrets") => ("Secret", "v1"),
        ("", "pods") => ("Pod", "v1"),
        ("", "namespaces") if namespace.is_none() => ("Namespace", "v1"),
        _ => return None,
    };
    if name.is_some() && namespace.is_none() && kind != "Namespace" {
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

fn handle(shared: &Shared, client: &Client<'_>, http: &Request) -> Option<Response> {
    let path = percent_decode(http.path());
    let query = http.query();
    let has_cert = !client.certificates.is_empty();
    let mut st = shared.lock();
    let answer = if st.down {
        None
    } else {
        Some(respond(&mut st, has_cert, http, &path, &query))
    };
    let parsed_body = if http.body.is_empty() {
        None
    } else {
        serde_yaml_ng::from_slice::<Value>(&http.body).ok()
    };
    st.requests.push(Recorded {
        method: http.method.clone(),
        path,
        query,
        content_type: http.header("content-type").map(str::to_string),
        body: parsed_body,
        status: answer.as_ref().map_or(0, |a| a.0),
    });
    // The real server pretty-prints for curl only; the agent gets compact JSON.
    let curl = http
        .header("user-agent")
        .is_some_and(|u| u.starts_with("curl/"));
    answer.map(|(code, body)| {
        if curl {
            let text = serde_json::to_vec_pretty(&body).unwrap_or_default();
            Response::new(code).with_body("application/json", text)
        } else {
            Response::json(code, &body)
        }
    })
}

fn respond(
    st: &mut State,
    has_cert: bool,
    http: &Request,
    path: &str,
    query: &BTreeMap<String, String>,
) -> (u16, Value) {
    let identity = if has_cert {
        Some(Identity {
            user: "system:admin".into(),
            scope: Scope::Cluster,
        })
    } else {
        http.header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .and_then(|t| st.tokens.get(t.trim()).cloned())
    };
    let Some(identity) = identity else {
        return status(401, "Unauthorized", "Unauthorized", Value::Null);
    };
    let Some(r) = route(path) else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            json!({}),
        );
    };
    let verb = verb(&http.method, &r);
    let allowed_scope = match (&identity.scope, &r.namespace) {
        (Scope::Cluster, _) => true,
        (Scope::Namespaces(set), Some(ns)) => set.contains(ns),
        (Scope::Namespaces(_), None) => false,
    };
    // An apply that creates the object is authorized as `create` too.
    let creates = verb == "patch"
        && http.header("content-type") == Some("application/apply-patch+yaml")
        && !st.objects.contains_key(&r.key());
    let denied = [Some(verb), creates.then_some("create")]
        .into_iter()
        .flatten()
        .find(|v| st.forbidden.iter().any(|(fv, p)| fv == v && *p == r.plural));
    if !allowed_scope || denied.is_some() {
        let verb = denied.unwrap_or(verb);
        let scope = match &r.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".into(),
        };
        let (what, details) = match &r.name {
            Some(n) => (
                format!("{} \"{n}\" is forbidden", r.resource()),
                json!({"name": n, "group": r.group, "kind": r.plural}),
            ),
            None => (
                format!("{} is forbidden", r.resource()),
                json!({"group": r.group, "kind": r.plural}),
            ),
        };
        return status(
            403,
            "Forbidden",
            &format!(
                "{what}: User \"{}\" cannot {verb} resource \"{}\" in API group \"{}\" {scope}",
                identity.user, r.plural, r.group
            ),
            details,
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
            409 => status(409, "Conflict", &format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", r.resource()), details),
            422 => status(422, "Invalid", &format!("{} \"{name}\" is invalid: spec.template.spec.containers[0].image: Required value", kind_group(&r)), json!({"name": name, "group": r.group, "kind": r.kind, "causes": [{"reason": "FieldValueRequired", "message": "Required value", "field": "spec.template.spec.containers[0].image"}]})),
            c => status(c, "InternalError", "Internal error occurred: injected", details),
        };
    }
    let dry_run = query.get("dryRun").is_some_and(|d| d == "All");
    let user_agent = http
        .header("user-agent")
        .and_then(|u| u.split('/').next())
        .unwrap_or("unknown")
        .to_string();
    match verb {
        "get" => get(st, &r),
        "list" => list(
            st,
            &r,
            query.get("labelSelector").map(String::as_str).unwrap_or(""),
        ),
        "patch" if r.kind == "Namespace" => method_not_allowed(),
        "patch" => {
            let manager = query.get("fieldManager").cloned();
            match http.header("content-type").unwrap_or("") {
                "application/apply-patch+yaml" => {
                    let force = query.get("force").is_some_and(|f| f == "true");
                    apply(st, &r, &http.body, manager.as_deref(), force, dry_run)
                }
                "application/merge-patch+json" => match serde_json::from_slice::<Value>(&http.body)
                {
                    Ok(p) => merge(st, &r, &p, &manager.unwrap_or(user_agent), dry_run),
                    Err(e) => status(
                        400,
                        "BadRequest",
                        &format!("error decoding patch: {e}"),
                        Value::Null,
                    ),
                },
                _ => status(
                    415,
                    "UnsupportedMediaType",
                    "415: Unsupported Media Type",
                    json!({}),
                ),
            }
        }
        "create" if r.name.is_none() && r.kind != "Namespace" => {
            match serde_json::from_slice::<Value>(&http.body) {
                Ok(obj) => {
                    let manager = query.get("fieldManager").cloned().unwrap_or(user_agent);
                    create(st, &r, obj, &manager, dry_run)
                }
                Err(e) => status(
                    400,
                    "BadRequest",
                    &format!("error decoding body: {e}"),
                    Value::Null,
                ),
            }
        }
        "delete" if r.name.is_some() && r.kind != "Namespace" => {
            let body: Value = serde_json::from_slice(&http.body).unwrap_or(Value::Null);
            let grace = query
                .get("gracePeriodSeconds")
                .and_then(|g| g.parse::<i64>().ok())
                .or_else(|| body["gracePeriodSeconds"].as_i64());
            let propagation = query
                .get("propagationPolicy")
                .cloned()
                .or_else(|| body["propagationPolicy"].as_str().map(str::to_string))
                .unwrap_or_else(|| "Background".into());
            delete(st, &r, grace, &propagation, dry_run)
        }
        _ => method_not_allowed(),
    }
}

fn method_not_allowed() -> (u16, Value) {
    status(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
        json!({}),
    )
}

/// `Deployment.apps`, `ConfigMap`: how "is invalid" messages name the kind.
fn kind_group(r: &Route) -> String {
    if r.group.is_empty() {
        r.kind.to_string()
    } else {
        format!("{}.{}", r.kind, r.group)
    }
}

fn namespace_missing(ns: &str) -> (u16, Value) {
    status(
        404,
        "NotFound",
        &format!("namespaces \"{ns}\" not found"),
        json!({"name": ns, "kind": "namespaces"}),
    )
}

fn get(st: &State, r: &Route) -> (u16, Value) {
    if r.kind == "Namespace" {
        let name = r.name.clone().unwrap_or_default();
        return if st.namespaces.contains(&name) {
            (
                200,
                json!({"kind": "Namespace", "apiVersion": "v1",
                       "metadata": {"name": name}, "spec": {"finalizers": ["kubernetes"]},
                       "status": {"phase": "Active"}}),
            )
        } else {
            r.not_found()
        };
    }
    match st.objects.get(&r.key()) {
        Some(o) => (200, r.with_type(o.obj.clone())),
        None => r.not_found(),
    }
}

fn list(st: &State, r: &Route, selector: &str) -> (u16, Value) {
    let sel = match selector::parse(selector) {
        Ok(s) => s,
        Err(why) => return status(400, "BadRequest", &why, Value::Null),
    };
    let items: Vec<Value> = if r.kind == "Namespace" {
        st.namespaces
            .iter()
            .map(|n| json!({"metadata": {"name": n}, "status": {"phase": "Active"}}))
            .collect()
    } else {
        st.of_plural(&r.plural)
            .filter(|(k, _)| r.namespace.as_ref().map_or(true, |ns| *ns == k.1))
            .filter(|(_, o)| {
                sel.iter()
                    .all(|req| req.matches(&o.obj["metadata"]["labels"]))
            })
            .map(|(_, o)| o.obj.clone())
            .collect()
    };
    (
        200,
        json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version,
               "metadata": {"resourceVersion": st.resource_version.to_string()}, "items": items}),
    )
}

/// A new object (`POST`, or an apply that creates): identity fields, defaults, validation.
fn create(st: &mut State, r: &Route, mut obj: Value, manager: &str, dry_run: bool) -> (u16, Value) {
    let ns = r.namespace.clone().unwrap_or_default();
    if !st.namespaces.contains(&ns) {
        return namespace_missing(&ns);
    }
    let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
        return status(
            422,
            "Invalid",
            &format!("{} \"\" is invalid: metadata.name: Required value: name or generateName is required", kind_group(r)),
            json!({"group": r.group, "kind": r.kind, "causes": [{"reason": "FieldValueRequired", "message": "Required value: name or generateName is required", "field": "metadata.name"}]}),
        );
    };
    let key = (r.plural.clone(), ns.clone(), name.clone());
    if st.objects.contains_key(&key) {
        return status(
            409,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", r.resource()),
            json!({"name": name, "group": r.group, "kind": r.plural}),
        );
    }
    let before = json!({"metadata": {}});
    if let Some(m) = obj.as_object_mut() {
        m.remove("status");
        m.remove("kind");
        m.remove("apiVersion");
    }
    let now = st.now_str();
    let mut managers = Vec::new();
    ssa::update(&before, &obj, &mut managers, manager, r.api_version, &now);
    finish_new(st, r, &mut obj, &name, &ns);
    schema::default(r.kind, &mut obj);
    if let Some(e) = invalid(r, &name, &obj, None) {
        return e;
    }
    if dry_run {
        return (201, r.with_type(obj));
    }
    let obj = st.write(key, obj, managers);
    (201, r.with_type(obj))
}

/// Identity fields of an object being created.
fn finish_new(st: &mut State, r: &Route, obj: &mut Value, name: &str, ns: &str) {
    let uid = st.next_uid();
    let now = st.now_str();
    let meta = &mut obj["metadata"];
    meta["name"] = json!(name);
    meta["namespace"] = json!(ns);
    meta["uid"] = json!(uid);
    meta["creationTimestamp"] = json!(now);
    if matches!(r.kind, "Deployment" | "ReplicaSet") {
        meta["generation"] = json!(1);
    }
    if r.kind == "Deployment" {
        obj["status"] = json!({});
    }
}

/// `422 Invalid` with the causes, when the object is refused.
fn invalid(r: &Route, name: &str, obj: &Value, old: Option<&Value>) -> Option<(u16, Value)> {
    let causes = schema::validate(r.kind, obj, old);
    if causes.is_empty() {
        return None;
    }
    let msg = causes
        .iter()
        .map(|(f, m)| format!("{f}: {m}"))
        .collect::<Vec<_>>()
        .join(", ");
    let message = if causes.len() == 1 {
        format!("{} \"{name}\" is invalid: {msg}", kind_group(r))
    } else {
        format!("{} \"{name}\" is invalid: [{msg}]", kind_group(r))
    };
    Some(status(
        422,
        "Invalid",
        &message,
        json!({"name": name, "group": r.group, "kind": r.kind,
               "causes": causes.iter().map(|(f, m)| json!({
                   "reason": if m.starts_with("Required") { "FieldValueRequired" } else if m.starts_with("Unsupported") { "FieldValueNotSupported" } else if m.starts_with("Duplicate") { "FieldValueDuplicate" } else { "FieldValueInvalid" },
                   "message": m, "field": f})).collect::<Vec<_>>()}),
    ))
}

fn apply(
    st: &mut State,
    r: &Route,
    body: &[u8],
    manager: Option<&str>,
    force: bool,
    dry_run: bool,
) -> (u16, Value) {
    let Some(manager) = manager.filter(|m| !m.is_empty()) else {
        return status(
            422,
            "Invalid",
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            json!({"group": "meta.k8s.io", "kind": "PatchOptions",
                   "causes": [{"reason": "FieldValueRequired", "message": "Required value: is required for apply patch", "field": "fieldManager"}]}),
        );
    };
    let name = r.name.clone().unwrap_or_default();
    let ns = r.namespace.clone().unwrap_or_default();
    let applied: Value = match serde_yaml_ng::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return status(
                400,
                "BadRequest",
                "error decoding YAML: the applied configuration is not an object",
                Value::Null,
            )
        }
        Err(e) => {
            return status(
                400,
                "BadRequest",
                &format!("error decoding YAML: {e}"),
                Value::Null,
            )
        }
    };
    if applied["kind"] != r.kind || applied["apiVersion"] != r.api_version {
        return status(
            500,
            "InternalError",
            "failed to merge config: expected objects of the same type",
            json!({}),
        );
    }
    if applied["metadata"]["name"] != name.as_str() {
        return status(
            400,
            "BadRequest",
            &format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                applied["metadata"]["name"].as_str().unwrap_or_default()
            ),
            json!({}),
        );
    }
    if applied["metadata"]["namespace"]
        .as_str()
        .is_some_and(|b| b != ns)
    {
        return status(
            400,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request",
            json!({}),
        );
    }
    if !st.namespaces.contains(&ns) {
        return namespace_missing(&ns);
    }
    let key = r.key();
    let existing = st.objects.get(&key).cloned();
    if let (Some(e), Some(rv)) = (&existing, applied["metadata"]["resourceVersion"].as_str()) {
        if e.obj["metadata"]["resourceVersion"] != rv {
            return status(409, "Conflict", &format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", r.resource()), json!({"name": name, "group": r.group, "kind": r.plural}));
        }
    }
    let now = st.now_str();
    let (current, managers) = match &existing {
        Some(e) => (e.obj.clone(), e.managers.clone()),
        None => (json!({"metadata": {}}), Vec::new()),
    };
    let merged = match ssa::apply(
        &current,
        &managers,
        &applied,
        manager,
        r.api_version,
        force,
        &now,
    ) {
        Ok(m) => m,
        Err(conflicts) => return conflict(r, &name, &conflicts),
    };
    let mut obj = merged.object;
    match &existing {
        None => finish_new(st, r, &mut obj, &name, &ns),
        Some(e) => obj["status"] = e.obj["status"].clone(),
    }
    if obj["status"].is_null() {
        if let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
    }
    schema::default(r.kind, &mut obj);
    if let Some(e) = invalid(r, &name, &obj, existing.as_ref().map(|e| &e.obj)) {
        return e;
    }
    let Some(e) = existing else {
        if dry_run {
            return (201, r.with_type(obj));
        }
        let obj = st.write(key, obj, merged.managers);
        return (201, r.with_type(obj));
    };
    let ownership = |ms: &[Manager]| -> Vec<(String, &'static str, ssa::FieldSet)> {
        ms.iter()
            .map(|m| (m.manager.clone(), m.operation, m.fields.clone()))
            .collect()
    };
    let comparable = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v["metadata"].as_object_mut() {
            m.remove("resourceVersion");
            m.remove("managedFields");
        }
        v
    };
    if comparable(&obj) == comparable(&e.obj)
        && ownership(&merged.managers) == ownership(&e.managers)
    {
        // A no-op apply: nothing is written, the resourceVersion stays.
        return (200, r.with_type(e.obj));
    }
    bump_generation(r, &e.obj, &mut obj);
    if dry_run {
        return (200, r.with_type(obj));
    }
    let obj = st.write(key, obj, merged.managers);
    (200, r.with_type(obj))
}

fn bump_generation(r: &Route, before: &Value, after: &mut Value) {
    if matches!(r.kind, "Deployment" | "ReplicaSet") && before["spec"] != after["spec"] {
        let g = before["metadata"]["generation"].as_i64().unwrap_or(0);
        after["metadata"]["generation"] = json!(g + 1);
    }
}

fn conflict(r: &Route, name: &str, conflicts: &[ssa::Conflict]) -> (u16, Value) {
    let message = if conflicts.len() == 1 {
        format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            conflicts[0].manager,
            ssa::display(&conflicts[0].path)
        )
    } else {
        let mut by_manager: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for c in conflicts {
            by_manager
                .entry(&c.manager)
                .or_default()
                .push(ssa::display(&c.path));
        }
        let mut lines = Vec::new();
        for (m, paths) in by_manager {
            lines.push(format!("conflicts with {m}:"));
            lines.extend(paths.into_iter().map(|p| format!("- {p}")));
        }
        format!(
            "Apply failed with {} conflicts: {}",
            conflicts.len(),
            lines.join("\n")
        )
    };
    status(
        409,
        "Conflict",
        &message,
        json!({"name": name, "group": r.group, "kind": r.plural,
               "causes": conflicts.iter().map(|c| json!({
                   "reason": "FieldManagerConflict",
                   "message": format!("conflict with {}", c.manager),
                   "field": ssa::display(&c.path)})).collect::<Vec<_>>()}),
    )
}

fn merge_into(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("an object");
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

/// A JSON merge patch (RFC 7386): an `Update` by `manager`.
fn merge(st: &mut State, r: &Route, patch: &Value, manager: &str, dry_run: bool) -> (u16, Value) {
    let key = r.key();
    let Some(before) = st.objects.get(&key).cloned() else {
        return r.not_found();
    };
    let name = key.2.clone();
    let mut obj = before.obj.clone();
    merge_into(&mut obj, patch);
    // The main resource does not write status; name and namespace are the URL's.
    obj["status"] = before.obj["status"].clone();
    if obj["status"].is_null() {
        if let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
    }
    obj["metadata"]["name"] = before.obj["metadata"]["name"].clone();
    obj["metadata"]["namespace"] = before.obj["metadata"]["namespace"].clone();
    schema::default(r.kind, &mut obj);
    if let Some(e) = invalid(r, &name, &obj, Some(&before.obj)) {
        return e;
    }
    if obj == before.obj {
        return (200, r.with_type(before.obj));
    }
    let now = st.now_str();
    let mut managers = before.managers.clone();
    ssa::update(
        &before.obj,
        &obj,
        &mut managers,
        manager,
        r.api_version,
        &now,
    );
    bump_generation(r, &before.obj, &mut obj);
    if dry_run {
        return (200, r.with_type(obj));
    }
    let obj = st.write(key, obj, managers);
    (200, r.with_type(obj))
}

fn delete(
    st: &mut State,
    r: &Route,
    grace: Option<i64>,
    propagation: &str,
    dry_run: bool,
) -> (u16, Value) {
    let key = r.key();
    let Some(stored) = st.objects.get(&key).cloned() else {
        return r.not_found();
    };
    if dry_run {
        return (200, r.with_type(stored.obj));
    }
    if r.kind == "Pod" {
        let pod = delete_pod(st, &key, grace);
        return (200, r.with_type(pod));
    }
    match propagation {
        "Foreground" => {
            let mut obj = stored.obj.clone();
            if obj["metadata"]["deletionTimestamp"].is_null() {
                obj["metadata"]["deletionTimestamp"] = json!(st.now_str());
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                obj["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
                obj = st.write(key, obj, stored.managers);
            }
            return (200, r.with_type(obj));
        }
        "Orphan" => {
            let uid = stored.obj["metadata"]["uid"].clone();
            let dependents: Vec<Key> = st
                .objects
                .iter()
                .filter(|(_, o)| controllers::owner_uid(&o.obj) == Some(&uid))
                .map(|(k, _)| k.clone())
                .collect();
            for k in dependents {
                if let Some(d) = st.objects.get(&k).cloned() {
                    let mut obj = d.obj;
                    if let Some(m) = obj["metadata"].as_object_mut() {
                        m.remove("ownerReferences");
                    }
                    st.write(k, obj, d.managers);
                }
            }
        }
        _ => {}
    }
    st.objects.remove(&key);
    st.resource_version += 1;
    (
        200,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
               "details": {"name": key.2, "group": r.group, "kind": r.plural,
                           "uid": stored.obj["metadata"]["uid"]}}),
    )
}

/// Deletes a pod as the API server does: one no kubelet runs (unbound) or a force delete
/// (grace 0) goes at once; a bound one becomes Terminating until the kubelet confirms.
/// Returns the Pod, as the API answers a pod DELETE.
fn delete_pod(st: &mut State, key: &Key, grace: Option<i64>) -> Value {
    let Some(stored) = st.objects.get(key).cloned() else {
        return Value::Null;
    };
    let mut pod = stored.obj;
    let grace = grace
        .or_else(|| pod["spec"]["terminationGracePeriodSeconds"].as_i64())
        .unwrap_or(30)
        .max(0);
    let now = st.now();
    let bound = pod["spec"]["nodeName"].as_str().is_some();
    if !bound || grace == 0 {
        pod["metadata"]["deletionTimestamp"] = json!(rfc3339(now as i64));
        pod["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        st.objects.remove(key);
        st.resource_version += 1;
        return pod;
    }
    let deadline = now as i64 + grace;
    let current = pod["metadata"]["deletionTimestamp"]
        .as_str()
        .and_then(parse_rfc3339);
    if current.is_some_and(|c| c <= deadline) {
        return pod;
    }
    pod["metadata"]["deletionTimestamp"] = json!(rfc3339(deadline));
    pod["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
    st.write(key.clone(), pod, stored.managers)
}

/// Label selectors as the API server parses them (equality- and set-based), with its errors.
mod selector {
    use serde_json::Value;

    pub enum Req {
        Eq(String, String),
        Ne(String, String),
        Exists(String),
        Absent(String),
        In(String, Vec<String>),
        NotIn(String, Vec<String>),
        Gt(String, i64),
        Lt(String, i64),
    }

    impl Req {
        pub fn matches(&self, labels: &Value) -> bool {
            let get = |k: &str| labels[k].as_str().map(str::to_string);
            let num = |k: &str| get(k).and_then(|v| v.parse::<i64>().ok());
            match self {
                Req::Eq(k, v) => get(k).as_deref() == Some(v),
                Req::Ne(k, v) => get(k).as_deref() != Some(v),
                Req::Exists(k) => get(k).is_some(),
                Req::Absent(k) => get(k).is_none(),
                Req::In(k, vs) => get(k).is_some_and(|x| vs.contains(&x)),
                Req::NotIn(k, vs) => get(k).map_or(true, |x| !vs.contains(&x)),
                Req::Gt(k, n) => num(k).is_some_and(|x| x > *n),
                Req::Lt(k, n) => num(k).is_some_and(|x| x < *n),
            }
        }
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Tok {
        Id(String),
        Op(&'static str),
    }

    fn lex(s: &str) -> Vec<Tok> {
        let mut out = Vec::new();
        let b: Vec<char> = s.chars().collect();
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            let two: String = b[i..(i + 2).min(b.len())].iter().collect();
            if c.is_whitespace() {
                i += 1;
            } else if two == "==" || two == "!=" {
                out.push(Tok::Op(if two == "==" { "==" } else { "!=" }));
                i += 2;
            } else if let Some(op) = [("=", "="), ("!", "!"), ("(", "("), (")", ")"), (",", ",")]
                .iter()
                .find(|(t, _)| t.starts_with(c))
            {
                out.push(Tok::Op(op.1));
                i += 1;
            } else {
                let start = i;
                while i < b.len() && !b[i].is_whitespace() && !"=!(),".contains(b[i]) {
                    i += 1;
                }
                out.push(Tok::Id(b[start..i].iter().collect()));
            }
        }
        out
    }

    fn show(t: Option<&Tok>) -> String {
        match t {
            Some(Tok::Id(s)) => s.clone(),
            Some(Tok::Op(o)) => o.to_string(),
            None => String::new(),
        }
    }

    pub fn parse(s: &str) -> Result<Vec<Req>, String> {
        let toks = lex(s);
        let mut out = Vec::new();
        let mut i = 0;
        let expected_op = |t: Option<&Tok>| {
            format!(
                "unable to parse requirement: found '{}', expected: in, notin, =, ==, !=, gt, lt",
                show(t)
            )
        };
        while i < toks.len() {
            let negated = toks[i] == Tok::Op("!");
            if negated {
                i += 1;
            }
            let Some(Tok::Id(key)) = toks.get(i).cloned() else {
                return Err(format!(
                    "unable to parse requirement: found '{}', expected: identifier",
                    show(toks.get(i))
                ));
            };
            i += 1;
            let end = matches!(toks.get(i), None | Some(Tok::Op(",")));
            if negated {
                if !end {
                    return Err(format!(
                        "unable to parse requirement: found '{}', expected: ',' or 'end of string'",
                        show(toks.get(i))
                    ));
                }
                out.push(Req::Absent(key));
            } else if end {
                out.push(Req::Exists(key));
            } else {
                let op = toks.get(i).cloned();
                i += 1;
                let value = |i: &mut usize| -> Result<String, String> {
                    match toks.get(*i) {
                        Some(Tok::Id(v)) => {
                            *i += 1;
                            Ok(v.clone())
                        }
                        // `a=` selects an empty value.
                        None | Some(Tok::Op(",")) => Ok(String::new()),
                        t => Err(format!(
                            "unable to parse requirement: found '{}', expected: identifier",
                            show(t)
                        )),
                    }
                };
                let set = |i: &mut usize| -> Result<Vec<String>, String> {
                    if toks.get(*i) != Some(&Tok::Op("(")) {
                        return Err(format!(
                            "unable to parse requirement: found '{}', expected: '('",
                            show(toks.get(*i))
                        ));
                    }
                    *i += 1;
                    let mut vs = Vec::new();
                    loop {
                        match toks.get(*i) {
                            Some(Tok::Id(v)) => vs.push(v.clone()),
                            Some(Tok::Op(")")) => {
                                *i += 1;
                                return Ok(vs);
                            }
                            Some(Tok::Op(",")) => {}
                            t => {
                                return Err(format!(
                                    "unable to parse requirement: found '{}', expected: ',', ')' or identifier",
                                    show(t)
                                ))
                            }
                        }
                        *i += 1;
                    }
                };
                let req = match op {
                    Some(Tok::Op("=")) | Some(Tok::Op("==")) => Req::Eq(key, value(&mut i)?),
                    Some(Tok::Op("!=")) => Req::Ne(key, value(&mut i)?),
                    Some(Tok::Id(w)) if w == "in" => Req::In(key, set(&mut i)?),
                    Some(Tok::Id(w)) if w == "notin" => Req::NotIn(key, set(&mut i)?),
                    Some(Tok::Id(w)) if w == "gt" || w == "lt" => {
                        let v = value(&mut i)?;
                        let n = v.parse::<i64>().map_err(|_| {
                            "unable to parse requirement: for 'Gt', 'Lt' operators, the value must be an integer".to_string()
                        })?;
                        if w == "gt" {
                            Req::Gt(key, n)
                        } else {
                            Req::Lt(key, n)
                        }
                    }
                    other => return Err(expected_op(other.as_ref())),
                };
                out.push(req);
            }
            match toks.get(i) {
                None => {}
                Some(Tok::Op(",")) => i += 1,
                t => {
                    return Err(format!(
                        "unable to parse requirement: found '{}', expected: ',' or 'end of string'",
                        show(t)
                    ))
                }
            }
        }
        Ok(out)
    }
}
