//! The `specification` of a `kind: shell` workload: a command on the host, in PodSpec words.
//!
//! ```yaml
//! command: ["/usr/bin/collector", "--interval", "5"]
//! env: [{name: MODE, value: edge}]
//! workingDir: /var/lib/collector
//! user: collector            # default: WORKLOAD_USER
//! restartPolicy: OnFailure   # Always (default) | OnFailure | Never
//! resources:
//!   limits: {memory: 64Mi, cpu: 250m, pids: 32}
//!   requests: {memory: 32Mi, cpu: 100m}
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::cgroup::Limits;
use crate::units;

use super::RestartPolicy;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellSpec {
    /// argv: executed directly, no shell interpolation (use `["/bin/sh", "-c", ...]` for that).
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawShell {
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<RawEnv>,
    pub working_dir: Option<PathBuf>,
    pub user: Option<String>,
    pub restart_policy: Option<RestartPolicy>,
    #[serde(default)]
    pub resources: RawResources,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEnv {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResources {
    #[serde(default)]
    pub limits: BTreeMap<String, serde_yaml_ng::Value>,
    #[serde(default)]
    pub requests: BTreeMap<String, serde_yaml_ng::Value>,
}

/// Parses a `resources.limits`/`requests` map (memory, cpu, pids). The error is (field, why).
pub(super) fn parse_resources(
    section: &str,
    map: &BTreeMap<String, serde_yaml_ng::Value>,
) -> Result<Limits, (String, String)> {
    let mut l = Limits::default();
    for (k, v) in map {
        let field = format!("resources.{section}.{k}");
        let text = match v {
            serde_yaml_ng::Value::String(s) => s.clone(),
            serde_yaml_ng::Value::Number(n) => n.to_string(),
            _ => return Err((field, "expected a quantity".into())),
        };
        match k.as_str() {
            "memory" => {
                l.memory_bytes =
                    Some(units::parse_memory(&text).map_err(|e| (field.clone(), e.to_string()))?)
            }
            "cpu" => {
                let m = units::parse_cpu(&text).map_err(|e| (field.clone(), e.to_string()))?;
                if m == 0 {
                    return Err((field, "must be more than 0".into()));
                }
                l.cpu_millicores = Some(m)
            }
            "pids" => {
                let p: u64 = text
                    .trim()
                    .parse()
                    .map_err(|_| (field.clone(), format!("'{text}' is not a whole number")))?;
                if p == 0 {
                    return Err((field, "must be at least 1".into()));
                }
                l.pids = Some(p)
            }
            _ => return Err((field, "unknown resource (memory, cpu, pids)".into())),
        }
    }
    Ok(l)
}
