//! Kernel alerts: the notifications that make the controller sample, and decide, at once
//! instead of at its next sampling period. Sampling stays the fallback, not the mechanism.
//!
//! On the workloads' parent cgroup (the agent's `workloads` directory, or a systemd slice: it
//! is a parameter):
//! - cgroup v1: usage thresholds at the budget and at the near-budget mark
//!   (`cgroup.event_control` on `memory.usage_in_bytes`), and `memory.pressure_level`;
//! - cgroup v2: `memory.high` at the budget, so that going over it both throttles the
//!   workloads and raises `high` in the parent's `memory.events` (inotify); `max` events there
//!   (the kernel cap is near) and a PSI trigger on the parent's `memory.pressure`.
//!
//! On each workload: OOM kills (v1 `memory.oom_control` eventfd, v2 its `memory.events`): the
//! run's end comes from its watch (drivers::watch), the alert brings the counters up to date.
//!
//! Everything runs as smol tasks on the reactor: no thread per file. The controller decides
//! the marks and what to watch, and hands them over as effects; [`Alerts`] is only ever called
//! without blocking, its tasks register with the kernel.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_channel::{Receiver, Sender};
use nix::sys::inotify::WatchDescriptor;
use smol::future::FutureExt;
use smol::Task;
use tracing::{debug, warn};

use crate::cgroup::notify::{self, EventSignal, FileWatcher, PressureLevel, PsiTrigger};
use crate::cgroup::systemd::SliceTree;
use crate::cgroup::WorkloadCgroup;
use crate::controller::Event;
use crate::workload::WorkloadName;

/// What the kernel told the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alert {
    /// The memory of all workloads crossed a mark: a v1 usage threshold (in either
    /// direction), or v2 usage over `memory.high` (the budget).
    MemoryMark(Mark),
    /// The kernel reclaims or stalls within the workloads: v1 pressure level, v2 PSI trigger
    /// or `max` events of the parent (its kernel cap).
    MemoryPressure,
    /// An OOM in a workload's cgroup (on v1 announced before the kill).
    Oom { workload: WorkloadName },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    NearBudget,
    Budget,
}

/// The marks in bytes of the parent's own usage counter. The parent also counts charges no
/// live workload owns (e.g. page cache left by removed workloads), so the controller puts the
/// marks at its own figures plus that offset: a notification then means the workloads
/// themselves crossed. A v1 threshold fires when usage reaches it; the budget is breached
/// when usage is over it: the thresholds sit one byte above the marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    pub near: u64,
    pub budget: u64,
}

/// A PSI trigger's stall share: the same 10 % the sampler's `some avg10` check uses.
const PSI_STALL: Duration = Duration::from_millis(100);
const PSI_WINDOW: Duration = Duration::from_secs(1);

pub struct Alerts {
    tx: Sender<Event>,
    marks: Sender<Marks>,
    /// v2: one inotify instance for the parent's and every workload's `memory.events`.
    hub: Option<Arc<Hub>>,
    workloads: HashMap<WorkloadName, Task<()>>,
    _parent: Vec<Task<()>>,
}

impl Alerts {
    /// Starts watching the workloads' parent cgroup; the marks come with [`Alerts::set_marks`].
    /// `slice`: the systemd cgroup driver's, whose slice the parent is (systemd then sets
    /// the v2 budget mark, as the slice's MemoryHigh).
    pub fn start(tx: Sender<Event>, parent: &WorkloadCgroup, slice: Option<SliceTree>) -> Alerts {
        let (marks, marks_rx) = async_channel::bounded(1);
        let mut tasks = Vec::new();
        let mut hub = None;
        match parent {
            WorkloadCgroup::V1 { memory, .. } => {
                tasks.push(smol::spawn(v1_parent(tx.clone(), memory.clone(), marks_rx)));
            }
            WorkloadCgroup::V2 { dir, .. } => {
                match FileWatcher::new() {
                    Ok(w) => {
                        let h = Arc::new(Hub {
                            watcher: w,
                            watched: Mutex::new(HashMap::new()),
                            tx: tx.clone(),
                        });
                        tasks.push(smol::spawn(h.clone().run()));
                        tasks.push(smol::spawn(
                            h.clone().hold(dir.join("memory.events"), Who::Parent),
                        ));
                        hub = Some(h);
                    }
                    Err(e) => warn!(
                        "no inotify ({e}): budget breaches and OOM kills are found by sampling"
                    ),
                }
                tasks.push(smol::spawn(v2_parent(
                    tx.clone(),
                    dir.clone(),
                    slice,
                    marks_rx,
                )));
            }
        }
        Alerts {
            tx,
            marks,
            hub,
            workloads: HashMap::new(),
            _parent: tasks,
        }
    }

    /// Moves the marks (the task registers them off the reactor).
    pub fn set_marks(&mut self, marks: Marks) {
        // The task only needs the newest marks.
        let _ = self.marks.force_send(marks);
    }

    /// Watches a workload's cgroup for OOM kills (again, if its cgroup was recreated).
    pub fn watch_oom(&mut self, name: &WorkloadName, cgroup: &WorkloadCgroup) {
        if self.workloads.get(name).is_some_and(|t| !t.is_finished()) {
            return;
        }
        let task = match cgroup {
            WorkloadCgroup::V1 { memory, .. } => {
                smol::spawn(v1_oom(self.tx.clone(), name.clone(), memory.clone()))
            }
            WorkloadCgroup::V2 { dir, .. } => match &self.hub {
                Some(h) => smol::spawn(
                    h.clone()
                        .hold(dir.join("memory.events"), Who::Workload(name.clone())),
                ),
                None => return,
            },
        };
        self.workloads.insert(name.clone(), task);
    }

    /// Stops watching a workload (dropping its task cancels it and closes its files).
    pub fn forget(&mut self, name: &WorkloadName) {
        self.workloads.remove(name);
    }
}

/// A future that never completes when there is nothing to wait for.
async fn signalled(s: &Option<EventSignal>) -> std::io::Result<u64> {
    match s {
        Some(s) => s.next().await,
        None => smol::future::pending().await,
    }
}

enum Wake {
    Marks(Marks),
    /// `None`: the registration's job failed.
    Armed(Option<Armed>),
    Closed,
    Signal(Alert, std::io::Result<u64>),
}

/// cgroup v1 parent: the two usage thresholds (moved when the marks move) and the pressure
/// level.
async fn v1_parent(tx: Sender<Event>, memory: PathBuf, marks: Receiver<Marks>) {
    // `medium`: working-set eviction, not the routine page-cache reclaim `low` reports;
    // `local`: reclaim against the workloads' common cap, not a workload's own limit (a
    // workload about to be OOM-killed reclaims in a burst).
    let pressure = notify::pressure_level(&memory, PressureLevel::Medium, true)
        .or_else(|_| notify::pressure_level(&memory, PressureLevel::Medium, false))
        .map_err(|e| warn!("no memory pressure notifications: {e}"))
        .ok();
    let (mut near, mut budget): (Option<EventSignal>, Option<EventSignal>) = (None, None);
    // Registering a threshold waits for an RCU grace period (tens of ms): on the agent's
    // blocking pool, while the old thresholds keep watching.
    let mut arming: Option<Pin<Box<dyn Future<Output = Option<Armed>> + Send>>> = None;
    loop {
        let wake = async {
            match &mut arming {
                Some(t) => Wake::Armed(t.as_mut().await),
                None => match marks.recv().await {
                    Ok(m) => Wake::Marks(m),
                    Err(_) => Wake::Closed,
                },
            }
        }
        .or(async { Wake::Signal(Alert::MemoryMark(Mark::Budget), signalled(&budget).await) })
        .or(async { Wake::Signal(Alert::MemoryMark(Mark::NearBudget), signalled(&near).await) })
        .or(async { Wake::Signal(Alert::MemoryPressure, signalled(&pressure).await) })
        .await;
        match wake {
            Wake::Closed => return,
            Wake::Marks(m) => {
                let memory = memory.clone();
                arming = Some(Box::pin(crate::pool::unblock(
                    crate::pool::Class::Control,
                    move || {
                        let arm = |bytes: u64| {
                            notify::usage_threshold(&memory, bytes)
                                .map_err(|e| warn!("no usage notification at {bytes} bytes: {e}"))
                                .ok()
                        };
                        Armed {
                            marks: m,
                            budget: arm(m.budget + 1),
                            near: arm(m.near + 1),
                        }
                    },
                )));
            }
            Wake::Armed(None) => {
                arming = None;
                warn!("registering the usage thresholds failed; the old ones stay");
            }
            Wake::Armed(Some(a)) => {
                arming = None;
                // Dropping the old eventfds unregisters the old thresholds.
                budget = a.budget;
                near = a.near;
                debug!(
                    budget = a.marks.budget,
                    near = a.marks.near,
                    "usage thresholds armed"
                );
            }
            Wake::Signal(alert, Ok(_)) => {
                if tx.send(Event::Kernel(alert)).await.is_err() {
                    return;
                }
            }
            Wake::Signal(alert, Err(e)) => {
                warn!("{alert:?} notifications stopped: {e}");
                match alert {
                    Alert::MemoryMark(Mark::Budget) => budget = None,
                    Alert::MemoryMark(Mark::NearBudget) => near = None,
                    _ => return,
                }
            }
        }
    }
}

/// Thresholds registered at `marks`.
struct Armed {
    marks: Marks,
    budget: Option<EventSignal>,
    near: Option<EventSignal>,
}

/// cgroup v2 parent: `memory.high` follows the budget mark (its `high` events arrive through
/// the hub), and a PSI trigger on the parent's `memory.pressure`. Under the systemd driver
/// the mark is the slice's MemoryHigh property (systemd writes the file).
async fn v2_parent(
    tx: Sender<Event>,
    dir: PathBuf,
    slice: Option<SliceTree>,
    marks: Receiver<Marks>,
) {
    let psi = PsiTrigger::new(&dir.join("memory.pressure"), PSI_STALL, PSI_WINDOW)
        .map_err(|e| warn!("no PSI trigger: {e}"))
        .ok();
    loop {
        let wake = async {
            match marks.recv().await {
                Ok(m) => Wake::Marks(m),
                Err(_) => Wake::Closed,
            }
        }
        .or(async {
            let r = match &psi {
                Some(p) => p.next().await.map(|_| 1),
                None => smol::future::pending().await,
            };
            Wake::Signal(Alert::MemoryPressure, r)
        })
        .await;
        match wake {
            Wake::Closed => return,
            Wake::Marks(m) => {
                let high = dir.join("memory.high");
                let slice = slice.clone();
                // Writing memory.high below the usage makes the writer reclaim (and a D-Bus
                // call waits for systemd): off the reactor.
                let written =
                    crate::pool::unblock(crate::pool::Class::Control, move || match slice {
                        Some(tree) => tree
                            .set_memory_high(m.budget)
                            .map_err(|e| format!("{}: {e}", tree.slice)),
                        None => crate::cgroup::write_file(&high, &m.budget.to_string())
                            .map_err(|e| e.to_string()),
                    })
                    .await;
                match written {
                    Some(Ok(())) => debug!(high = m.budget, "memory.high set at the budget"),
                    Some(Err(e)) => warn!("cannot set memory.high at the budget: {e}"),
                    None => warn!("setting memory.high at the budget failed"),
                }
            }
            Wake::Signal(alert, Ok(_)) => {
                if tx.send(Event::Kernel(alert)).await.is_err() {
                    return;
                }
            }
            Wake::Signal(_, Err(e)) => {
                warn!("PSI trigger stopped: {e}");
                return;
            }
            // memory.high is written in place (above).
            Wake::Armed(_) => {}
        }
    }
}

/// cgroup v1 workload: its `memory.oom_control` eventfd. The kernel also signals it when the
/// cgroup is removed; the watch then ends.
async fn v1_oom(tx: Sender<Event>, workload: WorkloadName, memory: PathBuf) {
    let signal = match notify::oom(&memory) {
        Ok(s) => s,
        Err(e) => {
            warn!(workload = %workload, "no OOM notifications: {e}");
            return;
        }
    };
    while signal.next().await.is_ok() {
        if !memory.is_dir() {
            return;
        }
        let alert = Alert::Oom {
            workload: workload.clone(),
        };
        if tx.send(Event::Kernel(alert)).await.is_err() {
            return;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    Parent,
    Workload(WorkloadName),
}

/// The `memory.events` counters that mean something to the agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct MemoryEvents {
    high: u64,
    max: u64,
    oom_kill: u64,
}

impl MemoryEvents {
    fn read(path: &Path) -> MemoryEvents {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let kv = crate::cgroup::parse_flat_keyed(&text);
        let get = |k: &str| kv.iter().find(|(n, _)| *n == k).map_or(0, |(_, v)| *v);
        MemoryEvents {
            high: get("high"),
            max: get("max"),
            oom_kill: get("oom_kill"),
        }
    }
}

struct Watched {
    path: PathBuf,
    who: Who,
    last: MemoryEvents,
}

/// cgroup v2: one inotify instance for every `memory.events` the agent watches.
struct Hub {
    watcher: FileWatcher,
    watched: Mutex<HashMap<WatchDescriptor, Watched>>,
    tx: Sender<Event>,
}

impl Hub {
    async fn run(self: Arc<Self>) {
        loop {
            let changes = match self.watcher.changed().await {
                Ok(c) => c,
                Err(e) => {
                    warn!("cgroup file watch stopped: {e}; sampling only");
                    return;
                }
            };
            let mut alerts = Vec::new();
            if let Ok(mut watched) = self.watched.lock() {
                for wd in changes.gone {
                    watched.remove(&wd);
                }
                for wd in changes.modified {
                    let Some(w) = watched.get_mut(&wd) else {
                        continue;
                    };
                    // A few counters of a tiny kernfs file: cheap enough for the reactor.
                    let now = MemoryEvents::read(&w.path);
                    alerts.extend(what_changed(&w.who, &w.last, &now));
                    w.last = now;
                }
            }
            for a in alerts {
                if self.tx.send(Event::Kernel(a)).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Watches `path` for as long as the returned future is alive (the watch's task).
    async fn hold(self: Arc<Self>, path: PathBuf, who: Who) {
        let wd = match self.watcher.add(&path) {
            Ok(wd) => wd,
            Err(e) => {
                warn!("cannot watch {}: {e}", path.display());
                return;
            }
        };
        let last = MemoryEvents::read(&path);
        if let Ok(mut w) = self.watched.lock() {
            w.insert(wd, Watched { path, who, last });
        }
        let _unwatch = Unwatch {
            hub: self.clone(),
            wd,
        };
        smol::future::pending::<()>().await;
    }
}

struct Unwatch {
    hub: Arc<Hub>,
    wd: WatchDescriptor,
}

impl Drop for Unwatch {
    fn drop(&mut self) {
        if let Ok(mut w) = self.hub.watched.lock() {
            w.remove(&self.wd);
        }
        self.hub.watcher.remove(self.wd);
    }
}

/// The alerts a change of `memory.events` means.
fn what_changed(who: &Who, before: &MemoryEvents, now: &MemoryEvents) -> Vec<Alert> {
    let mut out = Vec::new();
    match who {
        Who::Parent => {
            if now.high > before.high {
                out.push(Alert::MemoryMark(Mark::Budget));
            }
            if now.max > before.max {
                out.push(Alert::MemoryPressure);
            }
        }
        Who::Workload(name) => {
            if now.oom_kill > before.oom_kill {
                out.push(Alert::Oom {
                    workload: name.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_events_changes_become_alerts() {
        let before = MemoryEvents {
            high: 3,
            max: 0,
            oom_kill: 1,
        };
        let parent = Who::Parent;
        let hog = WorkloadName::parse("hog").unwrap();
        let w = Who::Workload(hog.clone());
        assert_eq!(what_changed(&parent, &before, &before), vec![]);
        let more_high = MemoryEvents { high: 9, ..before };
        assert_eq!(
            what_changed(&parent, &before, &more_high),
            vec![Alert::MemoryMark(Mark::Budget)]
        );
        let at_cap = MemoryEvents { max: 1, ..before };
        assert_eq!(
            what_changed(&parent, &before, &at_cap),
            vec![Alert::MemoryPressure]
        );
        let killed = MemoryEvents {
            oom_kill: 2,
            ..before
        };
        assert_eq!(
            what_changed(&w, &before, &killed),
            vec![Alert::Oom { workload: hog }]
        );
        // A workload's high/max events are the parent's business.
        assert_eq!(what_changed(&w, &before, &more_high), vec![]);
    }

    #[test]
    fn memory_events_parse() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("memory.events");
        std::fs::write(
            &p,
            "low 0\nhigh 12\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        assert_eq!(
            MemoryEvents::read(&p),
            MemoryEvents {
                high: 12,
                max: 3,
                oom_kill: 1
            }
        );
        assert_eq!(
            MemoryEvents::read(&dir.path().join("none")),
            MemoryEvents::default()
        );
    }
}
