//! Blocking mTLS client for the Flotta edge API (PROTOCOL.md §1–§2).
//!
//! One `FlottaClient` holds one TLS identity (bootstrap or device cert). After
//! a certificate swap, build a new one: construction only parses PEM and checks
//! the key against the certificate, no connection is made until a request.
//!
//! Calls block; run them off the controller's executor (e.g. `smol::unblock`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use ureq::tls::{ClientCert, RootCerts, TlsConfig, TlsProvider};

use super::messages::{
    from_json_slice, ControlCommand, DeviceConfigurationMessage, Directive, EnrolmentInfo,
    HardwareInfo, Heartbeat, Message, MessageError, MessageResponse, RegistrationInfo,
    RegistrationResponse, API_BASE_PATH,
};

/// Default cap on a response body. The configuration is the largest message
/// and is a full snapshot (§2.5); 1 MiB is far above any realistic device.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024;

/// Tunables of the HTTP exchange.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// TCP connect + TLS handshake.
    pub connect_timeout: Duration,
    /// Whole request, body included. The server answers in well under 1 s
    /// (§1.5); a hung server must not hang the agent.
    pub request_timeout: Duration,
    /// Larger response bodies fail with [`ClientError::TooLarge`].
    pub max_body_bytes: u64,
    pub user_agent: String,
    /// HTTPS_PROXY: an `http://` proxy the TLS session is tunnelled through (CONNECT); mTLS
    /// is end to end, the proxy sees only the host and port.
    pub proxy: Option<String>,
    /// NO_PROXY: hosts and domains reached directly.
    pub no_proxy: Vec<String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            user_agent: format!("device-worker-ng/{}", env!("CARGO_PKG_VERSION")),
            proxy: None,
            no_proxy: Vec::new(),
        }
    }
}

/// PEM material of one TLS identity plus the trust anchor.
#[derive(Clone)]
pub struct TlsMaterial {
    /// CA_ROOT: the only trusted root (never the system store).
    pub ca_root_pem: Vec<u8>,
    /// CERT: the client certificate (chain), PEM.
    pub cert_pem: Vec<u8>,
    /// KEY: `EC PRIVATE KEY` (SEC1), `PRIVATE KEY` (PKCS#8) or `RSA PRIVATE KEY`.
    pub key_pem: Vec<u8>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("TlsMaterial").finish_non_exhaustive()
    }
}

/// Paths of the PEM files (CA_ROOT, CERT, KEY).
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca_root: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsMaterial {
    pub fn from_paths(paths: &TlsPaths) -> Result<Self, ClientError> {
        let read = |what: &'static str, p: &Path| {
            std::fs::read(p).map_err(|e| ClientError::Config {
                what,
                reason: format!("cannot read {}: {e}", p.display()),
            })
        };
        Ok(TlsMaterial {
            ca_root_pem: read("CA_ROOT", &paths.ca_root)?,
            cert_pem: read("CERT", &paths.cert)?,
            key_pem: read("KEY", &paths.key)?,
        })
    }
}

/// Checks the bootstrap identity (CA_ROOT, CERT, KEY) before it is first used, so that what
/// can never work stops the agent with its reason (exit 78) instead of failing every
/// enrolment attempt with a TLS error. `Ok` carries what may still work out: validity
/// periods, since a device may boot with a wrong clock and set it later.
pub fn check_bootstrap(paths: &TlsPaths) -> Result<Vec<String>, ClientError> {
    let tls = TlsMaterial::from_paths(paths)?;
    let cert_path = paths.cert.display();
    let info = super::identity::CertificateInfo::from_pem(&tls.cert_pem).map_err(|e| {
        bad(
            "CERT",
            format!("{cert_path} is not a PEM certificate ({e}): use the bootstrap certificate of your Flotta server's CA"),
        )
    })?;
    if info.version != 3 {
        return Err(bad(
            "CERT",
            format!(
                "{cert_path} is an X.509 v{} certificate, which TLS refuses (plain `openssl x509 -req` makes v1): re-issue it as v3, e.g. with `-extfile` naming extendedKeyUsage=clientAuth",
                info.version
            ),
        ));
    }
    let provider = tls13_only_provider();
    check_key_matches(paths, &tls, &info, &provider)?;
    let verifier = client_verifier(paths, &tls, provider)?;
    let mut chain = CertificateDer::pem_slice_iter(&tls.cert_pem).flatten();
    let Some(end_entity) = chain.next() else {
        return Err(bad("CERT", format!("{cert_path}: no CERTIFICATE block")));
    };
    let intermediates: Vec<CertificateDer<'static>> = chain.collect();
    let mut warnings = Vec::new();
    if let Err(e) = verifier.verify_client_cert(
        &end_entity,
        &intermediates,
        rustls_pki_types::UnixTime::now(),
    ) {
        use rustls::CertificateError as C;
        match e {
            rustls::Error::InvalidCertificate(
                C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
            ) => warnings.push(format!(
                "the bootstrap certificate {cert_path} is not valid now ({e}): enrolment fails until the clock or the certificate is fixed"
            )),
            rustls::Error::InvalidCertificate(
                C::UnknownIssuer | C::BadSignature,
            ) => {
                return Err(bad(
                    "CERT",
                    format!(
                        "{cert_path} is not signed by CA_ROOT {}: use the bootstrap certificate of the CA that signs the server",
                        paths.ca_root.display()
                    ),
                ))
            }
            other => {
                return Err(bad(
                    "CERT",
                    format!("{cert_path} cannot be used as a TLS client certificate: {other}"),
                ))
            }
        }
    }
    Ok(warnings)
}

fn bad(what: &'static str, reason: String) -> ClientError {
    ClientError::Config { what, reason }
}

/// KEY must be a private key rustls can sign with, and the one CERT was issued for.
fn check_key_matches(
    paths: &TlsPaths,
    tls: &TlsMaterial,
    info: &super::identity::CertificateInfo,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<(), ClientError> {
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(|e| {
        bad(
            "KEY",
            format!(
                "{} holds no usable private key (SEC1, PKCS#8 or PKCS#1 PEM): {e}",
                paths.key.display()
            ),
        )
    })?;
    let signing = provider.key_provider.load_private_key(key).map_err(|e| {
        bad(
            "KEY",
            format!("{}: unsupported key: {e}", paths.key.display()),
        )
    })?;
    match signing.public_key() {
        Some(spki) if spki.as_ref() != info.public_key_der.as_slice() => Err(bad(
            "KEY",
            format!(
                "{} is not the key of {}: use the key the certificate was issued for",
                paths.key.display(),
                paths.cert.display()
            ),
        )),
        _ => Ok(()),
    }
}

/// A verifier that judges CERT as the server will: against CA_ROOT.
fn client_verifier(
    paths: &TlsPaths,
    tls: &TlsMaterial,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, ClientError> {
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&tls.ca_root_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            bad(
                "CA_ROOT",
                format!("{} is not PEM: {e}", paths.ca_root.display()),
            )
        })?;
    let mut store = rustls::RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(roots);
    if added == 0 {
        return Err(bad(
            "CA_ROOT",
            format!("{} holds no usable CA certificate", paths.ca_root.display()),
        ));
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
        .build()
        .map_err(|e| bad("CA_ROOT", e.to_string()))
}

/// Outcome of `enrolment` (§2.4.1): 200 while the EDSR waits for approval,
/// 208 once the EdgeDevice exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrolmentStatus {
    Pending,
    Approved,
}

/// Which call failed, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub method: &'static str,
    /// Path relative to the base path, e.g. `data/dev1/out`.
    pub path: String,
    /// Directive for data/out posts.
    pub directive: Option<&'static str>,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)?;
        if let Some(d) = self.directive {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

/// Every way a call can fail, classified for the controller's retry policy.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad SERVER, CA_ROOT, CERT, KEY or device id: nothing was sent.
    #[error("invalid client configuration ({what}): {reason}")]
    Config { what: &'static str, reason: String },
    /// Expired/invalid cert on a full-auth endpoint, or the register cert (§3.3).
    #[error("{endpoint}: 401 Unauthorized")]
    Unauthorized { endpoint: Endpoint },
    /// Path ID differs from the certificate CN (§3.3).
    #[error("{endpoint}: 403 Forbidden (device id does not match the certificate CN)")]
    Forbidden { endpoint: Endpoint },
    /// Not enrolled, not approved, or deleted (§1.4).
    #[error("{endpoint}: 404 Not Found")]
    NotFound { endpoint: Endpoint },
    #[error("{endpoint}: server error {status}")]
    Server { endpoint: Endpoint, status: u16 },
    #[error("{endpoint}: network error: {reason}")]
    Network { endpoint: Endpoint, reason: String },
    /// TLS handshake refused or server certificate not trusted.
    #[error("{endpoint}: TLS error: {reason}")]
    Tls { endpoint: Endpoint, reason: String },
    #[error("{endpoint}: timed out ({reason})")]
    Timeout { endpoint: Endpoint, reason: String },
    /// 2xx body that does not decode; `path` is the JSON path of the fault.
    #[error("{endpoint}: malformed {what} at `{path}`: {reason}")]
    Malformed {
        endpoint: Endpoint,
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{endpoint}: response body exceeds {limit} bytes")]
    TooLarge { endpoint: Endpoint, limit: u64 },
    /// Any other status (e.g. 400 with go-openapi's `{"code","message"}`).
    #[error("{endpoint}: unexpected status {status}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Unexpected {
        endpoint: Endpoint,
        status: u16,
        detail: String,
    },
}

impl ClientError {
    /// Transient failures worth retrying with backoff: the server or the path
    /// to it is unwell. Auth, identity and content errors need a different
    /// action (renew, re-enrol, report) and do not go away by retrying.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Server { .. }
            | ClientError::Network { .. }
            | ClientError::Timeout { .. } => true,
            ClientError::Unexpected { status, .. } => matches!(status, 408 | 429),
            ClientError::Config { .. }
            | ClientError::Unauthorized { .. }
            | ClientError::Forbidden { .. }
            | ClientError::NotFound { .. }
            | ClientError::Tls { .. }
            | ClientError::Malformed { .. }
            | ClientError::TooLarge { .. } => false,
        }
    }

    /// HTTP status when one was received.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Unauthorized { .. } => Some(401),
            ClientError::Forbidden { .. } => Some(403),
            ClientError::NotFound { .. } => Some(404),
            ClientError::Server { status, .. } | ClientError::Unexpected { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }
}

/// The Flotta edge API client for one identity.
pub struct FlottaClient {
    agent: ureq::Agent,
    /// `https://host:port/api/flotta-management/v1`, no trailing slash.
    base_url: String,
    max_body_bytes: u64,
    rng: ring::rand::SystemRandom,
}

impl fmt::Debug for FlottaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlottaClient")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

/// The certificates of a PEM file (`what` names its setting in errors); at least one.
fn certificates(
    pem: &[u8],
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(what, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad(what, "no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// ureq's TLS settings for mutual TLS 1.3 with CA_ROOT, CERT and KEY, each checked with a typed
/// error first.
fn tls_config(tls: &TlsMaterial, provider: Arc<CryptoProvider>) -> Result<TlsConfig, ClientError> {
    let roots = certificates(&tls.ca_root_pem, "CA_ROOT")?;
    let chain = certificates(&tls.cert_pem, "CERT")?;
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(|e| ClientError::Config {
        what: "KEY",
        reason: format!("no usable private key (SEC1, PKCS#8 or PKCS#1 PEM): {e}"),
    })?;

    // Build the rustls config once ourselves: ureq would panic on a key
    // that does not fit the certificate, we want a typed error instead.
    let mut store = rustls::RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(roots.iter().cloned());
    if added == 0 {
        return Err(ClientError::Config {
            what: "CA_ROOT",
            reason: "no parsable CA certificate".into(),
        });
    }
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config {
            what: "TLS",
            reason: e.to_string(),
        })?
        .with_root_certificates(store)
        .with_client_auth_cert(chain.clone(), key.clone_key())
        .map_err(|e| ClientError::Config {
            what: "CERT/KEY",
            reason: format!("key does not match certificate or is unsupported: {e}"),
        })?;

    let ureq_key = ureq::tls::PrivateKey::from_pem(&tls.key_pem)
        .map_err(|e| ClientError::Config {
            what: "KEY",
            reason: e.to_string(),
        })?
        .to_owned();
    let ureq_chain: Vec<ureq::tls::Certificate<'static>> = chain
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    let ureq_roots: Vec<ureq::tls::Certificate<'static>> = roots
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();

    Ok(TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::Specific(Arc::new(ureq_roots)))
        .client_cert(Some(ClientCert::new_with_certs(&ureq_chain, ureq_key)))
        .unversioned_rustls_crypto_provider(provider)
        .build())
}

/// ring's suites minus TLS 1.2: the server requires TLS 1.3 (§1.1), and a
/// provider without 1.2 suites makes rustls offer 1.3 only.
fn tls13_only_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|s| s.version().version == rustls::ProtocolVersion::TLSv1_3);
    Arc::new(provider)
}

impl FlottaClient {
    /// `server` is SERVER, e.g. `https://project-flotta.io:8043`, with or
    /// without a trailing slash (or even the base path).
    pub fn new(server: &str, tls: &TlsMaterial, opts: &ClientOptions) -> Result<Self, ClientError> {
        let base_url = base_url(server)?;
        let tls_config = tls_config(tls, tls13_only_provider())?;
        let config = ureq::Agent::config_builder()
            .tls_config(tls_config)
            .https_only(true)
            // Status codes carry protocol meaning (§1.4): inspect them all.
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            // Only the configured proxy: an ambient HTTP(S)_PROXY from the environment
            // must not silently reroute the mTLS session.
            .proxy(proxy_for(&base_url, opts)?)
            .timeout_connect(Some(opts.connect_timeout))
            .timeout_global(Some(opts.request_timeout))
            .user_agent(opts.user_agent.as_str())
            .build();

        Ok(FlottaClient {
            agent: config.new_agent(),
            base_url,
            max_body_bytes: opts.max_body_bytes,
            rng: ring::rand::SystemRandom::new(),
        })
    }

    /// Read CA_ROOT/CERT/KEY from disk and build a client.
    pub fn from_paths(
        server: &str,
        paths: &TlsPaths,
        opts: &ClientOptions,
    ) -> Result<Self, ClientError> {
        Self::new(server, &TlsMaterial::from_paths(paths)?, opts)
    }

    /// Base URL including the API base path.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// POST `enrolment` (§2.4.1). Sent with the bootstrap (`register`) cert.
    pub fn enrol(
        &self,
        device_id: &str,
        info: &EnrolmentInfo,
    ) -> Result<EnrolmentStatus, ClientError> {
        let ep = endpoint_data_out(device_id, Directive::Enrolment)?;
        let (status, body) = self.post(&ep, Directive::Enrolment, info)?;
        match status {
            200 => Ok(EnrolmentStatus::Pending),
            208 => Ok(EnrolmentStatus::Approved),
            _ => Err(classify(ep, status, &body)),
        }
    }

    /// POST `registration` (§2.4.2, renewal §3.5) with a PEM CSR; returns the
    /// signed certificate PEM. Works with the bootstrap cert, and with the
    /// current device cert even after it expired (§8 item 1).
    pub fn register(
        &self,
        device_id: &str,
        csr_pem: &str,
        hardware: Option<HardwareInfo>,
    ) -> Result<String, ClientError> {
        let ep = endpoint_data_out(device_id, Directive::Registration)?;
        let info = RegistrationInfo {
            certificate_request: csr_pem.to_owned(),
            hardware,
        };
        let (status, body) = self.post(&ep, Directive::Registration, &info)?;
        if status != 200 {
            return Err(classify(ep, status, &body));
        }
        let resp: MessageResponse<RegistrationResponse> =
            from_json_slice("registration response", &body).map_err(|e| malformed(&ep, e))?;
        let cert = resp.content.certificate;
        if !cert.contains("-----BEGIN CERTIFICATE-----") {
            return Err(ClientError::Malformed {
                endpoint: ep,
                what: "registration response",
                path: "content.certificate".into(),
                reason: "no PEM CERTIFICATE block".into(),
            });
        }
        Ok(cert)
    }

    /// GET `data/{id}/in` (§2.5): the full desired configuration. `None` for
    /// an empty 200 body, which the official agent ignores (§1.4).
    pub fn get_configuration(
        &self,
        device_id: &str,
    ) -> Result<Option<Message<DeviceConfigurationMessage>>, ClientError> {
        let ep = endpoint(device_id, "GET", "data", "in", None)?;
        let (status, body) = self.get(&ep)?;
        if status != 200 {
            return Err(classify(ep, status, &body));
        }
        if is_blank(&body) {
            return Ok(None);
        }
        from_json_slice("device configuration message", &body)
            .map(Some)
            .map_err(|e| malformed(&ep, e))
    }

    /// GET `control/{id}/in` (§2.6): `None` is the usual empty 200 body.
    pub fn get_control(&self, device_id: &str) -> Result<Option<ControlCommand>, ClientError> {
        let ep = endpoint(device_id, "GET", "control", "in", None)?;
        let (status, body) = self.get(&ep)?;
        if status != 200 {
            return Err(classify(ep, status, &body));
        }
        if is_blank(&body) {
            return Ok(None);
        }
        let msg: Message<ControlCommand> =
            from_json_slice("control message", &body).map_err(|e| malformed(&ep, e))?;
        Ok(Some(msg.content))
    }

    /// POST `heartbeat` (§5). 200 with an empty body on success.
    pub fn post_heartbeat(
        &self,
        device_id: &str,
        heartbeat: &Heartbeat,
    ) -> Result<(), ClientError> {
        let ep = endpoint_data_out(device_id, Directive::Heartbeat)?;
        let (status, body) = self.post(&ep, Directive::Heartbeat, heartbeat)?;
        match status {
            200 => Ok(()),
            _ => Err(classify(ep, status, &body)),
        }
    }

    fn url(&self, ep: &Endpoint) -> String {
        format!("{}/{}", self.base_url, ep.path)
    }

    fn get(&self, ep: &Endpoint) -> Result<(u16, Vec<u8>), ClientError> {
        let t0 = std::time::Instant::now();
        let answer = self
            .agent
            .get(&self.url(ep))
            .call()
            .map_err(|e| transport_error(ep, e))
            .and_then(|resp| self.read(ep, resp));
        log_request(ep, &answer, t0);
        answer
    }

    fn post<C: Serialize>(
        &self,
        ep: &Endpoint,
        directive: Directive,
        content: &C,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let msg = Message::data(directive, self.message_id(), content);
        let body = serde_json::to_vec(&msg).map_err(|e| ClientError::Config {
            what: "request body",
            reason: e.to_string(),
        })?;
        let t0 = std::time::Instant::now();
        let answer = self
            .agent
            .post(&self.url(ep))
            // Mandatory, else 415 (§1.3).
            .header("Content-Type", "application/json")
            .send(&body[..])
            .map_err(|e| transport_error(ep, e))
            .and_then(|resp| self.read(ep, resp));
        log_request(ep, &answer, t0);
        answer
    }

    fn read(
        &self,
        ep: &Endpoint,
        mut resp: ureq::http::Response<ureq::Body>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(self.max_body_bytes)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(limit) => ClientError::TooLarge {
                    endpoint: ep.clone(),
                    limit,
                },
                other => transport_error(ep, other),
            })?;
        Ok((status, body))
    }

    /// A fresh UUIDv4 (§2.1), from ring's system RNG (already linked for TLS).
    fn message_id(&self) -> String {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 16];
        if self.rng.fill(&mut b).is_err() {
            // getrandom failing is not recoverable in any useful way; fall
            // back to time-derived bytes so the request still goes out.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            b = nanos.to_le_bytes();
        }
        uuid_v4(b)
    }
}

/// One line per request at debug level: method, path (directive), status, time taken.
fn log_request(
    ep: &Endpoint,
    answer: &Result<(u16, Vec<u8>), ClientError>,
    t0: std::time::Instant,
) {
    match answer {
        Ok((status, body)) => tracing::debug!(
            request = %ep,
            status,
            bytes = body.len(),
            took_ms = t0.elapsed().as_millis() as u64,
            "server request"
        ),
        Err(e) => tracing::debug!(
            request = %ep,
            took_ms = t0.elapsed().as_millis() as u64,
            "server request failed: {e}"
        ),
    }
}

/// Format 16 random bytes as an RFC 4122 version-4 UUID.
pub fn uuid_v4(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The proxy to reach `url` through: HTTPS_PROXY unless NO_PROXY names the host.
fn proxy_for(url: &str, opts: &ClientOptions) -> Result<Option<ureq::Proxy>, ClientError> {
    let Some(proxy) = &opts.proxy else {
        return Ok(None);
    };
    let host = url_host(url);
    if bypasses_proxy(&host, &opts.no_proxy) {
        return Ok(None);
    }
    ureq::Proxy::new(proxy)
        .map(Some)
        .map_err(|e| ClientError::Config {
            what: "HTTPS_PROXY",
            reason: e.to_string(),
        })
}

/// The host of an `https://host[:port]/...` URL, lowercase, without IPv6 brackets.
fn url_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    let authority = authority.rsplit('@').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host.to_ascii_lowercase()
}

/// NO_PROXY as curl reads it: `*` is every host; `example.com` and `.example.com` are that
/// domain and its subdomains; anything else (an address) is matched whole.
pub fn bypasses_proxy(host: &str, no_proxy: &[String]) -> bool {
    no_proxy.iter().any(|entry| {
        let e = entry
            .trim()
            .trim_start_matches("*.")
            .trim_start_matches('.');
        let e = e.to_ascii_lowercase();
        entry.trim() == "*"
            || (!e.is_empty()
                && (host == e
                    || host
                        .strip_suffix(e.as_str())
                        .is_some_and(|prefix| prefix.ends_with('.'))))
    })
}

fn base_url(server: &str) -> Result<String, ClientError> {
    let s = server.trim();
    if !s.starts_with("https://") {
        return Err(ClientError::Config {
            what: "SERVER",
            reason: format!("`{server}` must be an https:// URL (§1.1: https only)"),
        });
    }
    let trimmed = s.trim_end_matches('/');
    // Accept SERVER given with the base path too; `[ng]` users write both.
    let root = trimmed.strip_suffix(API_BASE_PATH).unwrap_or(trimmed);
    let root = root.trim_end_matches('/');
    if root.len() <= "https://".len() {
        return Err(ClientError::Config {
            what: "SERVER",
            reason: format!("`{server}` has no host"),
        });
    }
    Ok(format!("{root}{API_BASE_PATH}"))
}

/// The id becomes a path segment: refuse anything that would need escaping.
fn check_path_id(device_id: &str) -> Result<(), ClientError> {
    let ok = !device_id.is_empty()
        && device_id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(ClientError::Config {
            what: "device id",
            reason: format!("`{device_id}` is not a valid path segment"),
        })
    }
}

fn endpoint(
    device_id: &str,
    method: &'static str,
    channel: &str,
    direction: &str,
    directive: Option<&'static str>,
) -> Result<Endpoint, ClientError> {
    check_path_id(device_id)?;
    Ok(Endpoint {
        method,
        path: format!("{channel}/{device_id}/{direction}"),
        directive,
    })
}

fn endpoint_data_out(device_id: &str, d: Directive) -> Result<Endpoint, ClientError> {
    endpoint(device_id, "POST", "data", "out", Some(d.as_str()))
}

fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

fn malformed(ep: &Endpoint, e: MessageError) -> ClientError {
    match e {
        MessageError::Malformed { what, path, reason } => ClientError::Malformed {
            endpoint: ep.clone(),
            what,
            path,
            reason,
        },
        other => ClientError::Malformed {
            endpoint: ep.clone(),
            what: "response",
            path: ".".into(),
            reason: other.to_string(),
        },
    }
}

/// Map a non-success status to its error (§1.4).
fn classify(endpoint: Endpoint, status: u16, body: &[u8]) -> ClientError {
    match status {
        401 => ClientError::Unauthorized { endpoint },
        403 => ClientError::Forbidden { endpoint },
        404 => ClientError::NotFound { endpoint },
        500..=599 => ClientError::Server { endpoint, status },
        _ => ClientError::Unexpected {
            endpoint,
            status,
            detail: error_detail(body),
        },
    }
}

/// go-openapi error bodies are `{"code":..,"message":..}` (§1.3); otherwise
/// keep a short printable excerpt.
fn error_detail(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ApiError {
        message: String,
    }
    if let Ok(e) = serde_json::from_slice::<ApiError>(body) {
        return e.message;
    }
    let text = String::from_utf8_lossy(body);
    text.chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

fn transport_error(ep: &Endpoint, e: ureq::Error) -> ClientError {
    let endpoint = ep.clone();
    match e {
        ureq::Error::Timeout(t) => ClientError::Timeout {
            endpoint,
            reason: t.to_string(),
        },
        ureq::Error::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) =>
        {
            ClientError::Timeout {
                endpoint,
                reason: io.to_string(),
            }
        }
        // ureq carries rustls handshake failures inside io::Error.
        ureq::Error::Io(io)
            if io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) =>
        {
            ClientError::Tls {
                endpoint,
                reason: io.to_string(),
            }
        }
        ureq::Error::BodyExceedsLimit(limit) => ClientError::TooLarge { endpoint, limit },
        ureq::Error::Rustls(err) => ClientError::Tls {
            endpoint,
            reason: err.to_string(),
        },
        ureq::Error::Tls(reason) => ClientError::Tls {
            endpoint,
            reason: reason.to_owned(),
        },
        other => ClientError::Network {
            endpoint,
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_accepts_trailing_slash_and_base_path() {
        let want = "https://h:8043/api/flotta-management/v1";
        for s in [
            "https://h:8043",
            "https://h:8043/",
            "https://h:8043//",
            "https://h:8043/api/flotta-management/v1",
            "https://h:8043/api/flotta-management/v1/",
        ] {
            assert_eq!(base_url(s).unwrap(), want, "{s}");
        }
        assert!(matches!(
            base_url("http://h:8043"),
            Err(ClientError::Config { what: "SERVER", .. })
        ));
        assert!(base_url("https://").is_err());
    }

    #[test]
    fn no_proxy_matching() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            url_host("https://Flotta.Example:8043/api"),
            "flotta.example"
        );
        assert_eq!(url_host("https://[::1]:8043/x"), "::1");
        let np = list(&["internal.example", ".lan", "10.0.0.1"]);
        assert!(bypasses_proxy("internal.example", &np));
        assert!(bypasses_proxy("api.internal.example", &np));
        assert!(bypasses_proxy("box.lan", &np));
        assert!(bypasses_proxy("10.0.0.1", &np));
        assert!(!bypasses_proxy("notinternal.example", &np));
        assert!(!bypasses_proxy("10.0.0.10", &np));
        assert!(!bypasses_proxy("flotta.example", &np));
        assert!(bypasses_proxy("anything", &list(&["*"])));
        assert!(!bypasses_proxy("anything", &[]));
    }

    #[test]
    fn uuid_v4_has_version_and_variant_bits() {
        let u = uuid_v4([0xff; 16]);
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
        assert_eq!(uuid_v4([0; 16]), "00000000-0000-4000-8000-000000000000");
    }

    #[test]
    fn classification_and_retry_policy() {
        let ep = Endpoint {
            method: "GET",
            path: "data/x/in".into(),
            directive: None,
        };
        let c = |s| classify(ep.clone(), s, b"");
        assert!(matches!(c(401), ClientError::Unauthorized { .. }));
        assert!(matches!(c(403), ClientError::Forbidden { .. }));
        assert!(matches!(c(404), ClientError::NotFound { .. }));
        assert!(matches!(c(503), ClientError::Server { status: 503, .. }));
        assert!(c(500).is_retryable());
        assert!(!c(401).is_retryable());
        assert!(!c(400).is_retryable());
        assert!(c(429).is_retryable());
        let e = classify(
            ep,
            422,
            br#"{"code":602,"message":"message in body is required"}"#,
        );
        assert_eq!(e.status(), Some(422));
        assert!(e.to_string().contains("message in body is required"), "{e}");
    }

    #[test]
    fn path_ids_are_checked() {
        assert!(endpoint("dev-1.a", "GET", "data", "in", None).is_ok());
        assert!(endpoint("../x", "GET", "data", "in", None).is_err());
        assert!(endpoint("", "GET", "data", "in", None).is_err());
        assert!(endpoint("a/b", "GET", "data", "in", None).is_err());
    }

    #[test]
    fn bad_pem_is_a_config_error() {
        let tls = TlsMaterial {
            ca_root_pem: b"nope".to_vec(),
            cert_pem: vec![],
            key_pem: vec![],
        };
        let e = FlottaClient::new("https://h", &tls, &ClientOptions::default()).unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::Config {
                    what: "CA_ROOT",
                    ..
                }
            ),
            "{e}"
        );
    }
}
