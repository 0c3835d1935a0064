//! The controller's workload side: the desired workloads, one entry (and machine) per actual
//! workload, and convergence between the two.
//!
//! Convergence is level-triggered: whenever the desired state changes for a name, and after
//! every transition of its machine, the name's desired and actual state are compared again
//! ([`Workloads::converge`]), so no change is lost to timing (a workload desired again while
//! its removal still stops it starts again once stopped). Applying a desired state touches
//! only the names whose spec changed: O(n log n) in its workloads; admission runs once per
//! batch of changes (the controller's drain), not once per workload.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, info, warn};

use super::admission::{self, counted_requests, Candidate, Decision, Hold, Running};
use super::effects::{DriverOp, Effect, Write};
use super::generation::Generation;
use super::resources::{ProfilesState, Used};
use super::{unix_now, Ctx, Event, Internal, RunOutcome};
use crate::budget::Budget;
use crate::cgroup::{Hierarchy, WorkloadCgroup};
use crate::config::Settings;
use crate::drivers::{Placement, Started};
use crate::machines::device::ProblemKey;
use crate::machines::workload::{
    self, AfterStop, Context, ExitInfo, State, WorkloadCommand, WorkloadEvent, WorkloadMachine,
};
use crate::sampler::{self, Report, Target};
use crate::status::Usage;
use crate::store::{Store, StoreError, WorkloadRecord};
use crate::units::Bytes;
use crate::workload::{
    BackoffPolicy, DesiredSecret, Rejection, SpecDefaults, ValidatedDesired, WorkloadKind,
    WorkloadName, WorkloadSpec,
};

/// A run's main process: its pid, and its start time in clock ticks since boot, which with
/// the pid names one process for good (a recycled pid has another start time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MainProcess {
    pub pid: i32,
    pub start_ticks: u64,
}

impl MainProcess {
    fn of(s: &Started) -> Option<MainProcess> {
        s.pid.map(|pid| MainProcess {
            pid,
            start_ticks: s.start_ticks,
        })
    }
}

/// Everything the controller holds for one actual workload.
pub struct Entry {
    /// The spec it runs (or will run); `None` for a run adopted while no valid desired state
    /// is known: kept running, never restarted, until a desired state says what it is.
    pub spec: Option<WorkloadSpec>,
    /// Kind of the run (what stop and cleanup must undo).
    pub kind: WorkloadKind,
    /// Fingerprint of the spec of the current run.
    pub fingerprint: String,
    pub machine: workload::Machine,
    pub cgroup: WorkloadCgroup,
    /// The current run: driver results and watches of earlier runs are stale.
    pub run: Generation,
    retry: Generation,
    cron: Generation,
    /// Main process of the current run.
    pub process: Option<MainProcess>,
    pub started_at: Option<Instant>,
    started_unix: u64,
    pub oom_baseline: u64,
    pub usage: Option<Usage>,
    last_cpu: Option<(u64, Instant)>,
    /// Order of arrival (older first among equal priorities).
    pub seq: u64,
    /// What the driver said the operator must know about the current run.
    pub notice: Option<String>,
    /// The desired state's new spec for it was refused: it runs the last good one.
    pub update_rejected: Option<String>,
    /// Why an evicted workload waits (budget recovery, or its profiles).
    pub hold: Hold,
    /// When the budget chose it as a victim (the sample that decided): its eviction is in
    /// progress until its memory is released, or for at most [`Workloads::victim_bound`].
    pub evicted_for_budget_at: Option<Instant>,
    /// A cron workload's run is due (consumed by admission).
    pub cron_due: bool,
    pub cron_next: Option<SystemTime>,
    /// The cpu limit an active profile condition imposes (PROTOCOL §7 workload profiles).
    pub profile_cpu_quota: Option<u64>,
    /// The uid of its processes, allocated from WORKLOAD_UIDS (shell workloads without
    /// `user:`).
    pub uid: Option<u32>,
    /// Adopted from an earlier agent (its process is no child of this one).
    pub adopted: bool,
}

impl Entry {
    /// A workload entry with no run yet.
    fn new(
        spec: Option<WorkloadSpec>,
        kind: WorkloadKind,
        fingerprint: String,
        machine: workload::Machine,
        cgroup: WorkloadCgroup,
        seq: u64,
        uid: Option<u32>,
    ) -> Entry {
        Entry {
            spec,
            kind,
            fingerprint,
            machine,
            cgroup,
            run: Generation::default(),
            retry: Generation::default(),
            cron: Generation::default(),
            process: None,
            started_at: None,
            started_unix: 0,
            oom_baseline: 0,
            usage: None,
            last_cpu: None,
            seq,
            notice: None,
            update_rejected: None,
            hold: Hold::None,
            evicted_for_budget_at: None,
            cron_due: false,
            cron_next: None,
            profile_cpu_quota: None,
            uid,
            adopted: false,
        }
    }

    fn placement(&self, name: &WorkloadName) -> Placement {
        Placement {
            name: name.clone(),
            kind: self.kind.clone(),
            cgroup: self.cgroup.clone(),
        }
    }

    fn priority(&self) -> i32 {
        self.spec.as_ref().map_or(0, |s| s.priority)
    }
}

/// Agent-wide defaults every spec falls back to (from the settings; DEFAULT_LIMITS' shares
/// of the budget resolved against `budget`).
pub fn spec_defaults(settings: &Settings, budget: &Budget) -> SpecDefaults {
    SpecDefaults {
        default_limits: settings
            .default_limits
            .resolve(budget.memory_bytes, budget.cpu_millicores),
        workload_user: settings.workload_user.clone(),
        backoff: BackoffPolicy {
            initial: settings.restart_backoff_initial,
            max: settings.restart_backoff_max,
            multiplier: 2.0,
            max_failures: settings.restart_max_failures,
            reset_after: Duration::from_secs(60).max(settings.restart_backoff_max),
        },
    }
}

pub struct Workloads {
    entries: BTreeMap<WorkloadName, Entry>,
    /// The desired workloads by name; `None` until a valid desired state is known (then
    /// nothing is stopped or started: what was adopted keeps running).
    desired: Option<BTreeMap<WorkloadName, WorkloadSpec>>,
    rejected: Vec<Rejection>,
    /// Workloads past MAX_WORKLOADS: how many, the first names.
    excess: (usize, Vec<String>),
    /// Records whose adoption is under way (their names start nothing meanwhile).
    adopting: BTreeMap<WorkloadName, WorkloadRecord>,
    secrets: Arc<Vec<DesiredSecret>>,
    seq: u64,
    hierarchy: Hierarchy,
    store: Store,
    stop_timeout: Duration,
    uids: Option<(u32, u32)>,
    /// The uid given last (see `free_uid`).
    last_uid: Option<u32>,
    /// The desired k8s workloads (name, manifest) last given to the k8s driver.
    k8s_desired: Option<Vec<(String, String)>>,
    /// Evictions decided for the budget since start (profile stops are not evictions).
    pub budget_evictions: u64,
}

impl Workloads {
    pub fn new(settings: &Settings, hierarchy: Hierarchy, store: Store) -> Workloads {
        Workloads {
            entries: BTreeMap::new(),
            desired: None,
            rejected: Vec::new(),
            excess: (0, Vec::new()),
            adopting: BTreeMap::new(),
            secrets: Arc::default(),
            seq: 0,
            hierarchy,
            store,
            stop_timeout: settings.stop_timeout,
            uids: settings.workload_uids,
            last_uid: None,
            budget_evictions: 0,
            k8s_desired: None,
        }
    }

    pub fn reconfigure(&mut self, settings: &Settings) {
        self.stop_timeout = settings.stop_timeout;
        self.uids = settings.workload_uids;
    }

    pub fn entries(&self) -> &BTreeMap<WorkloadName, Entry> {
        &self.entries
    }

    pub fn rejected(&self) -> &[Rejection] {
        &self.rejected
    }

    pub fn excess(&self) -> &(usize, Vec<String>) {
        &self.excess
    }

    /// The device profiles the desired workloads define themselves (their profiles
    /// annotation).
    pub fn inline_profiles(&self) -> Vec<crate::flotta::messages::DeviceProfile> {
        self.desired
            .iter()
            .flat_map(|d| d.values())
            .flat_map(|s| s.scheduling.inline_profiles.iter().cloned())
            .collect()
    }

    pub fn desired_known(&self) -> bool {
        self.desired.is_some()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn secrets(&self) -> Arc<Vec<DesiredSecret>> {
        self.secrets.clone()
    }

    // ---- the desired state --------------------------------------------------------------

    /// Takes in a validated desired state: only the names whose spec changed are converged.
    pub fn apply(&mut self, v: ValidatedDesired, cx: &mut Ctx) {
        let ValidatedDesired {
            specs,
            rejected,
            excess,
            excess_names,
            secrets,
            profiles: _,
        } = v;
        self.sync_secrets(secrets, cx);
        // The desired order is the order of arrival (older first among equal priorities).
        let order: Vec<WorkloadName> = specs.iter().map(|s| s.name.clone()).collect();
        let mut new: BTreeMap<WorkloadName, WorkloadSpec> =
            specs.into_iter().map(|s| (s.name.clone(), s)).collect();
        self.report_notices(&new, cx);
        let refused = self.keep_last_good(&rejected, &mut new, cx);
        for (name, e) in self.entries.iter_mut() {
            if !refused.contains(name) && e.update_rejected.take().is_some() {
                cx.push(Internal::Converge(name.clone()));
            }
        }
        self.note_rejections(&rejected, refused.len(), excess, excess_names, cx);
        self.rejected = rejected;

        let first = self.desired.is_none();
        let k8s: Vec<(String, String)> = new
            .values()
            .filter(|s| s.kind == WorkloadKind::K8s)
            .filter_map(|s| Some((s.name.to_string(), s.pod.as_ref()?.manifest.clone())))
            .collect();
        // The cluster is pruned at the first desired state and whenever its k8s workloads
        // change; the same ones again ask nothing of it.
        if self.k8s_desired.as_ref() != Some(&k8s) {
            self.k8s_desired = Some(k8s.clone());
            cx.fx.run(Effect::PruneK8s(k8s));
        }
        let old = self.desired.replace(new);
        let desired = self.desired.as_ref();
        let gone = old
            .as_ref()
            .map(|o| {
                o.keys()
                    .filter(|n| !desired.is_some_and(|d| d.contains_key(*n)))
            })
            .into_iter()
            .flatten();
        // (A refused name is never among the valid ones: `order` and `refused` are disjoint.)
        for name in order.iter().chain(refused.iter()).chain(gone) {
            let before = old.as_ref().and_then(|d| d.get(name));
            let after = desired.and_then(|d| d.get(name));
            let same = match (before, after) {
                // Limits can move alone: DEFAULT_LIMITS changed by a reload.
                (Some(a), Some(b)) => {
                    a.fingerprint == b.fingerprint
                        && a.scheduling == b.scheduling
                        && a.limits == b.limits
                }
                (None, None) => true,
                _ => false,
            };
            if !same {
                cx.push(Internal::Converge(name.clone()));
            }
        }
        if first {
            // Entries adopted before any desired state was known: now it says what they are.
            for name in self.entries.keys() {
                cx.push(Internal::Converge(name.clone()));
            }
        }
    }

    /// A new notice of a workload (a field overriding its annotation) becomes an event.
    fn report_notices(&self, new: &BTreeMap<WorkloadName, WorkloadSpec>, cx: &mut Ctx) {
        for (name, spec) in new {
            let before = self.desired.as_ref().and_then(|d| d.get(name));
            for n in &spec.notices {
                if !before.is_some_and(|b| b.notices.contains(n)) {
                    cx.report(
                        true,
                        "AnnotationOverridden",
                        format!("workload {name}: {n}"),
                    );
                }
            }
        }
    }

    /// Secrets no longer listed are removed now; listed ones are (re)written here and, to be
    /// sure they exist when a pod is created, again by each pod start.
    fn sync_secrets(&mut self, secrets: Vec<DesiredSecret>, cx: &mut Ctx) {
        if secrets != *self.secrets {
            let had = !self.secrets.is_empty();
            self.secrets = Arc::new(secrets);
            let pods = had
                || !self.secrets.is_empty()
                || self.entries.values().any(|e| e.kind == WorkloadKind::Pod);
            if pods {
                cx.push(Internal::Persist(Write::SyncSecrets(self.secrets.clone())));
            }
        }
    }

    /// A workload whose new spec is refused keeps running the last good one: puts it back
    /// into `new` and returns the names so kept.
    fn keep_last_good(
        &mut self,
        rejected: &[Rejection],
        new: &mut BTreeMap<WorkloadName, WorkloadSpec>,
        cx: &mut Ctx,
    ) -> BTreeSet<WorkloadName> {
        let mut refused = BTreeSet::new();
        for r in rejected {
            let Some(name) = &r.name else { continue };
            let last_good = self
                .desired
                .as_ref()
                .and_then(|d| d.get(name))
                .or_else(|| self.entries.get(name).and_then(|e| e.spec.as_ref()));
            if let Some(good) = last_good {
                new.insert(name.clone(), good.clone());
                refused.insert(name.clone());
                let why = format!("{}: {}", r.error.field, r.error.why);
                if let Some(e) = self.entries.get_mut(name) {
                    if e.update_rejected.as_deref() != Some(&why) {
                        cx.problem(
                        ProblemKey::Workload(name.to_string()),
                        Some(format!(
                            "workload {name}: its new spec is refused ({why}); running the last good one"
                        )),
                    );
                    }
                    e.update_rejected = Some(why);
                }
            }
        }
        refused
    }

    /// Reports new rejections once (not again on every identical desired state).
    fn note_rejections(
        &mut self,
        rejected: &[Rejection],
        updates_refused: usize,
        excess: usize,
        excess_names: Vec<String>,
        cx: &mut Ctx,
    ) {
        let known: BTreeSet<String> = self.rejected.iter().map(|r| r.error.to_string()).collect();
        for r in rejected {
            let text = r.error.to_string();
            if !known.contains(&text) {
                cx.report(true, "InvalidWorkload", format!("refused: {text}"));
            }
        }
        let mut problems = Vec::new();
        // Refused updates of running workloads are their own workloads' problems.
        let invalid = rejected.len().saturating_sub(updates_refused);
        if invalid > 0 {
            problems.push(format!(
                "{invalid} workload(s) of the desired state refused (see status)"
            ));
        }
        if excess > 0 {
            problems.push(format!(
                "{excess} workload(s) past MAX_WORKLOADS refused unread (first: {})",
                excess_names.join(", ")
            ));
            if self.excess.0 != excess {
                cx.report(
                    true,
                    "TooManyWorkloads",
                    format!("{excess} workloads over MAX_WORKLOADS refused"),
                );
            }
        }
        self.excess = (excess, excess_names);
        cx.problem(
            ProblemKey::Workloads,
            (!problems.is_empty()).then(|| problems.join("; ")),
        );
    }

    /// The server disconnected the device: nothing is desired any more.
    pub fn wipe(&mut self, cx: &mut Ctx) {
        self.desired = Some(BTreeMap::new());
        self.rejected.clear();
        self.excess = (0, Vec::new());
        for name in self.entries.keys() {
            cx.push(Internal::Converge(name.clone()));
        }
    }

    /// Compares one name's desired and actual state and acts on the difference.
    pub fn converge(&mut self, name: &WorkloadName, cx: &mut Ctx) {
        let Some(desired) = self.desired.as_ref() else {
            return;
        };
        let want = desired.get(name).cloned();
        let Some(e) = self.entries.get_mut(name) else {
            if let Some(spec) = want {
                if !self.adopting.contains_key(name) {
                    self.create(spec, cx);
                }
            }
            return;
        };
        let removing = matches!(
            e.machine.state(),
            State::Stopping {
                after: workload::AfterStop::Remove
            }
        );
        let Some(spec) = want else {
            if !removing && !matches!(e.machine.state(), State::Removed {}) {
                self.feed(name, WorkloadEvent::Remove, cx);
            }
            return;
        };
        let rescheduled = e.spec.as_ref().map(|s| &s.scheduling) != Some(&spec.scheduling);
        let changed = spec.fingerprint != e.fingerprint;
        if !e.machine.state().is_up() && !removing {
            e.kind = spec.kind.clone();
        }
        let same_spec = e.spec.as_ref() == Some(&spec);
        // Limits that moved without the spec's fingerprint (DEFAULT_LIMITS changed by a reload,
        // or first given to a run adopted from an older agent) are applied in place.
        let limits_moved = !changed
            && e.kind != WorkloadKind::K8s
            && e.machine.state().is_up()
            && e.spec.as_ref().map(|s| s.limits) != Some(spec.limits);
        if limits_moved {
            cx.fx.run(Effect::Driver {
                name: name.clone(),
                gen: e.run,
                op: DriverOp::SetLimits {
                    cgroup: e.cgroup.clone(),
                    limits: admission::effective_limits(&spec, e.profile_cpu_quota),
                },
            });
        }
        e.spec = Some(spec);
        if rescheduled {
            self.schedule_cron(name, cx);
        }
        if changed || removing {
            self.feed(name, WorkloadEvent::Update, cx);
        }
        if !same_spec {
            *cx.admission_due = true;
        }
    }

    fn create(&mut self, spec: WorkloadSpec, cx: &mut Ctx) {
        let name = spec.name.clone();
        let uid = self.wants_uid(&spec).then(|| self.free_uid()).flatten();
        if self.wants_uid(&spec) && uid.is_none() {
            warn!(workload = %name, "WORKLOAD_UIDS is exhausted: it runs as root");
        }
        let mut out = Context::default();
        let machine = workload::machine_in(
            WorkloadMachine::new(spec.restart, spec.backoff),
            State::waiting("waiting for admission".into()),
            &mut out,
        );
        self.seq += 1;
        let entry = Entry::new(
            None,
            spec.kind.clone(),
            spec.fingerprint.clone(),
            machine,
            self.hierarchy.workload(&name),
            self.seq,
            uid,
        );
        let entry = Entry {
            spec: Some(spec),
            ..entry
        };
        self.entries.insert(name.clone(), entry);
        cx.history.record(
            &format!("workload/{name}"),
            &crate::machines::Transition {
                from: "-",
                to: "pending",
                reason: "added to the desired state".into(),
            },
        );
        self.schedule_cron(&name, cx);
        *cx.admission_due = true;
    }

    /// Shell workloads without `user:` (and without WORKLOAD_USER) run as a uid of their own.
    fn wants_uid(&self, spec: &WorkloadSpec) -> bool {
        self.uids.is_some() && spec.shell.as_ref().is_some_and(|s| s.user.is_none())
    }

    /// The next uid of WORKLOAD_UIDS no workload has, after the one given last: a uid comes
    /// back only once the range has gone round, so what a removed workload left behind (files
    /// in /tmp, say) does not fall to the next workload at once.
    fn free_uid(&mut self) -> Option<u32> {
        let (lo, hi) = self.uids?;
        let used: BTreeSet<u32> = self
            .entries
            .values()
            .filter_map(|e| e.uid)
            .chain(self.adopting.values().filter_map(|r| r.uid))
            .collect();
        // After a restart, go on after the highest uid still in use.
        let last = self.last_uid.or_else(|| used.last().copied());
        let uid = next_free((lo, hi), last, &used)?;
        self.last_uid = Some(uid);
        Some(uid)
    }

    // ---- machines ------------------------------------------------------------------------

    /// Feeds one event to a workload machine and executes its commands.
    pub fn feed(&mut self, name: &WorkloadName, event: WorkloadEvent, cx: &mut Ctx) {
        let Some(e) = self.entries.get_mut(name) else {
            return;
        };
        let held_before = e.machine.state().holds_resources();
        let mut out = Context::default();
        e.machine.handle_with_context(&event, &mut out);
        let machine_name = format!("workload/{name}");
        for t in &out.transitions {
            cx.history.record(&machine_name, t);
        }
        if !out.transitions.is_empty() && e.machine.state().is_up() && e.started_at.is_none() {
            e.started_at = Some(Instant::now());
        }
        for c in out.commands {
            self.exec(name, c, cx);
        }
        let Some(e) = self.entries.get(name) else {
            return;
        };
        let state = e.machine.state();
        let problem = match state {
            State::Failed { reason } => Some(format!("workload {name} failed: {reason}")),
            _ => e.update_rejected.as_ref().map(|why| {
                format!(
                    "workload {name}: its new spec is refused ({why}); running the last good one"
                )
            }),
        };
        cx.problem(ProblemKey::Workload(name.to_string()), problem);
        if matches!(state, State::Removed {}) {
            self.entries.remove(name);
            cx.fx.run(Effect::Forget { name: name.clone() });
            cx.problem(ProblemKey::Workload(name.to_string()), None);
            *cx.admission_due = true;
        } else if held_before != state.holds_resources() || matches!(state, State::Pending { .. }) {
            *cx.admission_due = true;
        }
        if !out.transitions.is_empty() {
            cx.push(Internal::Converge(name.clone()));
        }
    }

    fn exec(&mut self, name: &WorkloadName, cmd: WorkloadCommand, cx: &mut Ctx) {
        let (store, secrets, grace) = (&self.store, self.secrets.clone(), self.stop_timeout);
        let Some(e) = self.entries.get_mut(name) else {
            return;
        };
        match cmd {
            WorkloadCommand::Start => {
                let gen = e.run.bump();
                e.process = None;
                e.started_at = None;
                e.usage = None;
                e.last_cpu = None;
                e.adopted = false;
                let Some(mut spec) = e.spec.clone() else {
                    return;
                };
                e.kind = spec.kind.clone();
                e.fingerprint = spec.fingerprint.clone();
                spec.limits = admission::effective_limits(&spec, e.profile_cpu_quota);
                cx.fx.run(Effect::Driver {
                    name: name.clone(),
                    gen,
                    op: DriverOp::Start {
                        spec: Box::new(spec),
                        cgroup: e.cgroup.clone(),
                        log: store.log_path(name),
                        uid: e.uid,
                        secrets,
                    },
                });
            }
            WorkloadCommand::Stop => cx.fx.run(Effect::Driver {
                name: name.clone(),
                gen: e.run,
                op: DriverOp::Stop {
                    at: e.placement(name),
                    grace,
                },
            }),
            WorkloadCommand::Cleanup => {
                cx.fx.run(Effect::Driver {
                    name: name.clone(),
                    gen: e.run,
                    op: DriverOp::Cleanup {
                        at: e.placement(name),
                        // Removed: a workload that is gone owns nothing, its output included
                        // (or a server renaming workloads would fill STATE_DIR, cap or not).
                        forget_output: true,
                    },
                });
                cx.push(Internal::Persist(Write::RemoveRecord(name.clone())));
            }
            WorkloadCommand::ScheduleRetry(delay) => {
                let gen = e.retry.bump();
                cx.after(
                    delay,
                    Event::RetryDue {
                        name: name.clone(),
                        gen,
                    },
                );
            }
            WorkloadCommand::Report {
                warn,
                reason,
                message,
            } => cx.report(warn, &reason, format!("workload {name}: {message}")),
        }
    }

    /// A driver result or a watch's news about one run.
    pub fn on_run(
        &mut self,
        name: &WorkloadName,
        gen: Generation,
        outcome: RunOutcome,
        cx: &mut Ctx,
    ) {
        if let RunOutcome::Adopted(started) = outcome {
            return self.adopted(name, started.map(|s| *s), cx);
        }
        let Some(e) = self.entries.get_mut(name) else {
            return;
        };
        if !e.run.is(gen) {
            debug!(workload = %name, run = %gen, "a result of an earlier run: dropped");
            return;
        }
        match outcome {
            RunOutcome::Started(s) => self.started(name, gen, s, cx),
            RunOutcome::StartFailed(error) => {
                self.feed(name, WorkloadEvent::StartFailed { error }, cx)
            }
            RunOutcome::Progress { ready, reason } => {
                self.feed(name, WorkloadEvent::Progress { ready, reason }, cx)
            }
            RunOutcome::Ended(end) => {
                let ran_for = e.started_at.map_or(Duration::ZERO, |t| t.elapsed());
                // A small read of the cgroup's own counter (kernfs, no I/O).
                let oom = e.cgroup.oom_kills() > e.oom_baseline || end.oom_killed;
                self.feed(
                    name,
                    WorkloadEvent::Exited(ExitInfo {
                        code: end.code,
                        signal: end.signal,
                        oom_killed: oom,
                        ran_for,
                    }),
                    cx,
                )
            }
            RunOutcome::Stopped => self.feed(name, WorkloadEvent::StopCompleted, cx),
            RunOutcome::CleanedUp(_) | RunOutcome::Adopted(_) => {}
        }
    }

    fn started(&mut self, name: &WorkloadName, gen: Generation, s: Started, cx: &mut Ctx) {
        let Some(e) = self.entries.get_mut(name) else {
            return;
        };
        e.process = MainProcess::of(&s);
        e.oom_baseline = s.oom_kills_at_start;
        e.started_unix = unix_now();
        if s.notice != e.notice {
            if let Some(n) = &s.notice {
                cx.report(true, "Notice", format!("workload {name}: {n}"));
            }
            e.notice = s.notice.clone();
        }
        let pid = s.pid;
        if pid.is_some() {
            cx.fx.run(Effect::WatchOom {
                name: name.clone(),
                cgroup: e.cgroup.clone(),
            });
        }
        cx.fx.run(Effect::Watch {
            name: name.clone(),
            gen,
            watch: s.watch,
        });
        if let Some(r) = self.record_of(name) {
            cx.push(Internal::Persist(Write::Record(r)));
        }
        let event = match pid {
            Some(_) => WorkloadEvent::Started { pid },
            None => WorkloadEvent::Progress {
                ready: false,
                reason: "applied; waiting for the cluster to run it".into(),
            },
        };
        self.feed(name, event, cx);
    }

    /// The record of a workload's current run (adoption after an agent restart needs it).
    pub fn record_of(&self, name: &WorkloadName) -> Option<WorkloadRecord> {
        let e = self.entries.get(name)?;
        if !e.machine.state().is_up() && !matches!(e.machine.state(), State::Starting { .. }) {
            return None;
        }
        Some(WorkloadRecord {
            name: name.clone(),
            kind: e.kind.clone(),
            fingerprint: e.fingerprint.clone(),
            pid: e.process.map(|p| p.pid),
            pid_start_ticks: e.process.map_or(0, |p| p.start_ticks),
            started_at_unix: e.started_unix,
            restarts: e.machine.inner().restarts,
            oom_kills_at_start: e.oom_baseline,
            uid: e.uid,
            restart: e.spec.as_ref().map(|s| s.restart),
            cgroup: serde_json::to_value(&e.cgroup).ok(),
        })
    }

    pub fn retry_due(&mut self, name: &WorkloadName, gen: Generation, cx: &mut Ctx) {
        if self.entries.get(name).is_some_and(|e| e.retry.is(gen)) {
            self.feed(name, WorkloadEvent::RetryDue, cx);
        }
    }

    // ---- adoption after an agent restart --------------------------------------------------

    /// Reads what an earlier agent left: every valid record is checked by its driver (on its
    /// lane); cgroups of ours without a record are emptied and removed.
    pub fn adopt_records(
        &mut self,
        records: Vec<Result<WorkloadRecord, StoreError>>,
        cx: &mut Ctx,
    ) {
        for rec in records {
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    warn!("ignoring a workload record: {e}");
                    continue;
                }
            };
            let name = rec.name.clone();
            let at = Placement {
                name: name.clone(),
                kind: rec.kind.clone(),
                cgroup: self.hierarchy.workload(&name),
            };
            self.adopting.insert(name.clone(), rec.clone());
            cx.fx.run(Effect::Driver {
                name,
                gen: Generation::default(),
                op: DriverOp::Adopt { at, record: rec },
            });
        }
        for found in self.hierarchy.existing_workloads() {
            match found {
                Ok(name) if !self.adopting.contains_key(&name) => {
                    warn!(workload = %name, "removing a workload cgroup that no record explains");
                    let at = Placement {
                        name: name.clone(),
                        // No record says what it was: a pod's cleanup also removes a plain
                        // cgroup (and the pod's children a plain removal could not).
                        kind: WorkloadKind::Pod,
                        cgroup: self.hierarchy.workload(&name),
                    };
                    cx.fx.run(Effect::Driver {
                        name,
                        gen: Generation::default(),
                        op: DriverOp::Cleanup {
                            at,
                            forget_output: false,
                        },
                    });
                }
                Ok(_) => {}
                Err(path) => warn!("{path}: not a workload name: left alone"),
            }
        }
    }

    fn adopted(&mut self, name: &WorkloadName, started: Option<Started>, cx: &mut Ctx) {
        let Some(rec) = self.adopting.remove(name) else {
            return;
        };
        let Some(s) = started else {
            info!(workload = %name, "its recorded run is gone: cleaning up what is left");
            let at = Placement {
                name: name.clone(),
                kind: rec.kind.clone(),
                cgroup: self.hierarchy.workload(name),
            };
            cx.fx.run(Effect::Driver {
                name: name.clone(),
                gen: Generation::default(),
                op: DriverOp::Cleanup {
                    at,
                    forget_output: false,
                },
            });
            cx.push(Internal::Persist(Write::RemoveRecord(name.clone())));
            cx.push(Internal::Converge(name.clone()));
            return;
        };
        let spec = self.desired.as_ref().and_then(|d| d.get(name)).cloned();
        let (restart, backoff) = spec.as_ref().map_or(
            (rec.restart.unwrap_or_default(), BackoffPolicy::default()),
            |s| (s.restart, s.backoff),
        );
        let mut shared = WorkloadMachine::new(restart, backoff);
        shared.restarts = rec.restarts;
        let mut out = Context::default();
        let machine = workload::machine_in(shared, State::adopted(s.pid), &mut out);
        self.seq += 1;
        let mut entry = Entry::new(
            spec.filter(|sp| sp.fingerprint == rec.fingerprint),
            rec.kind.clone(),
            rec.fingerprint.clone(),
            machine,
            self.hierarchy.workload(name),
            self.seq,
            rec.uid,
        );
        let gen = entry.run.bump();
        entry.process = MainProcess::of(&s);
        entry.started_at = Some(Instant::now());
        entry.started_unix = rec.started_at_unix;
        entry.oom_baseline = rec.oom_kills_at_start;
        entry.adopted = true;
        let adopted_as = entry.machine.state().name();
        self.entries.insert(name.clone(), entry);
        cx.history.record(
            &format!("workload/{name}"),
            &crate::machines::Transition {
                from: "-",
                to: adopted_as,
                reason: match s.pid {
                    Some(pid) => format!("adopted pid {pid}"),
                    None => "adopted its Deployment".into(),
                },
            },
        );
        if s.pid.is_some() {
            cx.fx.run(Effect::WatchOom {
                name: name.clone(),
                cgroup: self.hierarchy.workload(name),
            });
        }
        cx.fx.run(Effect::Watch {
            name: name.clone(),
            gen,
            watch: s.watch,
        });
        cx.push(Internal::Converge(name.clone()));
    }

    /// Adopted runs are watched by pidfd like any other: nothing to do per sample.
    pub fn adopted_liveness(&mut self, _report: &Report, _cx: &mut Ctx) {}

    // ---- admission, eviction, profiles, cron ------------------------------------------------

    /// One admission round over every waiting workload.
    pub fn admit(&mut self, budget: &Budget, profiles: &ProfilesState, cx: &mut Ctx) {
        let committed = self
            .entries
            .values()
            .filter(|e| e.machine.state().holds_resources())
            .filter_map(|e| e.spec.as_ref())
            .map(counted_requests)
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        let candidates: Vec<Candidate> = self
            .entries
            .iter()
            .filter_map(|(name, e)| {
                let spec = e.spec.as_ref()?;
                let waiting = match e.machine.state() {
                    State::Pending { .. } => true,
                    State::Evicted { .. } => e.hold != Hold::Budget,
                    State::Stopped { .. } => e.cron_due,
                    _ => false,
                };
                waiting.then(|| Candidate {
                    name,
                    spec,
                    seq: e.seq,
                    cron_due: e.cron_due,
                    cron_next_unix: e.cron_next.map(unix),
                })
            })
            .collect();
        let decisions: Vec<(WorkloadName, Decision)> = admission::decide(
            candidates,
            committed,
            budget,
            &profiles.profiles,
            &profiles.evaluation,
        )
        .into_iter()
        .map(|(n, d)| (n.clone(), d))
        .collect();
        for (name, decision) in decisions {
            match decision {
                Decision::Admit { cpu_quota } => {
                    if let Some(e) = self.entries.get_mut(&name) {
                        e.hold = Hold::None;
                        e.cron_due = false;
                        e.profile_cpu_quota = cpu_quota;
                    }
                    self.feed(&name, WorkloadEvent::Admit, cx);
                }
                Decision::Wait(reason) => {
                    let pending = self.entries.get(&name).is_some_and(|e| {
                        matches!(e.machine.state(), State::Pending { reason: r } if *r != reason)
                    });
                    if pending {
                        self.feed(&name, WorkloadEvent::Hold { reason }, cx);
                    }
                }
            }
        }
    }

    /// Over budget: evict the lowest-priority running workload, newest first among equals.
    /// A starting one counts as running: its process may already be allocating before the
    /// driver has reported it started (seen: the breach was acted on first, and a higher
    /// priority evicted in its place).
    pub fn shed_load(&mut self, used: Used, budget: &Budget, decided_at: Instant, cx: &mut Ctx) {
        let victim = admission::victim(
            self.entries
                .iter()
                .filter(|(_, e)| {
                    e.spec.is_some()
                        && (e.machine.state().is_up()
                            || matches!(e.machine.state(), State::Starting { .. }))
                })
                .map(|(name, e)| Running {
                    name,
                    priority: e.priority(),
                    seq: e.seq,
                }),
        )
        .cloned();
        let Some(name) = victim else {
            warn!("over budget, but no running workload is left to evict");
            return;
        };
        let reason = format!(
            "device over budget (memory {} of {}, cpu {}m of {}m): lowest priority",
            Bytes(used.memory_bytes),
            Bytes(budget.memory_bytes),
            used.cpu_millicores,
            budget.cpu_millicores
        );
        if let Some(e) = self.entries.get_mut(&name) {
            e.hold = Hold::Budget;
            e.evicted_for_budget_at = Some(decided_at);
        }
        self.budget_evictions += 1;
        self.feed(&name, WorkloadEvent::Evict { reason }, cx);
    }

    /// How long an eviction for the budget counts as in progress at most: the driver's stop
    /// (SIGTERM, STOP_TIMEOUT, then SIGKILL) and the kill's own retries. A victim whose stop
    /// hangs, or whose cgroup never empties, must not keep the budget from deciding forever.
    fn victim_bound(&self) -> Duration {
        self.stop_timeout + crate::cgroup::KILL_DEADLINE
    }

    /// When an eviction for the budget is in progress in `report`, the memory its victims
    /// still hold there. A victim's memory is released only once its processes are gone: it
    /// is in progress while the victim is stopping, and after that while the sample still
    /// finds processes in its cgroup (a sample taken just before the stop completed, whose
    /// report arrives after it), for at most [`Workloads::victim_bound`] from the decision.
    /// k8s victims do not count: the samples do not include their memory.
    pub fn eviction_in_progress(&self, report: &Report) -> Option<u64> {
        let bound = self.victim_bound();
        let mut held = None;
        for (name, e) in &self.entries {
            let Some(at) = e.evicted_for_budget_at else {
                continue;
            };
            if e.hold != Hold::Budget
                || e.kind == WorkloadKind::K8s
                || report.at.saturating_duration_since(at) >= bound
            {
                continue;
            }
            let stopping = match e.machine.state() {
                State::Stopping {
                    after: AfterStop::Evict(_),
                } => true,
                State::Evicted { .. } => false,
                _ => continue,
            };
            let counters = report
                .workloads
                .iter()
                .find(|s| s.name == *name)
                .and_then(|s| s.counters);
            if stopping || counters.is_some_and(|c| c.pids > 0) {
                *held.get_or_insert(0) += counters.map_or(0, |c| c.memory_bytes);
            }
        }
        held
    }

    /// The budget recovered: evicted workloads may be admitted again (admission decides).
    pub fn readmit(&mut self, cx: &mut Ctx) {
        for e in self.entries.values_mut() {
            if e.hold == Hold::Budget {
                e.hold = Hold::None;
            }
        }
        *cx.admission_due = true;
    }

    /// The profile evaluation changed: stop the workloads whose profiles became inactive,
    /// apply a changed cpu quota in place, and let admission start the others.
    pub fn profiles_changed(&mut self, profiles: &ProfilesState, cx: &mut Ctx) {
        let mut stop = Vec::new();
        for (name, e) in self.entries.iter_mut() {
            let up =
                e.machine.state().is_up() || matches!(e.machine.state(), State::Starting { .. });
            let Some(spec) = e
                .spec
                .as_ref()
                .filter(|s| up && !s.scheduling.profiles.is_empty())
            else {
                continue;
            };
            let p = profiles
                .profiles
                .workload_permission(&spec.scheduling.profiles, &profiles.evaluation);
            if !p.allowed {
                stop.push((name.clone(), p.reason));
            } else if p.cpu_quota_millicores != e.profile_cpu_quota {
                info!(workload = %name, quota = ?p.cpu_quota_millicores, "profile cpu quota changed");
                e.profile_cpu_quota = p.cpu_quota_millicores;
                // The quota of the active condition is the cpu limit while it is active
                // (PROTOCOL §7).
                cx.fx.run(Effect::Driver {
                    name: name.clone(),
                    gen: e.run,
                    op: DriverOp::SetLimits {
                        cgroup: e.cgroup.clone(),
                        limits: admission::effective_limits(spec, e.profile_cpu_quota),
                    },
                });
            }
        }
        for (name, reason) in stop {
            info!(workload = %name, "profile inactive: stopping it ({reason})");
            if let Some(e) = self.entries.get_mut(&name) {
                e.hold = Hold::Profile;
            }
            self.feed(
                &name,
                WorkloadEvent::Evict {
                    reason: format!("profile inactive: {reason}"),
                },
                cx,
            );
        }
        *cx.admission_due = true;
    }

    /// Plans the next run of a cron workload.
    fn schedule_cron(&mut self, name: &WorkloadName, cx: &mut Ctx) {
        let Some(e) = self.entries.get_mut(name) else {
            return;
        };
        let Some(schedule) = e.spec.as_ref().and_then(|s| s.scheduling.cron.clone()) else {
            e.cron_next = None;
            return;
        };
        let gen = e.cron.bump();
        let now = SystemTime::now();
        e.cron_next = schedule.next_after(now);
        if let Some(next) = e.cron_next {
            let delay = next.duration_since(now).unwrap_or(Duration::ZERO);
            cx.after(
                delay,
                Event::CronDue {
                    name: name.clone(),
                    gen,
                },
            );
        }
    }

    pub fn cron_due(&mut self, name: &WorkloadName, gen: Generation, cx: &mut Ctx) {
        let Some(e) = self.entries.get_mut(name) else {
            return;
        };
        if !e.cron.is(gen) {
            return;
        }
        if e.machine.state().holds_resources() {
            warn!(workload = %name, "scheduled run skipped: the previous run is still going");
        } else {
            e.cron_due = true;
        }
        self.schedule_cron(name, cx);
        *cx.admission_due = true;
    }

    // ---- sampling ----------------------------------------------------------------------

    /// Every workload with a cgroup of the agent (counters stay readable between runs, e.g.
    /// the pids.events of a fork bomb that died before the next tick).
    pub fn sample_targets(&self) -> Vec<Target> {
        self.entries
            .iter()
            .filter(|(_, e)| {
                e.kind != WorkloadKind::K8s && !matches!(e.machine.state(), State::Pending { .. })
            })
            .map(|(n, e)| Target {
                name: n.clone(),
                cgroup: e.cgroup.clone(),
            })
            .collect()
    }

    /// Takes in a sample's per-workload counters; returns the workloads' total.
    pub fn record_usage(&mut self, report: &Report, last: Option<Instant>) -> Used {
        let elapsed = last.map(|t| report.at.saturating_duration_since(t));
        let mut used = Used::default();
        for s in &report.workloads {
            let Some(e) = self.entries.get_mut(&s.name) else {
                continue;
            };
            let Some(c) = s.counters else { continue };
            let millis = match (e.last_cpu, elapsed) {
                (Some(prev), Some(_)) => {
                    sampler::millicores(prev.0, c.cpu_ns, report.at.duration_since(prev.1))
                }
                _ => 0,
            };
            e.last_cpu = Some((c.cpu_ns, report.at));
            used.memory_bytes += c.memory_bytes;
            used.cpu_millicores += millis;
            e.usage = Some(Usage {
                memory_bytes: c.memory_bytes,
                cpu_millicores: millis,
                pids: c.pids,
                oom_kills: c.oom_kills,
                cpu_throttled_periods: c.cpu_throttled_periods,
                pids_max_events: c.pids_max_events,
            });
        }
        used
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The first id of `range` after `last` (wrapping round) that is not in `used`.
fn next_free((lo, hi): (u32, u32), last: Option<u32>, used: &BTreeSet<u32>) -> Option<u32> {
    let after = last.filter(|u| (lo..hi).contains(u)).map_or(lo, |u| u + 1);
    (after..=hi).chain(lo..after).find(|u| !used.contains(u))
}

#[cfg(test)]
#[test]
fn ids_are_given_round_the_range_skipping_those_in_use() {
    let used: BTreeSet<u32> = [11, 13].into();
    assert_eq!(next_free((10, 13), None, &used), Some(10));
    assert_eq!(next_free((10, 13), Some(10), &used), Some(12));
    assert_eq!(
        next_free((10, 13), Some(12), &used),
        Some(10),
        "wraps, skipping 13"
    );
    assert_eq!(next_free((10, 13), Some(13), &used), Some(10));
    assert_eq!(next_free((10, 11), Some(10), &[10, 11].into()), None);
}
