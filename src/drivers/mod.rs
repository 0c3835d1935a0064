//! Drivers run workloads. Each call is blocking and runs on a workload's lane (a blocking
//! thread, one command at a time per workload), never on the controller task. The controller
//! only calls [`start`], [`stop`] and [`cleanup`], which dispatch on the workload's kind.

pub mod k8s;
pub mod podman;
pub mod process;
pub mod shell;
pub mod systemd;

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use crate::cgroup::{CgroupError, WorkloadCgroup};
use crate::workload::{DesiredSecret, WorkloadKind, WorkloadSpec};

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
    #[error("kind '{0}' has no driver on this agent")]
    Unsupported(&'static str),
}

/// How one run's end is awaited (on a waiter thread).
pub enum Waiter {
    /// Our own child process: wait(2) gives its exit status.
    Child(Child),
    /// A driver-specific blocking wait (e.g. a container runtime's own wait call).
    Blocking(Box<dyn FnOnce() -> RunEnd + Send>),
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

impl Waiter {
    pub fn wait(self) -> RunEnd {
        match self {
            Waiter::Child(mut c) => {
                use std::os::unix::process::ExitStatusExt;
                match c.wait() {
                    Ok(s) => RunEnd {
                        code: s.code(),
                        signal: s.signal(),
                        oom_killed: false,
                    },
                    Err(_) => RunEnd::default(),
                }
            }
            Waiter::Blocking(f) => f(),
        }
    }
}

/// A started run.
pub struct Started {
    /// The process the agent watches (adoption after an agent restart goes by pid + ticks).
    pub pid: i32,
    pub start_ticks: u64,
    pub oom_kills_at_start: u64,
    pub waiter: Waiter,
    /// Something the operator must know about this run (e.g. limits podman cannot enforce).
    pub notice: Option<String>,
}

/// Starts one run of the workload inside `cgroup` with its limits applied.
/// `secrets` is the desired state's `secrets` list (PROTOCOL §4.4): drivers that consume them
/// make sure they exist, as listed, before the workload starts.
pub fn start(
    spec: &WorkloadSpec,
    cgroup: &WorkloadCgroup,
    log_path: &Path,
    secrets: &[DesiredSecret],
) -> Result<Started, DriverError> {
    match spec.kind {
        WorkloadKind::Shell => {
            let s = shell::start(spec, cgroup, log_path)?;
            Ok(Started {
                pid: s.pid,
                start_ticks: s.start_ticks,
                oom_kills_at_start: s.oom_kills_at_start,
                waiter: Waiter::Child(s.child),
                notice: None,
            })
        }
        WorkloadKind::Pod => {
            // A pod reads its secrets when it is created.
            let report = podman::secrets::sync(secrets)?;
            if let Some((name, why)) = report.failed.first() {
                return Err(DriverError::Podman(podman::PodmanError::Unexpected(
                    format!("secret {name}: {why}"),
                )));
            }
            let s = podman::start(spec, cgroup, log_path)?;
            Ok(Started {
                pid: s.pid,
                start_ticks: s.start_ticks,
                oom_kills_at_start: s.oom_kills_at_start,
                waiter: Waiter::Blocking(s.waiter),
                notice: s.notice,
            })
        }
        // A Deployment has no local process: pid 0 and no cgroup of the agent; the run is
        // its pod, watched through the API (drivers/k8s).
        WorkloadKind::K8s => {
            let s = k8s::driver().start(spec, secrets)?;
            Ok(Started {
                pid: 0,
                start_ticks: 0,
                oom_kills_at_start: 0,
                waiter: Waiter::Blocking(s.waiter),
                notice: s.notice,
            })
        }
    }
}

/// Stops every process of the workload (SIGTERM, `grace`, SIGKILL).
pub fn stop(
    kind: &WorkloadKind,
    cgroup: &WorkloadCgroup,
    grace: Duration,
) -> Result<(), DriverError> {
    match kind {
        WorkloadKind::Pod => Ok(podman::stop(cgroup, grace)?),
        WorkloadKind::K8s => Ok(k8s::driver().stop(&podman::workload_name(cgroup), grace)?),
        WorkloadKind::Shell => Ok(cgroup.stop_all(grace)?),
    }
}

/// Removes everything the workload left: its cgroup (emptied first) and driver resources.
pub fn cleanup(kind: &WorkloadKind, cgroup: &WorkloadCgroup) -> Result<(), DriverError> {
    match kind {
        WorkloadKind::Pod => Ok(podman::cleanup(cgroup)?),
        WorkloadKind::K8s => {
            k8s::driver().cleanup(&podman::workload_name(cgroup))?;
            Ok(cgroup.remove()?)
        }
        WorkloadKind::Shell => Ok(cgroup.remove()?),
    }
}

/// Whether a recorded run (after an agent restart) is still the workload's: the same process,
/// inside the workload's cgroup (a pod's processes are in podman's cgroups below it).
/// A k8s workload has no process: the API answers (its Deployment exists and its pod runs or
/// is being deployed).
pub fn still_running(kind: &WorkloadKind, cgroup: &WorkloadCgroup, pid: i32, ticks: u64) -> bool {
    if *kind == WorkloadKind::K8s {
        return k8s::driver().still_running(&podman::workload_name(cgroup));
    }
    if !process::is_same_process(pid, ticks) {
        return false;
    }
    match kind {
        WorkloadKind::Pod => podman::in_subtree(cgroup, pid),
        WorkloadKind::Shell | WorkloadKind::K8s => cgroup.pids().is_ok_and(|p| p.contains(&pid)),
    }
}

/// A waiter for an adopted run that has no process to watch (a k8s workload's pod); `None`
/// for kinds whose adopted process the sampler watches by pid.
pub fn adopted_waiter(kind: &WorkloadKind, cgroup: &WorkloadCgroup) -> Option<Waiter> {
    match kind {
        WorkloadKind::K8s => match k8s::driver().watcher(&podman::workload_name(cgroup)) {
            Ok(w) => Some(Waiter::Blocking(w)),
            // Nothing to watch: the run has ended.
            Err(_) => Some(Waiter::Blocking(Box::new(RunEnd::default))),
        },
        WorkloadKind::Shell | WorkloadKind::Pod => None,
    }
}
