//! The desired state: the `workloads` of a device-configuration message (PROTOCOL §4.1, §4.3),
//! from the server or from the local desired-state file (serverless mode, same shape).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::pod::{parse_pod, PodInput};
use super::shell::{parse_resources, RawShell};
use super::{
    fingerprint, BackoffPolicy, RestartPolicy, ShellSpec, SpecError, WorkloadKind, WorkloadSpec,
    PRIORITY_KEY,
};
use crate::config::is_rfc1123_name;

/// One workload as the wire carries it (fields the core does not use are kept verbatim in
/// `extra`, so the desired state round-trips).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DesiredWorkload {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// device-worker-ng extension (PROTOCOL §7): `pod` (default), `shell`, `k8s`/`microshift`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub specification: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Whole ConfigMap YAML documents, appended to the pod manifest (PROTOCOL §4.3).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub configmaps: Vec<String>,
    #[serde(
        default,
        rename = "imageRegistries",
        skip_serializing_if = "Option::is_none"
    )]
    pub image_registries: Option<ImageRegistries>,
    /// device-worker-ng extension (PROTOCOL §7): run the pod with rootless podman.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootless: Option<bool>,
    /// device-worker-ng extensions (PROTOCOL §7).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<crate::flotta::messages::WorkloadProfile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// `imageRegistries` (PROTOCOL §4.3): the raw `.dockerconfigjson`, not base64.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ImageRegistries {
    #[serde(default, rename = "authFile", skip_serializing_if = "Option::is_none")]
    pub auth_file: Option<String>,
}

/// One entry of the configuration's `secrets` (PROTOCOL §4.4): `data` is a JSON string that
/// maps each key to the base64 of its value; it becomes a podman secret as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DesiredSecret {
    pub name: String,
    #[serde(default)]
    pub data: String,
}

/// The `retry` extension (PROTOCOL §7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Retry {
    #[serde(default)]
    pub backoff: Option<String>,
    #[serde(default, rename = "periodSeconds")]
    pub period_seconds: Option<f64>,
    #[serde(default, rename = "initialIntervalSeconds")]
    pub initial_interval_seconds: Option<f64>,
    #[serde(default, rename = "randomizationFactor")]
    pub randomization_factor: Option<f64>,
    #[serde(default)]
    pub multiplier: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DesiredState {
    /// Absent when empty on the wire (`omitempty`, PROTOCOL §4.1).
    #[serde(default)]
    pub workloads: Vec<DesiredWorkload>,
    /// Absent when empty on the wire (`omitempty`, PROTOCOL §4.1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<DesiredSecret>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DesiredError {
    #[error("desired state {path}: {why}")]
    Unreadable { path: String, why: String },
    #[error("desired state {path}: {why}")]
    Malformed { path: String, why: String },
}

/// Largest desired-state file accepted (a runaway file must not eat the agent's memory).
pub const MAX_DESIRED_BYTES: u64 = 4 << 20;

pub fn load_desired_file(path: &Path) -> Result<DesiredState, DesiredError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| DesiredError::Unreadable {
        path: shown.clone(),
        why: crate::config::io_why(&e),
    })?;
    if meta.len() > MAX_DESIRED_BYTES {
        return Err(DesiredError::Malformed {
            path: shown,
            why: format!(
                "{} bytes is over the {} byte cap",
                meta.len(),
                MAX_DESIRED_BYTES
            ),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| DesiredError::Unreadable {
        path: shown.clone(),
        why: crate::config::io_why(&e),
    })?;
    parse_desired(&text).map_err(|why| DesiredError::Malformed { path: shown, why })
}

/// Parses YAML or JSON (JSON is YAML); an empty document is an empty desired state.
pub fn parse_desired(text: &str) -> Result<DesiredState, String> {
    if text.trim().is_empty() {
        return Ok(DesiredState::default());
    }
    crate::yaml::from_str::<Option<DesiredState>>(text)
        .map(Option::unwrap_or_default)
        .map_err(|e| e.to_string())
}

/// Agent-wide defaults a spec falls back to.
#[derive(Debug, Clone)]
pub struct SpecDefaults {
    pub workload_user: String,
    pub backoff: BackoffPolicy,
}

impl DesiredState {
    /// Validates every workload on its own: one bad workload does not spoil the others.
    /// Duplicate names keep the first and reject the rest.
    pub fn validate(&self, defaults: &SpecDefaults) -> Vec<Result<WorkloadSpec, SpecError>> {
        let mut seen = BTreeSet::new();
        self.workloads
            .iter()
            .map(|w| {
                if !seen.insert(w.name.clone()) {
                    return Err(SpecError {
                        workload: w.name.clone(),
                        field: "name".into(),
                        why: "duplicate name in the desired state".into(),
                    });
                }
                w.to_spec(defaults)
            })
            .collect()
    }
}

impl DesiredWorkload {
    pub fn to_spec(&self, defaults: &SpecDefaults) -> Result<WorkloadSpec, SpecError> {
        let mut spec = self.to_spec_of_kind(defaults)?;
        let err = |field: &str, why: String| SpecError {
            workload: self.name.clone(),
            field: field.to_string(),
            why,
        };
        if let Some(c) = self.cron.as_deref().filter(|c| !c.trim().is_empty()) {
            if spec.kind == WorkloadKind::K8s {
                return Err(err("cron", "not supported for k8s workloads".into()));
            }
            let schedule =
                crate::cron::Schedule::parse(c).map_err(|e| err("cron", e.to_string()))?;
            spec.scheduling.cron = Some(schedule);
            // A scheduled run that ends well waits for the next time, it is not restarted.
            if spec.restart == RestartPolicy::Always {
                spec.restart = RestartPolicy::OnFailure;
            }
        }
        for p in &self.profiles {
            if p.name.trim().is_empty() {
                return Err(err("profiles", "a profile without a name".into()));
            }
        }
        spec.scheduling.profiles = self.profiles.clone();
        Ok(spec)
    }

    fn to_spec_of_kind(&self, defaults: &SpecDefaults) -> Result<WorkloadSpec, SpecError> {
        let err = |field: &str, why: String| SpecError {
            workload: self.name.clone(),
            field: field.to_string(),
            why,
        };
        if !is_rfc1123_name(&self.name) || self.name.len() > 63 {
            return Err(err(
                "name",
                "must be a lowercase RFC 1123 name of at most 63 characters".into(),
            ));
        }
        let kind = match self.kind.as_deref().unwrap_or("pod") {
            "shell" => WorkloadKind::Shell,
            "pod" => WorkloadKind::Pod,
            "k8s" | "microshift" => WorkloadKind::K8s,
            other => {
                return Err(err(
                    "kind",
                    format!("unknown kind '{other}' (pod, shell, k8s)"),
                ))
            }
        };
        let priority = match self
            .labels
            .get(PRIORITY_KEY)
            .or_else(|| self.annotations.get(PRIORITY_KEY))
        {
            None => 0,
            Some(p) => p
                .trim()
                .parse::<i32>()
                .map_err(|_| err(PRIORITY_KEY, format!("'{p}' is not a whole number")))?,
        };
        let mut backoff = defaults.backoff;
        if let Some(r) = &self.retry {
            apply_retry(&mut backoff, r).map_err(|why| err("retry", why))?;
        }
        let fp_input = serde_json::to_vec(self).unwrap_or_default();
        match kind {
            WorkloadKind::Shell => {
                let raw: RawShell = crate::yaml::from_str(&self.specification)
                    .map_err(|e| err("specification", e.to_string()))?;
                if raw.command.is_empty() || raw.command[0].is_empty() {
                    return Err(err("specification.command", "must name a program".into()));
                }
                if !raw.command[0].starts_with('/') {
                    return Err(err(
                        "specification.command",
                        format!("'{}' must be an absolute path", raw.command[0]),
                    ));
                }
                let limits = parse_resources("limits", &raw.resources.limits)
                    .map_err(|(f, why)| err(&format!("specification.{f}"), why))?;
                let requests = parse_resources("requests", &raw.resources.requests)
                    .map_err(|(f, why)| err(&format!("specification.{f}"), why))?;
                if let Some(d) = &raw.working_dir {
                    if !d.is_absolute() {
                        return Err(err("specification.workingDir", "must be absolute".into()));
                    }
                }
                let mut command = raw.command;
                command.extend(raw.args);
                Ok(WorkloadSpec {
                    name: self.name.clone(),
                    kind,
                    shell: Some(ShellSpec {
                        command,
                        env: raw.env.into_iter().map(|e| (e.name, e.value)).collect(),
                        working_dir: raw.working_dir,
                        user: raw.user.or_else(|| Some(defaults.workload_user.clone())),
                    }),
                    limits,
                    requests,
                    restart: raw.restart_policy.unwrap_or_default(),
                    backoff,
                    priority,
                    scheduling: Default::default(),
                    labels: self.labels.clone(),
                    fingerprint: fingerprint(&fp_input),
                    pod: None,
                })
            }
            WorkloadKind::Pod => {
                let parsed = parse_pod(&PodInput {
                    name: &self.name,
                    specification: &self.specification,
                    labels: &self.labels,
                    annotations: &self.annotations,
                    configmaps: &self.configmaps,
                    auth_file: self
                        .image_registries
                        .as_ref()
                        .and_then(|r| r.auth_file.as_deref())
                        .filter(|a| !a.trim().is_empty()),
                    rootless: self.rootless.unwrap_or(false),
                })
                .map_err(|(f, why)| err(&f, why))?;
                // Redeploy only when what podman sees changes (PROTOCOL §4.5): the rendered
                // manifest, the auth file, rootless; plus the agent's own restart settings.
                let mut fp = parsed.data.manifest.clone().into_bytes();
                fp.extend(parsed.data.auth_file.as_deref().unwrap_or("").as_bytes());
                fp.extend(format!("\0{}\0{:?}", parsed.data.rootless, backoff).as_bytes());
                Ok(WorkloadSpec {
                    name: self.name.clone(),
                    kind,
                    shell: None,
                    limits: parsed.limits,
                    requests: parsed.requests,
                    restart: parsed.restart,
                    backoff,
                    priority,
                    scheduling: Default::default(),
                    labels: self.labels.clone(),
                    fingerprint: fingerprint(&fp),
                    pod: Some(parsed.data),
                })
            }
            // A Deployment on the local Kubernetes API (drivers/k8s): the same PodSpec checks
            // as a pod; Kubernetes enforces the limits, the requests count for the budget.
            WorkloadKind::K8s => {
                let auth_file = self
                    .image_registries
                    .as_ref()
                    .and_then(|r| r.auth_file.as_deref())
                    .filter(|a| !a.trim().is_empty());
                let parsed = parse_pod(&PodInput {
                    name: &self.name,
                    specification: &self.specification,
                    labels: &self.labels,
                    annotations: &self.annotations,
                    configmaps: &self.configmaps,
                    auth_file,
                    rootless: false,
                })
                .map_err(|(f, why)| err(&f, why))?;
                if parsed.restart != super::RestartPolicy::Always {
                    return Err(err(
                        "specification.restartPolicy",
                        "a k8s workload runs as a Deployment, whose pods restart Always".into(),
                    ));
                }
                let namespace = self
                    .namespace
                    .as_deref()
                    .filter(|n| !n.is_empty())
                    .unwrap_or("default");
                if !is_rfc1123_name(namespace) || namespace.len() > 63 || namespace.contains('.') {
                    return Err(err(
                        "namespace",
                        format!("'{namespace}' is not a Kubernetes namespace name"),
                    ));
                }
                let manifest = crate::drivers::k8s::objects::render(
                    &parsed.data.manifest,
                    namespace,
                    &self.configmaps,
                    auth_file,
                )
                .map_err(|(f, why)| err(&f, why))?;
                let mut fp = manifest.clone().into_bytes();
                fp.extend(format!("\0{backoff:?}").as_bytes());
                // The agent's pod overhead and default pids limit are podman's, not these.
                let limits = crate::cgroup::Limits {
                    memory_bytes: parsed
                        .limits
                        .memory_bytes
                        .map(|m| m.saturating_sub(super::POD_MEMORY_OVERHEAD)),
                    cpu_millicores: parsed.limits.cpu_millicores,
                    pids: None,
                };
                Ok(WorkloadSpec {
                    name: self.name.clone(),
                    kind,
                    shell: None,
                    limits,
                    requests: parsed.requests,
                    restart: parsed.restart,
                    backoff,
                    priority,
                    scheduling: Default::default(),
                    labels: self.labels.clone(),
                    fingerprint: fingerprint(&fp),
                    pod: Some(super::PodSpecData {
                        manifest,
                        auth_file: parsed.data.auth_file,
                        rootless: false,
                        containers: parsed.data.containers,
                    }),
                })
            }
        }
    }
}

fn apply_retry(b: &mut BackoffPolicy, r: &Retry) -> Result<(), String> {
    let secs = |v: f64, what: &str| {
        if v.is_finite() && v > 0.0 && v < 86400.0 {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(format!("{what} must be between 0 and 86400 seconds"))
        }
    };
    match r.backoff.as_deref() {
        Some("constantBackoff") => {
            let p = secs(
                r.period_seconds.unwrap_or(b.initial.as_secs_f64()),
                "periodSeconds",
            )?;
            b.initial = p;
            b.max = p;
            b.multiplier = 1.0;
        }
        Some("exponentialBackoff") | None => {
            if let Some(i) = r.initial_interval_seconds {
                b.initial = secs(i, "initialIntervalSeconds")?;
                b.max = b.max.max(b.initial);
            }
            if let Some(m) = r.multiplier {
                if !(1.0..=100.0).contains(&m) {
                    return Err("multiplier must be between 1 and 100".into());
                }
                b.multiplier = m;
            }
        }
        Some(other) => {
            return Err(format!(
                "unknown backoff '{other}' (constantBackoff, exponentialBackoff)"
            ))
        }
    }
    Ok(())
}
