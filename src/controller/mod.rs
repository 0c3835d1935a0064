//! The controller: one task owns every machine and all state; everything else (timers,
//! signals, the desired-state watcher, the sampler, drivers, the control socket) only sends
//! [`Event`]s into one bounded channel.
//!
//! The loop only dispatches. The state lives in owned parts, each with its own file: the
//! device ([`device`]), the workloads ([`workloads`], with the pure decisions of
//! [`admission`]), the Flotta session ([`session`]), the resources ([`resources`]: budget,
//! pressure, totals, the cap on all workloads, profile variables) and what is reported
//! ([`reports`]: the outbox and the storage problem). Parts never call each other: what one
//! has to tell another goes into a local run-to-completion queue of [`Internal`] events that
//! the loop drains before it takes the next event, and what they do to the world goes
//! through [`effects::Effects`] (a unit test records it). Admission runs once per drained
//! batch, not once per change.

pub mod admission;
pub mod device;
pub mod effects;
pub mod generation;
pub mod lanes;
pub mod reports;
pub mod resources;
pub mod session;
mod snapshot;
pub mod sources;
pub mod workloads;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use tracing::{debug, error, info, warn};

use crate::config::{Inputs, Settings};
use crate::drivers::{RunEnd, Started};
use crate::machines::device::{DeviceEvent, ProblemKey};
use crate::machines::workload::WorkloadEvent;
use crate::machines::Transition;
use crate::sampler;
use crate::status::{Snapshot, TransitionInfo};
use crate::workload::{DesiredError, DesiredState, ValidatedDesired, WorkloadName};

use effects::{Effect, Effects, Write};
use generation::Generation;

/// Capacity of the event channel: producers wait (back-pressure) rather than grow memory.
pub const EVENT_CAPACITY: usize = 1024;

/// What a driver operation or a run's watch reports for one workload.
#[derive(Debug)]
pub enum RunOutcome {
    Started(Started),
    StartFailed(String),
    /// A run without a local process: available or not, and why.
    Progress {
        ready: bool,
        reason: String,
    },
    /// The run ended (its watch resolved).
    Ended(RunEnd),
    /// A stop finished: the workload's processes are gone.
    Stopped,
    /// A cleanup finished (with its error, if any).
    CleanedUp(Option<String>),
    /// After an agent restart: the recorded run is still there (and how to watch it).
    Adopted(Option<Box<Started>>),
}

/// What was read from the desired-state file (or, at start, STATE_DIR/desired.json).
#[derive(Debug)]
pub struct DesiredRead {
    /// The file's problem, if it gave nothing valid.
    pub file_error: Option<DesiredError>,
    /// What to apply: `None` when nothing valid was found anywhere.
    pub desired: Option<(DesiredState, ValidatedDesired)>,
    /// Where `desired` came from, for the log.
    pub source: String,
}

#[derive(Debug)]
pub enum Event {
    /// SIGTERM/SIGINT: stop the agent (workloads keep running, to be adopted on restart).
    Shutdown,
    /// SIGHUP: reload the configuration and the desired state.
    Reload,
    /// The local desired-state file changed (after a short quiet time).
    DesiredFileChanged,
    /// A read of the desired state finished (off the controller task).
    DesiredRead {
        gen: Generation,
        read: Box<DesiredRead>,
    },
    SampleTick {
        gen: Generation,
    },
    Sampled(Box<sampler::Report>),
    /// A notification from the kernel (crate::alerts): sample, and so decide, now.
    Kernel(crate::alerts::Alert),
    /// A driver result for one run of one workload (stale generations are dropped).
    Run {
        name: WorkloadName,
        gen: Generation,
        outcome: RunOutcome,
    },
    RetryDue {
        name: WorkloadName,
        gen: Generation,
    },
    /// A cron workload's scheduled time has come.
    CronDue {
        name: WorkloadName,
        gen: Generation,
    },
    Status(Sender<Snapshot>),
    /// An operator's `device-worker-ng reset`: the answer says what was done.
    Reset(Sender<String>),
    WatchdogTick,
    /// A request to the server finished.
    Session(Box<session::SessionResult>),
    SessionTimer {
        timer: crate::machines::session::Timer,
        gen: Generation,
    },
    /// A write finished.
    Persisted {
        written: Box<effects::Written>,
        error: Option<String>,
    },
}

impl Event {
    /// The event's kind, for the longest-handler figure.
    fn kind(&self) -> &'static str {
        match self {
            Event::Shutdown => "shutdown",
            Event::Reload => "reload",
            Event::DesiredFileChanged => "desired-file-changed",
            Event::DesiredRead { .. } => "desired-read",
            Event::SampleTick { .. } => "sample-tick",
            Event::Sampled(_) => "sampled",
            Event::Kernel(_) => "kernel-alert",
            Event::Run { .. } => "run",
            Event::RetryDue { .. } => "retry-due",
            Event::CronDue { .. } => "cron-due",
            Event::Status(_) => "status",
            Event::Reset(_) => "reset",
            Event::WatchdogTick => "watchdog",
            Event::Session(_) => "session",
            Event::SessionTimer { .. } => "session-timer",
            Event::Persisted { .. } => "persisted",
        }
    }
}

/// What one part tells another, through the controller's local queue.
#[derive(Debug)]
pub enum Internal {
    Device(DeviceEvent),
    Workload(WorkloadName, WorkloadEvent),
    /// Compare a workload's desired and actual state again (level-triggered).
    Converge(WorkloadName),
    /// An event for the log and, with a server, the heartbeat outbox.
    Report {
        warn: bool,
        reason: String,
        message: String,
    },
    /// Over budget: evict the lowest-priority running workload.
    ShedLoad,
    /// The budget recovered: evicted workloads may return.
    Readmit,
    /// The server disconnected the device: remove every workload.
    WipeWorkloads,
    /// The profile evaluation changed: stop or requota the workloads it concerns.
    ProfilesChanged,
    Persist(Write),
    /// A changed configuration from the server, validated on the session lane.
    ApplyDesired(Box<(DesiredState, ValidatedDesired)>),
}

/// What a part's handler gets: the effects and the local queue.
pub struct Ctx<'a> {
    pub fx: &'a mut dyn Effects,
    pub queue: &'a mut VecDeque<Internal>,
    pub history: &'a mut History,
    /// Run an admission round once the queue is drained.
    pub admission_due: &'a mut bool,
}

impl Ctx<'_> {
    pub fn push(&mut self, i: Internal) {
        self.queue.push_back(i);
    }

    pub fn problem(&mut self, key: ProblemKey, reason: Option<String>) {
        self.push(Internal::Device(match reason {
            Some(reason) => DeviceEvent::ProblemRaised { key, reason },
            None => DeviceEvent::ProblemCleared { key },
        }));
    }

    pub fn report(&mut self, warn: bool, reason: &str, message: String) {
        self.push(Internal::Report {
            warn,
            reason: reason.to_string(),
            message,
        });
    }

    pub fn after(&mut self, after: Duration, event: Event) {
        self.fx.run(Effect::Timer { after, event });
    }
}

/// CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

/// Recent transitions (for `status`) and how long the controller's handlers take.
#[derive(Debug, Default)]
pub struct History {
    pub transitions: VecDeque<TransitionInfo>,
    /// The longest single event handling since start, and its event kind.
    pub longest_handler: (Duration, &'static str),
}

const MAX_TRANSITIONS: usize = 100;

impl History {
    pub fn record(&mut self, machine: &str, t: &Transition) {
        info!(machine = %machine, from = t.from, to = t.to, reason = %t.reason, "transition");
        if self.transitions.len() == MAX_TRANSITIONS {
            self.transitions.pop_front();
        }
        self.transitions.push_back(TransitionInfo {
            at_unix: unix_now(),
            machine: machine.to_string(),
            from: t.from.to_string(),
            to: t.to.to_string(),
            reason: t.reason.clone(),
        });
    }
}

pub use crate::clock::unix_now;

/// The controller: the effects, the parts' state, and the local queue.
pub struct Controller<E: Effects> {
    fx: E,
    st: State,
    queue: VecDeque<Internal>,
    history: History,
    admission_due: bool,
    /// When METRICS_TEXTFILE was last written (at most once per SAMPLE_INTERVAL, also while
    /// the sampler runs faster near the budget).
    metrics_written: Option<Instant>,
}

/// The parts and what the loop keeps besides them.
pub struct State {
    settings: Settings,
    inputs: Inputs,
    device: device::DevicePart,
    workloads: workloads::Workloads,
    session: Option<session::SessionPart>,
    resources: resources::Resources,
    reports: reports::Reports,
    /// The read of the desired state whose result is awaited.
    desired_gen: Generation,
    sample_gen: Generation,
    started: Instant,
    hierarchy_info: HierarchyInfo,
    /// The most workloads since freed memory was last given back to the system, and how
    /// many there were at the previous sample.
    peak_since_trim: usize,
    workloads_at_last_sample: usize,
    /// A desired state was parsed since: its parse (up to MAX_MESSAGE_SIZE of text, and its
    /// trees) freed memory that the workload count alone would never give back.
    parsed_since_trim: bool,
}

/// How workload cgroups are made, for status: the layout, the cgroup driver, where.
struct HierarchyInfo {
    layout: String,
    base: String,
    driver: &'static str,
    /// The systemd driver's slice (workload unit names derive from it).
    slice: Option<String>,
}

/// What the controller is built from.
pub struct Parts {
    pub settings: Settings,
    pub inputs: Inputs,
    pub hierarchy: crate::cgroup::Hierarchy,
    pub store: crate::store::Store,
    pub session: Option<session::SessionPart>,
}

impl<E: Effects> Controller<E> {
    pub fn new(parts: Parts, fx: E) -> Controller<E> {
        let Parts {
            settings,
            inputs,
            hierarchy,
            store,
            session,
        } = parts;
        let hierarchy_info = HierarchyInfo {
            layout: hierarchy.layout.name().to_string(),
            base: hierarchy.base_display().display().to_string(),
            driver: hierarchy.driver_name(),
            slice: hierarchy.slice_tree().map(|t| t.slice.clone()),
        };
        let reports = reports::Reports::new(&store, session.is_some());
        let resources = resources::Resources::new(&settings);
        let mut session = session;
        if let Some(s) = session.as_mut() {
            s.set_defaults(workloads::spec_defaults(&settings, &resources.budget()));
        }
        Controller {
            fx,
            st: State {
                workloads: workloads::Workloads::new(&settings, hierarchy, store),
                resources,
                device: device::DevicePart::new(),
                session,
                reports,
                desired_gen: Generation::default(),
                sample_gen: Generation::default(),
                started: Instant::now(),
                hierarchy_info,
                peak_since_trim: 0,
                workloads_at_last_sample: 0,
                parsed_since_trim: false,
                settings,
                inputs,
            },
            queue: VecDeque::new(),
            history: History::default(),
            admission_due: false,
            metrics_written: None,
        }
    }

    /// The effects (tests inspect what was recorded).
    pub fn effects(&mut self) -> &mut E {
        &mut self.fx
    }

    pub fn device_state(&self) -> (&'static str, String) {
        self.st.device.state()
    }

    /// Runs `f` with the parts and a context (no draining).
    fn with_cx<R>(&mut self, f: impl FnOnce(&mut State, &mut Ctx) -> R) -> R {
        let mut cx = Ctx {
            fx: &mut self.fx,
            queue: &mut self.queue,
            history: &mut self.history,
            admission_due: &mut self.admission_due,
        };
        f(&mut self.st, &mut cx)
    }

    /// Runs `f` with the parts and a context, then drains the queue.
    fn dispatch(&mut self, f: impl FnOnce(&mut State, &mut Ctx)) {
        self.with_cx(f);
        self.drain();
    }

    /// Boots the machines: the device's start state, adoption of what earlier agents left
    /// running, the desired state's first read, the session's first request.
    pub fn boot(
        &mut self,
        records: Vec<Result<crate::store::WorkloadRecord, crate::store::StoreError>>,
    ) {
        self.dispatch(|st, cx| {
            let disconnected = st
                .session
                .as_ref()
                .is_some_and(|s| s.disconnected_at_boot());
            let serverless = st.session.is_none();
            let has_certificate = st.session.as_ref().is_some_and(|s| s.has_certificate());
            cx.push(Internal::Device(DeviceEvent::Boot {
                serverless,
                has_certificate,
                disconnected,
            }));
            st.workloads.adopt_records(records, cx);
            if disconnected {
                // A disconnected device runs nothing, whatever an earlier agent left behind
                // (a desired.json written before the disconnect, runs to adopt).
                cx.push(Internal::WipeWorkloads);
            } else {
                st.read_desired(true, cx);
            }
            if let Some(s) = st.session.as_mut() {
                s.boot(cx);
            }
        });
    }

    /// Handles internal events until none is left; then one admission round if due.
    fn drain(&mut self) {
        loop {
            while let Some(i) = self.queue.pop_front() {
                self.with_cx(|st, cx| st.internal(i, cx));
            }
            if !self.admission_due {
                // A burst (hundreds of workloads at once) grows the queue; it shrinks back.
                if self.queue.capacity() > 256 {
                    self.queue.shrink_to(32);
                }
                return;
            }
            self.admission_due = false;
            self.with_cx(|st, cx| {
                let budget = st.resources.budget();
                st.workloads.admit(&budget, &st.resources.profiles, cx)
            });
        }
    }

    /// Handles one event from the channel (and everything it causes); false on shutdown.
    /// How long it took is the controller thread's CPU time: the work the handler did, not
    /// the time the thread waited for a CPU on a loaded machine.
    pub fn handle(&mut self, ev: Event) -> bool {
        let t0 = thread_cpu_time();
        let kind = ev.kind();
        let go_on = self.event(ev);
        let took = thread_cpu_time().saturating_sub(t0);
        if took > self.history.longest_handler.0 {
            self.history.longest_handler = (took, kind);
            if took > Duration::from_millis(50) {
                warn!(event = kind, took = ?took, "a controller handler took long");
            }
        }
        go_on
    }

    fn event(&mut self, ev: Event) -> bool {
        match ev {
            Event::Shutdown => {
                info!("shutting down; workloads keep running and will be adopted on restart");
                self.fx.run(Effect::Notify("STOPPING=1".into()));
                return false;
            }
            Event::Reload => self.dispatch(|st, cx| st.reload(cx)),
            Event::DesiredFileChanged => self.dispatch(|st, cx| st.read_desired(false, cx)),
            Event::DesiredRead { gen, read } => {
                if self.st.desired_gen.is(gen) {
                    self.dispatch(|st, cx| st.on_desired_read(*read, cx));
                }
            }
            Event::SampleTick { gen } => {
                if self.st.sample_gen.is(gen) {
                    self.with_cx(|st, cx| st.request_sample(cx));
                }
            }
            Event::Sampled(report) => {
                self.dispatch(|st, cx| st.on_sampled(*report, cx));
                self.write_metrics();
            }
            Event::Kernel(alert) => self.with_cx(|st, cx| st.on_alert(alert, cx)),
            Event::Run { name, gen, outcome } => {
                self.dispatch(|st, cx| st.workloads.on_run(&name, gen, outcome, cx))
            }
            Event::RetryDue { name, gen } => {
                self.dispatch(|st, cx| st.workloads.retry_due(&name, gen, cx))
            }
            Event::CronDue { name, gen } => {
                self.dispatch(|st, cx| st.workloads.cron_due(&name, gen, cx))
            }
            Event::Status(reply) => {
                let snap = self.snapshot();
                let _ = reply.try_send(snap);
            }
            Event::Reset(reply) => {
                let mut answer = String::new();
                self.dispatch(|st, cx| answer = st.reset(cx));
                let _ = reply.try_send(answer);
            }
            Event::WatchdogTick => self.fx.run(Effect::Notify("WATCHDOG=1".into())),
            Event::Session(result) => self
                .dispatch(|st, cx| st.with_session(|s, w, d, r| s.on_result(*result, w, d, r, cx))),
            Event::SessionTimer { timer, gen } => self.dispatch(|st, cx| {
                st.with_session(|s, w, d, r| s.on_timer(timer, gen, w, d, r, cx))
            }),
            Event::Persisted { written, error } => {
                self.dispatch(|st, cx| st.reports.persisted(*written, error, &st.workloads, cx))
            }
        }
        true
    }

    /// Hands the metrics to the store lane, which renders and writes them (METRICS_TEXTFILE).
    fn write_metrics(&mut self) {
        let Some(path) = self.st.settings.metrics_textfile.clone() else {
            return;
        };
        let due = self
            .metrics_written
            .map_or(true, |t| t.elapsed() >= self.st.settings.sample_interval);
        if !due {
            return;
        }
        self.metrics_written = Some(Instant::now());
        let snapshot = Box::new(self.snapshot());
        self.fx
            .run(Effect::Persist(Box::new(Write::Metrics { path, snapshot })));
    }

    /// Runs the loop until shutdown.
    pub async fn run(mut self, rx: Receiver<Event>, tx: Sender<Event>) {
        self.with_cx(|st, cx| st.request_sample(cx));
        if let Some(iv) = crate::notify::watchdog_interval() {
            sources::every(tx.clone(), iv, || Event::WatchdogTick);
        }
        while let Ok(ev) = rx.recv().await {
            if !self.handle(ev) {
                break;
            }
        }
    }
}

impl State {
    /// What specs fall back to: the settings, DEFAULT_LIMITS resolved against the budget.
    fn spec_defaults(&self) -> crate::workload::SpecDefaults {
        workloads::spec_defaults(&self.settings, &self.resources.budget())
    }

    /// Runs `f` on the session (if there is one) with what it reads of the other parts.
    fn with_session(
        &mut self,
        f: impl FnOnce(
            &mut session::SessionPart,
            &workloads::Workloads,
            &device::DevicePart,
            &mut reports::Reports,
        ),
    ) {
        if let Some(s) = self.session.as_mut() {
            f(s, &self.workloads, &self.device, &mut self.reports);
        }
    }

    fn internal(&mut self, i: Internal, cx: &mut Ctx) {
        match i {
            Internal::Device(ev) => self.device.handle(&ev, cx),
            Internal::Workload(name, ev) => self.workloads.feed(&name, ev, cx),
            Internal::Converge(name) => self.workloads.converge(&name, cx),
            Internal::Report {
                warn,
                reason,
                message,
            } => self.reports.report(warn, reason, message, cx),
            Internal::ShedLoad => {
                let (used, budget) = (self.resources.used(), self.resources.budget());
                // Decisions come from samples: the one that decided is the last.
                let at = self.resources.last_sample().unwrap_or_else(Instant::now);
                self.workloads.shed_load(used, &budget, at, cx)
            }
            Internal::Readmit => self.workloads.readmit(cx),
            Internal::WipeWorkloads => {
                self.workloads.wipe(cx);
                // Nothing for a restarted agent to deploy from STATE_DIR either.
                cx.push(Internal::Persist(Write::Desired(DesiredState::default())));
            }
            Internal::ProfilesChanged => self
                .workloads
                .profiles_changed(&self.resources.profiles, cx),
            Internal::Persist(w) => cx.fx.run(Effect::Persist(Box::new(w))),
            Internal::ApplyDesired(d) => {
                let (raw, v) = *d;
                self.apply_desired(raw, v, cx)
            }
        }
    }

    /// Asks for the desired state off the controller task (serverless: the file; at start
    /// also STATE_DIR/desired.json as a fallback; with a server: desired.json at start only).
    fn read_desired(&mut self, at_start: bool, cx: &mut Ctx) {
        if self.session.is_some() && !at_start {
            return;
        }
        let gen = self.desired_gen.bump();
        let path = if self.session.is_some() {
            None
        } else {
            self.settings.desired_state.clone()
        };
        cx.fx.run(Effect::ReadDesired(effects::ReadDesired {
            gen,
            path,
            fallback: at_start,
            serverless: self.session.is_none(),
            defaults: self.spec_defaults(),
            max_workloads: self.settings.max_workloads,
        }));
    }

    fn on_desired_read(&mut self, read: DesiredRead, cx: &mut Ctx) {
        match &read.file_error {
            Some(e) => {
                error!("{e}; keeping the last good desired state");
                cx.report(true, "DesiredStateRejected", e.to_string());
                let what = if read.desired.is_some() || self.workloads.desired_known() {
                    "running the last good desired state"
                } else {
                    "no valid desired state anywhere: running what was adopted, starting nothing"
                };
                cx.problem(ProblemKey::DesiredState, Some(format!("{e} ({what})")));
            }
            None => cx.problem(ProblemKey::DesiredState, None),
        }
        if let Some((raw, validated)) = read.desired {
            debug!(source = %read.source, "desired state read");
            self.apply_desired(raw, validated, cx);
        }
    }

    /// Applies a validated desired state (from the file or the server).
    pub(crate) fn apply_desired(
        &mut self,
        raw: DesiredState,
        mut v: ValidatedDesired,
        cx: &mut Ctx,
    ) {
        cx.push(Internal::Persist(Write::Desired(raw)));
        self.parsed_since_trim = true;
        let mut profiles = std::mem::take(&mut v.profiles);
        self.workloads.apply(v, cx);
        // The workloads' own profiles: those of the specs that run, refused updates included.
        profiles.extend(self.workloads.inline_profiles());
        let profiles = crate::profiles::DeviceProfiles::from_config(&profiles);
        if self.resources.set_profiles(profiles) {
            cx.push(Internal::ProfilesChanged);
        }
        cx.push(Internal::Device(DeviceEvent::DesiredStateApplied));
    }

    fn on_sampled(&mut self, report: sampler::Report, cx: &mut Ctx) {
        let at = report.at;
        let used = self
            .workloads
            .record_usage(&report, self.resources.last_sample());
        let evicting = self.workloads.eviction_in_progress(&report);
        let pressure = self.resources.observe(&report, used, at, evicting);
        if let Some(marks) = self.resources.marks_due(report.parent_memory) {
            cx.fx.run(Effect::Marks(marks));
        }
        if self.resources.reevaluate() {
            cx.push(Internal::ProfilesChanged);
        }
        if let Some(cap) = self.resources.cap_due(self.settings.reserved_memory) {
            cx.push(Internal::Persist(Write::CapWorkloads(cap)));
        }
        // The next sample's time is chosen from this one: near the budget, at once faster.
        let interval = self
            .resources
            .next_interval(self.settings.sample_interval, at);
        let gen = self.sample_gen.bump();
        cx.after(interval, Event::SampleTick { gen });
        self.workloads.adopted_liveness(&report, cx);
        self.reports.retry_storage(at, &self.workloads, cx);
        self.give_back_memory();
        if let Some(p) = pressure {
            cx.push(Internal::Device(match p {
                crate::budget::Pressure::Exceeded(reason) => DeviceEvent::BudgetExceeded { reason },
                crate::budget::Pressure::Recovered => DeviceEvent::BudgetRecovered,
            }));
        }
    }

    /// Hands the sampler the current targets.
    fn request_sample(&mut self, cx: &mut Ctx) {
        self.resources.sample_requested(Instant::now());
        cx.fx.run(Effect::Sample(self.workloads.sample_targets()));
    }

    /// A kernel alert: a sample now (or as soon as the alert spacing allows); the decision
    /// follows from it like from any sample.
    fn on_alert(&mut self, alert: crate::alerts::Alert, cx: &mut Ctx) {
        debug!(?alert, "kernel alert: sampling now");
        match self.resources.on_alert(&alert, Instant::now()) {
            None => self.request_sample(cx),
            Some(wait) => {
                let gen = self.sample_gen.bump();
                cx.after(wait, Event::SampleTick { gen });
            }
        }
    }

    /// Once workloads have gone (or a desired state was parsed) and their number has held
    /// still for a sample (their stops and writes are over), hands the freed heap back to the
    /// system: glibc keeps it otherwise, and the agent's RSS would stay at its high-water mark.
    fn give_back_memory(&mut self) {
        let n = self.workloads.entries().len();
        let settled = n == self.workloads_at_last_sample;
        self.workloads_at_last_sample = n;
        self.peak_since_trim = self.peak_since_trim.max(n);
        if settled && (self.peak_since_trim > n || self.parsed_since_trim) {
            self.peak_since_trim = n;
            self.parsed_since_trim = false;
            crate::heap::give_back();
        }
    }

    fn reload(&mut self, cx: &mut Ctx) {
        match Settings::load(&self.inputs).and_then(|s| s.prepare_paths().map(|_| s)) {
            Ok(s) => {
                crate::logging::set_level(s.log_level);
                if s.control_socket != self.settings.control_socket
                    || s.state_dir != self.settings.state_dir
                    || s.cgroup_root != self.settings.cgroup_root
                    || s.cgroup_driver != self.settings.cgroup_driver
                    || s.systemd_slice != self.settings.systemd_slice
                {
                    warn!(
                        "STATE_DIR, CONTROL_SOCKET, CGROUP_DRIVER, SYSTEMD_SLICE and CGROUP_ROOT take effect at the next start"
                    );
                }
                let keep = (
                    self.settings.control_socket.clone(),
                    self.settings.state_dir.clone(),
                    self.settings.cgroup_root.clone(),
                    self.settings.cgroup_driver,
                    self.settings.systemd_slice.clone(),
                );
                self.settings = s;
                (
                    self.settings.control_socket,
                    self.settings.state_dir,
                    self.settings.cgroup_root,
                    self.settings.cgroup_driver,
                    self.settings.systemd_slice,
                ) = keep;
                self.workloads.reconfigure(&self.settings);
                self.resources.reconfigure(&self.settings);
                let defaults = self.spec_defaults();
                if let Some(session) = self.session.as_mut() {
                    session.reconfigure(defaults);
                }
                info!("configuration reloaded");
                self.read_desired(false, cx);
            }
            Err(e) => error!("configuration reload failed, keeping the running configuration: {e}"),
        }
    }

    /// `device-worker-ng reset`: a disconnected device enrols afresh.
    fn reset(&mut self, cx: &mut Ctx) -> String {
        let Some(s) = self.session.as_mut() else {
            return "serverless: there is nothing to reset".into();
        };
        if self.device.state().0 != "disconnected" {
            return format!(
                "the device is {}, not disconnected: nothing to reset",
                self.device.state().0
            );
        }
        cx.push(Internal::Device(DeviceEvent::Reset));
        s.reset(&mut self.reports, cx);
        "reset: the device forgot its disconnect and enrols afresh".into()
    }
}

#[cfg(test)]
mod tests;
