//! The controller: one task owns every machine and all state. Everything else (timers,
//! signals, the desired-state watcher, the sampler, drivers, the control socket) only sends
//! [`Event`]s into one bounded channel. Machines decide; the controller executes their commands
//! through the drivers on blocking lanes and feeds the results back as events.

mod admission;
mod kernel;
pub mod server;
mod snapshot;
pub mod sources;
mod workloads;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use async_channel::{Receiver, Sender};
use tracing::{error, info, warn};

use crate::budget::{Budget, PressureTracker};
use crate::cgroup::Hierarchy;
use crate::config::{Inputs, Settings};
use crate::machines::device::{self, DeviceCommand, DeviceEvent};
use crate::machines::workload::WorkloadEvent;
use crate::sampler::{self, DeviceTotals};
use crate::status::{Snapshot, TransitionInfo};
use crate::store::Store;

pub use workloads::Entry;

/// Capacity of the event channel: producers wait (back-pressure) rather than grow memory.
pub const EVENT_CAPACITY: usize = 1024;

#[derive(Debug)]
pub enum Event {
    /// SIGTERM/SIGINT: stop the agent (workloads keep running, to be adopted on restart).
    Shutdown,
    /// SIGHUP: reload the configuration and the desired state.
    Reload,
    /// The local desired-state file changed.
    DesiredStateChanged,
    /// The sampling period is over (stale tokens: a sample came in between and set a new one).
    SampleTick {
        token: u64,
    },
    Sampled(sampler::Report),
    /// A notification from the kernel (crate::alerts): sample, and decide, now.
    Kernel(crate::alerts::Alert),
    /// A driver result for one run of one workload (stale runs are dropped).
    Workload {
        name: String,
        run: u64,
        event: WorkloadEvent,
    },
    /// A waiter could not be started for a process: watch it like an adopted one.
    Unwatched {
        name: String,
        run: u64,
        pid: i32,
        ticks: u64,
    },
    RetryDue {
        name: String,
        token: u64,
    },
    Status(Sender<Snapshot>),
    WatchdogTick,
    /// The Flotta session: timers and request results.
    Server(server::ServerEvent),
    /// A cron workload's scheduled time has come.
    CronDue {
        name: String,
        token: u64,
    },
    /// A driver's notice about a run (e.g. limits it cannot enforce).
    Notice {
        name: String,
        run: u64,
        message: String,
    },
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub struct Controller {
    pub(crate) settings: Settings,
    inputs: Inputs,
    pub(crate) store: Store,
    pub(crate) hierarchy: Hierarchy,
    pub(crate) tx: Sender<Event>,
    device: device::Machine,
    pub(crate) workloads: BTreeMap<String, Entry>,
    transitions: VecDeque<TransitionInfo>,
    started: Instant,
    totals: DeviceTotals,
    last_sample: Option<Instant>,
    used: (u64, u64),
    pressure: PressureTracker,
    sampler: Option<Sender<Vec<sampler::Target>>>,
    /// Profiles, their variables and the admission loop's state.
    pub(crate) admission: admission::AdmissionState,
    /// The desired state's secrets, for drivers that consume them.
    pub(crate) secrets: std::sync::Arc<Vec<crate::workload::DesiredSecret>>,
    /// The Flotta session; `None` in serverless mode.
    pub(crate) server: Option<server::ServerSession>,
    /// Events for the server, kept until a heartbeat carrying them is acknowledged.
    pub(crate) outbox: crate::store::Outbox,
    /// The kernel's memory pressure (PSI some avg10) at the last sample.
    memory_pressure: Option<f64>,
    /// The cap last written on all workloads together.
    workloads_cap: Option<crate::cgroup::Limits>,
    /// Lane for writes to STATE_DIR that must not block the controller.
    pub(crate) persist: Sender<workloads::LaneOp>,
    /// The kernel's notifications; `None` until the loop runs.
    pub(crate) alerts: Option<crate::alerts::Alerts>,
    pub(crate) sampling: kernel::Sampling,
}

const MAX_TRANSITIONS: usize = 100;

impl Controller {
    pub fn new(
        settings: Settings,
        inputs: Inputs,
        store: Store,
        hierarchy: Hierarchy,
        tx: Sender<Event>,
        server: Option<server::ServerSession>,
    ) -> Controller {
        let pressure = PressureTracker::new(
            settings.budget_window,
            settings.budget_hold,
            settings.budget_low_watermark,
        );
        let outbox = if server.is_some() {
            store.load_outbox()
        } else {
            Default::default()
        };
        Controller {
            memory_pressure: None,
            workloads_cap: None,
            admission: Default::default(),
            secrets: Default::default(),
            server,
            outbox,
            settings,
            inputs,
            store,
            hierarchy,
            tx,
            device: device::new_machine(),
            workloads: BTreeMap::new(),
            transitions: VecDeque::new(),
            started: Instant::now(),
            totals: sampler::device_totals(),
            last_sample: None,
            used: (0, 0),
            pressure,
            sampler: None,
            persist: workloads::spawn_lane(),
            alerts: None,
            sampling: Default::default(),
        }
    }

    pub(crate) fn budget(&self) -> Budget {
        Budget::of(
            &self.totals,
            self.settings.reserved_memory,
            self.settings.reserved_cpu_millis,
        )
    }

    pub(crate) fn record_transition(
        &mut self,
        machine: String,
        from: &str,
        to: &str,
        reason: String,
    ) {
        info!(machine = %machine, from, to, reason = %reason, "transition");
        if self.transitions.len() == MAX_TRANSITIONS {
            self.transitions.pop_front();
        }
        self.transitions.push_back(TransitionInfo {
            at_unix: unix_now(),
            machine,
            from: from.to_string(),
            to: to.to_string(),
            reason,
        });
    }

    pub(crate) fn report(&mut self, warn_level: bool, reason: String, message: String) {
        if warn_level {
            warn!(reason = %reason, "{message}");
        } else {
            info!(reason = %reason, "{message}");
        }
        if self.server.is_some() {
            self.outbox
                .push(warn_level, reason.clone(), message.clone(), unix_now());
            self.persist_outbox();
        }
    }

    /// Feeds an event to the device machine and executes what it decides.
    pub(crate) fn device_event(&mut self, event: DeviceEvent) {
        let before = (self.device.state().name(), self.device.state().reason());
        let mut cmds = Vec::new();
        self.device.handle_with_context(&event, &mut cmds);
        let after = (self.device.state().name(), self.device.state().reason());
        if before != after {
            if before.0 != after.0 {
                self.record_transition("device".into(), before.0, after.0, after.1.clone());
            }
            crate::notify::notify(&format!("STATUS={}: {}", after.0, after.1));
        }
        for c in cmds {
            match c {
                DeviceCommand::Report {
                    warn,
                    reason,
                    message,
                } => self.report(warn, reason, message),
                DeviceCommand::ShedLoad => self.shed_load(),
                DeviceCommand::Readmit => self.readmit(),
                DeviceCommand::WipeWorkloads => {
                    let names: Vec<String> = self.workloads.keys().cloned().collect();
                    for n in names {
                        self.workload_event(&n, WorkloadEvent::Remove);
                    }
                }
                DeviceCommand::Enrol => self.enrol(),
            }
        }
    }

    pub fn device_problems(&self) -> Vec<String> {
        self.device.inner().problems.values().cloned().collect()
    }

    pub(crate) fn device_heartbeat(&self) -> Option<&'static str> {
        self.device.state().heartbeat_status()
    }

    pub fn device_state(&self) -> (&'static str, String) {
        (self.device.state().name(), self.device.state().reason())
    }

    /// Boots the machines: adopts or starts what the desired state asks for.
    pub fn boot(&mut self) {
        let serverless = self.server.is_none();
        let has_certificate = self.server.as_ref().is_some_and(|s| s.has_certificate());
        self.device_event(DeviceEvent::Boot {
            serverless,
            has_certificate,
        });
        self.adopt_and_reconcile();
        self.start_server();
    }

    fn on_sampled(&mut self, report: sampler::Report) {
        let elapsed = self.last_sample.map(|t| report.at.duration_since(t));
        self.last_sample = Some(report.at);
        self.totals = report.device;
        let (mut mem, mut cpu) = (0u64, 0u64);
        for s in report.workloads {
            let Some(e) = self.workloads.get_mut(&s.name) else {
                continue;
            };
            if let Some(c) = s.counters {
                let millis = match (e.last_cpu, elapsed) {
                    (Some(prev), Some(_)) => {
                        sampler::millicores(prev.0, c.cpu_ns, report.at.duration_since(prev.1))
                    }
                    _ => 0,
                };
                e.last_cpu = Some((c.cpu_ns, report.at));
                mem += c.memory_bytes;
                cpu += millis;
                e.usage = Some(crate::status::Usage {
                    memory_bytes: c.memory_bytes,
                    cpu_millicores: millis,
                    pids: c.pids,
                    oom_kills: c.oom_kills,
                    cpu_throttled_periods: c.cpu_throttled_periods,
                    pids_max_events: c.pids_max_events,
                });
            }
            if s.adopted_alive == Some(false) {
                let name = s.name.clone();
                self.adopted_exited(&name);
            }
        }
        self.used = (mem, cpu);
        self.memory_pressure = report.memory_pressure;
        tracing::trace!(memory = mem, cpu, parent = ?report.parent_memory, "sampled");
        self.place_marks(report.parent_memory);
        self.cap_workloads();
        self.native_variables(report.disk_percent, report.pids_percent);
        self.fed_variables(report.variables);
        self.reevaluate_profiles();
        let budget = self.budget();
        let evicting = self.evicting();
        if let Some(p) = self
            .pressure
            .observe(mem, cpu, &budget, report.at, evicting)
        {
            match p {
                crate::budget::Pressure::Exceeded(reason) => {
                    self.device_event(DeviceEvent::BudgetExceeded { reason })
                }
                crate::budget::Pressure::Recovered => {
                    self.device_event(DeviceEvent::BudgetRecovered)
                }
            }
        }
    }

    /// Keeps the kernel-enforced cap on all workloads together in line with the budget: cpu
    /// at the budget, memory at the budget plus half of RESERVED_MEMORY, so the agent's
    /// priority-aware eviction normally acts first and the kernel's OOM killer (within the
    /// workloads only) is the last resort that keeps the OS and the agent alive.
    fn cap_workloads(&mut self) {
        let b = self.budget();
        if b.memory_bytes == 0 || b.cpu_millicores == 0 {
            return;
        }
        let cap = crate::cgroup::Limits {
            memory_bytes: Some(b.memory_bytes + self.settings.reserved_memory / 2),
            cpu_millicores: Some(b.cpu_millicores),
            pids: None,
        };
        if self.workloads_cap == Some(cap) {
            return;
        }
        self.workloads_cap = Some(cap);
        let h = self.hierarchy.clone();
        let _ = self.persist.try_send(Box::new(move || {
            if let Err(e) = h.cap_workloads(&cap) {
                error!("capping all workloads at the budget: {e}");
            }
        }));
    }

    fn reload(&mut self) {
        match Settings::load(&self.inputs).and_then(|s| s.prepare_paths().map(|_| s)) {
            Ok(s) => {
                crate::logging::set_level(s.log_level);
                if s.control_socket != self.settings.control_socket
                    || s.state_dir != self.settings.state_dir
                    || s.cgroup_root != self.settings.cgroup_root
                {
                    warn!(
                        "STATE_DIR, CONTROL_SOCKET and CGROUP_ROOT take effect at the next start"
                    );
                }
                let keep = (
                    self.settings.control_socket.clone(),
                    self.settings.state_dir.clone(),
                    self.settings.cgroup_root.clone(),
                );
                self.settings = s;
                (
                    self.settings.control_socket,
                    self.settings.state_dir,
                    self.settings.cgroup_root,
                ) = keep;
                info!("configuration reloaded");
                self.reload_desired();
            }
            Err(e) => error!("configuration reload failed, keeping the running configuration: {e}"),
        }
    }

    /// Runs the loop until shutdown.
    pub async fn run(mut self, rx: Receiver<Event>) {
        let sampler_config = sampler::SamplerConfig {
            state_dir: self.settings.state_dir.clone(),
            variables_file: self.settings.variables_file.clone(),
            variables_ttl: self.settings.variables_ttl,
            parent_memory_file: Some(self.hierarchy.workloads_parent().memory_usage_file()),
        };
        match sampler::spawn(self.tx.clone(), sampler_config) {
            Ok(s) => self.sampler = Some(s),
            Err(e) => error!("cannot start the sampler thread: {e}; no usage figures"),
        }
        self.alerts = Some(crate::alerts::Alerts::start(
            self.tx.clone(),
            &self.hierarchy.workloads_parent(),
        ));
        self.watch_running_workloads();
        self.request_sample();
        if let Some(iv) = crate::notify::watchdog_interval() {
            sources::every(self.tx.clone(), iv, || Event::WatchdogTick);
        }
        while let Ok(ev) = rx.recv().await {
            match ev {
                Event::Shutdown => {
                    info!("shutting down; workloads keep running and will be adopted on restart");
                    crate::notify::notify("STOPPING=1");
                    break;
                }
                Event::Reload => self.reload(),
                Event::DesiredStateChanged => self.reload_desired(),
                Event::SampleTick { token } => {
                    if token == self.sampling.token {
                        self.request_sample();
                    }
                }
                Event::Sampled(report) => {
                    self.on_sampled(report);
                    self.schedule_next_sample();
                }
                Event::Kernel(alert) => self.on_alert(alert),
                Event::Workload { name, run, event } => {
                    if self.workloads.get(&name).is_some_and(|e| e.run == run) {
                        self.workload_event(&name, event);
                    }
                }
                Event::Unwatched {
                    name,
                    run,
                    pid,
                    ticks,
                } => {
                    if let Some(e) = self.workloads.get_mut(&name) {
                        if e.run == run {
                            e.adopted = Some((pid, ticks));
                            if let Some(a) = &mut self.alerts {
                                a.watch_exit(&name, pid, ticks);
                            }
                        }
                    }
                }
                Event::RetryDue { name, token } => {
                    if self
                        .workloads
                        .get(&name)
                        .is_some_and(|e| e.retry_token == token)
                    {
                        self.workload_event(&name, WorkloadEvent::RetryDue);
                    }
                }
                Event::Status(reply) => {
                    let snap = self.snapshot();
                    let _ = reply.try_send(snap);
                }
                Event::WatchdogTick => crate::notify::notify("WATCHDOG=1"),
                Event::Server(ev) => self.on_server_event(ev),
                Event::CronDue { name, token } => self.on_cron_due(&name, token),
                Event::Notice { name, run, message } => {
                    if let Some(e) = self.workloads.get_mut(&name).filter(|e| e.run == run) {
                        if e.notice.as_ref() != Some(&message) {
                            e.notice = Some(message.clone());
                            self.report(
                                true,
                                "Notice".into(),
                                format!("workload {name}: {message}"),
                            );
                        }
                    }
                }
            }
        }
    }

    pub fn desired_path(&self) -> Option<PathBuf> {
        self.settings.desired_state.clone()
    }
}

#[cfg(test)]
mod tests;
