//! The control socket: a Unix stream socket, mode 0600 (root only), one request per
//! connection: the client writes `status\n`, the daemon answers with the snapshot as JSON.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Snapshot;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("not running: nothing answers on {path} ({why})")]
    NotRunning { path: PathBuf, why: String },
    /// The socket is there but this user may not use it (it is root-only).
    #[error("permission denied on {path}: the control socket is root-only (run as root, e.g. with sudo)")]
    PermissionDenied { path: PathBuf },
    #[error("control socket {path}: {why}")]
    Io { path: PathBuf, why: String },
    #[error("control socket {path}: another agent is already running and answering there")]
    InUse { path: PathBuf },
    #[error("control socket {path}: malformed answer: {why}")]
    Malformed { path: PathBuf, why: String },
}

/// Largest answer the client reads (a snapshot of hundreds of workloads fits easily).
const MAX_ANSWER: u64 = 16 << 20;

/// Asks a running agent for its snapshot; the raw JSON text is returned with the parsed form.
pub fn request_status(path: &Path) -> Result<(Snapshot, String), SocketError> {
    let text = request(path, b"status\n")?;
    let snap = serde_json::from_str(&text).map_err(|e| SocketError::Malformed {
        path: path.into(),
        why: e.to_string(),
    })?;
    Ok((snap, text))
}

/// Asks a running agent to reset a disconnected device; returns what it did.
pub fn request_reset(path: &Path) -> Result<String, SocketError> {
    let text = request(path, b"reset\n")?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| SocketError::Malformed {
        path: path.into(),
        why: e.to_string(),
    })?;
    Ok(v["reset"].as_str().unwrap_or_default().to_string())
}

/// One request, its whole answer.
fn request(path: &Path, what: &[u8]) -> Result<String, SocketError> {
    let mut s = UnixStream::connect(path).map_err(|e| match e.kind() {
        // A live agent's socket that this user may not open is not an absent agent.
        std::io::ErrorKind::PermissionDenied => SocketError::PermissionDenied { path: path.into() },
        _ => SocketError::NotRunning {
            path: path.into(),
            why: crate::config::io_why(&e),
        },
    })?;
    let io = |e: std::io::Error| SocketError::Io {
        path: path.into(),
        why: e.to_string(),
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    s.write_all(what).map_err(io)?;
    let mut text = String::new();
    s.take(MAX_ANSWER).read_to_string(&mut text).map_err(io)?;
    Ok(text)
}

/// Binds the control socket: a stale socket file is replaced, a live agent is not.
pub fn bind(path: &Path) -> Result<smol::net::unix::UnixListener, SocketError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse { path: path.into() });
        }
        let _ = std::fs::remove_file(path);
    }
    let io = |e: std::io::Error| SocketError::Io {
        path: path.into(),
        why: e.to_string(),
    };
    let listener = smol::net::unix::UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}
