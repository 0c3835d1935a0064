//! The controller's workload side: reconciling the desired state, adopting what survived an
//! agent restart, and executing the workload machines' commands through the drivers.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_channel::Sender;
use tracing::{error, info, warn};

use super::{unix_now, Controller, Event};
use crate::cgroup::WorkloadCgroup;
use crate::drivers;
use crate::machines::device::DeviceEvent;
use crate::machines::workload::{
    self, ExitInfo, State, WorkloadCommand, WorkloadEvent, WorkloadMachine,
};
use crate::sampler::Target;
use crate::status::Usage;
use crate::store::{Store, WorkloadRecord};
use crate::workload::{
    DesiredSecret, DesiredState, SpecDefaults, SpecError, WorkloadKind, WorkloadSpec,
};

/// A blocking operation on one workload; a workload's operations run one at a time, in order,
/// so a stop always sees what an earlier start has spawned.
pub(crate) type LaneOp = Box<dyn FnOnce() + Send>;

pub(crate) fn spawn_lane() -> Sender<LaneOp> {
    let (tx, rx) = async_channel::unbounded::<LaneOp>();
    smol::spawn(async move {
        while let Ok(op) = rx.recv().await {
            smol::unblock(op).await;
        }
    })
    .detach();
    tx
}

/// Everything the controller holds for one workload.
pub struct Entry {
    /// `None` when the desired spec is invalid.
    pub spec: Option<WorkloadSpec>,
    /// Kind of the last valid spec (what stop and cleanup must undo).
    pub kind: WorkloadKind,
    pub machine: workload::Machine,
    pub cgroup: WorkloadCgroup,
    lane: Sender<LaneOp>,
    /// Identifies the current run; results of earlier runs are dropped.
    pub run: u64,
    pub retry_token: u64,
    /// (pid, start ticks) of a process without a waiter (adopted after a restart).
    pub adopted: Option<(i32, u64)>,
    pub started_at: Option<Instant>,
    pub oom_baseline: u64,
    pub usage: Option<Usage>,
    pub last_cpu: Option<(u64, Instant)>,
    pub admitted_seq: u64,
    /// What the driver said the operator must know about the current run.
    pub notice: Option<String>,
    /// Why an evicted workload waits (budget recovery, or its profiles).
    pub hold: super::admission::Hold,
    /// A cron workload's run is due (consumed by admission).
    pub cron_due: bool,
    pub cron_next: Option<std::time::SystemTime>,
    pub cron_token: u64,
    /// The cpu limit an active profile condition imposes (PROTOCOL §7 workload profiles).
    pub profile_cpu_quota: Option<u64>,
}

#[cfg(test)]
impl Entry {
    /// An entry in whatever state a test needs, as if admitted `seq`-th.
    pub(super) fn for_test(
        spec: WorkloadSpec,
        machine: workload::Machine,
        cgroup: WorkloadCgroup,
        seq: u64,
    ) -> Entry {
        Entry {
            kind: spec.kind.clone(),
            spec: Some(spec),
            machine,
            cgroup,
            lane: spawn_lane(),
            run: 1,
            retry_token: 0,
            adopted: None,
            started_at: None,
            oom_baseline: 0,
            usage: None,
            last_cpu: None,
            admitted_seq: seq,
            notice: None,
            hold: Default::default(),
            cron_due: false,
            cron_next: None,
            cron_token: 0,
            profile_cpu_quota: None,
        }
    }
}

impl Controller {
    pub(super) fn defaults(&self) -> SpecDefaults {
        SpecDefaults {
            workload_user: self.settings.workload_user.clone(),
            backoff: crate::workload::BackoffPolicy {
                initial: self.settings.restart_backoff_initial,
                max: self.settings.restart_backoff_max,
                multiplier: 2.0,
                max_failures: self.settings.restart_max_failures,
                reset_after: Duration::from_secs(60).max(self.settings.restart_backoff_max),
            },
        }
    }

    /// The desired state from its source; on error the last accepted one (persisted).
    /// With a server, the source is the last configuration accepted from it.
    fn load_desired(&mut self) -> Option<DesiredState> {
        if self.server.is_some() {
            return self.store.load_desired();
        }
        let Some(path) = self.settings.desired_state.clone() else {
            return Some(DesiredState::default());
        };
        match crate::workload::load_desired_file(&path) {
            Ok(d) => {
                self.device_event(DeviceEvent::ProblemCleared {
                    key: "desired-state".into(),
                });
                Some(d)
            }
            Err(e) => {
                error!("{e}; keeping the last good desired state");
                self.report(true, "DesiredStateRejected".into(), e.to_string());
                self.device_event(DeviceEvent::ProblemRaised {
                    key: "desired-state".into(),
                    reason: format!("{e} (running the last good desired state)"),
                });
                None
            }
        }
    }

    pub(crate) fn reload_desired(&mut self) {
        if self.server.is_some() {
            return;
        }
        if let Some(d) = self.load_desired() {
            self.reconcile(&d);
        }
    }

    /// First reconciliation after start: adopt what still runs from an earlier agent, clean up
    /// what is no longer wanted, start the rest.
    pub(crate) fn adopt_and_reconcile(&mut self) {
        let (desired, persisted) = match self.load_desired() {
            Some(d) => (d, true),
            None => (self.store.load_desired().unwrap_or_default(), false),
        };
        let specs = desired.validate(&self.defaults());
        let mut known = BTreeSet::new();
        for rec in self.store.load_records() {
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    warn!("ignoring workload record: {e}");
                    continue;
                }
            };
            known.insert(rec.name.clone());
            let spec = specs
                .iter()
                .filter_map(|s| s.as_ref().ok())
                .find(|s| s.name == rec.name);
            let alive = WorkloadKind::from_name(&rec.kind).is_some_and(|k| {
                drivers::still_running(&k, &rec.cgroup, rec.pid, rec.pid_start_ticks)
            });
            match spec {
                Some(spec) if alive && spec.fingerprint == rec.fingerprint => {
                    info!(workload = %rec.name, pid = rec.pid, "adopting the running workload");
                    self.adopt(spec.clone(), &rec);
                }
                _ => {
                    if alive {
                        info!(workload = %rec.name, "running workload is no longer desired as it is: stopping it");
                    }
                    // The driver undoes what it created (a pod's containers live in child
                    // cgroups that only `kube down` removes), then the cgroup goes.
                    let kind = WorkloadKind::from_name(&rec.kind).unwrap_or(WorkloadKind::Shell);
                    if let Err(e) = drivers::cleanup(&kind, &rec.cgroup) {
                        warn!(workload = %rec.name, "cleaning up: {e}");
                    }
                    let _ = self.store.remove_record(&rec.name);
                }
            }
        }
        // cgroups of ours without a record (e.g. an agent killed between start and record).
        for name in self.hierarchy.existing_workloads() {
            if !known.contains(&name) && !self.workloads.contains_key(&name) {
                warn!(workload = %name, "removing an orphaned workload cgroup");
                let cg = self.hierarchy.workload(&name);
                // No record says what it was: a plain cgroup, or a pod whose containers
                // keep child cgroups busy.
                if let Err(e) = drivers::cleanup(&WorkloadKind::Shell, &cg) {
                    if let Err(e2) = drivers::cleanup(&WorkloadKind::Pod, &cg) {
                        warn!(workload = %name, "{e}; as a pod: {e2}");
                    }
                }
            }
        }
        // With a server and nothing persisted yet, the first configuration is still to come.
        let applied = persisted || self.server.is_none();
        self.apply_specs(&desired, specs, applied);
    }

    fn adopt(&mut self, spec: WorkloadSpec, rec: &WorkloadRecord) {
        let mut shared = WorkloadMachine::new(spec.restart, spec.backoff);
        shared.restarts = rec.restarts;
        let mut cmds = Vec::new();
        let machine = workload::machine_in(shared, State::Running { pid: rec.pid }, &mut cmds);
        let name = spec.name.clone();
        let entry = Entry {
            kind: spec.kind.clone(),
            cgroup: rec.cgroup.clone(),
            spec: Some(spec),
            machine,
            lane: spawn_lane(),
            run: 1,
            retry_token: 0,
            adopted: Some((rec.pid, rec.pid_start_ticks)),
            started_at: Some(Instant::now()),
            oom_baseline: rec.oom_kills_at_start,
            usage: None,
            last_cpu: None,
            admitted_seq: self.next_seq(),
            notice: None,
            hold: Default::default(),
            cron_due: false,
            cron_next: None,
            cron_token: 0,
            profile_cpu_quota: None,
        };
        let kind = entry.kind.clone();
        let cgroup = entry.cgroup.clone();
        self.workloads.insert(name.clone(), entry);
        if kind == WorkloadKind::K8s {
            // No local process to sample: the driver watches the Deployment instead.
            if let Some(e) = self.workloads.get_mut(&name) {
                e.adopted = None;
            }
            let watch = move || match drivers::adopted_waiter(&kind, &cgroup) {
                Some(w) => w.wait(),
                None => drivers::RunEnd::default(),
            };
            let cg = self.hierarchy.workload(&name);
            if let Err(e) = spawn_waiter(self.tx.clone(), name.clone(), 1, watch, cg, u64::MAX) {
                warn!(workload = %name, "cannot watch the adopted workload: {e}");
            }
        }
        self.record_transition(
            format!("workload/{name}"),
            "-",
            "running",
            format!("adopted pid {}", rec.pid),
        );
    }

    pub(super) fn next_seq(&self) -> u64 {
        self.workloads
            .values()
            .map(|e| e.admitted_seq)
            .max()
            .unwrap_or(0)
            + 1
    }

    /// Converges the workloads to a desired state (apply only on change).
    pub(crate) fn reconcile(&mut self, desired: &DesiredState) {
        let specs = desired.validate(&self.defaults());
        self.apply_specs(desired, specs, true);
    }

    fn apply_specs(
        &mut self,
        desired: &DesiredState,
        specs: Vec<Result<WorkloadSpec, SpecError>>,
        applied: bool,
    ) {
        // Persisted off the controller task (fsync), in order, on the store's own lane.
        let (store, copy) = (self.store.clone(), desired.clone());
        let _ = self.persist.try_send(Box::new(move || {
            if let Err(e) = store.save_desired(&copy) {
                error!("cannot persist the desired state: {e}");
            }
        }));
        if desired.secrets != *self.secrets {
            // Secrets no longer listed are removed now; listed ones are (re)written here and,
            // to be sure they exist when a pod is created, again by each pod start.
            let had_secrets = !self.secrets.is_empty();
            self.secrets = Arc::new(desired.secrets.clone());
            let uses_pods = had_secrets
                || !self.secrets.is_empty()
                || self.workloads.values().any(|e| e.kind == WorkloadKind::Pod);
            if uses_pods {
                let copy = self.secrets.clone();
                let _ =
                    self.persist.try_send(Box::new(move || {
                        match drivers::podman::secrets::sync(&copy) {
                            Ok(r) => {
                                for (name, why) in r.failed {
                                    error!(secret = %name, "cannot write the podman secret: {why}");
                                }
                            }
                            Err(e) => error!("syncing podman secrets: {e}"),
                        }
                    }));
            }
        }
        let profiles: Vec<crate::flotta::messages::DeviceProfile> = desired
            .extra
            .get("configuration")
            .and_then(|c| c.get("profiles"))
            .and_then(|p| serde_json::from_value(p.clone()).ok())
            .unwrap_or_default();
        self.set_profiles(crate::profiles::DeviceProfiles::from_config(&profiles));
        let wanted: BTreeSet<String> = desired.workloads.iter().map(|w| w.name.clone()).collect();
        let present: Vec<String> = self.workloads.keys().cloned().collect();
        for name in present {
            if !wanted.contains(&name) {
                self.workload_event(&name, WorkloadEvent::Remove);
            }
        }
        for (i, result) in specs.into_iter().enumerate() {
            match result {
                Ok(spec) => self.apply_spec(spec),
                Err(e) => {
                    let name = desired.workloads[i].name.clone();
                    error!("rejected: {e}");
                    self.report(true, "InvalidWorkload".into(), e.to_string());
                    self.apply_invalid(&name, e);
                }
            }
        }
        if applied {
            self.device_event(DeviceEvent::DesiredStateApplied);
        }
    }

    fn new_entry(
        &mut self,
        spec: Option<WorkloadSpec>,
        name: &str,
        kind: WorkloadKind,
        state: State,
    ) -> Vec<WorkloadCommand> {
        let (restart, backoff) = spec
            .as_ref()
            .map_or((Default::default(), self.defaults().backoff), |s| {
                (s.restart, s.backoff)
            });
        let mut cmds = Vec::new();
        let machine =
            workload::machine_in(WorkloadMachine::new(restart, backoff), state, &mut cmds);
        let entry = Entry {
            spec,
            kind,
            machine,
            cgroup: self.hierarchy.workload(name),
            lane: spawn_lane(),
            run: 0,
            retry_token: 0,
            adopted: None,
            started_at: None,
            oom_baseline: 0,
            usage: None,
            last_cpu: None,
            admitted_seq: self.next_seq(),
            notice: None,
            hold: Default::default(),
            cron_due: false,
            cron_next: None,
            cron_token: 0,
            profile_cpu_quota: None,
        };
        self.workloads.insert(name.to_string(), entry);
        cmds
    }

    fn apply_spec(&mut self, spec: WorkloadSpec) {
        let name = spec.name.clone();
        match self.workloads.get_mut(&name) {
            None => {
                let kind = spec.kind.clone();
                self.new_entry(
                    Some(spec),
                    &name,
                    kind,
                    State::Pending {
                        reason: "waiting for admission".into(),
                    },
                );
                self.record_transition(
                    format!("workload/{name}"),
                    "-",
                    "pending",
                    "added to the desired state".into(),
                );
                self.schedule_cron(&name);
                self.admit_pending();
            }
            Some(e) => {
                let changed = e.spec.as_ref().map(|s| &s.fingerprint) != Some(&spec.fingerprint);
                let rescheduled = e.spec.as_ref().map(|s| &s.scheduling) != Some(&spec.scheduling);
                if !changed && !rescheduled {
                    return;
                }
                e.kind = spec.kind.clone();
                e.spec = Some(spec);
                if rescheduled {
                    self.schedule_cron(&name);
                }
                if changed {
                    self.workload_event(&name, WorkloadEvent::Update);
                }
                self.admit_pending();
            }
        }
    }

    fn apply_invalid(&mut self, name: &str, err: SpecError) {
        let reason = format!("{}: {}", err.field, err.why);
        match self.workloads.get_mut(name) {
            None => {
                self.new_entry(
                    None,
                    name,
                    WorkloadKind::Shell,
                    State::Failed {
                        reason: format!("invalid spec: {reason}"),
                    },
                );
                self.record_transition(
                    format!("workload/{name}"),
                    "-",
                    "failed",
                    format!("invalid spec: {reason}"),
                );
                self.update_problem(name);
            }
            Some(e) => {
                if e.spec.is_none() && e.machine.state().reason().ends_with(&reason) {
                    return;
                }
                e.spec = None;
                self.workload_event(name, WorkloadEvent::Invalidate { reason });
            }
        }
    }

    /// Feeds one event to a workload machine and executes its commands.
    pub(crate) fn workload_event(&mut self, name: &str, event: WorkloadEvent) {
        let Some(e) = self.workloads.get_mut(name) else {
            return;
        };
        let before = e.machine.state().name();
        let mut cmds = Vec::new();
        e.machine.handle_with_context(&event, &mut cmds);
        let after = e.machine.state().name();
        let reason = e.machine.state().reason();
        if let State::Running { .. } = e.machine.state() {
            if before != "running" {
                e.started_at = Some(Instant::now());
                if let Some(a) = &mut self.alerts {
                    a.watch_workload(name, &e.cgroup);
                }
            }
        }
        if before != after {
            self.record_transition(format!("workload/{name}"), before, after, reason);
        }
        for c in cmds {
            self.exec(name, c);
        }
        self.update_problem(name);
        if after == "removed" {
            self.workloads.remove(name);
            if let Some(a) = &mut self.alerts {
                a.forget(name);
            }
            self.device_event(DeviceEvent::ProblemCleared {
                key: format!("workload/{name}"),
            });
        } else if after == "pending" && before != "pending" {
            self.admit_pending();
        }
        // Resources freed: what waits for room may fit now.
        let holding = ["starting", "running", "backoff", "stopping"];
        if holding.contains(&before) && !holding.contains(&after) {
            self.admit_pending();
        }
    }

    /// A failed workload is a device problem until it leaves that state.
    fn update_problem(&mut self, name: &str) {
        let Some(e) = self.workloads.get(name) else {
            return;
        };
        let key = format!("workload/{name}");
        let event = match e.machine.state() {
            State::Failed { reason } => DeviceEvent::ProblemRaised {
                key,
                reason: format!("workload {name} failed: {reason}"),
            },
            _ => DeviceEvent::ProblemCleared { key },
        };
        self.device_event(event);
    }

    fn exec(&mut self, name: &str, cmd: WorkloadCommand) {
        let store = self.store.clone();
        let secrets = self.secrets.clone();
        let tx = self.tx.clone();
        let grace = self.settings.stop_timeout;
        let Some(e) = self.workloads.get_mut(name) else {
            return;
        };
        match cmd {
            WorkloadCommand::Start => {
                e.run += 1;
                e.adopted = None;
                e.usage = None;
                e.last_cpu = None;
                let Some(mut spec) = e.spec.clone() else {
                    return;
                };
                // An active profile condition's cpu quota lowers the cpu limit of this run.
                spec.limits = Self::effective_limits(&spec, e.profile_cpu_quota);
                let op = start_op(
                    spec,
                    e.cgroup.clone(),
                    store,
                    tx,
                    e.run,
                    e.machine.inner().restarts,
                    secrets,
                );
                let _ = e.lane.try_send(op);
            }
            WorkloadCommand::Stop => {
                let (cg, run, n, kind) =
                    (e.cgroup.clone(), e.run, name.to_string(), e.kind.clone());
                let _ = e.lane.try_send(Box::new(move || {
                    if let Err(err) = drivers::stop(&kind, &cg, grace) {
                        error!(workload = %n, "stopping: {err}");
                    }
                    let _ = tx.send_blocking(Event::Workload {
                        name: n,
                        run,
                        event: WorkloadEvent::StopCompleted,
                    });
                }));
            }
            WorkloadCommand::Cleanup => {
                let (cg, n, kind) = (e.cgroup.clone(), name.to_string(), e.kind.clone());
                let _ = e.lane.try_send(Box::new(move || {
                    if let Err(err) = drivers::cleanup(&kind, &cg) {
                        error!(workload = %n, "removing its cgroup: {err}");
                    }
                    if let Err(err) = store.remove_record(&n) {
                        error!(workload = %n, "removing its record: {err}");
                    }
                }));
            }
            WorkloadCommand::ScheduleRetry(delay) => {
                e.retry_token += 1;
                let token = e.retry_token;
                super::sources::after(
                    tx,
                    delay,
                    Event::RetryDue {
                        name: name.to_string(),
                        token,
                    },
                );
            }
            WorkloadCommand::Report {
                warn,
                reason,
                message,
            } => self.report(warn, reason, format!("workload {name}: {message}")),
        }
    }

    /// The limits a run gets: the spec's, with an active profile condition's cpu quota.
    pub(crate) fn effective_limits(
        spec: &WorkloadSpec,
        quota: Option<u64>,
    ) -> crate::cgroup::Limits {
        let mut l = spec.limits;
        if let Some(q) = quota {
            l.cpu_millicores = Some(l.cpu_millicores.map_or(q, |c| c.min(q)));
        }
        l
    }

    /// Applies a new profile cpu quota to a running workload's cgroup, in place.
    pub(crate) fn set_profile_quota(&mut self, name: &str, quota: Option<u64>) {
        let Some(e) = self.workloads.get_mut(name) else {
            return;
        };
        e.profile_cpu_quota = quota;
        let Some(spec) = e.spec.as_ref() else {
            return;
        };
        let limits = Self::effective_limits(spec, quota);
        let (cg, n) = (e.cgroup.clone(), name.to_string());
        let _ = e.lane.try_send(Box::new(move || {
            if let Err(err) = cg.apply(&limits) {
                error!(workload = %n, "applying the profile's cpu quota: {err}");
            }
        }));
    }

    /// An adopted process (no waiter) was found gone by the sampler.
    pub(crate) fn adopted_exited(&mut self, name: &str) {
        let Some(e) = self.workloads.get_mut(name) else {
            return;
        };
        if e.adopted.take().is_none() {
            return;
        }
        let oom = e.cgroup.oom_kills() > e.oom_baseline;
        let ran_for = e.started_at.map_or(Duration::ZERO, |t| t.elapsed());
        self.workload_event(
            name,
            WorkloadEvent::Exited(ExitInfo {
                code: None,
                signal: None,
                oom_killed: oom,
                ran_for,
            }),
        );
    }

    /// Every workload with a cgroup (counters stay readable between runs, e.g. the pids.events
    /// of a fork bomb that died before the next tick).
    pub(crate) fn sample_targets(&self) -> Vec<Target> {
        self.workloads
            .iter()
            .filter(|(_, e)| {
                e.spec.is_some() && !matches!(e.machine.state(), State::Pending { .. })
            })
            .map(|(n, e)| Target {
                name: n.clone(),
                cgroup: e.cgroup.clone(),
                adopted: e.adopted,
            })
            .collect()
    }

    /// Over budget: evict the lowest-priority running workload, newest first among equals.
    /// A starting one counts as running: its process may already be allocating before the
    /// driver has reported it started (seen: the breach came first, and a higher priority was
    /// evicted in its place).
    pub(crate) fn shed_load(&mut self) {
        let victim = self
            .workloads
            .iter()
            .filter(|(_, e)| {
                matches!(
                    e.machine.state(),
                    State::Running { .. } | State::Starting {}
                )
            })
            .min_by_key(|(_, e)| {
                (
                    e.spec.as_ref().map_or(0, |s| s.priority),
                    std::cmp::Reverse(e.admitted_seq),
                )
            })
            .map(|(n, _)| n.clone());
        match victim {
            Some(name) => {
                let (mem, cpu) = self.used;
                let budget = self.budget();
                let reason = format!(
                    "device over budget (memory {} of {}, cpu {cpu}m of {}m): lowest priority",
                    crate::units::Bytes(mem),
                    crate::units::Bytes(budget.memory_bytes),
                    budget.cpu_millicores
                );
                if let Some(e) = self.workloads.get_mut(&name) {
                    e.hold = super::admission::Hold::Budget;
                }
                self.workload_event(&name, WorkloadEvent::Evict { reason });
            }
            None => warn!("over budget, but no running workload is left to evict"),
        }
    }

    /// The budget recovered: evicted workloads may be admitted again (admission decides).
    pub(crate) fn readmit(&mut self) {
        for e in self.workloads.values_mut() {
            if e.hold == super::admission::Hold::Budget {
                e.hold = super::admission::Hold::None;
            }
        }
        self.admit_pending();
    }
}

/// A thread that waits for the end of one run and reports it as `Exited`.
fn spawn_waiter(
    tx: Sender<Event>,
    name: String,
    run: u64,
    waiter: impl FnOnce() -> drivers::RunEnd + Send + 'static,
    cgroup: WorkloadCgroup,
    oom_baseline: u64,
) -> std::io::Result<()> {
    let t0 = Instant::now();
    std::thread::Builder::new()
        .name(format!("wait-{name}"))
        .stack_size(64 * 1024)
        .spawn(move || {
            let end = waiter();
            let oom = cgroup.oom_kills() > oom_baseline || end.oom_killed;
            let _ = tx.send_blocking(Event::Workload {
                name,
                run,
                event: WorkloadEvent::Exited(ExitInfo {
                    code: end.code,
                    signal: end.signal,
                    oom_killed: oom,
                    ran_for: t0.elapsed(),
                }),
            });
        })
        .map(|_| ())
}

/// The blocking start of one run: cgroup, process, record, then a waiter for its exit.
fn start_op(
    spec: WorkloadSpec,
    cgroup: WorkloadCgroup,
    store: Store,
    tx: Sender<Event>,
    run: u64,
    restarts: u32,
    secrets: Arc<Vec<DesiredSecret>>,
) -> LaneOp {
    Box::new(move || {
        let name = spec.name.clone();
        let send = |event| {
            let _ = tx.send_blocking(Event::Workload {
                name: name.clone(),
                run,
                event,
            });
        };
        let started = match drivers::start(&spec, &cgroup, &store.log_path(&name), &secrets) {
            Ok(s) => s,
            Err(e) => {
                return send(WorkloadEvent::StartFailed {
                    error: e.to_string(),
                })
            }
        };
        let record = WorkloadRecord {
            name: name.clone(),
            kind: spec.kind.name().into(),
            fingerprint: spec.fingerprint.clone(),
            cgroup: cgroup.clone(),
            pid: started.pid,
            pid_start_ticks: started.start_ticks,
            started_at_unix: unix_now(),
            restarts,
            oom_kills_at_start: started.oom_kills_at_start,
        };
        if let Err(e) = store.save_record(&record) {
            // Not fatal for the run; only adoption after an agent restart needs it.
            error!(workload = %name, "cannot persist its record: {e}");
        }
        send(WorkloadEvent::Started { pid: started.pid });
        if let Some(notice) = started.notice.clone() {
            let _ = tx.send_blocking(Event::Notice {
                name: name.clone(),
                run,
                message: notice,
            });
        }
        let (pid, ticks) = (started.pid, started.start_ticks);
        let baseline = started.oom_kills_at_start;
        let spawned = spawn_waiter(
            tx.clone(),
            name.clone(),
            run,
            move || started.waiter.wait(),
            cgroup,
            baseline,
        );
        if let Err(e) = spawned {
            warn!(workload = %name, "no waiter thread ({e}): watching pid {pid} by sampling");
            let _ = tx.send_blocking(Event::Unwatched {
                name,
                run,
                pid,
                ticks,
            });
        }
    })
}
