//! Everything the controller does to the world goes through [`Effects::run`]: driver work on a
//! workload's lane, watching a run's end, timers, writes to STATE_DIR, requests to the server,
//! reading the desired-state file, handing the sampler its targets, telling systemd. The
//! controller's parts only decide; [`RealEffects`] carries out, on lanes (blocking tasks on
//! smol's bounded blocking pool, one operation at a time per lane) and on the reactor, and
//! every result comes back as an [`Event`]. A unit test records the effects instead.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_channel::Sender;
use tracing::{debug, error};

use super::generation::Generation;
use super::lanes::{Lane, LaneOp, WorkloadLanes};
use super::session::{Request, SessionResult};
use super::{Event, RunOutcome};
use crate::cgroup::{Hierarchy, Limits, WorkloadCgroup};
use crate::drivers::{Driver, Drivers, Placement, Run, Watch};
use crate::sampler::Target;
use crate::store::{Applied, Disconnected, Outbox, Store, WorkloadRecord};
use crate::workload::{DesiredSecret, DesiredState, WorkloadName, WorkloadSpec};

/// Blocking driver work for one workload.
#[derive(Debug)]
pub enum DriverOp {
    Start {
        spec: Box<WorkloadSpec>,
        cgroup: WorkloadCgroup,
        log: PathBuf,
        uid: Option<u32>,
        secrets: Arc<Vec<DesiredSecret>>,
    },
    Stop {
        at: Placement,
        grace: Duration,
    },
    Cleanup {
        at: Placement,
        /// Also delete its output (it left the desired state).
        forget_output: bool,
    },
    /// New limits for a running workload (a profile's cpu quota), in place.
    SetLimits {
        cgroup: WorkloadCgroup,
        limits: Limits,
    },
    /// After an agent restart: is the recorded run still there?
    Adopt {
        at: Placement,
        record: WorkloadRecord,
    },
}

impl DriverOp {
    pub fn what(&self) -> &'static str {
        match self {
            DriverOp::Start { .. } => "start",
            DriverOp::Stop { .. } => "stop",
            DriverOp::Cleanup { .. } => "cleanup",
            DriverOp::SetLimits { .. } => "set-limits",
            DriverOp::Adopt { .. } => "adopt",
        }
    }
}

/// A write to STATE_DIR (or to the kernel, for the cap on all workloads).
#[derive(Debug, Clone)]
pub enum Write {
    Record(WorkloadRecord),
    RemoveRecord(WorkloadName),
    Desired(DesiredState),
    Outbox(Outbox),
    Applied(Applied),
    Disconnected(Disconnected),
    /// An operator's reset: forget the disconnect, the configuration and the outbox.
    ForgetServerState,
    /// Cap all workloads together (kernel-enforced; see `resources`).
    CapWorkloads(Limits),
    /// Make the desired state's secrets podman secrets (pods read them at creation).
    SyncSecrets(Arc<Vec<DesiredSecret>>),
    /// METRICS_TEXTFILE, rendered from the snapshot (off the controller task).
    Metrics {
        path: PathBuf,
        snapshot: Box<crate::status::Snapshot>,
    },
}

/// What a finished write was about: enough to act on its result, without carrying (and
/// dropping on the controller task) the whole of what was written.
#[derive(Debug, Clone)]
pub struct Written {
    pub what: String,
    pub state_dir: bool,
    /// The workload whose record was written or removed.
    pub record_of: Option<WorkloadName>,
    /// The file of STATE_DIR (other than a record) it wrote or removed.
    pub file: Option<&'static str>,
    /// A failed write of such a file (not the outbox, which is kept in memory anyway) comes
    /// back whole, to be redone once STATE_DIR can be written again.
    pub failed: Option<Box<Write>>,
}

/// [`Written::file`] of a reset's removal of the server state.
pub const FORGET_SERVER_STATE: &str = "the server state";

impl Write {
    /// What comes back once the write finished, `failed` or not.
    pub fn finished(self, failed: bool) -> Written {
        let mut written = self.written();
        let redo = written.file.is_some() && !matches!(self, Write::Outbox(_));
        if failed && redo {
            written.failed = Some(Box::new(self));
        }
        written
    }

    fn written(&self) -> Written {
        Written {
            what: self.describe(),
            state_dir: self.is_state_dir(),
            record_of: match self {
                Write::Record(r) => Some(r.name.clone()),
                Write::RemoveRecord(n) => Some(n.clone()),
                _ => None,
            },
            file: self.file(),
            failed: None,
        }
    }

    /// Which file of STATE_DIR (other than a record) the write replaces: a later write of the
    /// same file makes an earlier failure of it moot.
    fn file(&self) -> Option<&'static str> {
        match self {
            Write::Desired(_) => Some("desired.json"),
            Write::Outbox(_) => Some("outbox.json"),
            Write::Applied(_) => Some("applied.json"),
            Write::Disconnected(_) => Some("disconnected"),
            Write::ForgetServerState => Some(FORGET_SERVER_STATE),
            Write::Record(_)
            | Write::RemoveRecord(_)
            | Write::CapWorkloads(_)
            | Write::SyncSecrets(_)
            | Write::Metrics { .. } => None,
        }
    }

    /// What the write is about, for the storage problem and logs.
    pub fn describe(&self) -> String {
        match self {
            Write::Record(r) => format!("the record of workload {}", r.name),
            Write::RemoveRecord(n) => format!("removing the record of workload {n}"),
            Write::Desired(_) => "the desired state".into(),
            Write::Outbox(_) => "the outbox".into(),
            Write::Applied(_) => "the applied configuration".into(),
            Write::Disconnected(_) => "the disconnect".into(),
            Write::ForgetServerState => "forgetting the server state".into(),
            Write::CapWorkloads(_) => "the cap on all workloads".into(),
            Write::SyncSecrets(_) => "the podman secrets".into(),
            Write::Metrics { path, .. } => format!("METRICS_TEXTFILE {}", path.display()),
        }
    }

    /// Writes to STATE_DIR (their failure is a storage problem).
    pub fn is_state_dir(&self) -> bool {
        !matches!(
            self,
            Write::CapWorkloads(_) | Write::SyncSecrets(_) | Write::Metrics { .. }
        )
    }
}

/// Reading the desired-state file (and, at start, falling back to the last accepted one).
#[derive(Debug, Clone)]
pub struct ReadDesired {
    pub gen: Generation,
    pub path: Option<PathBuf>,
    /// Also read STATE_DIR/desired.json when the file gives nothing valid (at start).
    pub fallback: bool,
    /// No server: without a file, nothing is desired.
    pub serverless: bool,
    pub defaults: crate::workload::SpecDefaults,
    pub max_workloads: usize,
}

#[derive(Debug)]
pub enum Effect {
    /// Blocking driver work on the workload's lane (in order per workload); the result
    /// comes back as [`Event::Run`] of generation `gen`.
    Driver {
        name: WorkloadName,
        gen: Generation,
        op: DriverOp,
    },
    /// Await the run's end on the reactor; replaces the workload's previous watch.
    Watch {
        name: WorkloadName,
        gen: Generation,
        watch: Watch,
    },
    /// The workload is gone: drop its watch and, once its queue is done, its lane.
    Forget { name: WorkloadName },
    /// Send `event` after `after`.
    Timer { after: Duration, event: Event },
    /// A write, on the store lane (in order); the result comes back as [`Event::Persisted`].
    Persist(Box<Write>),
    /// A request to the Flotta server, on the session lane.
    Request(Request),
    /// Read the desired state off the controller task ([`Event::DesiredRead`]).
    ReadDesired(ReadDesired),
    /// Hand the sampler the current targets (skipped when it is still busy).
    Sample(Vec<Target>),
    /// Have the kernel notify when the workloads' memory crosses these marks.
    Marks(crate::alerts::Marks),
    /// Have the kernel notify OOM kills in the workload's cgroup (until it is forgotten).
    WatchOom {
        name: WorkloadName,
        cgroup: WorkloadCgroup,
    },
    /// sd_notify (READY, STATUS, WATCHDOG).
    Notify(String),
    /// The desired k8s workloads (name, rendered manifest) changed, or the first desired
    /// state was applied: tell the k8s driver at once, then prune the cluster of what no
    /// desired workload explains (on the cluster lane).
    PruneK8s(Vec<(String, String)>),
}

/// The world as the controller sees it.
pub trait Effects {
    fn run(&mut self, effect: Effect);
}

/// What carries effects out on this host.
pub struct RealEffects {
    tx: Sender<Event>,
    drivers: Arc<Drivers>,
    store: Store,
    hierarchy: Hierarchy,
    lanes: WorkloadLanes,
    watches: HashMap<WorkloadName, smol::Task<()>>,
    store_lane: Lane,
    session_lane: Lane,
    /// Work on the Kubernetes cluster as a whole (pruning).
    cluster_lane: Lane,
    sampler: Option<Sender<Vec<Target>>>,
    alerts: crate::alerts::Alerts,
}

impl RealEffects {
    pub fn new(
        tx: Sender<Event>,
        drivers: Arc<Drivers>,
        store: Store,
        hierarchy: Hierarchy,
        sampler: Option<Sender<Vec<Target>>>,
    ) -> RealEffects {
        let alerts = crate::alerts::Alerts::start(
            tx.clone(),
            &hierarchy.workloads_parent(),
            hierarchy.slice_tree().cloned(),
        );
        RealEffects {
            alerts,
            tx,
            drivers,
            store,
            hierarchy,
            lanes: WorkloadLanes::default(),
            watches: HashMap::new(),
            store_lane: Lane::new(crate::pool::Class::Control),
            session_lane: Lane::new(crate::pool::Class::Control),
            cluster_lane: Lane::new(crate::pool::Class::Control),
            sampler,
        }
    }

    /// Awaits the end of a run on the reactor; a new watch of the workload replaces (and
    /// cancels) the one before.
    fn watch(&mut self, name: WorkloadName, gen: Generation, watch: crate::drivers::Watch) {
        let tx = self.tx.clone();
        let n = name.clone();
        let task = smol::spawn(async move {
            let progress_tx = tx.clone();
            let pn = n.clone();
            let end = crate::drivers::watch::until_end(watch, move |ready, reason| {
                let _ = progress_tx.try_send(Event::Run {
                    name: pn.clone(),
                    gen,
                    outcome: RunOutcome::Progress { ready, reason },
                });
            })
            .await;
            let _ = tx
                .send(Event::Run {
                    name: n,
                    gen,
                    outcome: RunOutcome::Ended(end),
                })
                .await;
        });
        // Dropping the previous watch task cancels it.
        self.watches.insert(name, task);
    }

    /// Prunes the cluster of Deployments no desired k8s workload explains, on its own lane.
    fn prune_k8s(&mut self, desired: Vec<(String, String)>) {
        let Some(k8s) = self.drivers.k8s() else {
            return;
        };
        // Before any start of this desired state is queued: a prune still queued
        // from an earlier one never deletes what this one wants.
        k8s.desire(desired);
        let drivers = self.drivers.clone();
        self.cluster_lane.push(Box::new(move || {
            let Some(k8s) = drivers.k8s() else { return };
            match k8s.prune() {
                Ok(removed) if !removed.is_empty() => {
                    tracing::info!(
                        "pruned Deployments no workload wants: {}",
                        removed.join(", ")
                    )
                }
                Ok(_) | Err(crate::drivers::k8s::K8sError::NotConfigured) => {}
                Err(e) => tracing::warn!("pruning the Kubernetes cluster: {e}"),
            }
        }));
    }

    fn driver(&mut self, name: WorkloadName, gen: Generation, op: DriverOp) {
        let (tx, drivers, store) = (self.tx.clone(), self.drivers.clone(), self.store.clone());
        let n = name.clone();
        let send = move |outcome: RunOutcome| {
            let _ = tx.send_blocking(Event::Run {
                name: n,
                gen,
                outcome,
            });
        };
        let lane_op: LaneOp = match op {
            DriverOp::Start {
                spec,
                cgroup,
                log,
                uid,
                secrets,
            } => Box::new(move || {
                let run = Run {
                    spec: &spec,
                    cgroup: &cgroup,
                    log: &log,
                    secrets: &secrets,
                    uid,
                };
                send(match drivers.of(&spec.kind).start(&run) {
                    Ok(s) => RunOutcome::Started(s),
                    Err(e) => RunOutcome::StartFailed(e.to_string()),
                })
            }),
            DriverOp::Stop { at, grace } => Box::new(move || {
                if let Err(e) = drivers.of(&at.kind).stop(&at, grace) {
                    error!(workload = %at.name, "stopping: {e}");
                }
                send(RunOutcome::Stopped)
            }),
            DriverOp::Cleanup { at, forget_output } => Box::new(move || {
                let result = drivers.of(&at.kind).cleanup(&at);
                if let Err(e) = &result {
                    error!(workload = %at.name, "cleaning up: {e}");
                }
                // On the workload's lane, after its log writer has ended with the cleanup:
                // nothing writes the files any more, and a new run cannot have started yet.
                if forget_output {
                    if let Err(e) = store.remove_logs(&at.name) {
                        error!(workload = %at.name, "removing its output: {e}");
                    }
                }
                send(RunOutcome::CleanedUp(result.err().map(|e| e.to_string())))
            }),
            DriverOp::SetLimits { cgroup, limits } => {
                let (hierarchy, n) = (self.hierarchy.clone(), name.clone());
                Box::new(move || {
                    // The hierarchy knows who holds the limits: the cgroup's files
                    // (cgroupfs) or the workload's units (systemd).
                    if let Err(e) = hierarchy.limit_workload(&n, &limits) {
                        error!(
                            "applying new limits to {}: {e}",
                            cgroup.display_path().display()
                        );
                    }
                })
            }
            DriverOp::Adopt { at, record } => Box::new(move || {
                send(RunOutcome::Adopted(
                    drivers.of(&at.kind).adopt(&at, &record).map(Box::new),
                ))
            }),
        };
        self.lanes.push(&name, lane_op);
    }

    fn persist(&mut self, w: Write) {
        let (tx, store, hierarchy, drivers) = (
            self.tx.clone(),
            self.store.clone(),
            self.hierarchy.clone(),
            self.drivers.clone(),
        );
        self.store_lane.push(Box::new(move || {
            let result = match &w {
                Write::Record(r) => store.save_record(r).map_err(|e| e.to_string()),
                Write::RemoveRecord(n) => store.remove_record(n).map_err(|e| e.to_string()),
                Write::Desired(d) => store.save_desired(d).map_err(|e| e.to_string()),
                Write::Outbox(o) => store.save_outbox(o).map_err(|e| e.to_string()),
                Write::Applied(a) => store.save_applied(a).map_err(|e| e.to_string()),
                Write::Disconnected(d) => store.save_disconnected(d).map_err(|e| e.to_string()),
                Write::ForgetServerState => store.forget_server_state().map_err(|e| e.to_string()),
                Write::CapWorkloads(l) => hierarchy.cap_workloads(l).map_err(|e| e.to_string()),
                Write::SyncSecrets(s) => match drivers.pods() {
                    Some(p) => p.sync_secrets(s).map_err(|e| e.to_string()),
                    None => Ok(()),
                },
                // Readable by the collector, which need not run as root.
                Write::Metrics { path, snapshot } => crate::store::write_atomic_unsynced(
                    path,
                    crate::metrics::render(snapshot).as_bytes(),
                    0o644,
                )
                .map_err(|e| e.to_string()),
            };
            let _ = tx.send_blocking(Event::Persisted {
                written: Box::new(w.finished(result.is_err())),
                error: result.err(),
            });
        }));
    }
}

impl Effects for RealEffects {
    fn run(&mut self, effect: Effect) {
        // A lane retired while its last operation was still reporting is dropped at a later
        // effect (there is one at least every sample), not kept for good.
        self.lanes.sweep();
        match effect {
            Effect::Driver { name, gen, op } => {
                debug!(workload = %name, run = %gen, "driver: {}", op.what());
                self.driver(name, gen, op)
            }
            Effect::Watch { name, gen, watch } => self.watch(name, gen, watch),
            Effect::Forget { name } => {
                self.watches.remove(&name);
                if self.watches.capacity() > 4 * self.watches.len() + 16 {
                    self.watches.shrink_to_fit();
                }
                self.alerts.forget(&name);
                self.lanes.retire(name);
            }
            Effect::Timer { after, event } => {
                let tx = self.tx.clone();
                smol::spawn(async move {
                    smol::Timer::after(after).await;
                    let _ = tx.send(event).await;
                })
                .detach();
            }
            Effect::Persist(w) => self.persist(*w),
            Effect::Request(r) => {
                let tx = self.tx.clone();
                self.session_lane.push(Box::new(move || {
                    let result: SessionResult = r.execute();
                    let _ = tx.send_blocking(Event::Session(Box::new(result)));
                }));
            }
            Effect::ReadDesired(r) => {
                let (tx, store) = (self.tx.clone(), self.store.clone());
                // On the store lane: reads of the file never overlap, and one stuck read
                // cannot pile up others.
                self.store_lane.push(Box::new(move || {
                    let gen = r.gen;
                    let read = super::sources::read_desired(&r, &store);
                    let _ = tx.send_blocking(Event::DesiredRead {
                        gen,
                        read: Box::new(read),
                    });
                }));
            }
            Effect::Sample(targets) => {
                if let Some(s) = &self.sampler {
                    // A full queue means the sampler is still busy with the last round: skip.
                    let _ = s.try_send(targets);
                }
            }
            Effect::Marks(m) => self.alerts.set_marks(m),
            Effect::WatchOom { name, cgroup } => self.alerts.watch_oom(&name, &cgroup),
            Effect::Notify(state) => crate::notify::notify(&state),
            Effect::PruneK8s(desired) => self.prune_k8s(desired),
        }
    }
}
