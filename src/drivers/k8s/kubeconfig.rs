//! The part of a kubeconfig the agent uses: the current context's cluster (server URL, CA) and
//! user (client certificate and key, or a bearer token), as kubectl reads them. Anything that
//! needs a helper program or a login flow is refused with its name, not half supported.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use super::K8sError;

/// Largest kubeconfig accepted (a real one is a few KiB).
const MAX_KUBECONFIG_BYTES: u64 = 1 << 20;

/// How the agent reaches one cluster.
#[derive(Clone)]
pub struct ClusterAccess {
    /// `https://host:port`, no trailing slash.
    pub server: String,
    /// PEM of the CA that signed the API server's certificate (the only trust anchor).
    pub ca_pem: Vec<u8>,
    pub credentials: Credentials,
}

#[derive(Clone)]
pub enum Credentials {
    ClientCert { cert_pem: Vec<u8>, key_pem: Vec<u8> },
    BearerToken(String),
}

impl fmt::Debug for ClusterAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print keys or tokens.
        let creds = match self.credentials {
            Credentials::ClientCert { .. } => "client certificate",
            Credentials::BearerToken(_) => "bearer token",
        };
        f.debug_struct("ClusterAccess")
            .field("server", &self.server)
            .field("credentials", &creds)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "kebab-case")]
struct Kubeconfig {
    current_context: Option<String>,
    clusters: Vec<Named<Cluster>>,
    contexts: Vec<Named<Context>>,
    users: Vec<Named<User>>,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "context", alias = "user")]
    item: Option<T>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "kebab-case")]
struct Cluster {
    server: Option<String>,
    certificate_authority: Option<PathBuf>,
    certificate_authority_data: Option<String>,
    insecure_skip_tls_verify: Option<bool>,
    proxy_url: Option<String>,
    tls_server_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Context {
    cluster: Option<String>,
    user: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "kebab-case")]
struct User {
    client_certificate: Option<PathBuf>,
    client_certificate_data: Option<String>,
    client_key: Option<PathBuf>,
    client_key_data: Option<String>,
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<PathBuf>,
    username: Option<String>,
    exec: Option<serde_yaml_ng::Value>,
    auth_provider: Option<serde_yaml_ng::Value>,
    #[serde(rename = "as")]
    impersonate: Option<String>,
}

/// Reads the kubeconfig at `path` (one file; kubectl's `a:b` merging is not supported).
pub fn load(path: &Path) -> Result<ClusterAccess, K8sError> {
    let bad = |why: String| K8sError::Kubeconfig {
        path: path.display().to_string(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    if meta.len() > MAX_KUBECONFIG_BYTES {
        return Err(bad(format!("{} bytes is not a kubeconfig", meta.len())));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    parse(&text, path.parent().unwrap_or(Path::new("/"))).map_err(bad)
}

/// Parses a kubeconfig; relative file paths in it are relative to `dir` (kubectl's rule).
pub fn parse(text: &str, dir: &Path) -> Result<ClusterAccess, String> {
    let cfg: Kubeconfig = crate::yaml::from_str(text).map_err(|e| format!("not YAML: {e}"))?;
    let ctx_name = match cfg.current_context.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => c.to_string(),
        None if cfg.contexts.len() == 1 => cfg.contexts[0].name.clone(),
        None => return Err("no current-context".into()),
    };
    let ctx = find(&cfg.contexts, &ctx_name, "context")?;
    let cluster_name = ctx
        .cluster
        .as_deref()
        .ok_or_else(|| format!("context '{ctx_name}' names no cluster"))?;
    let user_name = ctx
        .user
        .as_deref()
        .ok_or_else(|| format!("context '{ctx_name}' names no user"))?;
    let cluster = find(&cfg.clusters, cluster_name, "cluster")?;
    let user = find(&cfg.users, user_name, "user")?;
    let (server, ca_pem) = cluster_endpoint(cluster, cluster_name, dir)?;
    let credentials = user_credentials(user, user_name, dir)?;
    Ok(ClusterAccess {
        server,
        ca_pem,
        credentials,
    })
}

/// The cluster's API server and the CA to trust for it.
fn cluster_endpoint(
    cluster: &Cluster,
    cluster_name: &str,
    dir: &Path,
) -> Result<(String, Vec<u8>), String> {
    let at = |what: &str| format!("cluster '{cluster_name}': {what}");

    let server = cluster
        .server
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| at("no server"))?;
    if !server.starts_with("https://") {
        return Err(at(&format!(
            "server '{server}' must be an https:// URL (the agent never talks to the API in clear)"
        )));
    }
    let server = server.trim_end_matches('/').to_string();
    if cluster.insecure_skip_tls_verify == Some(true) {
        return Err(at(
            "insecure-skip-tls-verify is not supported: give the API server's CA",
        ));
    }
    if cluster.proxy_url.is_some() {
        return Err(at("proxy-url is not supported"));
    }
    if cluster.tls_server_name.is_some() {
        return Err(at("tls-server-name is not supported"));
    }
    let ca_pem = data_or_file(
        cluster.certificate_authority_data.as_deref(),
        cluster.certificate_authority.as_deref(),
        dir,
        "certificate-authority",
    )?
    .ok_or_else(|| {
        at("no certificate-authority(-data): the agent trusts only the CA the kubeconfig names")
    })?;
    Ok((server, ca_pem))
}

/// The user's credentials: a client certificate and key, or a bearer token.
fn user_credentials(user: &User, user_name: &str, dir: &Path) -> Result<Credentials, String> {
    let at = |what: &str| format!("user '{user_name}': {what}");
    if user.exec.is_some() {
        return Err(at(
            "exec credential plugins are not supported (use a client certificate or a token)",
        ));
    }
    if user.auth_provider.is_some() {
        return Err(at(
            "auth-provider is not supported (use a client certificate or a token)",
        ));
    }
    if user.username.is_some() {
        return Err(at(
            "basic authentication (username/password) is not supported",
        ));
    }
    if user.impersonate.is_some() {
        return Err(at("impersonation (as) is not supported"));
    }
    let cert = data_or_file(
        user.client_certificate_data.as_deref(),
        user.client_certificate.as_deref(),
        dir,
        "client-certificate",
    )?;
    let key = data_or_file(
        user.client_key_data.as_deref(),
        user.client_key.as_deref(),
        dir,
        "client-key",
    )?;
    let credentials = match (cert, key) {
        (Some(cert_pem), Some(key_pem)) => Credentials::ClientCert { cert_pem, key_pem },
        (Some(_), None) => return Err(at("client-certificate without client-key")),
        (None, Some(_)) => return Err(at("client-key without client-certificate")),
        (None, None) => {
            let token = match (&user.token, &user.token_file) {
                (Some(t), _) => t.clone(),
                (None, Some(f)) => {
                    let p = dir.join(f);
                    std::fs::read_to_string(&p)
                        .map_err(|e| at(&format!("tokenFile {}: {e}", p.display())))?
                }
                (None, None) => {
                    return Err(at(
                        "no credentials (client-certificate and client-key, or token)",
                    ))
                }
            };
            let token = token.trim().to_string();
            if token.is_empty() || token.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                return Err(at("the token is empty or not a single printable word"));
            }
            Credentials::BearerToken(token)
        }
    };
    Ok(credentials)
}

fn find<'a, T>(list: &'a [Named<T>], name: &str, what: &str) -> Result<&'a T, String> {
    list.iter()
        .find(|n| n.name == name)
        .and_then(|n| n.item.as_ref())
        .ok_or_else(|| format!("no {what} named '{name}'"))
}

/// `<what>-data` (base64 of PEM) wins over `<what>` (a file), as in kubectl.
fn data_or_file(
    data: Option<&str>,
    file: Option<&Path>,
    dir: &Path,
    what: &str,
) -> Result<Option<Vec<u8>>, String> {
    if let Some(d) = data.filter(|d| !d.trim().is_empty()) {
        let compact: String = d.split_whitespace().collect();
        return base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .map(Some)
            .map_err(|e| format!("{what}-data is not base64: {e}"));
    }
    match file.filter(|f| !f.as_os_str().is_empty()) {
        None => Ok(None),
        Some(f) => {
            let p = dir.join(f);
            std::fs::read(&p)
                .map(Some)
                .map_err(|e| format!("{what} {}: {e}", p.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn config(cluster: &str, user: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: ms\ncontexts:\n- name: ms\n  context: {{cluster: c, user: u, namespace: default}}\nclusters:\n- name: c\n  cluster:\n{cluster}\nusers:\n- name: u\n  user:\n{user}\n"
        )
    }

    #[test]
    fn client_certificate_data_and_ca_data() {
        let text = config(
            &format!(
                "    server: https://127.0.0.1:6443/\n    certificate-authority-data: {}",
                b64("CA")
            ),
            &format!(
                "    client-certificate-data: {}\n    client-key-data: {}",
                b64("CERT"),
                b64("KEY")
            ),
        );
        let a = parse(&text, Path::new("/")).unwrap();
        assert_eq!(a.server, "https://127.0.0.1:6443");
        assert_eq!(a.ca_pem, b"CA");
        match &a.credentials {
            Credentials::ClientCert { cert_pem, key_pem } => {
                assert_eq!(cert_pem, b"CERT");
                assert_eq!(key_pem, b"KEY");
            }
            Credentials::BearerToken(_) => panic!("expected a client certificate"),
        }
        assert!(!format!("{a:?}").contains("KEY"));
    }

    #[test]
    fn files_are_relative_to_the_kubeconfig_and_token_works() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), "CAFILE").unwrap();
        std::fs::write(dir.path().join("token"), "abc.def\n").unwrap();
        let text = config(
            "    server: https://api.local:6443\n    certificate-authority: ca.crt",
            "    tokenFile: token",
        );
        let a = parse(&text, dir.path()).unwrap();
        assert_eq!(a.ca_pem, b"CAFILE");
        assert!(matches!(a.credentials, Credentials::BearerToken(ref t) if t == "abc.def"));
    }

    #[test]
    fn unsupported_and_missing_pieces_are_named() {
        let ca = format!(
            "    server: https://h:6443\n    certificate-authority-data: {}",
            b64("CA")
        );
        let cases = [
            (
                config(&ca, "    exec: {command: aws}"),
                "exec credential plugins",
            ),
            (
                config(&ca, "    auth-provider: {name: oidc}"),
                "auth-provider",
            ),
            (
                config(&ca, "    username: a\n    password: b"),
                "basic authentication",
            ),
            (config(&ca, "    {}"), "no credentials"),
            (
                config(&ca, &format!("    client-certificate-data: {}", b64("C"))),
                "without client-key",
            ),
            (
                config("    server: http://h:8080", "    token: t"),
                "must be an https:// URL",
            ),
            (
                config("    server: https://h:6443", "    token: t"),
                "no certificate-authority",
            ),
            (
                config(
                    "    server: https://h:6443\n    insecure-skip-tls-verify: true",
                    "    token: t",
                ),
                "insecure-skip-tls-verify",
            ),
            (
                config(&ca, "    token: t").replace("current-context: ms", "current-context: x"),
                "no context named 'x'",
            ),
            (
                config(&ca, "    token: t").replace("cluster: c,", "cluster: z,"),
                "no cluster named 'z'",
            ),
            ("- a".to_string(), "not YAML"),
        ];
        for (text, want) in cases {
            let err = parse(&text, Path::new("/")).unwrap_err();
            assert!(err.contains(want), "{want}: got {err}");
        }
    }
}
