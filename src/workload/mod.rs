//! Workloads: the desired state's shape (PROTOCOL §4.3 plus the device-worker-ng `kind`),
//! validated into [`WorkloadSpec`]s the drivers can run.

pub mod annotations;
mod desired;
pub mod name;
mod pod;
mod shell;

pub use desired::{
    parse_desired, DesiredError, DesiredSecret, DesiredState, DesiredWorkload, ImageRegistries,
    Rejection, Retry, SpecDefaults, ValidatedDesired, MAX_DESIRED_BYTES,
};
pub use name::{NameError, WorkloadName};
pub use pod::{PodSpecData, DEFAULT_POD_PIDS, POD_MEMORY_OVERHEAD, WORKLOAD_LABEL};
pub use shell::ShellSpec;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cgroup::Limits;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

/// Exponential backoff between restarts, capped, "broken" after too many consecutive failures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    pub max_failures: u32,
    /// A run at least this long resets the failure count.
    pub reset_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            max_failures: 5,
            reset_after: Duration::from_secs(60),
        }
    }
}

impl BackoffPolicy {
    /// Delay before the restart that follows the `failure`-th consecutive failure (1-based).
    pub fn delay(&self, failure: u32) -> Duration {
        let exp = failure.saturating_sub(1).min(64) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exp);
        Duration::from_secs_f64(secs.min(self.max.as_secs_f64()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    Shell,
    Pod,
    K8s,
}

impl WorkloadKind {
    pub fn name(&self) -> &'static str {
        match self {
            WorkloadKind::Shell => "shell",
            WorkloadKind::Pod => "pod",
            WorkloadKind::K8s => "k8s",
        }
    }

    /// The kind of a [`name`](Self::name) (as persisted in workload records).
    pub fn from_name(name: &str) -> Option<WorkloadKind> {
        match name {
            "shell" => Some(WorkloadKind::Shell),
            "pod" => Some(WorkloadKind::Pod),
            "k8s" => Some(WorkloadKind::K8s),
            _ => None,
        }
    }
}

/// A validated workload, ready for a driver.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadSpec {
    pub name: WorkloadName,
    pub kind: WorkloadKind,
    pub shell: Option<ShellSpec>,
    pub pod: Option<PodSpecData>,
    /// What it runs with: its own limits, else DEFAULT_LIMITS'.
    pub limits: Limits,
    /// Which of `limits` came from DEFAULT_LIMITS (they do not count as requests).
    pub default_limits: Limits,
    pub requests: Limits,
    pub restart: RestartPolicy,
    pub backoff: BackoffPolicy,
    /// Higher runs first and is evicted last (label or annotation `device-worker-ng/priority`).
    pub priority: i32,
    /// When the workload may run besides the budget: device-profile conditions and cron.
    pub scheduling: Scheduling,
    pub labels: BTreeMap<String, String>,
    /// Fingerprint of everything that requires a restart when it changes.
    pub fingerprint: String,
    /// What the operator should know about how the spec was read (an annotation that the
    /// field overrides).
    pub notices: Vec<String>,
}

/// The device-worker-ng extensions that gate when a workload runs (PROTOCOL §7).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scheduling {
    /// Runs only while all these profiles are active (one of their conditions true).
    pub profiles: Vec<crate::flotta::messages::WorkloadProfile>,
    /// Runs on this schedule (UTC); a run still going when the next is due is not doubled.
    pub cron: Option<crate::cron::Schedule>,
    /// Device profiles the workload defines itself (its profiles annotation with
    /// expressions), named `<workload>:<profile>`.
    pub inline_profiles: Vec<crate::flotta::messages::DeviceProfile>,
}

/// Why a workload of the desired state was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("workload '{workload}': {field}: {why}")]
pub struct SpecError {
    pub workload: String,
    pub field: String,
    pub why: String,
}

/// FNV-1a 64: a fingerprint that is stable across agent versions and Rust releases (it is
/// persisted, and a changed fingerprint restarts the workload).
pub fn fingerprint(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The label/annotation that carries a workload's priority (its twin that passes a stock
/// Flotta operator is [`annotations::PRIORITY`]).
pub const PRIORITY_KEY: &str = "device-worker-ng/priority";

#[cfg(test)]
mod tests;
