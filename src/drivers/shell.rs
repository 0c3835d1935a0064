//! The shell driver: a command on the host, inside its cgroup before its first instruction.
//!
//! The child joins the cgroup between fork and exec, still as root, and only then drops to
//! the workload's user (`process::join_cgroup_before_exec`, shared with the pod driver).
//! Its stdout and stderr are a pipe to its log writer ([`super::output`]), not the agent.

use std::ffi::CString;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::unistd::{Gid, Uid, User};

use super::{Driver, DriverError, Placement, Run, RunEnd, Started, Watch};
use crate::cgroup::CgroupError;
use crate::store::WorkloadRecord;

#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("user '{0}' does not exist")]
    NoSuchUser(String),
    #[error("cannot look up user '{user}': {why}")]
    UserLookup { user: String, why: String },
    #[error("output: {0}")]
    Output(#[from] super::output::OutputError),
    #[error("output pipe: {0}")]
    Pipe(std::io::Error),
    #[error("cannot execute {program}: {why}")]
    Exec { program: String, why: String },
    #[error("not a shell workload")]
    NotShell,
}

/// The shell driver.
#[derive(Debug)]
pub struct ShellDriver {
    /// WORKLOAD_LOG_MAX: most bytes of one workload's output kept (log and rotated log).
    log_max: u64,
}

struct Identity {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
    home: String,
    name: String,
}

fn resolve_user(name: &str) -> Result<Identity, ShellError> {
    let user = User::from_name(name)
        .map_err(|e| ShellError::UserLookup {
            user: name.into(),
            why: e.to_string(),
        })?
        .ok_or_else(|| ShellError::NoSuchUser(name.into()))?;
    let cname = CString::new(name).map_err(|_| ShellError::NoSuchUser(name.into()))?;
    let groups = nix::unistd::getgrouplist(&cname, user.gid).unwrap_or_else(|_| vec![user.gid]);
    Ok(Identity {
        uid: user.uid,
        gid: user.gid,
        groups,
        home: user.dir.display().to_string(),
        name: user.name,
    })
}

/// A uid of its own (no passwd entry): its own group, no supplementary groups, `/` as home.
fn dynamic(uid: u32) -> Identity {
    Identity {
        uid: Uid::from_raw(uid),
        gid: Gid::from_raw(uid),
        groups: vec![Gid::from_raw(uid)],
        home: "/".into(),
        name: format!("dwng-{uid}"),
    }
}

impl ShellDriver {
    pub fn new(log_max: u64) -> ShellDriver {
        ShellDriver { log_max }
    }
}

impl Driver for ShellDriver {
    /// Prepares the cgroup (limits applied, leftovers killed) and starts the process in it.
    fn start(&self, run: &Run) -> Result<Started, DriverError> {
        let (spec, cgroup, log_path) = (run.spec, run.cgroup, run.log);
        let shell = spec.shell.as_ref().ok_or(ShellError::NotShell)?;
        cgroup.create()?;
        cgroup.apply(&spec.limits)?;
        // A previous run may have left children behind (e.g. a daemonised grandchild).
        cgroup.kill_all()?;
        let oom_kills_at_start = cgroup.oom_kills();

        let identity = match (shell.user.as_deref(), run.uid) {
            (Some("root"), _) => None,
            // A uid (a PodSpec's runAsUser): its passwd entry if it has one, else itself, as
            // Kubernetes runs it.
            (Some(uid), _) if uid.bytes().all(|b| b.is_ascii_digit()) => {
                let uid: u32 = uid
                    .parse()
                    .map_err(|_| ShellError::NoSuchUser(uid.into()))?;
                match User::from_uid(Uid::from_raw(uid)) {
                    Ok(Some(u)) => Some(resolve_user(&u.name)?),
                    _ => Some(dynamic(uid)),
                }
            }
            (Some(name), _) => Some(resolve_user(name)?),
            (None, Some(uid)) => Some(dynamic(uid)),
            (None, None) => None,
        };

        // After `kill_all`: the earlier run's writer has seen the end of its input (the new
        // one waits for it to finish).
        let stdout = super::output::start_writer(cgroup, log_path, self.log_max)
            .map_err(ShellError::Output)?;
        let stderr = stdout.try_clone().map_err(ShellError::Pipe)?;

        let program = &shell.command[0];
        let mut cmd = Command::new(program);
        cmd.args(&shell.command[1..])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("WORKLOAD_NAME", spec.name.as_str())
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .current_dir(shell.working_dir.as_deref().unwrap_or(Path::new("/")));
        match &identity {
            Some(id) => cmd.env("HOME", &id.home).env("USER", &id.name),
            None => cmd.env("HOME", "/root").env("USER", "root"),
        };
        cmd.envs(shell.env.iter().map(|(k, v)| (k, v)));
        let creds = identity
            .as_ref()
            .map(|id| (id.uid, id.gid, id.groups.clone()));
        let procs =
            super::process::join_cgroup_before_exec(&mut cmd, &cgroup.procs_files(), creds, true)?;
        let child = cmd.spawn().map_err(|e| ShellError::Exec {
            program: program.clone(),
            why: e.to_string(),
        })?;
        drop(procs);
        let pid = child.id() as i32;
        // The watch reaps it (waitpid on its pidfd's readiness), not `Child::wait`.
        drop(child);
        let start_ticks = super::process::start_ticks(pid).unwrap_or(0);
        Ok(Started {
            pid: Some(pid),
            start_ticks,
            oom_kills_at_start,
            watch: Watch::Child { pid },
            notice: None,
        })
    }

    fn stop(&self, at: &Placement, grace: Duration) -> Result<(), DriverError> {
        Ok(at.cgroup.stop_all(grace)?)
    }

    fn cleanup(&self, at: &Placement) -> Result<(), DriverError> {
        Ok(at.cgroup.remove()?)
    }

    /// The recorded process, if it is still the same one and inside the workload's cgroup.
    /// It is no child of this agent: its exit status cannot be known, only that it ended
    /// (and, from the cgroup's counter, whether the kernel OOM-killed it).
    fn adopt(&self, at: &Placement, record: &WorkloadRecord) -> Option<Started> {
        let pid = record.pid?;
        let ticks = record.pid_start_ticks;
        if !super::process::is_same_process(pid, ticks)
            || !at.cgroup.pids().is_ok_and(|p| p.contains(&pid))
        {
            return None;
        }
        Some(Started {
            pid: Some(pid),
            start_ticks: ticks,
            oom_kills_at_start: record.oom_kills_at_start,
            watch: Watch::Processes {
                pids: vec![(pid, ticks)],
                finish: Box::new(|_| RunEnd::default()),
            },
            notice: None,
        })
    }
}
