//! Drivers run workloads. One seam, [`Driver`], dispatched by an enum ([`AnyDriver`], the way
//! youki's `AnyCgroupManager` dispatches cgroup managers): the controller asks [`Drivers`] —
//! built once from the settings in `daemon.rs` — for the driver of a workload's kind and calls
//! it on the workload's lane (a blocking task, one operation at a time per workload, never on
//! the controller task). How a run's end is awaited is the driver's answer too ([`Watch`]),
//! awaited on the reactor by [`watch::until_end`].

pub mod k8s;
pub mod output;
pub mod podman;
pub mod process;
pub mod shell;
pub mod watch;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cgroup::{CgroupError, Layout, WorkloadCgroup};
use crate::store::WorkloadRecord;
use crate::workload::{DesiredSecret, WorkloadKind, WorkloadName, WorkloadSpec};

pub use watch::{Poll, Watch};

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{0}")]
    Shell(#[from] shell::ShellError),
    #[error("{0}")]
    Podman(#[from] podman::PodmanError),
    #[error("{0}")]
    K8s(#[from] k8s::K8sError),
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
}

/// How a run ended, as far as the driver can tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunEnd {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The driver saw an OOM kill the workload cgroup's own counter does not show (cgroup v1
    /// counts a kill only in the victim's cgroup, e.g. a pod container's, below the workload's).
    pub oom_killed: bool,
}

/// A started (or adopted) run.
#[derive(Debug)]
pub struct Started {
    /// The main process; `None` for a run without a local process (k8s).
    pub pid: Option<i32>,
    pub start_ticks: u64,
    pub oom_kills_at_start: u64,
    pub watch: Watch,
    /// Something the operator must know about this run (e.g. limits podman cannot enforce).
    pub notice: Option<String>,
}

/// Everything one start needs.
pub struct Run<'a> {
    pub spec: &'a WorkloadSpec,
    pub cgroup: &'a WorkloadCgroup,
    pub log: &'a Path,
    /// The desired state's `secrets` (PROTOCOL §4.4): drivers that consume them make sure
    /// they exist, as listed, before the workload starts.
    pub secrets: &'a [DesiredSecret],
    /// The uid a shell workload without an explicit `user:` runs as.
    pub uid: Option<u32>,
}

/// Where a workload lives: enough to stop, clean up or adopt it.
#[derive(Debug, Clone)]
pub struct Placement {
    pub name: WorkloadName,
    pub kind: WorkloadKind,
    pub cgroup: WorkloadCgroup,
}

/// What every kind of workload can be asked. Each call blocks (it runs on a lane).
pub trait Driver {
    /// Starts one run inside the workload's cgroup with its limits applied.
    fn start(&self, run: &Run) -> Result<Started, DriverError>;
    /// Stops every process of the workload (SIGTERM, `grace`, SIGKILL).
    fn stop(&self, at: &Placement, grace: Duration) -> Result<(), DriverError>;
    /// Removes everything the workload left: driver resources, then its cgroup.
    fn cleanup(&self, at: &Placement) -> Result<(), DriverError>;
    /// After an agent restart: the recorded run if it still is the workload's (same process,
    /// in the workload's cgroup; for k8s: its Deployment exists), with how to watch it.
    fn adopt(&self, at: &Placement, record: &WorkloadRecord) -> Option<Started>;
}

/// The drivers, dispatched by enum.
pub enum AnyDriver {
    Shell(shell::ShellDriver),
    Pod(podman::PodDriver),
    K8s(k8s::K8sDriver),
}

impl Driver for AnyDriver {
    fn start(&self, run: &Run) -> Result<Started, DriverError> {
        match self {
            AnyDriver::Shell(d) => d.start(run),
            AnyDriver::Pod(d) => d.start(run),
            AnyDriver::K8s(d) => d.start(run),
        }
    }

    fn stop(&self, at: &Placement, grace: Duration) -> Result<(), DriverError> {
        match self {
            AnyDriver::Shell(d) => d.stop(at, grace),
            AnyDriver::Pod(d) => d.stop(at, grace),
            AnyDriver::K8s(d) => d.stop(at, grace),
        }
    }

    fn cleanup(&self, at: &Placement) -> Result<(), DriverError> {
        match self {
            AnyDriver::Shell(d) => d.cleanup(at),
            AnyDriver::Pod(d) => d.cleanup(at),
            AnyDriver::K8s(d) => d.cleanup(at),
        }
    }

    fn adopt(&self, at: &Placement, record: &WorkloadRecord) -> Option<Started> {
        match self {
            AnyDriver::Shell(d) => d.adopt(at, record),
            AnyDriver::Pod(d) => d.adopt(at, record),
            AnyDriver::K8s(d) => d.adopt(at, record),
        }
    }
}

/// What the drivers need from the agent's settings.
#[derive(Debug, Clone)]
pub struct DriverSettings {
    pub state_dir: PathBuf,
    pub layout: Layout,
    pub rootless_user: Option<String>,
    pub xdg_runtime_dir: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    /// WORKLOAD_LOG_MAX (shell workloads' output).
    pub log_max: u64,
}

/// One driver per kind, built once at start-up and shared by every lane.
pub struct Drivers {
    shell: AnyDriver,
    pod: AnyDriver,
    k8s: AnyDriver,
}

impl Drivers {
    pub fn new(s: &DriverSettings) -> Drivers {
        Drivers {
            shell: AnyDriver::Shell(shell::ShellDriver::new(s.log_max)),
            pod: AnyDriver::Pod(podman::PodDriver::new(podman::PodmanSettings {
                state_dir: s.state_dir.clone(),
                layout: s.layout.clone(),
                rootless_user: s.rootless_user.clone(),
                xdg_runtime_dir: s.xdg_runtime_dir.clone(),
            })),
            k8s: AnyDriver::K8s(k8s::K8sDriver::new(k8s::K8sSettings {
                kubeconfig: s.kubeconfig.clone(),
                ..k8s::K8sSettings::default()
            })),
        }
    }

    pub fn of(&self, kind: &WorkloadKind) -> &AnyDriver {
        match kind {
            WorkloadKind::Shell => &self.shell,
            WorkloadKind::Pod => &self.pod,
            WorkloadKind::K8s => &self.k8s,
        }
    }

    /// The pod driver (podman secrets are synced for all pods together).
    pub fn pods(&self) -> Option<&podman::PodDriver> {
        match &self.pod {
            AnyDriver::Pod(p) => Some(p),
            _ => None,
        }
    }

    /// The k8s driver (pruning what the agent no longer wants works across workloads).
    pub fn k8s(&self) -> Option<&k8s::K8sDriver> {
        match &self.k8s {
            AnyDriver::K8s(k) => Some(k),
            _ => None,
        }
    }
}
