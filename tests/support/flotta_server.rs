//! A real mTLS Flotta edge-API server for integration tests (PROTOCOL.md).
//!
//! rustls (TLS 1.3 only, client certificate required but not verified at the
//! handshake, like Go's `RequireAnyClientCert`, §1.1) plus a small HTTP/1.1
//! parser on std threads. Authentication, routing, validation and every status
//! code follow PROTOCOL.md §1.3, §1.4 and §3.3; the PKI follows §3.1 and §3.4.
//!
//! Known deviations from the real server: HTTP/1.1 only (no h2), and the CSR
//! self-signature *is* checked (rcgen's parser insists), which only matters
//! for a forged CSR.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use device_worker_ng::flotta::messages::{
    DateTime, DeviceConfigurationMessage, EnrolmentInfo, Heartbeat, Message, MessageResponse,
    MessageType, RegistrationInfo, RegistrationResponse, API_BASE_PATH,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName as TlsDn, SignatureScheme};
use serde_json::{json, Value};

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
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            auto_approve_after: None,
            cert_validity: Duration::from_secs(30 * 86_400),
            heartbeat_bumps_version: true,
            max_request_body: 4 * 1024 * 1024,
        }
    }
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
    faults: VecDeque<(Fault, usize)>,
    resource_version: u64,
    tls_failures: usize,
    /// TLS connections completed (each one a full handshake with client certificate).
    connections: usize,
}

struct Pki {
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

struct Shared {
    opts: ServerOptions,
    pki: Pki,
    state: Mutex<State>,
    stop: AtomicBool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking handler thread must not wedge the whole test.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handle of a running server; stops on drop.
pub struct FlottaTestServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    dir: tempfile::TempDir,
    ca_pem: String,
    accept: Option<JoinHandle<()>>,
    conns: Connections,
}

/// Open connections: a socket clone to shut down on stop, and the thread.
type Connections = Arc<Mutex<Vec<(TcpStream, JoinHandle<()>)>>>;

fn now_offset() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn dn(pairs: &[(DnType, &str)]) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    for (t, v) in pairs {
        d.push(t.clone(), *v);
    }
    d
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
        let _ = rustls::crypto::ring::default_provider().install_default();
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

        let shared = Arc::new(Shared {
            opts,
            pki: Pki { ca_der, issuer },
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
        });

        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
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
        let tls = Arc::new(tls);

        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let conns: Connections = Arc::default();
        let accept = {
            let shared = shared.clone();
            let conns = conns.clone();
            std::thread::Builder::new()
                .name("flotta-test-accept".into())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if shared.stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(stream) = stream else { continue };
                        let Ok(clone) = stream.try_clone() else {
                            continue;
                        };
                        let shared = shared.clone();
                        let tls = tls.clone();
                        let h = std::thread::spawn(move || serve_connection(shared, tls, stream));
                        let mut c = conns.lock().unwrap_or_else(|e| e.into_inner());
                        c.retain(|(_, h)| !h.is_finished());
                        c.push((clone, h));
                    }
                })
                .unwrap()
        };

        let server = FlottaTestServer {
            addr,
            shared,
            dir,
            ca_pem,
            accept: Some(accept),
            conns,
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
        format!("https://{}", self.addr)
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
    pub fn set_configuration(&self, id: &str, cfg: DeviceConfigurationMessage) {
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
        self.shared.state().tls_failures
    }

    /// TLS connections accepted with a completed handshake.
    pub fn connections(&self) -> usize {
        self.shared.state().connections
    }

    /// Apply `fault` to the next `times` requests (queued after earlier faults).
    pub fn inject_fault(&self, fault: Fault, times: usize) {
        if times > 0 {
            self.shared.state().faults.push_back((fault, times));
        }
    }

    pub fn clear_faults(&self) {
        self.shared.state().faults.clear();
    }

    /// Stop accepting, close every connection, join all threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.shared.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the blocking accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for (s, _) in &conns {
            let _ = s.shutdown(Shutdown::Both);
        }
        for (_, h) in conns {
            let _ = h.join();
        }
    }
}

impl Drop for FlottaTestServer {
    fn drop(&mut self) {
        self.shutdown();
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
// HTTP/1.1
// ---------------------------------------------------------------------------

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Bytes of the request line and headers.
    head_len: usize,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Response {
    status: u16,
    body: Vec<u8>,
    json: bool,
    extra: Vec<(String, String)>,
}

impl Response {
    /// Handler statuses have empty bodies and no Content-Type (§1.3).
    fn empty(status: u16) -> Self {
        Response {
            status,
            body: Vec::new(),
            json: false,
            extra: Vec::new(),
        }
    }
    fn json(status: u16, v: &impl serde::Serialize) -> Self {
        Response {
            status,
            body: serde_json::to_vec(v).unwrap_or_default(),
            json: true,
            extra: Vec::new(),
        }
    }
    /// go-openapi error body `{"code","message"}` (§1.3).
    fn api_error(status: u16, code: u16, message: &str) -> Self {
        Self::json(status, &json!({"code": code, "message": message}))
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        208 => "Already Reported",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        413 => "Request Entity Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

type TlsStream = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

fn serve_connection(shared: Arc<Shared>, tls: Arc<rustls::ServerConfig>, tcp: TcpStream) {
    if shared.stop.load(Ordering::SeqCst) {
        return;
    }
    let Ok(conn) = rustls::ServerConnection::new(tls) else {
        return;
    };
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    // Finish the handshake first so the peer certificate is known.
    while stream.conn.is_handshaking() {
        if stream.conn.complete_io(&mut stream.sock).is_err() {
            shared.state().tls_failures += 1;
            return;
        }
    }
    shared.state().connections += 1;
    let certs: Vec<CertificateDer<'static>> = stream
        .conn
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let mut reader = BufReader::new(stream);
    while let Ok(Some(req)) = read_request(&mut reader, shared.opts.max_request_body) {
        let close = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let Some(resp) = handle(&shared, &certs, &req) else {
            // DropConnection fault: no close_notify, just a dead socket.
            let _ = reader.get_mut().sock.shutdown(Shutdown::Both);
            return;
        };
        if write_response(reader.get_mut(), &resp).is_err() || close {
            break;
        }
    }
    // The accept loop keeps a clone of the socket for stop(): close it
    // explicitly, dropping our half would not end the TCP connection.
    let stream = reader.get_mut();
    stream.conn.send_close_notify();
    let _ = stream.conn.complete_io(&mut stream.sock);
    let _ = stream.sock.shutdown(Shutdown::Both);
}

fn read_request(r: &mut BufReader<TlsStream>, max_body: usize) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request line",
        ));
    };
    let (method, target) = (method.to_owned(), target.to_owned());
    let mut headers = Vec::new();
    let mut header_bytes = 0;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        header_bytes += h.len();
        if header_bytes > 64 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "headers too large",
            ));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let mut req = Request {
        method,
        target,
        headers,
        body: Vec::new(),
        head_len: line.len() + header_bytes,
    };
    if req
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if req.body.len() + n > max_body {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "body too large"));
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            req.body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(len) = req.header("content-length") {
        let n: usize = len
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))?;
        if n > max_body {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "body too large"));
        }
        req.body = vec![0; n];
        r.read_exact(&mut req.body)?;
    }
    Ok(Some(req))
}

fn response_head(resp: &Response) -> String {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\n",
        resp.status,
        reason(resp.status),
        resp.body.len()
    );
    if resp.json {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in &resp.extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    head
}

fn write_response(w: &mut TlsStream, resp: &Response) -> io::Result<()> {
    w.write_all(response_head(resp).as_bytes())?;
    w.write_all(&resp.body)?;
    w.flush()
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

fn handle(shared: &Shared, certs: &[CertificateDer<'_>], req: &Request) -> Option<Response> {
    let path = clean_path(&req.target);
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
    };

    // Faults first: they model a broken server or network in front of it.
    let fault = {
        let mut st = shared.state();
        let f = st.faults.front_mut().map(|(f, n)| {
            *n -= 1;
            (f.clone(), *n == 0)
        });
        if let Some((_, true)) = f {
            st.faults.pop_front();
        }
        f.map(|(f, _)| f)
    };
    let resp = match fault {
        Some(Fault::DropConnection) => {
            shared.state().requests.push(record);
            return None;
        }
        Some(Fault::Status(s)) => Some(Response::empty(s)),
        Some(Fault::GarbageBody) => Some(Response {
            status: 200,
            body: b"\x00\x01<html>garbage{{".to_vec(),
            json: true,
            extra: Vec::new(),
        }),
        Some(Fault::HugeBody(n)) => Some(Response {
            status: 200,
            body: vec![b' '; n],
            json: true,
            extra: Vec::new(),
        }),
        Some(Fault::Delay(d)) => {
            let until = Instant::now() + d;
            while Instant::now() < until && !shared.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            None
        }
        None => None,
    };
    let resp = resp.unwrap_or_else(|| dispatch(shared, certs, &peer, req, &path, &mut record));
    record.status = Some(resp.status);
    record.response_bytes = response_head(&resp).len() + resp.body.len();
    shared.state().requests.push(record);
    Some(resp)
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
        return Response::api_error(404, 404, &format!("path {path} was not found"));
    };
    let allowed = match route {
        Route::DataIn | Route::ControlIn => "GET",
        Route::DataOut | Route::ControlOut => "POST",
    };
    if req.method != allowed {
        let mut r = Response::api_error(
            405,
            405,
            &format!("method {} is not allowed, but [{allowed}] are", req.method),
        );
        r.extra.push(("Allow".into(), allowed.into()));
        return r;
    }
    // (3) mTLS middleware: 401 with no body.
    let authed = match route {
        Route::DataOut => register_auth(&shared.pki, certs),
        _ => full_auth(&shared.pki, certs),
    };
    if !authed {
        return Response::empty(401);
    }
    if let Some(accept) = req.header("accept") {
        if !accept.contains("application/json") && !accept.contains("*/*") {
            return Response::api_error(406, 406, "unsupported media type requested");
        }
    }
    let cn_matches = peer
        .cn
        .as_deref()
        .is_some_and(|cn| cn.to_lowercase() == id.to_lowercase());

    match route {
        Route::DataIn => {
            if !cn_matches {
                return Response::empty(403);
            }
            get_data_in(shared, &id)
        }
        Route::ControlIn => {
            if !cn_matches {
                return Response::empty(403);
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
                Response {
                    status: 200,
                    body: Vec::new(),
                    json: true,
                    extra: Vec::new(),
                }
            }
        }
        Route::ControlOut => match bind_message(req) {
            Err(r) => r,
            Ok(_) if !cn_matches => Response::empty(403),
            Ok(_) => Response::empty(200),
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
        return Err(Response::api_error(
            415,
            415,
            &format!("unsupported media type {ct:?}, only [application/json] are allowed"),
        ));
    }
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Err(Response::api_error(422, 602, "message in body is required"));
    }
    let v: Value = serde_json::from_slice(&req.body).map_err(|e| {
        Response::api_error(
            400,
            400,
            &format!("parsing message body from \"\" failed: {e}"),
        )
    })?;
    if !v.is_object() {
        return Err(Response::api_error(
            400,
            400,
            "parsing message body failed: not an object",
        ));
    }
    for k in ["message_id", "response_to", "directive", "type", "sent"] {
        if v.get(k).is_some_and(|x| !x.is_string() && !x.is_null()) {
            return Err(Response::api_error(
                400,
                400,
                &format!("parsing message body failed: {k}"),
            ));
        }
    }
    if v.get("version")
        .is_some_and(|x| !x.is_i64() && !x.is_null())
    {
        return Err(Response::api_error(
            400,
            400,
            "parsing message body failed: version",
        ));
    }
    if let Some(s) = v.get("sent").and_then(Value::as_str) {
        if DateTime::parse(s).is_none() {
            return Err(Response::api_error(
                400,
                400,
                "parsing message body failed: sent",
            ));
        }
    }
    if let Some(t) = v.get("type").and_then(Value::as_str) {
        if !["connection-status", "command", "event", "data"].contains(&t) {
            return Err(Response::api_error(
                422,
                606,
                "type in body should be one of [connection-status command event data]",
            ));
        }
    }
    serde_json::from_value(v).map_err(|e| Response::api_error(400, 400, &e.to_string()))
}

fn get_data_in(shared: &Shared, id: &str) -> Response {
    let st = shared.state();
    if !st.devices.get(id).is_some_and(|d| d.approved) {
        return Response::empty(404);
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
                return Response::empty(400);
            };
            let mut st = shared.state();
            let d = st.devices.entry(id.to_owned()).or_default();
            if d.approved {
                return Response::empty(208);
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
            Response::empty(200)
        }
        "registration" => register(shared, peer, cn_matches, id, &msg),
        "heartbeat" => {
            if !cn_matches {
                return Response::empty(403);
            }
            let Ok(hb) = serde_json::from_value::<Heartbeat>(msg.content) else {
                return Response::empty(400);
            };
            let mut st = shared.state();
            if !st.devices.get(id).is_some_and(|d| d.approved) {
                return Response::empty(404);
            }
            st.heartbeats.push((id.to_owned(), hb));
            if shared.opts.heartbeat_bumps_version {
                st.resource_version += 1;
            }
            Response::empty(200)
        }
        "ansible" => {
            if !cn_matches {
                return Response::empty(403);
            }
            if !shared.state().devices.get(id).is_some_and(|d| d.approved) {
                return Response::empty(404);
            }
            // No playbook executions: 500, the normal case (§2.7, §8 item 4).
            Response::empty(500)
        }
        _ => Response::empty(400),
    }
}

fn register(shared: &Shared, peer: &Peer, cn_matches: bool, id: &str, msg: &Message) -> Response {
    let Ok(info) = serde_json::from_value::<RegistrationInfo>(msg.content.clone()) else {
        return Response::empty(400);
    };
    let ns = {
        let mut st = shared.state();
        // ns from the cert OU, else "default"; a bootstrap cert then looks
        // up the EDSR's target namespace (§2.4.2 steps 1-2).
        let mut ns = peer.ou.clone().unwrap_or_else(|| "default".into());
        let Some(d) = st.devices.get_mut(id) else {
            return Response::empty(404);
        };
        if ns == "default" && !cn_matches && !d.namespace.is_empty() {
            ns = d.namespace.clone();
        }
        if !d.approved {
            return Response::empty(404);
        }
        if d.registered && !cn_matches {
            // Plain "forbidden" error → 500, not 403 (§8 item 8).
            return Response::empty(500);
        }
        ns
    };
    let Ok(csr) = CertificateSigningRequestParams::from_pem(&info.certificate_request) else {
        return Response::empty(400);
    };
    // CN overwritten with the path id as given, O and OU set (§3.4).
    let mut params = client_params(id, Some(&ns));
    params.not_before = now_offset() - time::Duration::days(1);
    params.not_after = now_offset()
        + time::Duration::try_from(shared.opts.cert_validity).unwrap_or(time::Duration::days(30));
    let Ok(cert) = params.signed_by(&csr.public_key, &shared.pki.issuer) else {
        return Response::empty(500);
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
