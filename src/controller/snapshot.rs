//! Builds the status snapshot from the controller's state.

use super::Controller;
use crate::status::{AgentInfo, BudgetInfo, DeviceInfo, Snapshot, WorkloadInfo};

impl Controller {
    pub fn snapshot(&self) -> Snapshot {
        let budget = self.budget();
        let (state, reason) = self.device_state();
        let problems = self.device_problems();
        Snapshot {
            agent: AgentInfo {
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                uptime_seconds: self.started.elapsed().as_secs(),
                cgroup_layout: self.hierarchy.layout.name().into(),
                cgroup_base: self.hierarchy.base_display().display().to_string(),
                state_dir: self.settings.state_dir.display().to_string(),
                desired_state: self
                    .settings
                    .desired_state
                    .as_ref()
                    .map(|p| p.display().to_string()),
                server: self.settings.server.clone(),
                rss_bytes: crate::drivers::process::rss_bytes(std::process::id() as i32),
            },
            device: DeviceInfo {
                state: state.into(),
                reason,
                problems,
            },
            budget: BudgetInfo {
                memory_total_bytes: self.totals.memory_total_bytes,
                memory_reserved_bytes: self.settings.reserved_memory,
                memory_budget_bytes: budget.memory_bytes,
                memory_used_bytes: self.used.0,
                cpu_total_millicores: self.totals.cpus * 1000,
                cpu_reserved_millicores: self.settings.reserved_cpu_millis,
                cpu_budget_millicores: budget.cpu_millicores,
                cpu_used_millicores: self.used.1,
            },
            profiles: crate::status::ProfilesInfo {
                variables: self
                    .admission
                    .variables
                    .iter()
                    .map(|(k, v)| (k.clone(), format!("{v:.1}")))
                    .collect(),
                conditions: self.admission.evaluation.clone(),
            },
            server: self
                .server
                .as_ref()
                .map(|s| s.info(self.outbox.events.len())),
            workloads: self
                .workloads
                .iter()
                .map(|(name, e)| {
                    let st = e.machine.state();
                    let has_cgroup = e.spec.is_some();
                    WorkloadInfo {
                        name: name.clone(),
                        kind: if e.spec.is_some() {
                            e.kind.name().into()
                        } else {
                            "-".into()
                        },
                        state: st.name().into(),
                        reason: st.reason(),
                        heartbeat_status: st.heartbeat_status().into(),
                        pid: st.pid(),
                        restarts: e.machine.inner().restarts,
                        oom_kills: e.machine.inner().oom_kills,
                        priority: e.spec.as_ref().map_or(0, |s| s.priority),
                        limits: e.spec.as_ref().map(|s| s.limits).unwrap_or_default(),
                        usage: e.usage.clone(),
                        cgroup: has_cgroup.then(|| e.cgroup.display_path().display().to_string()),
                        notice: e.notice.clone(),
                        log: has_cgroup.then(|| self.store.log_path(name).display().to_string()),
                    }
                })
                .collect(),
            transitions: self.transitions.iter().cloned().collect(),
        }
    }
}
