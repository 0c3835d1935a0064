//! The shell driver: a command on the host, inside its cgroup before its first instruction.
//!
//! The child joins the cgroup between fork and exec, still as root, and only then drops to
//! the workload's user (`process::join_cgroup_before_exec`, shared with the pod driver).

use std::ffi::CString;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use nix::unistd::{Gid, Uid, User};

use crate::cgroup::{CgroupError, WorkloadCgroup};
use crate::workload::WorkloadSpec;

#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("user '{0}' does not exist")]
    NoSuchUser(String),
    #[error("cannot look up user '{user}': {why}")]
    UserLookup { user: String, why: String },
    #[error("log file {path}: {why}")]
    Log { path: String, why: String },
    #[error("cannot execute {program}: {why}")]
    Exec { program: String, why: String },
    #[error("not a shell workload")]
    NotShell,
}

/// A started workload process.
pub struct Started {
    pub child: Child,
    pub pid: i32,
    pub start_ticks: u64,
    pub oom_kills_at_start: u64,
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

/// Prepares the cgroup (limits applied, leftovers killed) and starts the process in it.
pub fn start(
    spec: &WorkloadSpec,
    cgroup: &WorkloadCgroup,
    log_path: &Path,
) -> Result<Started, ShellError> {
    let shell = spec.shell.as_ref().ok_or(ShellError::NotShell)?;
    cgroup.create()?;
    cgroup.apply(&spec.limits)?;
    // A previous run may have left children behind (e.g. a daemonised grandchild).
    cgroup.kill_all()?;
    let oom_kills_at_start = cgroup.oom_kills();

    let identity = match shell.user.as_deref() {
        None | Some("root") => None,
        Some(name) => Some(resolve_user(name)?),
    };

    let log_err = |e: std::io::Error| ShellError::Log {
        path: log_path.display().to_string(),
        why: e.to_string(),
    };
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(log_path)
        .map_err(log_err)?;
    let log2 = log.try_clone().map_err(log_err)?;

    let program = &shell.command[0];
    let mut cmd = Command::new(program);
    cmd.args(&shell.command[1..])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("WORKLOAD_NAME", &spec.name)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
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
    let start_ticks = super::process::start_ticks(pid).unwrap_or(0);
    Ok(Started {
        child,
        pid,
        start_ticks,
        oom_kills_at_start,
    })
}
