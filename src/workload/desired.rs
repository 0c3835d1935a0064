//! The desired state: the `workloads` of a device-configuration message (PROTOCOL §4.1, §4.3),
//! from the server or from the local desired-state file (serverless mode, same shape).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::name::{shown, WorkloadName};
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

/// Parses YAML or JSON (JSON is YAML). A document without `workloads` is refused: a file
/// caught half-written must not read as "nothing desired" (`workloads: []` says that).
pub fn parse_desired(text: &str) -> Result<DesiredState, String> {
    // JSON is YAML, but serde_json reads it an order of magnitude faster (a server-sized
    // document of 10 000 workloads in milliseconds); the depth limit holds for both.
    let doc: Option<serde_json::Value> = if text.trim_start().starts_with('{') {
        crate::yaml::check_depth(text, crate::yaml::MAX_DEPTH).map_err(|e| e.to_string())?;
        Some(serde_json::from_str(text).map_err(|e| e.to_string())?)
    } else {
        crate::yaml::from_str(text).map_err(|e| e.to_string())?
    };
    match doc {
        Some(v @ serde_json::Value::Object(_)) if v.get("workloads").is_some() => {
            serde_path_to_error::deserialize(v).map_err(|e| {
                let path = e.path().to_string();
                format!("at `{path}`: {}", e.into_inner())
            })
        }
        Some(serde_json::Value::Object(_)) => {
            Err("no `workloads` key (an empty desired state is `workloads: []`)".into())
        }
        _ => Err("expected a mapping with `workloads`".into()),
    }
}

/// Agent-wide defaults a spec falls back to.
#[derive(Debug, Clone, Default)]
pub struct SpecDefaults {
    /// WORKLOAD_USER: the user of shell workloads without `user:` (`None`: a uid of their own).
    pub workload_user: Option<String>,
    pub backoff: BackoffPolicy,
    /// DEFAULT_LIMITS, resolved against the device budget.
    pub default_limits: crate::cgroup::Limits,
}

/// A workload of the desired state that the agent refuses: shown (status, heartbeat event),
/// but it owns nothing (no cgroup, record, log or cleanup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Position in the desired state's `workloads`.
    pub index: usize,
    /// The name as given, made safe to show ([`super::name::shown`]).
    pub shown_name: String,
    /// The name, when it is a valid one (an invalid spec under a good name).
    pub name: Option<WorkloadName>,
    pub error: SpecError,
}

/// A desired state checked workload by workload: what runs, and what is refused and why.
#[derive(Debug, Clone, Default)]
pub struct ValidatedDesired {
    /// Valid workloads with distinct names, in the desired state's order.
    pub specs: Vec<WorkloadSpec>,
    pub rejected: Vec<Rejection>,
    /// Workloads past MAX_WORKLOADS: refused unread (how many, and the first names).
    pub excess: usize,
    pub excess_names: Vec<String>,
    pub secrets: Vec<DesiredSecret>,
    /// The configuration's device profiles (PROTOCOL §7), when the source has them.
    pub profiles: Vec<crate::flotta::messages::DeviceProfile>,
}

/// How many excess names a rejection message lists.
const EXCESS_NAMES_SHOWN: usize = 5;

impl DesiredState {
    /// Validates every workload on its own: one bad workload does not spoil the others.
    /// Duplicate names keep the first and reject the rest.
    pub fn validate(&self, defaults: &SpecDefaults) -> Vec<Result<WorkloadSpec, SpecError>> {
        let mut seen = BTreeSet::new();
        self.workloads
            .iter()
            .map(|w| {
                if !seen.insert(w.name.as_str()) {
                    return Err(SpecError {
                        workload: shown(&w.name),
                        field: "name".into(),
                        why: "duplicate name in the desired state: the first one is kept".into(),
                    });
                }
                w.to_spec(defaults)
            })
            .collect()
    }

    /// Validates at most `max_workloads` workloads (the rest are refused unread: a message
    /// of 10 000 workloads costs no more than one of `max_workloads`).
    pub fn validated(&self, defaults: &SpecDefaults, max_workloads: usize) -> ValidatedDesired {
        let (kept, excess) = self
            .workloads
            .split_at(self.workloads.len().min(max_workloads));
        let head = DesiredState {
            workloads: kept.to_vec(),
            ..Default::default()
        };
        let mut out = ValidatedDesired {
            excess: excess.len(),
            excess_names: excess
                .iter()
                .take(EXCESS_NAMES_SHOWN)
                .map(|w| shown(&w.name))
                .collect(),
            secrets: self.secrets.clone(),
            profiles: self
                .extra
                .get("configuration")
                .and_then(|c| c.get("profiles"))
                .and_then(|p| serde_json::from_value(p.clone()).ok())
                .unwrap_or_default(),
            ..Default::default()
        };
        for (index, r) in head.validate(defaults).into_iter().enumerate() {
            match r {
                Ok(spec) => out.specs.push(spec),
                Err(error) => {
                    let raw = &kept[index].name;
                    // A duplicate's name is valid but belongs to the first workload.
                    let name = WorkloadName::parse(raw)
                        .ok()
                        .filter(|_| error.field != "name");
                    out.rejected.push(Rejection {
                        index,
                        shown_name: shown(raw),
                        name,
                        error,
                    })
                }
            }
        }
        out
    }
}

/// The kind a `kind` names (PROTOCOL §7; `microshift` is `k8s`).
pub(super) fn parse_kind(kind: &str) -> Result<WorkloadKind, String> {
    match kind {
        "shell" => Ok(WorkloadKind::Shell),
        "pod" => Ok(WorkloadKind::Pod),
        "k8s" | "microshift" => Ok(WorkloadKind::K8s),
        other => Err(format!("unknown kind '{}' (pod, shell, k8s)", shown(other))),
    }
}

impl DesiredWorkload {
    /// Validates the workload: its fields, and the annotations that stand in for them
    /// ([`super::annotations`]); DEFAULT_LIMITS fill the limits it does not declare.
    pub fn to_spec(&self, defaults: &SpecDefaults) -> Result<WorkloadSpec, SpecError> {
        let err = |field: &str, why: String| SpecError {
            workload: shown(&self.name),
            field: field.to_string(),
            why,
        };
        let name = WorkloadName::parse(&self.name).map_err(|e| err("name", e.to_string()))?;
        let resolved = super::annotations::resolve(self, &name).map_err(|(f, why)| err(&f, why))?;
        let mut spec = resolved.workload.spec_of_fields(name, defaults)?;
        spec.notices = resolved.notices;
        spec.scheduling.inline_profiles = resolved.inline_profiles;
        apply_default_limits(&mut spec, &defaults.default_limits);
        Ok(spec)
    }

    /// The spec its fields describe.
    fn spec_of_fields(
        &self,
        name: WorkloadName,
        defaults: &SpecDefaults,
    ) -> Result<WorkloadSpec, SpecError> {
        let err = |field: &str, why: String| SpecError {
            workload: shown(&self.name),
            field: field.to_string(),
            why,
        };
        let kind = parse_kind(self.kind.as_deref().unwrap_or("pod")).map_err(|e| err("kind", e))?;
        let priority = match self
            .labels
            .get(PRIORITY_KEY)
            .or_else(|| self.annotations.get(PRIORITY_KEY))
        {
            None => 0,
            Some(p) => p.trim().parse::<i32>().map_err(|_| {
                err(
                    PRIORITY_KEY,
                    format!("'{}' is not a whole number", shown(p)),
                )
            })?,
        };
        let mut backoff = defaults.backoff;
        if let Some(r) = &self.retry {
            apply_retry(&mut backoff, r).map_err(|why| err("retry", why))?;
        }
        let common = Common {
            name,
            priority,
            backoff,
        };
        let mut spec = match kind {
            WorkloadKind::Shell => self.shell_spec(common, defaults),
            WorkloadKind::Pod => self.pod_spec(common),
            WorkloadKind::K8s => self.k8s_spec(common),
        }
        .map_err(|(field, why)| err(&field, why))?;
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

    fn auth_file(&self) -> Option<&str> {
        self.image_registries
            .as_ref()
            .and_then(|r| r.auth_file.as_deref())
            .filter(|a| !a.trim().is_empty())
    }

    fn shell_spec(
        &self,
        c: Common,
        defaults: &SpecDefaults,
    ) -> Result<WorkloadSpec, (String, String)> {
        let spec_err = |field: &str, why: String| (format!("specification{field}"), why);
        let raw: RawShell =
            crate::yaml::from_str(&self.specification).map_err(|e| spec_err("", e.to_string()))?;
        if raw.command.is_empty() || raw.command[0].is_empty() {
            return Err(spec_err(".command", "must name a program".into()));
        }
        if !raw.command[0].starts_with('/') {
            return Err(spec_err(
                ".command",
                format!("'{}' must be an absolute path", shown(&raw.command[0])),
            ));
        }
        let limits = parse_resources("limits", &raw.resources.limits)
            .map_err(|(f, why)| spec_err(&format!(".{f}"), why))?;
        let requests = parse_resources("requests", &raw.resources.requests)
            .map_err(|(f, why)| spec_err(&format!(".{f}"), why))?;
        if let Some(d) = &raw.working_dir {
            if !d.is_absolute() {
                return Err(spec_err(".workingDir", "must be absolute".into()));
            }
        }
        let mut command = raw.command;
        command.extend(raw.args);
        let fp_input = serde_json::to_vec(self).unwrap_or_default();
        Ok(c.spec(
            self,
            Body {
                kind: WorkloadKind::Shell,
                limits,
                requests,
                restart: raw.restart_policy.unwrap_or_default(),
                fingerprint: fingerprint(&fp_input),
                shell: Some(ShellSpec {
                    command,
                    env: raw.env.into_iter().map(|e| (e.name, e.value)).collect(),
                    working_dir: raw.working_dir,
                    user: raw.user.or_else(|| defaults.workload_user.clone()),
                }),
                pod: None,
            },
        ))
    }

    fn pod_spec(&self, c: Common) -> Result<WorkloadSpec, (String, String)> {
        let parsed = parse_pod(&PodInput {
            name: c.name.as_str(),
            specification: &self.specification,
            labels: &self.labels,
            annotations: &self.annotations,
            configmaps: &self.configmaps,
            auth_file: self.auth_file(),
            rootless: self.rootless.unwrap_or(false),
        })?;
        // Redeploy only when what podman sees changes (PROTOCOL §4.5): the rendered
        // manifest, the auth file, rootless; plus the agent's own restart settings.
        let mut fp = parsed.data.manifest.clone().into_bytes();
        fp.extend(parsed.data.auth_file.as_deref().unwrap_or("").as_bytes());
        fp.extend(format!("\0{}\0{:?}", parsed.data.rootless, c.backoff).as_bytes());
        Ok(c.spec(
            self,
            Body {
                kind: WorkloadKind::Pod,
                limits: parsed.limits,
                requests: parsed.requests,
                restart: parsed.restart,
                fingerprint: fingerprint(&fp),
                shell: None,
                pod: Some(parsed.data),
            },
        ))
    }

    /// A Deployment on the local Kubernetes API (drivers/k8s): the same PodSpec checks as a
    /// pod; Kubernetes enforces the limits, the requests count for the budget.
    fn k8s_spec(&self, c: Common) -> Result<WorkloadSpec, (String, String)> {
        let auth_file = self.auth_file();
        let parsed = parse_pod(&PodInput {
            name: c.name.as_str(),
            specification: &self.specification,
            labels: &self.labels,
            annotations: &self.annotations,
            configmaps: &self.configmaps,
            auth_file,
            rootless: false,
        })?;
        if parsed.restart != super::RestartPolicy::Always {
            return Err((
                "specification.restartPolicy".into(),
                "a k8s workload runs as a Deployment, whose pods restart Always".into(),
            ));
        }
        let namespace = self
            .namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or("default");
        if !is_rfc1123_name(namespace) || namespace.len() > 63 || namespace.contains('.') {
            return Err((
                "namespace".into(),
                format!("'{}' is not a Kubernetes namespace name", shown(namespace)),
            ));
        }
        let manifest = crate::drivers::k8s::objects::render(
            &parsed.data.manifest,
            namespace,
            &self.configmaps,
            auth_file,
        )?;
        let mut fp = manifest.clone().into_bytes();
        fp.extend(format!("\0{:?}", c.backoff).as_bytes());
        // The agent's pod overhead and default pids limit are podman's, not these.
        let limits = crate::cgroup::Limits {
            memory_bytes: parsed
                .limits
                .memory_bytes
                .map(|m| m.saturating_sub(super::POD_MEMORY_OVERHEAD)),
            cpu_millicores: parsed.limits.cpu_millicores,
            pids: None,
        };
        let restart = parsed.restart;
        Ok(c.spec(
            self,
            Body {
                kind: WorkloadKind::K8s,
                limits,
                requests: parsed.requests,
                restart,
                fingerprint: fingerprint(&fp),
                shell: None,
                pod: Some(super::PodSpecData {
                    manifest,
                    auth_file: parsed.data.auth_file,
                    rootless: false,
                    containers: parsed.data.containers,
                }),
            },
        ))
    }
}

/// What every kind's spec shares.
struct Common {
    name: WorkloadName,
    priority: i32,
    backoff: BackoffPolicy,
}

/// What differs between the kinds' specs.
struct Body {
    kind: WorkloadKind,
    limits: crate::cgroup::Limits,
    requests: crate::cgroup::Limits,
    restart: RestartPolicy,
    fingerprint: String,
    shell: Option<ShellSpec>,
    pod: Option<super::PodSpecData>,
}

impl Common {
    fn spec(self, w: &DesiredWorkload, b: Body) -> WorkloadSpec {
        WorkloadSpec {
            name: self.name,
            kind: b.kind,
            shell: b.shell,
            pod: b.pod,
            limits: b.limits,
            requests: b.requests,
            restart: b.restart,
            backoff: self.backoff,
            priority: self.priority,
            scheduling: Default::default(),
            labels: w.labels.clone(),
            fingerprint: b.fingerprint,
            default_limits: Default::default(),
            notices: Vec::new(),
        }
    }
}

/// Fills the limits a workload does not declare from DEFAULT_LIMITS, one resource at a time
/// (as a Kubernetes LimitRange does): a workload that limits only its memory still gets the
/// default pids limit.
fn apply_default_limits(spec: &mut WorkloadSpec, defaults: &crate::cgroup::Limits) {
    // Kubernetes enforces a k8s workload's limits, not the agent; defaulting them there is a
    // LimitRange's job.
    if spec.kind != WorkloadKind::K8s {
        let (l, d, from) = (&mut spec.limits, &mut spec.default_limits, defaults);
        for (limit, taken, default) in [
            (&mut l.memory_bytes, &mut d.memory_bytes, from.memory_bytes),
            (
                &mut l.cpu_millicores,
                &mut d.cpu_millicores,
                from.cpu_millicores,
            ),
            (&mut l.pids, &mut d.pids, from.pids),
        ] {
            if limit.is_none() && default.is_some() {
                *limit = default;
                *taken = default;
            }
        }
    }
    if spec.kind == WorkloadKind::Pod && spec.limits.pids.is_none() {
        spec.limits.pids = Some(super::DEFAULT_POD_PIDS);
    }
}

pub(super) fn apply_retry(b: &mut BackoffPolicy, r: &Retry) -> Result<(), String> {
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
