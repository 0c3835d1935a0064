//! A small blocking client for the few Kubernetes API calls the driver makes: server-side
//! apply, JSON merge patch, get, list by label selector, delete. ureq + rustls (ring), as the
//! Flotta client; no kubectl, no async runtime.
//!
//! Conventions followed (Kubernetes API concepts): resource paths
//! `/api/v1/namespaces/{ns}/{plural}/{name}` and `/apis/apps/v1/...`; apply is `PATCH` with
//! `Content-Type: application/apply-patch+yaml` (a JSON body is valid YAML) and
//! `?fieldManager=device-worker-ng&force=true`; failures come as a `Status` object whose
//! `reason` and `message` become the error.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use ureq::tls::{ClientCert, RootCerts, TlsConfig, TlsProvider};

use super::kubeconfig::{ClusterAccess, Credentials};
use super::K8sError;

/// The field manager of every apply (server-side apply ownership).
pub const FIELD_MANAGER: &str = "device-worker-ng";

/// Largest response body read (a pod list of one workload is a few KiB).
const MAX_BODY_BYTES: u64 = 8 << 20;

/// Timeouts of each call.
#[derive(Debug, Clone, Copy)]
pub struct ApiTimeouts {
    pub connect: Duration,
    /// The whole exchange, body included.
    pub request: Duration,
}

impl Default for ApiTimeouts {
    fn default() -> Self {
        ApiTimeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(20),
        }
    }
}

/// The resources the driver manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Deployment,
    ConfigMap,
    Secret,
    Pod,
}

impl Resource {
    fn prefix(self) -> &'static str {
        match self {
            Resource::Deployment => "/apis/apps/v1",
            _ => "/api/v1",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Resource::Deployment => "deployments",
            Resource::ConfigMap => "configmaps",
            Resource::Secret => "secrets",
            Resource::Pod => "pods",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Resource::Deployment => "Deployment",
            Resource::ConfigMap => "ConfigMap",
            Resource::Secret => "Secret",
            Resource::Pod => "Pod",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Resource::Deployment => "apps/v1",
            _ => "v1",
        }
    }
}

/// One call, for error messages: `apply Deployment default/web`.
fn op(verb: &str, res: Resource, ns: Option<&str>, name: Option<&str>) -> String {
    match (ns, name) {
        (Some(ns), Some(n)) => format!("{verb} {} {ns}/{n}", res.kind()),
        (Some(ns), None) => format!("{verb} {} in {ns}", res.plural()),
        (None, _) => format!("{verb} {} in all namespaces", res.plural()),
    }
}

/// A client for one cluster and one identity.
pub struct KubeClient {
    agent: ureq::Agent,
    server: String,
    token: Option<String>,
}

impl std::fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeClient")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl KubeClient {
    pub fn new(access: &ClusterAccess, timeouts: ApiTimeouts) -> Result<Self, K8sError> {
        let bad = |why: String| K8sError::Credentials(why);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&access.ca_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(format!("certificate-authority: invalid PEM: {e}")))?;
        let mut store = rustls::RootCertStore::empty();
        let (added, _) = store.add_parsable_certificates(roots.iter().cloned());
        if added == 0 {
            return Err(bad("certificate-authority: no usable CA certificate".into()));
        }
        let ureq_roots: Vec<ureq::tls::Certificate<'static>> = roots
            .iter()
            .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        let mut tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::Specific(Arc::new(ureq_roots)))
            .unversioned_rustls_crypto_provider(provider.clone());
        let mut token = None;
        match &access.credentials {
            Credentials::ClientCert { cert_pem, key_pem } => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
                    .collect::<Result<_, _>>()
                    .map_err(|e| bad(format!("client-certificate: invalid PEM: {e}")))?;
                if chain.is_empty() {
                    return Err(bad("client-certificate: no CERTIFICATE block".into()));
                }
                let key = PrivateKeyDer::from_pem_slice(key_pem)
                    .map_err(|e| bad(format!("client-key: no usable private key: {e}")))?;
                // Built once here only to check the pair: ureq panics on a key that does not
                // fit its certificate, the agent wants a reason instead.
                rustls::ClientConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| bad(e.to_string()))?
                    .with_root_certificates(store)
                    .with_client_auth_cert(chain.clone(), key)
                    .map_err(|e| {
                        bad(format!(
                            "client-key does not match client-certificate or is unsupported: {e}"
                        ))
                    })?;
                let ureq_key = ureq::tls::PrivateKey::from_pem(key_pem)
                    .map_err(|e| bad(format!("client-key: {e}")))?
                    .to_owned();
                let ureq_chain: Vec<ureq::tls::Certificate<'static>> = chain
                    .iter()
                    .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                    .collect();
                tls = tls.client_cert(Some(ClientCert::new_with_certs(&ureq_chain, ureq_key)));
            }
            Credentials::BearerToken(t) => token = Some(t.clone()),
        }
        let config = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .https_only(true)
            // Status codes and Status bodies carry the reason: inspect them all.
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            // The local API is reached directly, never through an ambient HTTP(S)_PROXY.
            .proxy(None)
            .timeout_connect(Some(timeouts.connect))
            .timeout_global(Some(timeouts.request))
            .user_agent(format!("device-worker-ng/{}", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(KubeClient {
            agent: config.new_agent(),
            server: access.server.clone(),
            token,
        })
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    fn url(&self, res: Resource, ns: Option<&str>, name: Option<&str>) -> String {
        let mut u = format!("{}{}", self.server, res.prefix());
        if let Some(ns) = ns {
            u.push_str("/namespaces/");
            u.push_str(&encode(ns));
        }
        u.push('/');
        u.push_str(res.plural());
        if let Some(n) = name {
            u.push('/');
            u.push_str(&encode(n));
        }
        u
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        let req = req.header("Accept", "application/json");
        match &self.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    /// Server-side apply of a whole object under [`FIELD_MANAGER`], taking over fields another
    /// manager set (`force=true`: this agent owns what it applies). Creates or updates; with
    /// `dry_run` the server validates and admits it without storing anything.
    pub fn apply(
        &self,
        res: Resource,
        ns: &str,
        name: &str,
        object: &Value,
        dry_run: bool,
    ) -> Result<Value, K8sError> {
        let op = op(
            if dry_run { "dry-run apply" } else { "apply" },
            res,
            Some(ns),
            Some(name),
        );
        let url = format!(
            "{}?fieldManager={}&force=true{}",
            self.url(res, Some(ns), Some(name)),
            encode(FIELD_MANAGER),
            if dry_run { "&dryRun=All" } else { "" }
        );
        let body = serde_json::to_vec(object).map_err(|e| K8sError::Manifest(e.to_string()))?;
        let resp = self
            .auth(self.agent.patch(&url))
            .header("Content-Type", "application/apply-patch+yaml")
            .send(&body[..]);
        let (status, body) = self.read(&op, resp)?;
        match status {
            200 | 201 => json(&op, &body),
            // An object is created into its namespace: a 404 is the namespace's.
            404 if status_kind(&body) == "namespaces" => Err(K8sError::NamespaceMissing {
                namespace: ns.to_string(),
            }),
            _ => Err(classify(op, status, &body)),
        }
    }

    /// A JSON merge patch (RFC 7386), e.g. `{"spec":{"replicas":0}}`.
    pub fn merge_patch(
        &self,
        res: Resource,
        ns: &str,
        name: &str,
        patch: &Value,
    ) -> Result<Option<Value>, K8sError> {
        let op = op("patch", res, Some(ns), Some(name));
        let url = format!(
            "{}?fieldManager={}",
            self.url(res, Some(ns), Some(name)),
            encode(FIELD_MANAGER)
        );
        let body = serde_json::to_vec(patch).map_err(|e| K8sError::Manifest(e.to_string()))?;
        let resp = self
            .auth(self.agent.patch(&url))
            .header("Content-Type", "application/merge-patch+json")
            .send(&body[..]);
        let (status, body) = self.read(&op, resp)?;
        match status {
            200 => json(&op, &body).map(Some),
            404 => Ok(None),
            _ => Err(classify(op, status, &body)),
        }
    }

    /// The object, or `None` when it does not exist.
    pub fn get(&self, res: Resource, ns: &str, name: &str) -> Result<Option<Value>, K8sError> {
        let op = op("get", res, Some(ns), Some(name));
        let resp = self
            .auth(self.agent.get(self.url(res, Some(ns), Some(name))))
            .call();
        let (status, body) = self.read(&op, resp)?;
        match status {
            200 => json(&op, &body).map(Some),
            404 => Ok(None),
            _ => Err(classify(op, status, &body)),
        }
    }

    /// The items matching a label selector, in one namespace or (`None`) in all of them.
    pub fn list(
        &self,
        res: Resource,
        ns: Option<&str>,
        selector: &str,
    ) -> Result<Vec<Value>, K8sError> {
        let op = op("list", res, ns, None);
        let url = format!(
            "{}?labelSelector={}",
            self.url(res, ns, None),
            encode(selector)
        );
        let resp = self.auth(self.agent.get(&url)).call();
        let (status, body) = self.read(&op, resp)?;
        if status != 200 {
            return Err(classify(op, status, &body));
        }
        let list = json(&op, &body)?;
        match list.get("items") {
            Some(Value::Array(items)) => Ok(items.clone()),
            Some(Value::Null) | None => Ok(Vec::new()),
            Some(_) => Err(K8sError::Malformed {
                op,
                why: "`items` is not a list".into(),
            }),
        }
    }

    /// Deletes an object; `false` when it was already gone. Dependents (a Deployment's
    /// ReplicaSets and pods) are collected in the background.
    pub fn delete(
        &self,
        res: Resource,
        ns: &str,
        name: &str,
        grace: Option<Duration>,
    ) -> Result<bool, K8sError> {
        let op = op("delete", res, Some(ns), Some(name));
        let mut url = format!(
            "{}?propagationPolicy=Background",
            self.url(res, Some(ns), Some(name))
        );
        if let Some(g) = grace {
            url.push_str(&format!("&gracePeriodSeconds={}", g.as_secs()));
        }
        let resp = self.auth(self.agent.delete(&url)).call();
        let (status, body) = self.read(&op, resp)?;
        match status {
            200 | 202 => Ok(true),
            404 => Ok(false),
            _ => Err(classify(op, status, &body)),
        }
    }

    fn read(
        &self,
        op: &str,
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, Vec<u8>), K8sError> {
        let mut resp = resp.map_err(|e| self.transport(op, e))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY_BYTES)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(limit) => K8sError::Malformed {
                    op: op.to_string(),
                    why: format!("response body over {limit} bytes"),
                },
                other => self.transport(op, other),
            })?;
        Ok((status, body))
    }

    fn transport(&self, op: &str, e: ureq::Error) -> K8sError {
        let why = match e {
            ureq::Error::Timeout(t) => format!("timed out ({t})"),
            ureq::Error::Io(io) => io.to_string(),
            ureq::Error::ConnectionFailed => "connection failed".into(),
            ureq::Error::HostNotFound => "host not found".into(),
            ureq::Error::Rustls(t) => format!("TLS: {t}"),
            ureq::Error::Tls(t) => format!("TLS: {t}"),
            other => other.to_string(),
        };
        K8sError::Unreachable {
            server: self.server.clone(),
            op: op.to_string(),
            why,
        }
    }
}

fn json(op: &str, body: &[u8]) -> Result<Value, K8sError> {
    serde_json::from_slice(body).map_err(|e| K8sError::Malformed {
        op: op.to_string(),
        why: format!("not JSON: {e}"),
    })
}

/// The `Status` object of a failed call: (reason, message), message with the causes of an
/// invalid object (`field: message`) when the message does not already carry them.
pub fn status_detail(body: &[u8]) -> (String, String) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        let text = String::from_utf8_lossy(body);
        let short: String = text
            .chars()
            .take(200)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        return (String::new(), short.trim().to_string());
    };
    let reason = v["reason"].as_str().unwrap_or_default().to_string();
    let mut message = v["message"].as_str().unwrap_or_default().to_string();
    if let Some(causes) = v["details"]["causes"].as_array() {
        for c in causes {
            let field = c["field"].as_str().unwrap_or_default();
            let m = c["message"].as_str().unwrap_or_default();
            if !m.is_empty() && !message.contains(m) {
                if !message.is_empty() {
                    message.push_str("; ");
                }
                message.push_str(&format!("{field}: {m}"));
            }
        }
    }
    (reason, message)
}

/// `details.kind` of a `Status` (the resource a 404 or 403 is about).
fn status_kind(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["details"]["kind"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A failed status → its error class (401, 403, 409, 422 each their own).
fn classify(op: String, status: u16, body: &[u8]) -> K8sError {
    let (reason, message) = status_detail(body);
    match status {
        401 => K8sError::Unauthorized { op },
        403 => K8sError::Forbidden { op, message },
        409 => K8sError::Conflict { op, message },
        422 => K8sError::Invalid { op, message },
        _ => K8sError::Api {
            op,
            status,
            reason,
            message,
        },
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters (path segments and query
/// values alike).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_bodies_become_reasons() {
        let body = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Deployment.apps \"web\" is invalid","reason":"Invalid","details":{"name":"web","group":"apps","kind":"Deployment","causes":[{"reason":"FieldValueRequired","message":"Required value","field":"spec.template.spec.containers[0].image"}]},"code":422}"#;
        let e = classify("apply Deployment default/web".into(), 422, body);
        assert!(matches!(e, K8sError::Invalid { .. }));
        let s = e.to_string();
        assert!(s.contains("422"), "{s}");
        assert!(
            s.contains("spec.template.spec.containers[0].image: Required value"),
            "{s}"
        );
        let e = classify("x".into(), 500, b"<html>oops</html>");
        assert!(e.to_string().contains("oops"));
        assert!(e.is_retryable());
    }

    #[test]
    fn selectors_and_names_are_encoded() {
        assert_eq!(
            encode("device-worker-ng/workload=web,a!=b"),
            "device-worker-ng%2Fworkload%3Dweb%2Ca%21%3Db"
        );
    }
}
