//! Builds the status snapshot from the controller's parts.

use super::effects::Effects;
use super::{Controller, State};
use crate::cgroup::systemd::UnitNames;
use crate::status::{AgentInfo, BudgetInfo, DeviceInfo, Snapshot, WorkloadInfo};
use crate::workload::{WorkloadKind, WorkloadSpec, POD_MEMORY_OVERHEAD};

/// The spec's notices and the driver's, in one line.
fn notice(spec: &[String], driver: &Option<String>) -> Option<String> {
    let all: Vec<&str> = spec
        .iter()
        .map(String::as_str)
        .chain(driver.as_deref())
        .collect();
    (!all.is_empty()).then(|| all.join("; "))
}

/// What a pod's memory limit adds to its containers' (their sum is what the spec declares).
fn pod_overhead(s: &WorkloadSpec) -> Option<u64> {
    (s.kind == WorkloadKind::Pod
        && s.limits.memory_bytes.is_some()
        && s.default_limits.memory_bytes.is_none())
    .then_some(POD_MEMORY_OVERHEAD)
}

/// One row per workload, then one per refused workload that has no entry.
fn workload_rows(st: &State) -> Vec<WorkloadInfo> {
    let mut rows: Vec<WorkloadInfo> = st
        .workloads
        .entries()
        .iter()
        .map(|(name, e)| {
            let m = e.machine.state();
            let mut reason = m.reason();
            if let Some(why) = &e.update_rejected {
                reason =
                    format!("{reason}; its new spec is refused ({why}): running the last good one");
            }
            if e.spec.is_none() {
                reason = format!("{reason}; kept running: no valid desired state says what it is");
            }
            // The unit that holds the workload (systemd driver): a shell workload's service,
            // a pod's slice (podman's pod slice is below it).
            let unit = st.hierarchy_info.slice.as_ref().and_then(|slice| {
                let n = UnitNames::of(slice, name.as_str());
                match e.kind {
                    WorkloadKind::Shell => Some(n.service),
                    WorkloadKind::Pod => Some(n.slice),
                    WorkloadKind::K8s => None,
                }
            });
            WorkloadInfo {
                name: name.to_string(),
                kind: e.kind.name().into(),
                state: m.name().into(),
                reason,
                heartbeat_status: m.heartbeat_status().as_str().into(),
                pid: m.pid(),
                restarts: e.machine.inner().restarts,
                oom_kills: e.machine.inner().oom_kills,
                priority: e.spec.as_ref().map_or(0, |s| s.priority),
                limits: e.spec.as_ref().map(|s| s.limits).unwrap_or_default(),
                usage: e.usage.clone(),
                cgroup: (e.kind != WorkloadKind::K8s)
                    .then(|| e.cgroup.display_path().display().to_string()),
                notice: notice(e.spec.as_ref().map_or(&[][..], |s| &s.notices), &e.notice),
                default_limits: e
                    .spec
                    .as_ref()
                    .map(|s| s.default_limits)
                    .unwrap_or_default(),
                pod_overhead_bytes: e.spec.as_ref().and_then(pod_overhead),
                // Under systemd a shell workload's output is its unit's journal.
                log: (e.kind == WorkloadKind::Shell && unit.is_none())
                    .then(|| st.workloads.store().log_path(name).display().to_string()),
                uid: e.uid,
                unit,
            }
        })
        .collect();
    for r in st.workloads.rejected() {
        if r.name
            .as_ref()
            .is_some_and(|n| st.workloads.entries().contains_key(n))
        {
            continue;
        }
        rows.push(WorkloadInfo {
            name: r.shown_name.clone(),
            kind: "-".into(),
            state: "failed".into(),
            reason: format!("invalid spec: {}: {}", r.error.field, r.error.why),
            heartbeat_status: "crashed".into(),
            pid: None,
            restarts: 0,
            oom_kills: 0,
            priority: 0,
            limits: Default::default(),
            usage: None,
            cgroup: None,
            notice: None,
            log: None,
            uid: None,
            default_limits: Default::default(),
            pod_overhead_bytes: None,
            unit: None,
        });
    }
    rows
}

impl<E: Effects> Controller<E> {
    pub fn snapshot(&self) -> Snapshot {
        let st = &self.st;
        let budget = st.resources.budget();
        let totals = st.resources.totals();
        let used = st.resources.used();
        let (state, reason) = st.device.state();
        let workloads = workload_rows(st);
        Snapshot {
            agent: AgentInfo {
                version: option_env!("DWNG_VERSION")
                    .unwrap_or(env!("CARGO_PKG_VERSION"))
                    .into(),
                pid: std::process::id(),
                uptime_seconds: st.started.elapsed().as_secs(),
                cgroup_layout: st.hierarchy_info.layout.clone(),
                cgroup_base: st.hierarchy_info.base.clone(),
                cgroup_driver: st.hierarchy_info.driver.into(),
                systemd_slice: st.hierarchy_info.slice.clone(),
                state_dir: st.settings.state_dir.display().to_string(),
                desired_state: st
                    .settings
                    .desired_state
                    .as_ref()
                    .map(|p| p.display().to_string()),
                server: st.settings.server.clone(),
                rss_bytes: crate::drivers::process::rss_bytes(std::process::id() as i32),
                // Microseconds are the precision worth showing (JSON showed 15 digits).
                longest_handler_ms: (self.history.longest_handler.0.as_secs_f64() * 1e6).round()
                    / 1000.0,
                longest_handler_event: self.history.longest_handler.1.to_string(),
                evictions_total: st.workloads.budget_evictions,
            },
            device: DeviceInfo {
                state: state.into(),
                reason,
                problems: st.device.problems(),
            },
            budget: BudgetInfo {
                memory_total_bytes: totals.memory_total_bytes,
                memory_reserved_bytes: st.settings.reserved_memory,
                memory_budget_bytes: budget.memory_bytes,
                memory_used_bytes: used.memory_bytes,
                cpu_total_millicores: totals.cpus * 1000,
                cpu_reserved_millicores: st.settings.reserved_cpu_millis,
                cpu_budget_millicores: budget.cpu_millicores,
                cpu_used_millicores: used.cpu_millicores,
            },
            profiles: crate::status::ProfilesInfo {
                variables: st
                    .resources
                    .profiles
                    .variables
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_string()))
                    .collect(),
                conditions: st.resources.profiles.evaluation.clone(),
            },
            server: st
                .session
                .as_ref()
                .map(|s| s.info(st.reports.outbox.events.len())),
            workloads,
            transitions: self.history.transitions.iter().cloned().collect(),
        }
    }
}
