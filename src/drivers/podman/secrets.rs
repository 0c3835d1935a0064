//! The configuration's `secrets` (PROTOCOL §4.4) as podman secrets: named as the Flotta
//! secret, content exactly its `data` (a JSON object of base64 values, which `kube play`
//! resolves for `secretKeyRef`/`secretRef`). Reconciled like the official agent does: create,
//! update (remove + create: podman 4.3 has no `secret update`) and remove the ones no longer
//! listed. Only secrets the agent created are ever removed: they carry a label, and the
//! fingerprints of their content are kept in `<state_dir>/pods/secrets.json`.
//!
//! The controller has [`sync`] run with the whole desired list whenever the desired state is
//! applied, and every pod start runs it again (a pod reads its secrets at creation).

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{PodDriver, Podman, PodmanError};
use crate::workload::{fingerprint, DesiredSecret};

/// Label on the podman secrets the agent manages.
pub const MANAGED_LABEL: &str = "device-worker-ng/managed=true";

/// What one [`sync`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SecretsReport {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub removed: Vec<String>,
    /// (secret, podman's message) of secrets that could not be written.
    pub failed: Vec<(String, String)>,
}

fn ledger_path(pods: &PodDriver, rootless: bool) -> PathBuf {
    let file = if rootless {
        "secrets-rootless.json"
    } else {
        "secrets.json"
    };
    pods.state_dir().join("pods").join(file)
}

fn load_ledger(pods: &PodDriver, rootless: bool) -> BTreeMap<String, String> {
    std::fs::read(ledger_path(pods, rootless))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_ledger(
    pods: &PodDriver,
    rootless: bool,
    l: &BTreeMap<String, String>,
) -> Result<(), PodmanError> {
    let p = ledger_path(pods, rootless);
    if let Some(d) = p.parent() {
        crate::store::private_dir(d).map_err(|e| PodmanError::Io {
            path: d.display().to_string(),
            why: e.to_string(),
        })?;
    }
    let bytes = serde_json::to_vec_pretty(l).unwrap_or_default();
    crate::store::write_atomic(&p, &bytes, 0o600).map_err(|e| PodmanError::Io {
        path: p.display().to_string(),
        why: e.to_string(),
    })
}

/// Makes root's podman secrets (and the rootless user's, when one is configured) match
/// `desired`. One failing secret does not stop the others.
pub fn sync(pods: &PodDriver, desired: &[DesiredSecret]) -> Result<SecretsReport, PodmanError> {
    // Pod starts (on their lanes) and the controller's sync may run at once: one at a time,
    // so the ledger is never read and written concurrently.
    let _guard = pods.secrets_lock.lock().unwrap_or_else(|e| e.into_inner());
    let mut report = sync_one(pods, &Podman::rootful(), false, desired)?;
    if pods.settings.rootless_user.is_some() {
        let r = sync_one(pods, &pods.podman_for(true)?, true, desired)?;
        report.failed.extend(r.failed);
    }
    Ok(report)
}

fn sync_one(
    pods: &PodDriver,
    podman: &Podman,
    rootless: bool,
    desired: &[DesiredSecret],
) -> Result<SecretsReport, PodmanError> {
    let mut ledger = load_ledger(pods, rootless);
    let existing: Vec<String> = podman
        .run(&["secret", "ls", "--format", "{{.Name}}"])?
        .stdout
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let mut report = SecretsReport::default();
    for s in desired {
        let fp = fingerprint(s.data.as_bytes());
        let exists = existing.contains(&s.name);
        if exists && ledger.get(&s.name) == Some(&fp) {
            continue;
        }
        if exists {
            let _ = podman.run(&["secret", "rm", &s.name]);
        }
        match podman.run_with(
            &["secret", "create", "--label", MANAGED_LABEL, &s.name, "-"],
            Some(s.data.as_bytes()),
            None,
            super::cli::CALL_TIMEOUT,
        ) {
            Ok(_) => {
                ledger.insert(s.name.clone(), fp);
                if exists {
                    report.updated.push(s.name.clone())
                } else {
                    report.created.push(s.name.clone())
                }
            }
            Err(e) => {
                ledger.remove(&s.name);
                report.failed.push((s.name.clone(), e.to_string()));
            }
        }
    }
    let wanted: Vec<&str> = desired.iter().map(|s| s.name.as_str()).collect();
    let stale: Vec<String> = ledger
        .keys()
        .filter(|n| !wanted.contains(&n.as_str()))
        .cloned()
        .collect();
    for name in stale {
        if existing.contains(&name) {
            if let Err(e) = podman.run(&["secret", "rm", &name]) {
                report.failed.push((name.clone(), e.to_string()));
                continue;
            }
        }
        ledger.remove(&name);
        report.removed.push(name);
    }
    save_ledger(pods, rootless, &ledger)?;
    Ok(report)
}
