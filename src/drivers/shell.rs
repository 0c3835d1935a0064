//! The shell driver: a command on the host, inside its cgroup before its first instruction.
//!
//! The child joins the cgroup between fork and exec (in `pre_exec`, still as root), and only
//! then drops to the workload's user: whatever it executes is already limited, and it cannot
//! write to the root-owned `cgroup.procs` to leave.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
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

/// Formats `n` in decimal into `buf` without allocating (safe between fork and exec).
fn itoa(mut n: u32, buf: &mut [u8; 12]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
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

    // Opened before fork: the child only write(2)s its pid into them.
    let procs: Vec<OwnedFd> = cgroup
        .procs_files()
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_CLOEXEC)
                .open(p)
                .map(OwnedFd::from)
                .map_err(|source| {
                    ShellError::Cgroup(CgroupError::Io {
                        path: p.clone(),
                        source,
                    })
                })
        })
        .collect::<Result<_, _>>()?;
    let proc_fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();

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
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe system calls (setsid, write, setgroups, setgid, setuid) on memory
    // prepared before the fork; it does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            let mut buf = [0u8; 12];
            let pid = itoa(nix::libc::getpid() as u32, &mut buf);
            for fd in &proc_fds {
                if nix::libc::write(*fd, pid.as_ptr().cast(), pid.len()) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some((uid, gid, groups)) = &creds {
                nix::unistd::setgroups(groups)?;
                nix::unistd::setgid(*gid)?;
                nix::unistd::setuid(*uid)?;
            }
            Ok(())
        });
    }
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

#[cfg(test)]
mod tests {
    #[test]
    fn itoa_formats_without_allocating() {
        let mut b = [0u8; 12];
        assert_eq!(super::itoa(0, &mut b), b"0");
        assert_eq!(super::itoa(4194304, &mut b), b"4194304");
        assert_eq!(super::itoa(u32::MAX, &mut b), b"4294967295");
    }
}
