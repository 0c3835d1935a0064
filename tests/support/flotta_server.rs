//! A real mTLS Flotta edge-API server for integration tests (PROTOCOL.md).
//!
//! On the [`https`](crate::https) skeleton: TLS 1.3 only, client certificate
//! required but not verified at the handshake, like Go's `RequireAnyClientCert`
//! (§1.1). Authentication, routing, validation and every status code follow
//! PROTOCOL.md §1.3, §1.4 and §3.3; the PKI follows §3.1 and §3.4.
//!
//! Known deviations from the real server: HTTP/1.1 only (no h2), and the CSR
//! self-signature *is* checked (rcgen's parser insists), which only matters
//! for a forged CSR.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use device_worker_ng::flotta::messages::{
    DateTime, DeviceConfigurationMessage, EnrolmentInfo, Heartbeat, Message, MessageResponse,
    MessageType, RegistrationInfo, RegistrationResponse, API_BASE_PATH,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName as TlsDn, SignatureScheme};
use serde_json::{json, Value};

use crate::https::{
    self, distinguished_name as dn, Client, HttpsServer, Limits, Request, Response,
};

/// Behaviour switches.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Approve an enrolled device automatically once it has enrolled this
    /// many times (1 = on the first call, which then already answers 208 on
    /// the second). `None`: only [`FlottaTestServer::approve`] approves.
    pub auto_approve_after: Option<usize>,
    /// Validity of certificates signed at registration (server default 30 d).
    pub cert_validity: Duration,
    /// The real `version` is the EdgeDevice resourceVersion, which every
    /// heartbeat status write changes (§8 item 6).
    pub heartbeat_bumps_version: bool,
    /// Largest request body accepted.
    pub max_request_body: usize,
    /// What a configuration goes through before it is served.
    pub delivery: Delivery,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            auto_approve_after: None,
            cert_validity: Duration::from_secs(30 * 86_400),
            heartbeat_bumps_version: true,
            max_request_body: 4 * 1024 * 1024,
            delivery: Delivery::Direct,
        }
    }
}

/// How a configuration reaches data/in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// As given (a k4e operator, which maps every device-worker-ng field).
    Direct,
    /// As the stock Flotta operator builds it from EdgeWorkloads ([`stock_operator`]).
    StockOperator,
}

/// Which requests a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Any,
    /// GET data/in.
    DataIn,
    /// GET control/in.
    ControlIn,
    /// POST data/out with this directive (e.g. `heartbeat`).
    Directive(&'static str),
}

/// A misbehaviour applied to the next requests, before authentication.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this status and an empty body.
    Status(u16),
    /// 200 with a body that is not JSON.
    GarbageBody,
    /// 200 with a body of this many bytes.
    HugeBody(usize),
    /// Wait, then handle normally.
    Delay(Duration),
    /// Close the connection without answering.
    DropConnection,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    /// Normalised path, base path included.
    pub path: String,
    pub directive: Option<String>,
    pub client_cn: Option<String>,
    /// `None` when the connection was dropped on purpose.
    pub status: Option<u16>,
    pub content_type: Option<String>,
    /// HTTP bytes of the request (line, headers, body) and of the response.
    pub request_bytes: usize,
    pub response_bytes: usize,
    /// When it arrived.
    pub at: Instant,
}

/// Files of an issued client certificate.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

#[derive(Debug, Clone, Default)]
struct Device {
    /// EDSR exists.
    enrolled: bool,
    /// EdgeDevice exists.
    approved: bool,
    /// EdgeDevice lost its `edgedeviceSignedRequest` label (§2.4.2 step 4).
    registered: bool,
    namespace: String,
    enrol_calls: usize,
}

#[derive(Default)]
struct State {
    devices: HashMap<String, Device>,
    configs: HashMap<String, DeviceConfigurationMessage>,
    disconnect: HashSet<String>,
    heartbeats: Vec<(String, Heartbeat)>,
    requests: Vec<RequestRecord>,
    faults: VecDeque<(Target, Fault, usize)>,
    /// Requests a [`Fault::Delay`] holds right now.
    delayed: usize,
    resource_version: u64,
}

struct Pki {
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

struct Shared {
    opts: ServerOptions,
    pki: Pki,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking handler thread must not wedge the whole test.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handle of a running server; stops on drop.
pub struct FlottaTestServer {
    http: HttpsServer,
    shared: Arc<Shared>,
    dir: tempfile::TempDir,
    ca_pem: String,
}

fn now_offset() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn client_params(cn: &str, ou: Option<&str>) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut pairs = vec![
        (DnType::CommonName, cn),
        (DnType::OrganizationName, "flotta-operator"),
    ];
    if let Some(ou) = ou {
        pairs.push((DnType::OrganizationalUnitName, ou));
    }
    p.distinguished_name = dn(&pairs);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Both EKUs, as the server issues them (§3.4); Go's verifier then wants serverAuth.
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    p.serial_number = Some(rcgen::SerialNumber::from_slice(
        &SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_be_bytes()[4..],
    ));
    p
}

impl FlottaTestServer {
    pub fn start(opts: ServerOptions) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");

        // CA: P-256, O=flotta-operator, no CN (§3.1).
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = CertificateParams::default();
        ca.distinguished_name = dn(&[(DnType::OrganizationName, "flotta-operator")]);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
        ca.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        // Backdated far enough for the expired-certificate tests.
        ca.not_before = now_offset() - time::Duration::days(400);
        ca.not_after = now_offset() + time::Duration::days(3650);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let ca_pem = ca_cert.pem();
        let ca_der = ca_cert.der().clone();
        let issuer = Issuer::new(ca, ca_key);

        // Server cert: CN="*", DNS project-flotta.io, IP 127.0.0.1 (§1.1).
        let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut sp = client_params("*", None);
        sp.subject_alt_names = vec![
            SanType::DnsName("project-flotta.io".try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
            SanType::IpAddress("::1".parse().unwrap()),
        ];
        sp.not_before = now_offset() - time::Duration::days(1);
        sp.not_after = now_offset() + time::Duration::days(365);
        let server_cert = sp.signed_by(&server_key, &issuer).unwrap();

        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();

        let provider = https::tls_provider();
        let verifier = Arc::new(RequireAnyClientCert {
            algs: provider.signature_verification_algorithms,
        });
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![server_cert.der().clone()],
                PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
            )
            .unwrap();

        let limits = Limits {
            max_body_bytes: opts.max_request_body,
            ..Limits::default()
        };
        let shared = Arc::new(Shared {
            opts,
            pki: Pki { ca_der, issuer },
            state: Mutex::new(State::default()),
        });
        let http = {
            let shared = shared.clone();
            HttpsServer::start(
                Arc::new(tls),
                limits,
                move |client: &Client<'_>, req: &Request| handle(&shared, client, req),
            )
        };
        let server = FlottaTestServer {
            http,
            shared,
            dir,
            ca_pem,
        };
        // Bootstrap cert: CN=register, O=flotta-operator, 1 year (§3.1).
        let reg = server.sign_client("register", None, -1, 365);
        std::fs::write(server.register_cert_path(), &reg.0).unwrap();
        std::fs::write(server.register_key_path(), &reg.1).unwrap();
        server
    }

    fn sign_client(
        &self,
        cn: &str,
        ou: Option<&str>,
        from_days: i64,
        to_days: i64,
    ) -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = client_params(cn, ou);
        p.not_before = now_offset() + time::Duration::days(from_days);
        p.not_after = now_offset() + time::Duration::days(to_days);
        let cert = p.signed_by(&key, &self.shared.pki.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// `https://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("https://{}", self.http.addr())
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn register_cert_path(&self) -> PathBuf {
        self.dir.path().join("register.crt")
    }

    pub fn register_key_path(&self) -> PathBuf {
        self.dir.path().join("register.key")
    }

    /// The agent's settings (as environment variables) for talking to this server as `id`
    /// with the bootstrap certificate.
    pub fn agent_env(&self, id: &str) -> Vec<(String, String)> {
        [
            ("EDGE_DEVICE_SERVER", self.url()),
            ("EDGE_DEVICE_CA_ROOT", self.ca_path().display().to_string()),
            (
                "EDGE_DEVICE_CERT",
                self.register_cert_path().display().to_string(),
            ),
            (
                "EDGE_DEVICE_KEY",
                self.register_key_path().display().to_string(),
            ),
            ("EDGE_DEVICE_DEVICE_ID", id.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Scratch directory that lives as long as the server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Issue a device certificate directly and mark `id` as registered, for
    /// tests that start from a registered (or expired) device. `not_before`
    /// and `not_after` are days relative to now.
    pub fn issue_device_cert(
        &self,
        id: &str,
        not_before_days: i64,
        not_after_days: i64,
    ) -> IssuedCert {
        let (cert_pem, key_pem) =
            self.sign_client(id, Some("default"), not_before_days, not_after_days);
        let n = self.shared.state().devices.len();
        let cert_path = self.dir.path().join(format!("{id}-{n}.crt"));
        let key_path = self.dir.path().join(format!("{id}-{n}.key"));
        std::fs::write(&cert_path, &cert_pem).unwrap();
        std::fs::write(&key_path, &key_pem).unwrap();
        let mut st = self.shared.state();
        let d = st.devices.entry(id.to_owned()).or_default();
        d.enrolled = true;
        d.approved = true;
        d.registered = true;
        d.namespace = "default".into();
        IssuedCert {
            cert_pem,
            key_pem,
            cert_path,
            key_path,
        }
    }

    /// Approve the EDSR: the EdgeDevice now exists (§2.4.1).
    pub fn approve(&self, id: &str) {
        let mut st = self.shared.state();
        let d = st.devices.entry(id.to_owned()).or_default();
        d.enrolled = true;
        d.approved = true;
        if d.namespace.is_empty() {
            d.namespace = "default".into();
        }
        st.resource_version += 1;
    }

    pub fn is_enrolled(&self, id: &str) -> bool {
        self.shared
            .state()
            .devices
            .get(id)
            .is_some_and(|d| d.enrolled)
    }

    pub fn is_registered(&self, id: &str) -> bool {
        self.shared
            .state()
            .devices
            .get(id)
            .is_some_and(|d| d.registered)
    }

    /// Delete the EdgeDevice: data/in and heartbeat → 404, control/in →
    /// `disconnect` (§1.4).
    pub fn delete_device(&self, id: &str) {
        self.shared.state().devices.remove(id);
    }

    /// The desired configuration served on data/in; `device_id` and
    /// `version` are filled in by the server.
    ///
    /// With [`Delivery::StockOperator`], `cfg` is what the EdgeWorkloads say and the server
    /// serves what the stock operator makes of it; a configuration no EdgeWorkload can say
    /// (the API server would refuse it) fails the test here.
    pub fn set_configuration(&self, id: &str, cfg: DeviceConfigurationMessage) {
        let cfg = match self.shared.opts.delivery {
            Delivery::Direct => cfg,
            Delivery::StockOperator => stock_operator(cfg)
                .unwrap_or_else(|why| panic!("no stock Flotta operator delivers this: {why}")),
        };
        let mut st = self.shared.state();
        st.resource_version += 1;
        st.configs.insert(id.to_owned(), cfg);
    }

    pub fn set_disconnect(&self, id: &str, on: bool) {
        let mut st = self.shared.state();
        if on {
            st.disconnect.insert(id.to_owned());
        } else {
            st.disconnect.remove(id);
        }
    }

    /// Current `version` (EdgeDevice resourceVersion stand-in).
    pub fn version(&self) -> String {
        self.shared.state().resource_version.to_string()
    }

    pub fn heartbeats(&self) -> Vec<(String, Heartbeat)> {
        self.shared.state().heartbeats.clone()
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.state().requests.clone()
    }

    /// Handshakes that failed (e.g. a client without a certificate).
    pub fn tls_failures(&self) -> usize {
        self.http.handshake_failures()
    }

    /// TLS connections accepted with a completed handshake.
    pub fn connections(&self) -> usize {
        self.http.connections()
    }

    /// Apply `fault` to the next `times` requests (queued after earlier faults).
    pub fn inject_fault(&self, fault: Fault, times: usize) {
        self.inject_fault_on(Target::Any, fault, times);
    }

    /// Apply `fault` to the next `times` requests that `target` names (queued after earlier
    /// faults for the same requests).
    pub fn inject_fault_on(&self, target: Target, fault: Fault, times: usize) {
        if times > 0 {
            self.shared.state().faults.push_back((target, fault, times));
        }
    }

    pub fn clear_faults(&self) {
        self.shared.state().faults.clear();
    }

    /// Drops the faults queued for `target`.
    pub fn clear_faults_on(&self, target: Target) {
        self.shared.state().faults.retain(|(t, _, _)| *t != target);
    }

    /// Requests a [`Fault::Delay`] holds right now (the agent is waiting for their answer).
    pub fn delayed(&self) -> usize {
        self.shared.state().delayed
    }

    /// Stop accepting, close every connection, join all threads.
    pub fn stop(mut self) {
        self.http.shutdown();
    }
}

// ---------------------------------------------------------------------------
// TLS: require a certificate, verify nothing but the handshake signature
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct RequireAnyClientCert {
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for RequireAnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[TlsDn] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Checked per request in the HTTP layer (§1.1, §3.3).
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

/// Handler statuses have empty bodies and no Content-Type (§1.3).
fn empty(status: u16) -> Response {
    Response::new(status)
}

/// go-openapi error body `{"code","message"}` (§1.3).
fn api_error(status: u16, code: u16, message: &str) -> Response {
    Response::json(status, &json!({"code": code, "message": message}))
}

// ---------------------------------------------------------------------------
// Routing, auth, handlers
// ---------------------------------------------------------------------------

/// go-openapi applies `path.Clean` before matching (§1.2): `//`, `.`, `..`.
fn clean_path(p: &str) -> String {
    let p = p.split('?').next().unwrap_or("");
    let mut out: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    DataIn,
    DataOut,
    ControlIn,
    ControlOut,
}

fn route(path: &str) -> Option<(Route, String)> {
    let rest = path.strip_prefix(API_BASE_PATH)?;
    let segs: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    match segs.as_slice() {
        ["data", id, "in"] => Some((Route::DataIn, (*id).to_owned())),
        ["data", id, "out"] => Some((Route::DataOut, (*id).to_owned())),
        ["control", id, "in"] => Some((Route::ControlIn, (*id).to_owned())),
        ["control", id, "out"] => Some((Route::ControlOut, (*id).to_owned())),
        _ => None,
    }
}

struct Peer {
    cn: Option<String>,
    ou: Option<String>,
}

fn peer_names(certs: &[CertificateDer<'_>]) -> Peer {
    let Some(first) = certs.first() else {
        return Peer { cn: None, ou: None };
    };
    match x509_parser::parse_x509_certificate(first.as_ref()) {
        Ok((_, c)) => Peer {
            cn: c
                .subject()
                .iter_common_name()
                .next()
                .and_then(|a| a.as_str().ok())
                .map(str::to_owned),
            ou: c
                .subject()
                .iter_organizational_unit()
                .next()
                .and_then(|a| a.as_str().ok())
                .map(str::to_owned),
        },
        Err(_) => Peer { cn: None, ou: None },
    }
}

/// Register auth: some presented cert is signed by the CA; dates and CN are
/// not checked (§3.3, §8 item 1).
fn register_auth(pki: &Pki, certs: &[CertificateDer<'_>]) -> bool {
    let Ok((_, ca)) = x509_parser::parse_x509_certificate(pki.ca_der.as_ref()) else {
        return false;
    };
    certs.iter().any(|c| {
        x509_parser::parse_x509_certificate(c.as_ref())
            .map(|(_, c)| c.verify_signature(Some(ca.public_key())).is_ok())
            .unwrap_or(false)
    })
}

/// Full auth: every presented cert is not `register` and verifies like Go's
/// `x509.Verify` with default options: unexpired, chains to the CA, EKU
/// serverAuth (§3.3).
fn full_auth(pki: &Pki, certs: &[CertificateDer<'_>]) -> bool {
    let Ok(anchor) = webpki::anchor_from_trusted_cert(&pki.ca_der) else {
        return false;
    };
    !certs.is_empty()
        && certs.iter().all(|c| {
            if peer_names(std::slice::from_ref(c)).cn.as_deref() == Some("register") {
                return false;
            }
            let Ok(ee) = webpki::EndEntityCert::try_from(c) else {
                return false;
            };
            ee.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                std::slice::from_ref(&anchor),
                &[],
                UnixTime::now(),
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .is_ok()
        })
}

fn handle(shared: &Shared, client: &Client<'_>, req: &Request) -> Option<Response> {
    let certs = client.certificates;
    let path = clean_path(req.path());
    let peer = peer_names(certs);
    let mut record = RequestRecord {
        method: req.method.clone(),
        path: path.clone(),
        directive: None,
        client_cn: peer.cn.clone(),
        status: None,
        content_type: req.header("content-type").map(str::to_owned),
        request_bytes: req.head_len + req.body.len(),
        response_bytes: 0,
        at: Instant::now(),
    };

    // Faults first: they model a broken server or network in front of it.
    let fault = {
        let mut st = shared.state();
        let hit = st
            .faults
            .iter()
            .position(|(t, _, _)| targets(*t, req, &path));
        hit.map(|i| {
            let (_, f, n) = &mut st.faults[i];
            *n -= 1;
            let f = f.clone();
            if st.faults[i].2 == 0 {
                st.faults.remove(i);
            }
            f
        })
    };
    let resp = match fault {
        Some(Fault::DropConnection) => {
            shared.state().requests.push(record);
            return None;
        }
        Some(Fault::Status(s)) => Some(empty(s)),
        Some(Fault::GarbageBody) => Some(
            Response::new(200).with_body("application/json", b"\x00\x01<html>garbage{{".to_vec()),
        ),
        Some(Fault::HugeBody(n)) => {
            Some(Response::new(200).with_body("application/json", vec![b' '; n]))
        }
        Some(Fault::Delay(d)) => {
            shared.state().delayed += 1;
            let until = Instant::now() + d;
            while Instant::now() < until && !client.server_stopping() {
                std::thread::sleep(Duration::from_millis(10));
            }
            shared.state().delayed -= 1;
            None
        }
        None => None,
    };
    let resp = resp.unwrap_or_else(|| dispatch(shared, certs, &peer, req, &path, &mut record));
    record.status = Some(resp.status);
    record.response_bytes = resp.wire_len();
    shared.state().requests.push(record);
    Some(resp)
}

/// Does `target` name this request?
fn targets(target: Target, req: &Request, path: &str) -> bool {
    match (target, route(path)) {
        (Target::Any, _) => true,
        (Target::DataIn, Some((Route::DataIn, _))) => req.method == "GET",
        (Target::ControlIn, Some((Route::ControlIn, _))) => req.method == "GET",
        (Target::Directive(d), Some((Route::DataOut, _))) => {
            serde_json::from_slice::<Value>(&req.body)
                .ok()
                .and_then(|v| v.get("directive").and_then(Value::as_str).map(|x| x == d))
                .unwrap_or(false)
        }
        _ => false,
    }
}

fn dispatch(
    shared: &Shared,
    certs: &[CertificateDer<'_>],
    peer: &Peer,
    req: &Request,
    path: &str,
    record: &mut RequestRecord,
) -> Response {
    // (2) routing: 404 / 405 with go-openapi bodies (§1.3).
    let Some((route, id)) = route(path) else {
        return api_error(404, 404, &format!("path {path} was not found"));
    };
    let allowed = match route {
        Route::DataIn | Route::ControlIn => "GET",
        Route::DataOut | Route::ControlOut => "POST",
    };
    if req.method != allowed {
        return api_error(
            405,
            405,
            &format!("method {} is not allowed, but [{allowed}] are", req.method),
        )
        .with_header("Allow", allowed);
    }
    // (3) mTLS middleware: 401 with no body.
    let authed = match route {
        Route::DataOut => register_auth(&shared.pki, certs),
        _ => full_auth(&shared.pki, certs),
    };
    if !authed {
        return empty(401);
    }
    if let Some(accept) = req.header("accept") {
        if !accept.contains("application/json") && !accept.contains("*/*") {
            return api_error(406, 406, "unsupported media type requested");
        }
    }
    let cn_matches = peer
        .cn
        .as_deref()
        .is_some_and(|cn| cn.to_lowercase() == id.to_lowercase());

    match route {
        Route::DataIn => {
            if !cn_matches {
                return empty(403);
            }
            get_data_in(shared, &id)
        }
        Route::ControlIn => {
            if !cn_matches {
                return empty(403);
            }
            let st = shared.state();
            let exists = st.devices.get(&id).is_some_and(|d| d.approved);
            if st.disconnect.contains(&id) || !exists {
                // Unregistered/deleted → disconnect (§1.4, §2.6).
                Response::json(
                    200,
                    &json!({"content":{"arguments":null,"command":"disconnect"},
                            "message_id": uuid(), "sent": DateTime::now().to_string(),
                            "type":"command","version":1}),
                )
            } else {
                // Empty body, Content-Type still set (§1.4).
                Response::new(200).with_body("application/json", Vec::new())
            }
        }
        Route::ControlOut => match bind_message(req) {
            Err(r) => r,
            Ok(_) if !cn_matches => empty(403),
            Ok(_) => empty(200),
        },
        Route::DataOut => {
            let msg = match bind_message(req) {
                Err(r) => return r,
                Ok(m) => m,
            };
            record.directive = Some(msg.directive.clone());
            post_data_out(shared, peer, cn_matches, &id, msg)
        }
    }
}

/// go-openapi body binding and validation of `message` (§1.3).
fn bind_message(req: &Request) -> Result<Message, Response> {
    let ct = req
        .header("content-type")
        .unwrap_or("application/octet-stream");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(api_error(
            415,
            415,
            &format!("unsupported media type {ct:?}, only [application/json] are allowed"),
        ));
    }
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Err(api_error(422, 602, "message in body is required"));
    }
    let v: Value = serde_json::from_slice(&req.body).map_err(|e| {
        api_error(
            400,
            400,
            &format!("parsing message body from \"\" failed: {e}"),
        )
    })?;
    if !v.is_object() {
        return Err(api_error(
            400,
            400,
            "parsing message body failed: not an object",
        ));
    }
    for k in ["message_id", "response_to", "directive", "type", "sent"] {
        if v.get(k).is_some_and(|x| !x.is_string() && !x.is_null()) {
            return Err(api_error(
                400,
                400,
                &format!("parsing message body failed: {k}"),
            ));
        }
    }
    if v.get("version")
        .is_some_and(|x| !x.is_i64() && !x.is_null())
    {
        return Err(api_error(400, 400, "parsing message body failed: version"));
    }
    if let Some(s) = v.get("sent").and_then(Value::as_str) {
        if DateTime::parse(s).is_none() {
            return Err(api_error(400, 400, "parsing message body failed: sent"));
        }
    }
    if let Some(t) = v.get("type").and_then(Value::as_str) {
        if !["connection-status", "command", "event", "data"].contains(&t) {
            return Err(api_error(
                422,
                606,
                "type in body should be one of [connection-status command event data]",
            ));
        }
    }
    serde_json::from_value(v).map_err(|e| api_error(400, 400, &e.to_string()))
}

fn get_data_in(shared: &Shared, id: &str) -> Response {
    let st = shared.state();
    if !st.devices.get(id).is_some_and(|d| d.approved) {
        return empty(404);
    }
    let mut cfg = st
        .configs
        .get(id)
        .cloned()
        .unwrap_or_else(default_configuration);
    cfg.device_id = id.to_owned();
    cfg.version = st.resource_version.to_string();
    let msg = Message {
        message_type: Some(MessageType::Data),
        message_id: uuid(),
        response_to: String::new(),
        version: Some(1),
        sent: Some(DateTime::now().to_string()),
        directive: "device".into(),
        metadata: None,
        content: cfg,
    };
    Response::json(200, &msg)
}

/// What the server sends for a device nobody configured (§4.6 minimal).
pub fn default_configuration() -> DeviceConfigurationMessage {
    serde_json::from_value(
        json!({"configuration":{"heartbeat":{"hardware_profile":{},"period_seconds":60},
        "metrics":{"receiver":{"request_num_samples":30000,"timeout_seconds":10}},"mounts":[]}}),
    )
    .unwrap_or_default()
}

/// A configuration of shell workloads `(name, command)` run as root, with a heartbeat every
/// second (carrying the hardware profile if `hardware`).
pub fn shell_configuration(
    workloads: &[(&str, &str)],
    hardware: bool,
) -> DeviceConfigurationMessage {
    let w: Vec<_> = workloads
        .iter()
        .map(|(name, cmd)| {
            json!({"name": name, "namespace": "default", "kind": "shell",
                   "specification": format!("command: [\"/bin/sh\", \"-c\", {cmd:?}]\nuser: root\n")})
        })
        .collect();
    serde_json::from_value(json!({
        "configuration": {"heartbeat": {"hardware_profile": {"include": hardware, "scope": "delta"}, "period_seconds": 1},
                          "metrics": {"receiver": {"request_num_samples": 30000, "timeout_seconds": 10}}, "mounts": []},
        "workloads": w
    }))
    .expect("a valid configuration")
}

fn post_data_out(
    shared: &Shared,
    peer: &Peer,
    cn_matches: bool,
    id: &str,
    msg: Message,
) -> Response {
    match msg.directive.as_str() {
        "enrolment" => {
            let Ok(info) = serde_json::from_value::<EnrolmentInfo>(msg.content) else {
                return empty(400);
            };
            let mut st = shared.state();
            let d = st.devices.entry(id.to_owned()).or_default();
            if d.approved {
                return empty(208);
            }
            d.enrolled = true;
            d.enrol_calls += 1;
            d.namespace = info.target_namespace.unwrap_or_else(|| "default".into());
            if shared
                .opts
                .auto_approve_after
                .is_some_and(|n| d.enrol_calls >= n)
            {
                d.approved = true;
                st.resource_version += 1;
            }
            empty(200)
        }
        "registration" => register(shared, peer, cn_matches, id, &msg),
        "heartbeat" => {
            if !cn_matches {
                return empty(403);
            }
            let Ok(hb) = serde_json::from_value::<Heartbeat>(msg.content) else {
                return empty(400);
            };
            let mut st = shared.state();
            if !st.devices.get(id).is_some_and(|d| d.approved) {
                return empty(404);
            }
            st.heartbeats.push((id.to_owned(), hb));
            if shared.opts.heartbeat_bumps_version {
                st.resource_version += 1;
            }
            empty(200)
        }
        "ansible" => {
            if !cn_matches {
                return empty(403);
            }
            if !shared.state().devices.get(id).is_some_and(|d| d.approved) {
                return empty(404);
            }
            // No playbook executions: 500, the normal case (§2.7, §8 item 4).
            empty(500)
        }
        _ => empty(400),
    }
}

fn register(shared: &Shared, peer: &Peer, cn_matches: bool, id: &str, msg: &Message) -> Response {
    let Ok(info) = serde_json::from_value::<RegistrationInfo>(msg.content.clone()) else {
        return empty(400);
    };
    let ns = {
        let mut st = shared.state();
        // ns from the cert OU, else "default"; a bootstrap cert then looks
        // up the EDSR's target namespace (§2.4.2 steps 1-2).
        let mut ns = peer.ou.clone().unwrap_or_else(|| "default".into());
        let Some(d) = st.devices.get_mut(id) else {
            return empty(404);
        };
        if ns == "default" && !cn_matches && !d.namespace.is_empty() {
            ns = d.namespace.clone();
        }
        // A renewal (the device's own certificate, expired or not: §3.5) needs the
        // EdgeDevice in the certificate's namespace.
        if !d.approved || (cn_matches && d.namespace != ns) {
            return empty(404);
        }
        if d.registered && !cn_matches {
            // Plain "forbidden" error → 500, not 403 (§8 item 8).
            return empty(500);
        }
        ns
    };
    let Ok(csr) = CertificateSigningRequestParams::from_pem(&info.certificate_request) else {
        return empty(400);
    };
    // CN overwritten with the path id as given, O and OU set (§3.4).
    let mut params = client_params(id, Some(&ns));
    params.not_before = now_offset() - time::Duration::days(1);
    params.not_after = now_offset()
        + time::Duration::try_from(shared.opts.cert_validity).unwrap_or(time::Duration::days(30));
    let Ok(cert) = params.signed_by(&csr.public_key, &shared.pki.issuer) else {
        return empty(500);
    };
    if let Some(d) = shared.state().devices.get_mut(id) {
        d.registered = true;
    }
    Response::json(
        200,
        &MessageResponse {
            message_id: msg.message_id.clone(),
            directive: "registration".into(),
            content: RegistrationResponse {
                certificate: cert.pem(),
            },
            metadata: None,
        },
    )
}

fn uuid() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    device_worker_ng::flotta::client::uuid_v4(b)
}

// ---------------------------------------------------------------------------
// The stock Flotta operator
// ---------------------------------------------------------------------------

/// What the stock Flotta operator makes of a configuration (PROTOCOL §4.3, §4.7, §6, §7): the
/// device-worker-ng fields (`kind`, `cron`, `rootless`, `retry`, workload `profiles`,
/// `configuration.profiles`) are gone; only labels and annotations whose key starts with
/// `podman/` pass, with the prefix stripped; the PodSpec is written again as ghodss/yaml
/// writes `spec.pod.spec` (keys sorted, `resources: {}` in every container: the webhook
/// refuses `limits` and `requests`). `Err` when no EdgeWorkload can say it (the API server
/// refuses the object): a key with two `/`, a label value Kubernetes does not take, a
/// specification that is no PodSpec.
pub fn stock_operator(
    mut cfg: DeviceConfigurationMessage,
) -> Result<DeviceConfigurationMessage, String> {
    cfg.configuration.profiles.clear();
    for w in &mut cfg.workloads {
        let at = |what: String| format!("workload {}: {what}", w.name);
        w.kind = None;
        w.cron = None;
        w.rootless = None;
        w.retry = None;
        w.profiles.clear();
        for (k, v) in &w.labels {
            if !valid_key(k) || !valid_label_value(v) {
                return Err(at(format!("label {k:?}: {v:?} is not a Kubernetes label")));
            }
        }
        if let Some(k) = w.annotations.keys().find(|k| !valid_key(k)) {
            return Err(at(format!(
                "annotation {k:?} is not a Kubernetes annotation key"
            )));
        }
        w.labels = podman_only(&w.labels);
        w.annotations = podman_only(&w.annotations);
        w.specification = pod_spec_as_the_operator_writes_it(&w.specification).map_err(at)?;
    }
    Ok(cfg)
}

/// The operator's filter (`[op] internal/common/utils/utils.go:127-138`).
fn podman_only(
    m: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    m.iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("podman/")?.to_string(), v.clone())))
        .collect()
}

fn pod_spec_as_the_operator_writes_it(spec: &str) -> Result<String, String> {
    let mut v: Value =
        serde_yaml_ng::from_str(spec).map_err(|e| format!("specification is not YAML: {e}"))?;
    let has_containers = v
        .get("containers")
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty());
    if !has_containers {
        return Err("an EdgeWorkload's spec.pod.spec is a PodSpec with containers".into());
    }
    for key in ["containers", "initContainers"] {
        if let Some(cs) = v.get_mut(key).and_then(Value::as_array_mut) {
            for c in cs {
                if let Some(c) = c.as_object_mut() {
                    c.insert("resources".into(), json!({}));
                }
            }
        }
    }
    // serde_json's maps are sorted: the order ghodss/yaml writes.
    serde_yaml_ng::to_string(&v).map_err(|e| e.to_string())
}

/// A Kubernetes label or annotation key: an optional DNS-subdomain prefix and `/`, then a
/// name of at most 63 characters, alphanumeric at both ends, `-`, `_`, `.` inside.
fn valid_key(k: &str) -> bool {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let prefix_ok = prefix.map_or(true, |p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    });
    prefix_ok && valid_name(name) && !name.is_empty()
}

fn valid_name(n: &str) -> bool {
    let b = n.as_bytes();
    b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().map_or(true, u8::is_ascii_alphanumeric)
        && b.last().map_or(true, u8::is_ascii_alphanumeric)
}

/// A label value: empty, or a name.
fn valid_label_value(v: &str) -> bool {
    valid_name(v)
}
