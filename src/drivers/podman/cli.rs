//! Running the `podman` CLI, rootful or as the rootless user, with a deadline.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Uid, User};

use super::PodmanError;
use crate::cgroup::WorkloadCgroup;

/// Where podman is looked for (the agent runs with a minimal PATH under systemd).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Deadline of one podman call; `kube play` may pull images and gets more.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);
pub const PLAY_TIMEOUT: Duration = Duration::from_secs(600);

/// The unprivileged user rootless pods run as.
#[derive(Debug, Clone)]
pub struct RootlessUser {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
    pub home: PathBuf,
    pub runtime_dir: PathBuf,
}

impl RootlessUser {
    pub fn resolve(name: &str, runtime_dir: Option<PathBuf>) -> Result<Self, PodmanError> {
        let user = User::from_name(name)
            .map_err(|e| PodmanError::Rootless(format!("cannot look up user '{name}': {e}")))?
            .ok_or_else(|| PodmanError::Rootless(format!("user '{name}' does not exist")))?;
        let cname = CString::new(name)
            .map_err(|_| PodmanError::Rootless(format!("user '{name}' does not exist")))?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid).unwrap_or_else(|_| vec![user.gid]);
        let runtime_dir =
            runtime_dir.unwrap_or_else(|| PathBuf::from(format!("/run/user/{}", user.uid)));
        Ok(RootlessUser {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
            groups,
            home: user.dir,
            runtime_dir,
        })
    }

    /// Creates XDG_RUNTIME_DIR (0700, owned by the user) if it is missing: without systemd
    /// logind nobody else does.
    fn ensure_runtime_dir(&self) -> Result<(), PodmanError> {
        let d = &self.runtime_dir;
        if d.is_dir() {
            return Ok(());
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
            .and_then(|_| {
                nix::unistd::chown(d, Some(self.uid), Some(self.gid)).map_err(std::io::Error::from)
            })
            .map_err(|e| PodmanError::Rootless(format!("XDG_RUNTIME_DIR {}: {e}", d.display())))
    }
}

/// One podman "connection": root's storage, or a rootless user's.
#[derive(Debug, Clone, Default)]
pub struct Podman {
    pub user: Option<RootlessUser>,
}

/// What a podman call printed.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

impl Podman {
    pub fn rootful() -> Self {
        Podman { user: None }
    }

    pub fn rootless(user: RootlessUser) -> Result<Self, PodmanError> {
        user.ensure_runtime_dir()?;
        Ok(Podman { user: Some(user) })
    }

    pub fn is_rootless(&self) -> bool {
        self.user.is_some()
    }

    /// Runs podman and returns its output; a non-zero exit is [`PodmanError::Failed`] with
    /// podman's own message.
    pub fn run(&self, args: &[&str]) -> Result<Output, PodmanError> {
        self.run_with(args, None, None, CALL_TIMEOUT)
    }

    /// Like [`run`](Self::run), with `stdin`, and with the podman process (and so conmon and,
    /// when podman cannot create cgroups, the containers) started inside `join`.
    pub fn run_with(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        join: Option<&WorkloadCgroup>,
        timeout: Duration,
    ) -> Result<Output, PodmanError> {
        let shown = || format!("podman {}", args.join(" "));
        let mut cmd = Command::new("podman");
        cmd.args(args)
            .env_clear()
            .env("PATH", PATH)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .current_dir("/");
        let creds = match &self.user {
            None => {
                cmd.env("HOME", "/root").env("USER", "root");
                None
            }
            Some(u) => {
                cmd.env("HOME", &u.home)
                    .env("USER", &u.name)
                    .env("XDG_RUNTIME_DIR", &u.runtime_dir);
                Some((u.uid, u.gid, u.groups.clone()))
            }
        };
        let cgroup_procs = join.map(|cg| cg.procs_files()).unwrap_or_default();
        let procs =
            crate::drivers::process::join_cgroup_before_exec(&mut cmd, &cgroup_procs, creds, false)
                .map_err(|e| PodmanError::Io {
                    path: e.to_string(),
                    why: "cannot open the cgroup".into(),
                })?;
        let mut child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                PodmanError::NotInstalled
            } else {
                PodmanError::Command {
                    command: shown(),
                    why: e.to_string(),
                }
            }
        })?;
        drop(procs);
        if let (Some(data), Some(mut w)) = (stdin, child.stdin.take()) {
            let _ = w.write_all(data);
        }
        let (status, stdout, stderr) =
            wait_with_output(child, timeout).map_err(|e| PodmanError::Command {
                command: shown(),
                why: e.to_string(),
            })?;
        match status {
            None => Err(PodmanError::Failed {
                command: shown(),
                message: format!("no answer within {timeout:?}"),
            }),
            Some(s) if s.success() => Ok(Output { stdout, stderr }),
            Some(s) => Err(PodmanError::Failed {
                command: shown(),
                message: podman_message(&stderr, &stdout, s.code()),
            }),
        }
    }
}

/// Waits for `child` (killed at `timeout`: `None` status) with its output.
fn wait_with_output(
    mut child: std::process::Child,
    timeout: Duration,
) -> std::io::Result<(Option<std::process::ExitStatus>, String, String)> {
    // Drain the pipes on threads so a chatty podman cannot block on a full pipe.
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = out_pipe.as_mut() {
            let _ = p.read_to_string(&mut s);
        }
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = err_pipe.as_mut() {
            let _ = p.read_to_string(&mut s);
        }
        s
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait()? {
            Some(s) => break Some(s),
            None if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(5)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    Ok((status, stdout, stderr))
}

/// Podman's own words for a failure: the `Error: ...` lines of stderr (its warnings and
/// progress lines are noise in a status reason).
pub fn podman_message(stderr: &str, stdout: &str, code: Option<i32>) -> String {
    let errors: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Error:") || l.starts_with("error"))
        .collect();
    let text = if !errors.is_empty() {
        errors.join("; ")
    } else if !stderr.trim().is_empty() {
        stderr.trim().lines().last().unwrap_or("").to_string()
    } else if !stdout.trim().is_empty() {
        stdout.trim().lines().last().unwrap_or("").to_string()
    } else {
        format!("exit code {}", code.map_or("?".into(), |c| c.to_string()))
    };
    let text = text.strip_prefix("Error: ").unwrap_or(&text).to_string();
    // A status reason, not a log: keep it to one readable line.
    if text.len() > 512 {
        let mut cut = 509;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}...", &text[..cut])
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::podman_message;

    #[test]
    fn the_error_lines_are_the_message() {
        let stderr = "Trying to pull localhost/x:1...\ntime=\"..\" level=warning msg=\"x\"\nError: initializing source docker://localhost/x:1: pinging container registry localhost: connection refused\n";
        assert_eq!(
            podman_message(stderr, "", Some(125)),
            "initializing source docker://localhost/x:1: pinging container registry localhost: connection refused"
        );
        assert_eq!(podman_message("", "", Some(125)), "exit code 125");
        assert_eq!(podman_message("only a line\n", "", Some(1)), "only a line");
    }
}
