//! Admission and eviction, as pure decisions over the workloads' facts: which waiting
//! workloads may run now (their requests fit the budget — higher priority first, then older
//! first —, their device profiles are active and, for a cron workload, its time has come), and
//! which running workload goes first when the device is over budget (the lowest priority, the
//! newest among equals). The workloads part applies the decisions.

use crate::budget::Budget;
use crate::flotta::messages::WorkloadProfile;
use crate::profiles::{DeviceProfiles, Evaluation};
use crate::units::Bytes;
use crate::workload::{WorkloadName, WorkloadSpec};

/// Why a workload does not run right now (none: it may).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Hold {
    #[default]
    None,
    /// Evicted because the device was over budget: waits for the budget to recover.
    Budget,
    /// Stopped because one of its profiles became inactive.
    Profile,
}

/// The requests a workload is counted with: its requests, else the limits it declares (as
/// Kubernetes defaults requests to limits), else nothing. A DEFAULT_LIMITS limit is a ceiling
/// the device imposes, not a claim of the workload's: it is not counted.
pub fn counted_requests(spec: &WorkloadSpec) -> (u64, u64) {
    let declared =
        |limit: Option<u64>, defaulted: Option<u64>| limit.filter(|_| defaulted.is_none());
    (
        spec.requests
            .memory_bytes
            .or(declared(
                spec.limits.memory_bytes,
                spec.default_limits.memory_bytes,
            ))
            .unwrap_or(0),
        spec.requests
            .cpu_millicores
            .or(declared(
                spec.limits.cpu_millicores,
                spec.default_limits.cpu_millicores,
            ))
            .unwrap_or(0),
    )
}

/// A workload that waits to run (pending, evicted, or a cron workload that stopped).
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub name: &'a WorkloadName,
    pub spec: &'a WorkloadSpec,
    /// Order of admission into the desired state (older first among equal priorities).
    pub seq: u64,
    /// Its cron schedule says it is time.
    pub cron_due: bool,
    /// When its schedule says next (UTC seconds), for the reason.
    pub cron_next_unix: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start it, with the cpu quota of its active profile condition, if any.
    Admit { cpu_quota: Option<u64> },
    /// Not now, and why.
    Wait(String),
}

/// Decides, in priority order, which candidates start now. `committed` is what the workloads
/// that hold resources already claim.
pub fn decide<'a>(
    mut candidates: Vec<Candidate<'a>>,
    committed: (u64, u64),
    budget: &Budget,
    profiles: &DeviceProfiles,
    evaluation: &Evaluation,
) -> Vec<(&'a WorkloadName, Decision)> {
    candidates.sort_by_key(|c| (-(c.spec.priority as i64), c.seq));
    let mut free_mem = budget.memory_bytes.saturating_sub(committed.0);
    let mut free_cpu = budget.cpu_millicores.saturating_sub(committed.1);
    let mut out = Vec::with_capacity(candidates.len());
    for c in candidates {
        let s = &c.spec.scheduling;
        let permission = permission(profiles, &s.profiles, evaluation);
        if let Some(p) = permission.as_ref().filter(|p| !p.allowed) {
            out.push((
                c.name,
                Decision::Wait(format!("waiting for its profiles: {}", p.reason)),
            ));
            continue;
        }
        if s.cron.is_some() && !c.cron_due {
            let reason = match c.cron_next_unix {
                Some(t) => format!(
                    "waiting for its next scheduled run at {} UTC",
                    crate::status::clock(t)
                ),
                None => "its schedule has no next run".into(),
            };
            out.push((c.name, Decision::Wait(reason)));
            continue;
        }
        let (mem, cpu) = counted_requests(c.spec);
        if mem > free_mem {
            out.push((
                c.name,
                Decision::Wait(format!(
                    "insufficient budget: needs {} memory, {} free",
                    Bytes(mem),
                    Bytes(free_mem)
                )),
            ));
            continue;
        }
        if cpu > free_cpu {
            out.push((
                c.name,
                Decision::Wait(format!(
                    "insufficient budget: needs {cpu}m cpu, {free_cpu}m free"
                )),
            ));
            continue;
        }
        free_mem -= mem;
        free_cpu -= cpu;
        out.push((
            c.name,
            Decision::Admit {
                cpu_quota: permission.and_then(|p| p.cpu_quota_millicores),
            },
        ));
    }
    out
}

fn permission(
    profiles: &DeviceProfiles,
    wanted: &[WorkloadProfile],
    evaluation: &Evaluation,
) -> Option<crate::profiles::Permission> {
    (!wanted.is_empty()).then(|| profiles.workload_permission(wanted, evaluation))
}

/// A running workload, as eviction sees it.
#[derive(Debug, Clone, Copy)]
pub struct Running<'a> {
    pub name: &'a WorkloadName,
    pub priority: i32,
    pub seq: u64,
}

/// Over budget: the lowest-priority running workload, the newest among equals.
pub fn victim<'a>(running: impl IntoIterator<Item = Running<'a>>) -> Option<&'a WorkloadName> {
    running
        .into_iter()
        .min_by_key(|r| (r.priority, std::cmp::Reverse(r.seq)))
        .map(|r| r.name)
}

/// The limits a run gets: the spec's, with an active profile condition's cpu quota.
pub fn effective_limits(spec: &WorkloadSpec, quota: Option<u64>) -> crate::cgroup::Limits {
    let mut l = spec.limits;
    if let Some(q) = quota {
        l.cpu_millicores = Some(l.cpu_millicores.map_or(q, |c| c.min(q)));
    }
    l
}
