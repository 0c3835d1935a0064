//! Control groups: layout detection (v1 legacy, v1 hybrid, v2 unified), one cgroup per
//! workload with enforced limits, usage counters, killing and removal.
//!
//! Every file access goes through a directory `Path`, so the parsing and the layout logic are
//! tested against temporary directories laid out like cgroupfs; the real kernel is exercised by
//! the root-only tests in `tests/` and by the cgroup v2 qemu guest.

mod files;
mod fs;
mod layout;
pub mod notify;
pub mod systemd;

pub use files::{
    keyed as read_keyed, parse_flat_keyed, read_u64, write as write_file, CounterReader,
};
pub use layout::{detect, detect_from, Layout, V1Mounts};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::workload::WorkloadName;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup layout: {0}")]
    Layout(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot parse '{content}'")]
    Parse { path: PathBuf, content: String },
    #[error("cgroup {path} still has processes after {waited:?}")]
    NotEmpty { path: PathBuf, waited: Duration },
    #[error("{path}: {why}")]
    Kernel { path: PathBuf, why: String },
    #[error("{path}: asked for {wanted}, the kernel kept {got}")]
    NotApplied {
        path: PathBuf,
        wanted: String,
        got: String,
    },
    /// Boxed: zbus' errors are large, and CgroupError travels in every driver result.
    #[error("{0}")]
    Systemd(Box<systemd::SystemdError>),
}

impl From<systemd::SystemdError> for CgroupError {
    fn from(e: systemd::SystemdError) -> CgroupError {
        CgroupError::Systemd(Box::new(e))
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Limits enforced on one workload's cgroup. `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub cpu_millicores: Option<u64>,
    pub pids: Option<u64>,
}

/// Counters read from one workload's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub memory_bytes: u64,
    /// Cumulative CPU time in nanoseconds.
    pub cpu_ns: u64,
    pub pids: u64,
    pub oom_kills: u64,
    pub cpu_throttled_periods: u64,
    pub pids_max_events: u64,
}

/// How long [`WorkloadCgroup::kill_all`] keeps killing before it gives up.
pub const KILL_DEADLINE: Duration = Duration::from_secs(5);

/// The CFS period used for cpu quotas (the kernel default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// One workload's cgroup, in whichever hierarchy the host has (an enum, not a trait object,
/// so the layout is visible in `match`es).
///
/// Only [`Hierarchy`] makes one, from a validated [`WorkloadName`], under the agent's own
/// `<CGROUP_ROOT>/workloads/`: the private `sealed` field keeps any other code (and any
/// file: it is not `Deserialize`) from pointing the kill and removal functions elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "version", rename_all = "lowercase")]
pub enum WorkloadCgroup {
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        cpuacct: PathBuf,
        pids: PathBuf,
        #[serde(skip)]
        sealed: Sealed,
    },
    V2 {
        dir: PathBuf,
        #[serde(skip)]
        sealed: Sealed,
    },
}

/// Proof that a [`WorkloadCgroup`] was made by this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed(());

impl WorkloadCgroup {
    /// The directory shown to people (the memory controller's on v1).
    pub fn display_path(&self) -> &Path {
        match self {
            WorkloadCgroup::V1 { memory, .. } => memory,
            WorkloadCgroup::V2 { dir, .. } => dir,
        }
    }

    /// Every directory of the cgroup (one per v1 controller mount; one on v2).
    pub fn dirs(&self) -> Vec<&Path> {
        match self {
            WorkloadCgroup::V1 {
                memory,
                cpu,
                cpuacct,
                pids,
                ..
            } => {
                let mut v: Vec<&Path> = vec![memory, cpu, cpuacct, pids];
                v.sort();
                v.dedup();
                v
            }
            WorkloadCgroup::V2 { dir, .. } => vec![dir],
        }
    }

    /// The `cgroup.procs` files a process must be written to so it is inside every controller.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs().iter().map(|d| d.join("cgroup.procs")).collect()
    }

    pub fn exists(&self) -> bool {
        self.dirs().iter().all(|d| d.is_dir())
    }

    pub fn create(&self) -> Result<(), CgroupError> {
        fs::create(self)
    }

    /// Writes the limits; a limit set to `None` is reset to unlimited.
    pub fn apply(&self, limits: &Limits) -> Result<(), CgroupError> {
        fs::apply(self, limits)
    }

    /// Moves a running process into the cgroup (a process the agent starts joins it before
    /// exec instead: `drivers::process::join_cgroup_before_exec`).
    pub fn attach(&self, pid: u32) -> Result<(), CgroupError> {
        fs::attach(self, pid)
    }

    /// The processes in the cgroup.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let dir = match self {
            WorkloadCgroup::V1 { pids, .. } => pids,
            WorkloadCgroup::V2 { dir, .. } => dir,
        };
        let path = dir.join("cgroup.procs");
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        Ok(text
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
            .collect())
    }

    /// The file holding the cgroup's memory usage (its subtree's, hierarchically).
    pub fn memory_usage_file(&self) -> PathBuf {
        match self {
            WorkloadCgroup::V1 { memory, .. } => memory.join("memory.usage_in_bytes"),
            WorkloadCgroup::V2 { dir, .. } => dir.join("memory.current"),
        }
    }

    pub fn oom_kills(&self) -> u64 {
        match self {
            WorkloadCgroup::V1 { memory, .. } => {
                files::keyed(&memory.join("memory.oom_control"), "oom_kill").unwrap_or(0)
            }
            WorkloadCgroup::V2 { dir, .. } => {
                files::keyed(&dir.join("memory.events"), "oom_kill").unwrap_or(0)
            }
        }
    }

    /// Reads the usage counters. Missing optional files read as 0 (older kernels lack some).
    pub fn counters(&self) -> Result<Counters, CgroupError> {
        self.counters_with(&mut CounterReader::direct())
    }

    /// [`WorkloadCgroup::counters`] through a (caching) reader.
    pub fn counters_with(&self, r: &mut CounterReader) -> Result<Counters, CgroupError> {
        Ok(match self {
            WorkloadCgroup::V1 {
                memory,
                cpu,
                cpuacct,
                pids,
                ..
            } => Counters {
                memory_bytes: r.read_u64(&memory.join("memory.usage_in_bytes"))?,
                cpu_ns: r.read_u64(&cpuacct.join("cpuacct.usage"))?,
                pids: r.read_u64(&pids.join("pids.current"))?,
                oom_kills: r
                    .keyed(&memory.join("memory.oom_control"), "oom_kill")
                    .unwrap_or(0),
                cpu_throttled_periods: r.keyed(&cpu.join("cpu.stat"), "nr_throttled").unwrap_or(0),
                pids_max_events: r.keyed(&pids.join("pids.events"), "max").unwrap_or(0),
            },
            WorkloadCgroup::V2 { dir, .. } => {
                let stat = dir.join("cpu.stat");
                let kv = parse_flat_keyed(r.read(&stat).map_err(io_err(&stat))?);
                let get = |k: &str| kv.iter().find(|(n, _)| *n == k).map_or(0, |(_, v)| *v);
                let (cpu_ns, cpu_throttled_periods) =
                    (get("usage_usec") * 1000, get("nr_throttled"));
                Counters {
                    memory_bytes: r.read_u64(&dir.join("memory.current"))?,
                    cpu_ns,
                    pids: r.read_u64(&dir.join("pids.current"))?,
                    oom_kills: r.keyed(&dir.join("memory.events"), "oom_kill").unwrap_or(0),
                    cpu_throttled_periods,
                    pids_max_events: r.keyed(&dir.join("pids.events"), "max").unwrap_or(0),
                }
            }
        })
    }

    /// The child cgroup a shell workload's log writer runs in (`drivers::output`): its
    /// memory, cpu and pids count as the workload's (controllers account hierarchically),
    /// but it is not among the workload's own processes, so stopping the workload never
    /// signals it: it writes the workload's last words and ends when their pipe closes.
    pub fn log_writer(&self) -> WorkloadCgroup {
        let child = |d: &Path| d.join(LOG_WRITER);
        match self {
            WorkloadCgroup::V1 {
                memory,
                cpu,
                cpuacct,
                pids,
                sealed,
            } => WorkloadCgroup::V1 {
                memory: child(memory),
                cpu: child(cpu),
                cpuacct: child(cpuacct),
                pids: child(pids),
                sealed: *sealed,
            },
            WorkloadCgroup::V2 { dir, sealed } => WorkloadCgroup::V2 {
                dir: child(dir),
                sealed: *sealed,
            },
        }
    }

    /// Whether any process is in the cgroup (a missing cgroup has none).
    pub fn has_processes(&self) -> bool {
        self.pids().is_ok_and(|p| !p.is_empty())
    }

    /// Sends `signal` to every process in the cgroup; returns how many were signalled.
    pub fn signal_all(&self, signal: Signal) -> Result<usize, CgroupError> {
        if signal == Signal::SIGKILL {
            if let WorkloadCgroup::V2 { dir, .. } = self {
                // cgroup.kill (5.14+) kills atomically, including processes forked meanwhile,
                // but the whole subtree: not while a log writer still drains the output (the
                // loop in `kill_all` catches forks one round later, bounded by pids.max).
                let kill = dir.join("cgroup.kill");
                if kill.exists()
                    && !self.log_writer().has_processes()
                    && files::write(&kill, "1").is_ok()
                {
                    return Ok(self.pids()?.len());
                }
            }
        }
        let pids = self.pids()?;
        for pid in &pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), signal);
        }
        Ok(pids.len())
    }

    /// SIGTERM, then SIGKILL after `grace`, until the cgroup is empty (bounded).
    pub fn stop_all(&self, grace: Duration) -> Result<(), CgroupError> {
        if self.pids()?.is_empty() {
            return Ok(());
        }
        self.signal_all(Signal::SIGTERM)?;
        if self.wait_empty(grace)? {
            return Ok(());
        }
        self.kill_all()
    }

    /// SIGKILL everything until the cgroup is empty. A fork bomb can race a one-pass kill, so
    /// repeat (bounded: the pids limit caps what it can fork).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let deadline = KILL_DEADLINE;
        let start = Instant::now();
        while start.elapsed() < deadline {
            if self.signal_all(Signal::SIGKILL)? == 0 {
                return Ok(());
            }
            if self.wait_empty(Duration::from_millis(200))? {
                return Ok(());
            }
        }
        Err(CgroupError::NotEmpty {
            path: self.display_path().to_path_buf(),
            waited: deadline,
        })
    }

    /// Waits until the cgroup has no processes; `Ok(false)` on time-out.
    pub fn wait_empty(&self, timeout: Duration) -> Result<bool, CgroupError> {
        let start = Instant::now();
        loop {
            if self.pids()?.is_empty() {
                return Ok(true);
            }
            if start.elapsed() >= timeout {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Empties and deletes the cgroup (all controllers). Missing directories are fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        if !self.dirs().iter().any(|d| d.exists()) {
            return Ok(());
        }
        if self.dirs().iter().all(|d| d.join("cgroup.procs").exists()) {
            self.kill_all()?;
        }
        self.retire_log_writer()?;
        for d in self.dirs() {
            fs::remove_dir(d)?;
        }
        Ok(())
    }

    /// Waits (briefly) for the log writer of an earlier run to write what is left in its
    /// pipe and end, kills it if it does not, and removes its cgroup. Call it once the
    /// workload's own processes are gone: their end is the end of the writer's input.
    pub fn retire_log_writer(&self) -> Result<(), CgroupError> {
        let writer = self.log_writer();
        if !writer.dirs().iter().any(|d| d.exists()) {
            return Ok(());
        }
        if writer.has_processes() && !writer.wait_empty(LOG_WRITER_DRAIN)? {
            writer.kill_all()?;
        }
        for d in writer.dirs() {
            fs::remove_dir(d)?;
        }
        Ok(())
    }
}

/// The child cgroup of a workload's log writer ([`WorkloadCgroup::log_writer`]). It cannot
/// clash with a workload's name: it lives inside a workload's cgroup, not beside the others.
const LOG_WRITER: &str = "log-writer";

/// How long a log writer may take to write what its pipe still holds once the workload's
/// processes are gone (a pipe holds at most 1 MiB; a writer is usually done in
/// milliseconds).
const LOG_WRITER_DRAIN: Duration = Duration::from_secs(2);

/// Quota in µs per [`CPU_PERIOD_US`] for a millicore limit (the kernel's minimum is 1000 µs).
pub fn cpu_quota_us(millicores: u64) -> u64 {
    (millicores * CPU_PERIOD_US / 1000).max(1000)
}

/// Where workload cgroups live, and who makes them (the cgroup driver, like the kubelet's):
/// the agent itself in its own subtree (cgroupfs), or systemd, as units in the agent's slice
/// (`systemd::SliceTree`).
#[derive(Debug, Clone)]
pub struct Hierarchy {
    pub layout: Layout,
    /// v2: the agent's base cgroup directory; v1: the subtree name under each controller.
    base: PathBuf,
    /// The systemd driver's slices; `None`: the cgroupfs driver.
    systemd: Option<systemd::SliceTree>,
}

impl Hierarchy {
    /// The cgroupfs driver's hierarchy for `root_name` (e.g. `device-worker-ng`) in the
    /// detected layout; `base` overrides where the v2 subtree lives (tests).
    pub fn new(layout: Layout, root_name: &str, delegated_base: Option<PathBuf>) -> Self {
        let base = match (&layout, delegated_base) {
            (Layout::Unified { .. }, Some(b)) => b,
            (Layout::Unified { root }, None) => root.join(root_name),
            (_, _) => PathBuf::from(root_name),
        };
        Hierarchy {
            layout,
            base,
            systemd: None,
        }
    }

    /// The systemd driver's: workloads are units in `tree`'s slice.
    pub fn under_systemd(tree: systemd::SliceTree) -> Self {
        let base = tree.cgroup().display_path().to_path_buf();
        Hierarchy {
            layout: tree.layout.clone(),
            base,
            systemd: Some(tree),
        }
    }

    /// `systemd` or `cgroupfs`.
    pub fn driver_name(&self) -> &'static str {
        if self.systemd.is_some() {
            "systemd"
        } else {
            "cgroupfs"
        }
    }

    /// The systemd driver's slices (`None` under the cgroupfs driver).
    pub fn slice_tree(&self) -> Option<&systemd::SliceTree> {
        self.systemd.as_ref()
    }

    pub fn base_display(&self) -> PathBuf {
        match &self.layout {
            _ if self.systemd.is_some() => self.base.clone(),
            Layout::Unified { .. } => self.base.clone(),
            Layout::Legacy(m) | Layout::Hybrid(m) => m.memory.join(&self.base),
        }
    }

    /// The cgroup of a workload: `<base>/workloads/<name>` (cgroupfs) or its slice's
    /// (systemd), nothing else (the name is one validated label: no `/`, no `..`).
    pub fn workload(&self, name: &WorkloadName) -> WorkloadCgroup {
        match &self.systemd {
            Some(tree) => tree.workload_cgroup(name.as_str()),
            None => self.under_workloads(Path::new(name.as_str())),
        }
    }

    /// New limits for a workload's cgroup (its slice and service under systemd).
    pub fn limit_workload(&self, name: &WorkloadName, limits: &Limits) -> Result<(), CgroupError> {
        match &self.systemd {
            Some(tree) => Ok(tree.limit(name.as_str(), limits)?),
            None => self.workload(name).apply(limits),
        }
    }

    fn under_workloads(&self, rel: &Path) -> WorkloadCgroup {
        let rel = if rel.as_os_str().is_empty() {
            PathBuf::from("workloads")
        } else {
            Path::new("workloads").join(rel)
        };
        match &self.layout {
            Layout::Unified { .. } => WorkloadCgroup::V2 {
                dir: self.base.join(rel),
                sealed: Sealed(()),
            },
            Layout::Legacy(m) | Layout::Hybrid(m) => WorkloadCgroup::V1 {
                memory: m.memory.join(&self.base).join(&rel),
                cpu: m.cpu.join(&self.base).join(&rel),
                cpuacct: m.cpuacct.join(&self.base).join(&rel),
                pids: m.pids.join(&self.base).join(&rel),
                sealed: Sealed(()),
            },
        }
    }

    /// Creates the subtree and, on v2, enables the controllers for the children. When the base
    /// holds processes (the agent itself, delegated by systemd), they move into `base/agent`
    /// first: cgroup v2 allows controllers only in cgroups without processes of their own.
    pub fn setup(&self) -> Result<(), CgroupError> {
        if let Some(tree) = &self.systemd {
            return Ok(tree.setup()?);
        }
        match &self.layout {
            Layout::Unified { .. } => {
                // The parent must offer the controllers to the base (the root always may).
                if let Some(parent) = self.base.parent() {
                    let offered = std::fs::read_to_string(self.base.join("cgroup.controllers"))
                        .or_else(|_| std::fs::read_to_string(parent.join("cgroup.subtree_control")))
                        .unwrap_or_default();
                    if !["memory", "cpu", "pids"]
                        .iter()
                        .all(|c| offered.split_whitespace().any(|o| o == *c))
                    {
                        enable_v2_controllers(parent)?;
                    }
                }
                let workloads = self.base.join("workloads");
                self.workloads_parent().create()?;
                let procs = self.base.join("cgroup.procs");
                let text = std::fs::read_to_string(&procs).map_err(io_err(&procs))?;
                if !text.trim().is_empty() {
                    let leaf = WorkloadCgroup::V2 {
                        dir: self.base.join("agent"),
                        sealed: Sealed(()),
                    };
                    leaf.create()?;
                    for pid in text.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                        // A process that exited meanwhile cannot move: nothing lost.
                        let _ = leaf.attach(pid);
                    }
                }
                for dir in [&self.base, &workloads] {
                    enable_v2_controllers(dir)?;
                }
            }
            Layout::Legacy(_) | Layout::Hybrid(_) => self.workloads_parent().create()?,
        }
        Ok(())
    }

    /// The parent of every workload cgroup (`<base>/workloads`), as a cgroup of its own.
    pub fn workloads_parent(&self) -> WorkloadCgroup {
        match &self.systemd {
            Some(tree) => tree.cgroup(),
            None => self.under_workloads(Path::new("")),
        }
    }

    /// Caps all workloads together: whatever they do, the kernel keeps them within `limits`,
    /// so the OS and the agent keep their reservation even before the agent reacts.
    pub fn cap_workloads(&self, limits: &Limits) -> Result<(), CgroupError> {
        match &self.systemd {
            Some(tree) => Ok(tree.cap(limits)?),
            None => self.workloads_parent().apply(limits),
        }
    }

    /// The workload cgroups that exist (to find orphans after a restart); a directory whose
    /// name is no workload name is reported, never touched.
    pub fn existing_workloads(&self) -> Vec<Result<WorkloadName, String>> {
        if let Some(tree) = &self.systemd {
            return tree
                .existing()
                .into_iter()
                .map(|n| WorkloadName::parse(&n).map_err(|_| n))
                .collect();
        }
        let dir = match &self.layout {
            Layout::Unified { .. } => self.base.join("workloads"),
            Layout::Legacy(m) | Layout::Hybrid(m) => m.memory.join(&self.base).join("workloads"),
        };
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut names: Vec<Result<WorkloadName, String>> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| {
                let raw = e.file_name().to_string_lossy().into_owned();
                WorkloadName::parse(&raw).map_err(|_| dir.join(&raw).display().to_string())
            })
            .collect();
        names.sort();
        names
    }

    /// Removes the whole subtree (tests and `purge`): every workload cgroup, then the base.
    pub fn remove_all(&self) -> Result<(), CgroupError> {
        if let Some(tree) = &self.systemd {
            return Ok(tree.remove_all(Duration::from_secs(10))?);
        }
        for name in self.existing_workloads().into_iter().flatten() {
            self.workload(&name).remove()?;
        }
        let dirs: Vec<PathBuf> = match &self.layout {
            Layout::Unified { .. } => vec![self.base.join("workloads"), self.base.clone()],
            Layout::Legacy(m) | Layout::Hybrid(m) => [&m.memory, &m.cpu, &m.cpuacct, &m.pids]
                .iter()
                .flat_map(|c| [c.join(&self.base).join("workloads"), c.join(&self.base)])
                .collect(),
        };
        for d in dirs {
            fs::remove_dir(&d)?;
        }
        Ok(())
    }
}

fn enable_v2_controllers(dir: &Path) -> Result<(), CgroupError> {
    let available = dir.join("cgroup.controllers");
    let text = std::fs::read_to_string(&available).map_err(io_err(&available))?;
    let wanted: Vec<String> = ["memory", "cpu", "pids"]
        .iter()
        .filter(|c| text.split_whitespace().any(|a| a == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if wanted.len() < 3 {
        return Err(CgroupError::Layout(format!(
            "{} offers controllers '{}', need memory, cpu and pids (enable them in the parent's cgroup.subtree_control)",
            dir.display(),
            text.trim()
        )));
    }
    files::write(&dir.join("cgroup.subtree_control"), &wanted.join(" "))
}

#[cfg(test)]
mod tests;
