//! `device-worker-ng logs NAME`: a workload's output, from wherever its driver put it. Under
//! the systemd cgroup driver a shell workload's output is its service's journal
//! (`journalctl -u <unit>`); under cgroupfs it is `STATE_DIR/logs/<name>.log`; a pod's is its
//! containers' log, read by `podman pod logs` (podman's journald log driver under systemd).

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::cgroup::systemd::{self, UnitNames};
use crate::config::{CgroupDriverChoice, Settings};
use crate::status::socket;
use crate::workload::WorkloadName;

#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("{0}")]
    Name(#[from] crate::workload::name::NameError),
    #[error("no workload {0} (and no log of it in {1})")]
    Unknown(String, String),
    #[error("{what}: {why}")]
    Io { what: String, why: String },
    #[error("{0}")]
    Rootless(String),
}

/// Where a workload's output is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogSource {
    /// A unit's journal.
    Journal {
        unit: String,
    },
    /// A pod's containers (podman as `user` when the pod is rootless).
    Pod {
        name: WorkloadName,
        user: Option<String>,
    },
    File(PathBuf),
}

/// What `logs` shows.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub follow: bool,
    pub lines: u32,
}

/// Finds where `name`'s output is: the running agent says (kind, unit); without one, the
/// settings do (a systemd host's unit name, the log file, the pod's rootless marker).
pub fn locate(settings: &Settings, socket: &Path, name: &str) -> Result<LogSource, LogsError> {
    let name = WorkloadName::parse(name)?;
    let rootless_marker = settings
        .state_dir
        .join("pods")
        .join(name.as_str())
        .join("rootless");
    let pod = |name: WorkloadName| LogSource::Pod {
        user: rootless_marker
            .exists()
            .then(|| settings.rootless_user.clone())
            .flatten(),
        name,
    };
    let file = settings
        .state_dir
        .join("logs")
        .join(format!("{}.log", name.as_str()));
    if let Ok((snap, _)) = socket::request_status(socket) {
        let w = snap
            .workloads
            .iter()
            .find(|w| w.name == name.as_str())
            .ok_or_else(|| {
                LogsError::Unknown(name.to_string(), settings.state_dir.display().to_string())
            })?;
        return Ok(match (w.kind.as_str(), &w.unit) {
            ("pod", _) => pod(name),
            (_, Some(unit)) => LogSource::Journal { unit: unit.clone() },
            _ => LogSource::File(w.log.clone().map_or(file, PathBuf::from)),
        });
    }
    // No agent answers: a pod keeps its marker directory; a shell workload its log file
    // (cgroupfs) or its journal (systemd).
    if rootless_marker.parent().is_some_and(Path::is_dir) {
        return Ok(pod(name));
    }
    if file.exists() {
        return Ok(LogSource::File(file));
    }
    if settings.cgroup_driver != CgroupDriverChoice::Cgroupfs && systemd::booted() {
        return Ok(LogSource::Journal {
            unit: UnitNames::of(&settings.systemd_slice, name.as_str()).service,
        });
    }
    Err(LogsError::Unknown(
        name.to_string(),
        settings.state_dir.display().to_string(),
    ))
}

/// Shows the output: journalctl and podman replace this process (so `--follow` and paging
/// behave as theirs do); a file is printed (and followed) here. Returns only on failure, or
/// after printing a file without `follow`.
pub fn show(source: &LogSource, opts: Options, settings: &Settings) -> Result<(), LogsError> {
    let lines = opts.lines.to_string();
    match source {
        LogSource::Journal { unit } => {
            let mut c = Command::new("journalctl");
            c.args(["--no-pager", "-u", unit, "-n", &lines]);
            if opts.follow {
                c.arg("-f");
            }
            Err(exec_failed("journalctl", c.exec()))
        }
        LogSource::Pod { name, user } => {
            let mut c = Command::new("podman");
            c.args(["pod", "logs", "--tail", &lines]);
            if opts.follow {
                c.arg("-f");
            }
            c.arg(name.as_str()).current_dir("/");
            if let Some(user) = user {
                let u = crate::drivers::podman::RootlessUser::resolve(
                    user,
                    settings.xdg_runtime_dir.clone(),
                )
                .map_err(|e| LogsError::Rootless(e.to_string()))?;
                c.uid(u.uid.as_raw())
                    .gid(u.gid.as_raw())
                    .env("HOME", &u.home)
                    .env("USER", &u.name)
                    .env("XDG_RUNTIME_DIR", &u.runtime_dir);
            }
            Err(exec_failed("podman", c.exec()))
        }
        LogSource::File(path) => print_file(path, opts),
    }
}

fn exec_failed(what: &str, e: std::io::Error) -> LogsError {
    LogsError::Io {
        what: format!("cannot run {what}"),
        why: e.to_string(),
    }
}

/// The last `lines` lines of the file (read from its end, whatever its size), then, with
/// `follow`, what is appended to it.
fn print_file(path: &Path, opts: Options) -> Result<(), LogsError> {
    let io = |e: std::io::Error| LogsError::Io {
        what: path.display().to_string(),
        why: e.to_string(),
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    // Enough of the end for the lines asked for, typically; never the whole of a huge log.
    let window = (u64::from(opts.lines) * 256).clamp(4096, 16 << 20);
    f.seek(SeekFrom::Start(len.saturating_sub(window)))
        .map_err(io)?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).map_err(io)?;
    let text = String::from_utf8_lossy(&tail);
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(opts.lines as usize);
    let mut out = std::io::stdout().lock();
    for l in &all[start..] {
        let _ = writeln!(out, "{l}");
    }
    let _ = out.flush();
    drop(out);
    if !opts.follow {
        return Ok(());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        let mut out = std::io::stdout().lock();
        if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Inputs;

    fn settings(dir: &Path) -> Settings {
        let mut s = Settings::load(&Inputs::default()).unwrap();
        s.state_dir = dir.to_path_buf();
        s.cgroup_driver = CgroupDriverChoice::Cgroupfs;
        s
    }

    #[test]
    fn without_an_agent_the_files_tell() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let sock = dir.path().join("none.sock");
        assert!(matches!(
            locate(&s, &sock, "../etc/passwd"),
            Err(LogsError::Name(_))
        ));
        assert!(matches!(
            locate(&s, &sock, "ghost"),
            Err(LogsError::Unknown(..))
        ));
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        std::fs::write(dir.path().join("logs/ticker.log"), "a\nb\nc\n").unwrap();
        assert_eq!(
            locate(&s, &sock, "ticker").unwrap(),
            LogSource::File(dir.path().join("logs/ticker.log"))
        );
        std::fs::create_dir_all(dir.path().join("pods/web")).unwrap();
        let web = WorkloadName::parse("web").unwrap();
        assert_eq!(
            locate(&s, &sock, "web").unwrap(),
            LogSource::Pod {
                name: web.clone(),
                user: None
            }
        );
        let mut rl = s.clone();
        rl.rootless_user = Some("dwngrl".into());
        std::fs::write(dir.path().join("pods/web/rootless"), "").unwrap();
        assert_eq!(
            locate(&rl, &sock, "web").unwrap(),
            LogSource::Pod {
                name: web,
                user: Some("dwngrl".into())
            }
        );
    }
}
