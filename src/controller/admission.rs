//! Admission: which workloads may run now. A waiting workload starts when its requests fit
//! the device budget (higher priority first, then older first), its device profiles are
//! active and, for a cron workload, its time has come. Profiles are re-evaluated on every
//! sample: a workload whose profile turns inactive is stopped (evicted) and started again when
//! it is active once more.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::{Controller, Event};
use crate::machines::workload::{State, WorkloadEvent};
use crate::profiles::expr::Value;
use crate::profiles::{DeviceProfiles, Evaluation};
use crate::units::Bytes;
use crate::workload::WorkloadSpec;

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

/// The requests a workload is counted with: its requests, else its limits (as Kubernetes
/// defaults requests to limits), else nothing.
pub fn counted_requests(spec: &WorkloadSpec) -> (u64, u64) {
    (
        spec.requests
            .memory_bytes
            .or(spec.limits.memory_bytes)
            .unwrap_or(0),
        spec.requests
            .cpu_millicores
            .or(spec.limits.cpu_millicores)
            .unwrap_or(0),
    )
}

/// Does this state hold resources (started, running, about to restart, stopping)?
fn holds_resources(s: &State) -> bool {
    matches!(
        s,
        State::Starting {} | State::Running { .. } | State::Backoff { .. } | State::Stopping { .. }
    )
}

impl Controller {
    /// Requests of the workloads that hold resources now.
    fn committed(&self) -> (u64, u64) {
        self.workloads
            .values()
            .filter(|e| holds_resources(e.machine.state()))
            .filter_map(|e| e.spec.as_ref())
            .map(counted_requests)
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    /// Admits what may run, in priority order; re-entrant calls are folded into one loop.
    pub(crate) fn admit_pending(&mut self) {
        if self.admission.running {
            self.admission.again = true;
            return;
        }
        self.admission.running = true;
        loop {
            self.admission.again = false;
            self.admission_round();
            if !self.admission.again {
                break;
            }
        }
        self.admission.running = false;
    }

    fn admission_round(&mut self) {
        let mut candidates: Vec<(i32, u64, String)> = self
            .workloads
            .iter()
            .filter(|(_, e)| e.spec.is_some())
            .filter(|(_, e)| match e.machine.state() {
                State::Pending { .. } => true,
                State::Evicted { .. } => e.hold != Hold::Budget,
                State::Stopped { .. } => e.cron_due,
                _ => false,
            })
            .map(|(n, e)| {
                let p = e.spec.as_ref().map_or(0, |s| s.priority);
                (-p, e.admitted_seq, n.clone())
            })
            .collect();
        candidates.sort();
        let budget = self.budget();
        let (used_mem, used_cpu) = self.committed();
        let mut free_mem = budget.memory_bytes.saturating_sub(used_mem);
        let mut free_cpu = budget.cpu_millicores.saturating_sub(used_cpu);
        for (_, _, name) in candidates {
            let Some(e) = self.workloads.get(&name) else {
                continue;
            };
            let Some(spec) = e.spec.clone() else {
                continue;
            };
            let pending = matches!(e.machine.state(), State::Pending { .. });
            // Profiles.
            let permission = (!spec.scheduling.profiles.is_empty()).then(|| {
                self.admission
                    .profiles
                    .workload_permission(&spec.scheduling.profiles, &self.admission.evaluation)
            });
            if let Some(p) = permission.as_ref().filter(|p| !p.allowed) {
                if pending {
                    let reason = format!("waiting for its profiles: {}", p.reason);
                    self.workload_event(&name, WorkloadEvent::Hold { reason });
                }
                continue;
            }
            // Cron.
            if spec.scheduling.cron.is_some() && !e.cron_due {
                if pending {
                    let reason = match e.cron_next {
                        Some(t) => format!(
                            "waiting for its next scheduled run at {} UTC",
                            crate::status::clock(unix(t))
                        ),
                        None => "its schedule has no next run".into(),
                    };
                    self.workload_event(&name, WorkloadEvent::Hold { reason });
                }
                continue;
            }
            // Budget.
            let (mem, cpu) = counted_requests(&spec);
            if mem > free_mem || cpu > free_cpu {
                let reason = if mem > free_mem {
                    format!(
                        "insufficient budget: needs {} memory, {} free",
                        Bytes(mem),
                        Bytes(free_mem)
                    )
                } else {
                    format!("insufficient budget: needs {cpu}m cpu, {free_cpu}m free")
                };
                if pending {
                    self.workload_event(&name, WorkloadEvent::Hold { reason });
                }
                continue;
            }
            free_mem -= mem;
            free_cpu -= cpu;
            if let Some(e) = self.workloads.get_mut(&name) {
                e.hold = Hold::None;
                e.cron_due = false;
                e.profile_cpu_quota = permission.and_then(|p| p.cpu_quota_millicores);
            }
            self.workload_event(&name, WorkloadEvent::Admit);
        }
    }

    /// The device profiles of a new desired state.
    pub(crate) fn set_profiles(&mut self, profiles: DeviceProfiles) {
        for e in profiles.errors() {
            warn!("device profile rejected: {e}");
        }
        self.admission.profiles = profiles;
        self.reevaluate_profiles();
    }

    /// Re-evaluates the profile conditions over the current variables; stops the workloads
    /// whose profiles became inactive and admits the ones that may run again.
    pub(crate) fn reevaluate_profiles(&mut self) {
        let vars = self.admission.variables.clone();
        let evaluation = self.admission.profiles.evaluate(&vars);
        let changed = evaluation != self.admission.evaluation;
        self.admission.evaluation = evaluation;
        if !changed {
            return;
        }
        let mut running = Vec::new();
        let mut requota = Vec::new();
        for (n, e) in &self.workloads {
            if !matches!(
                e.machine.state(),
                State::Running { .. } | State::Starting {}
            ) {
                continue;
            }
            let Some(s) = e
                .spec
                .as_ref()
                .filter(|s| !s.scheduling.profiles.is_empty())
            else {
                continue;
            };
            let p = self
                .admission
                .profiles
                .workload_permission(&s.scheduling.profiles, &self.admission.evaluation);
            if !p.allowed {
                running.push((n.clone(), p.reason));
            } else if p.cpu_quota_millicores != e.profile_cpu_quota {
                requota.push((n.clone(), p.cpu_quota_millicores));
            }
        }
        // The quota of the active condition is the cpu limit while it is active (PROTOCOL §7).
        for (name, quota) in requota {
            info!(workload = %name, quota = ?quota, "profile cpu quota changed");
            self.set_profile_quota(&name, quota);
        }
        for (name, reason) in running {
            info!(workload = %name, "profile inactive: stopping it ({reason})");
            if let Some(e) = self.workloads.get_mut(&name) {
                e.hold = Hold::Profile;
            }
            self.workload_event(
                &name,
                WorkloadEvent::Evict {
                    reason: format!("profile inactive: {reason}"),
                },
            );
        }
        self.admit_pending();
    }

    /// Native profile variables from a sample: usage as percentages of the budget.
    pub(crate) fn native_variables(&mut self, disk_percent: Option<f64>, pids_percent: f64) {
        let b = self.budget();
        let pct = |used: u64, of: u64| {
            if of == 0 {
                100.0
            } else {
                used as f64 * 100.0 / of as f64
            }
        };
        let v = &mut self.admission.variables;
        v.insert(
            "cpu".into(),
            Value::percent(pct(self.used.1, b.cpu_millicores)),
        );
        v.insert(
            "memory".into(),
            Value::percent(pct(self.used.0, b.memory_bytes)),
        );
        v.insert("pids".into(), Value::percent(pids_percent));
        match disk_percent {
            Some(d) => {
                v.insert("disk".into(), Value::percent(d));
            }
            None => {
                v.remove("disk");
            }
        }
    }

    /// Variables fed through the local input (replacing the previous ones).
    pub(crate) fn fed_variables(&mut self, fed: BTreeMap<String, Value>) {
        let v = &mut self.admission.variables;
        v.retain(|k, _| crate::profiles::expr::NATIVE_VARIABLES.contains(&k.as_str()));
        for (k, val) in fed {
            if !crate::profiles::expr::NATIVE_VARIABLES.contains(&k.as_str()) {
                v.insert(k, val);
            }
        }
    }

    /// Plans the next run of a cron workload.
    pub(crate) fn schedule_cron(&mut self, name: &str) {
        let tx = self.tx.clone();
        let Some(e) = self.workloads.get_mut(name) else {
            return;
        };
        let Some(schedule) = e.spec.as_ref().and_then(|s| s.scheduling.cron.clone()) else {
            e.cron_next = None;
            return;
        };
        e.cron_token += 1;
        let now = SystemTime::now();
        e.cron_next = schedule.next_after(now);
        if let Some(next) = e.cron_next {
            let delay = next.duration_since(now).unwrap_or(Duration::ZERO);
            super::sources::after(
                tx,
                delay,
                Event::CronDue {
                    name: name.to_string(),
                    token: e.cron_token,
                },
            );
        }
    }

    pub(crate) fn on_cron_due(&mut self, name: &str, token: u64) {
        let Some(e) = self.workloads.get_mut(name) else {
            return;
        };
        if e.cron_token != token {
            return;
        }
        if holds_resources(e.machine.state()) {
            warn!(workload = %name, "scheduled run skipped: the previous run is still going");
        } else {
            e.cron_due = true;
        }
        self.schedule_cron(name);
        self.admit_pending();
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The admission state the controller keeps.
#[derive(Debug, Default)]
pub struct AdmissionState {
    running: bool,
    again: bool,
    pub profiles: DeviceProfiles,
    pub evaluation: Evaluation,
    pub variables: BTreeMap<String, Value>,
}
