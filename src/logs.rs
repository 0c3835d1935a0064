//! `device-worker-ng logs NAME [--tail N] [--follow]`: a workload's output, read where the
//! agent keeps it: the files of the shell driver's log writer (`STATE_DIR/logs/<name>.log`
//! and the rotated `<name>.log.1`, deleted with the workload) under the cgroupfs driver, the
//! journal of the workload's service under the systemd driver, and a pod's containers'
//! output where podman keeps it (`podman pod logs`). The agent is not asked: logs stay
//! readable while it is down.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::cgroup::systemd::{self, UnitNames};
use crate::config::{CgroupDriverChoice, Settings};
use crate::drivers::podman::RootlessUser;
use crate::workload::WorkloadName;

#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("{0}")]
    Name(#[from] crate::workload::NameError),
    #[error("no output recorded for workload {name} (looked for {path})")]
    NoLog { name: WorkloadName, path: PathBuf },
    #[error("{path}: {why}")]
    Read { path: PathBuf, why: String },
    /// Whoever read the output went away (a closed pipe): not a failure.
    #[error("the reader went away")]
    ReaderGone,
}

/// Where workload output is read from.
#[derive(Debug, Clone)]
pub enum Source {
    /// `<state_dir>/logs/<name>.log` and its rotated predecessor.
    Files { state_dir: PathBuf },
    /// The systemd cgroup driver's: a shell workload's service writes to the journal
    /// (`journalctl -u <slice stem>-<name>.service`). Output the files hold instead (the
    /// driver fell back to cgroupfs, or an older agent ran it) is read there.
    Journal { slice: String, state_dir: PathBuf },
    /// A pod's containers: podman keeps their output (its journald log driver on systemd
    /// hosts), read by `podman pod logs`, as the rootless user for their pods.
    Pod { rootless_user: Option<RootlessUser> },
}

impl Source {
    /// Where `name`'s output is under this agent's settings: a pod's (the podman driver keeps
    /// `STATE_DIR/pods/<name>` while the pod exists, with a `rootless` marker for the rootless
    /// user's) is podman's; a shell workload's, the host's ([`Source::of`]).
    pub fn of_workload(settings: &Settings, name: &WorkloadName) -> Result<Source, LogsError> {
        let pod_dir = settings.state_dir.join("pods").join(name.as_str());
        if !pod_dir.is_dir() {
            return Ok(Source::of(settings));
        }
        if !pod_dir.join("rootless").exists() {
            return Ok(Source::Pod {
                rootless_user: None,
            });
        }
        let user = settings
            .rootless_user
            .as_deref()
            .ok_or_else(|| LogsError::Read {
                path: pod_dir.clone(),
                why: "a rootless pod, but ROOTLESS_USER is not configured".into(),
            })?;
        let user = RootlessUser::resolve(user, settings.xdg_runtime_dir.clone()).map_err(|e| {
            LogsError::Read {
                path: pod_dir,
                why: e.to_string(),
            }
        })?;
        Ok(Source::Pod {
            rootless_user: Some(user),
        })
    }

    /// Where this agent's settings put shell workloads' output.
    pub fn of(settings: &Settings) -> Source {
        let files = Source::Files {
            state_dir: settings.state_dir.clone(),
        };
        if settings.cgroup_driver == CgroupDriverChoice::Cgroupfs || !systemd::booted() {
            return files;
        }
        Source::Journal {
            slice: settings.systemd_slice.clone(),
            state_dir: settings.state_dir.clone(),
        }
    }
}

/// What to show.
#[derive(Debug, Clone)]
pub struct Request {
    pub name: WorkloadName,
    /// Only the last this many lines (of everything kept).
    pub tail: Option<usize>,
    /// Then keep showing output as it comes, until interrupted.
    pub follow: bool,
}

/// Writes the requested output to `out`. A reader that goes away (a closed pipe) ends it
/// without an error.
pub fn show(source: &Source, req: &Request, out: &mut impl Write) -> Result<(), LogsError> {
    let result = match source {
        Source::Files { state_dir } => files::show(state_dir, req, out),
        Source::Journal { slice, state_dir } => {
            let current = crate::store::log_path(state_dir, &req.name);
            let rotated = crate::drivers::output::rotated(&current);
            if current.exists() || rotated.exists() {
                files::show(state_dir, req, out)
            } else {
                journal::show(&UnitNames::of(slice, req.name.as_str()).service, req, out)
            }
        }
        Source::Pod { rootless_user } => pod::show(rootless_user.as_ref(), req, out),
    };
    match result {
        Err(LogsError::ReaderGone) => Ok(()),
        other => other,
    }
}

/// An error of copying `path` to the output (either side may fail).
fn read_err(path: &Path) -> impl Fn(std::io::Error) -> LogsError + '_ {
    move |e| match e.kind() {
        std::io::ErrorKind::BrokenPipe => LogsError::ReaderGone,
        std::io::ErrorKind::PermissionDenied => LogsError::Read {
            path: path.to_path_buf(),
            why: "permission denied (workload output is root's)".into(),
        },
        _ => LogsError::Read {
            path: path.to_path_buf(),
            why: e.to_string(),
        },
    }
}

/// Runs a reader of logs kept elsewhere (journalctl, podman) and copies its stdout to `out`
/// as it comes (so `--follow` follows); `whose` names the output in an error. Returns how
/// many bytes it copied.
fn stream(mut c: Command, whose: &str, out: &mut impl Write) -> Result<u64, LogsError> {
    let program = c.get_program().to_string_lossy().into_owned();
    let what = Path::new(&program);
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(read_err(what))?;
    let copied = match child.stdout.take() {
        Some(mut from) => std::io::copy(&mut from, out).and_then(|n| out.flush().map(|()| n)),
        None => Ok(0),
    };
    if copied.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(read_err(what))?;
    let copied = copied.map_err(read_err(what))?;
    if !status.success() {
        return Err(LogsError::Read {
            path: PathBuf::from(whose),
            why: format!("{program} {status}"),
        });
    }
    Ok(copied)
}

mod journal {
    use super::*;

    /// The unit's entries, as the workload wrote them (`-o cat`), by journalctl, copied to
    /// `out` (and followed with `--follow`).
    pub fn show(unit: &str, req: &Request, out: &mut impl Write) -> Result<(), LogsError> {
        let mut c = Command::new("journalctl");
        c.args(["--no-pager", "--quiet", "-o", "cat", "-u", unit]);
        if let Some(n) = req.tail {
            c.args(["-n", &n.to_string()]);
        }
        if req.follow {
            c.arg("--follow");
        }
        let whose = format!("the journal of {unit}");
        // journalctl says nothing of a unit it never saw: as with the files, no output is
        // an error (a mistyped name must not look like a silent workload).
        match stream(c, &whose, out)? {
            0 if !req.follow => Err(LogsError::NoLog {
                name: req.name.clone(),
                path: PathBuf::from(whose),
            }),
            _ => Ok(()),
        }
    }
}

mod pod {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// The pod's containers' output, by `podman pod logs` (root's podman, or the rootless
    /// user's: their uid, home and runtime directory).
    pub fn show(
        user: Option<&RootlessUser>,
        req: &Request,
        out: &mut impl Write,
    ) -> Result<(), LogsError> {
        let mut c = Command::new("podman");
        c.args(["pod", "logs"]);
        if let Some(n) = req.tail {
            c.args(["--tail", &n.to_string()]);
        }
        if req.follow {
            c.arg("--follow");
        }
        c.arg(req.name.as_str()).current_dir("/");
        if let Some(u) = user {
            c.uid(u.uid.as_raw())
                .gid(u.gid.as_raw())
                .env("HOME", &u.home)
                .env("USER", &u.name)
                .env("XDG_RUNTIME_DIR", &u.runtime_dir);
        }
        stream(c, &format!("the logs of pod {}", req.name), out).map(|_| ())
    }
}

mod files {
    use super::*;

    /// How often a followed log is looked at again.
    const FOLLOW_POLL: Duration = Duration::from_millis(200);
    const BLOCK: u64 = 64 << 10;

    fn open(path: &Path) -> Result<Option<File>, LogsError> {
        match File::open(path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(read_err(path)(e)),
        }
    }

    pub fn show(state_dir: &Path, req: &Request, out: &mut impl Write) -> Result<(), LogsError> {
        let current = crate::store::log_path(state_dir, &req.name);
        let rotated = crate::drivers::output::rotated(&current);
        let (cur, old) = (open(&current)?, open(&rotated)?);
        if cur.is_none() && old.is_none() && !req.follow {
            return Err(LogsError::NoLog {
                name: req.name.clone(),
                path: current,
            });
        }
        // Where each file's shown part starts: all of both, or the last `n` lines.
        let mut from_cur = 0;
        let mut from_old = Some(0);
        if let Some(n) = req.tail {
            let (start, found) = match &cur {
                Some(f) => tail_start(f, n).map_err(read_err(&current))?,
                None => (0, 0),
            };
            from_cur = start;
            from_old = match &old {
                Some(f) if found < n => {
                    Some(tail_start(f, n - found).map_err(read_err(&rotated))?.0)
                }
                _ => None,
            };
        }
        if let (Some(f), Some(start)) = (&old, from_old) {
            copy_from(f, start, out).map_err(read_err(&rotated))?;
        }
        let mut pos = match &cur {
            Some(f) => copy_from(f, from_cur, out).map_err(read_err(&current))?,
            None => 0,
        };
        out.flush().map_err(read_err(&current))?;
        if !req.follow {
            return Ok(());
        }
        let mut cur = cur;
        loop {
            std::thread::sleep(FOLLOW_POLL);
            let on_disk = std::fs::metadata(&current).ok();
            let same = match (&cur, &on_disk) {
                (Some(f), Some(m)) => f.metadata().is_ok_and(|o| o.ino() == m.ino()),
                _ => false,
            };
            if let Some(f) = &cur {
                // Truncated in place: from its start again. Asked of the open file before
                // reading it (a size seen earlier may predate what was appended since).
                if f.metadata().is_ok_and(|m| m.len() < pos) {
                    pos = 0;
                }
                // Whatever reached the file before it was rotated (or since the last look).
                pos = copy_from(f, pos, out).map_err(read_err(&current))?;
            }
            if !same && on_disk.is_some() {
                // Rotated (or created): the new file from its start.
                cur = open(&current)?;
                pos = 0;
                if let Some(f) = &cur {
                    pos = copy_from(f, 0, out).map_err(read_err(&current))?;
                }
            }
            out.flush().map_err(read_err(&current))?;
        }
    }

    /// Copies `f` from `start` to its end; returns where it ended.
    fn copy_from(mut f: &File, start: u64, out: &mut impl Write) -> std::io::Result<u64> {
        f.seek(SeekFrom::Start(start))?;
        let copied = std::io::copy(&mut f, out)?;
        Ok(start + copied)
    }

    /// Where the last `n` lines of `f` start, and how many lines there were (at most `n`).
    /// Scans backwards block by block: a long log is not read whole.
    pub(super) fn tail_start(mut f: &File, n: usize) -> std::io::Result<(u64, usize)> {
        let len = f.metadata()?.len();
        if n == 0 || len == 0 {
            return Ok((len, 0));
        }
        let mut buf = vec![0u8; BLOCK as usize];
        let mut end = len;
        let mut found = 0;
        while end > 0 {
            let start = end.saturating_sub(BLOCK);
            let block = &mut buf[..(end - start) as usize];
            f.seek(SeekFrom::Start(start))?;
            f.read_exact(block)?;
            for (i, _) in block.iter().enumerate().rev().filter(|(_, b)| **b == b'\n') {
                let at = start + i as u64;
                // A final newline ends the last line; it does not start another.
                if at == len - 1 {
                    continue;
                }
                found += 1;
                if found == n {
                    return Ok((at + 1, found));
                }
            }
            end = start;
        }
        // The first line has no newline before it.
        Ok((0, found + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(dir: &Path, tail: Option<usize>) -> String {
        let mut out = Vec::new();
        show(
            &Source::Files {
                state_dir: dir.to_path_buf(),
            },
            &Request {
                name: WorkloadName::parse("w").unwrap(),
                tail,
                follow: false,
            },
            &mut out,
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_rotated_file_comes_first_and_tail_spans_both() {
        let t = tempfile::tempdir().unwrap();
        let logs = t.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        std::fs::write(logs.join("w.log.1"), "a\nb\nc\n").unwrap();
        std::fs::write(logs.join("w.log"), "d\ne\n").unwrap();
        assert_eq!(shown(t.path(), None), "a\nb\nc\nd\ne\n");
        assert_eq!(shown(t.path(), Some(1)), "e\n");
        assert_eq!(shown(t.path(), Some(2)), "d\ne\n");
        assert_eq!(shown(t.path(), Some(3)), "c\nd\ne\n");
        assert_eq!(shown(t.path(), Some(10)), "a\nb\nc\nd\ne\n");
        assert_eq!(shown(t.path(), Some(0)), "");
        // A last line still being written counts as a line.
        std::fs::write(logs.join("w.log"), "d\ne").unwrap();
        assert_eq!(shown(t.path(), Some(1)), "e");
        assert_eq!(shown(t.path(), Some(2)), "d\ne");
    }

    #[test]
    fn tail_scans_across_blocks() {
        let t = tempfile::tempdir().unwrap();
        let text: String = (0..30_000).map(|i| format!("line {i}\n")).collect();
        std::fs::create_dir(t.path().join("logs")).unwrap();
        std::fs::write(t.path().join("logs/w.log"), &text).unwrap();
        assert_eq!(shown(t.path(), Some(2)), "line 29998\nline 29999\n");
        let last = shown(t.path(), Some(20_000));
        assert!(last.starts_with("line 10000\n"), "{}", &last[..20]);
        assert_eq!(shown(t.path(), Some(40_000)), text);
    }

    #[test]
    fn a_workload_without_output_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let e = show(
            &Source::Files {
                state_dir: t.path().to_path_buf(),
            },
            &Request {
                name: WorkloadName::parse("none").unwrap(),
                tail: None,
                follow: false,
            },
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no output recorded"), "{e}");
    }

    #[test]
    fn a_pods_output_is_podmans_as_its_user() {
        let t = tempfile::tempdir().unwrap();
        let settings = |rootless_user: Option<&str>| {
            let mut flags = vec![
                format!("STATE_DIR={}", t.path().display()),
                "CGROUP_DRIVER=cgroupfs".into(),
            ];
            flags.extend(rootless_user.map(|u| format!("ROOTLESS_USER={u}")));
            crate::config::Settings::load(&crate::config::Inputs {
                flags,
                ..Default::default()
            })
            .unwrap()
        };
        let web = WorkloadName::parse("web").unwrap();
        let s = settings(None);
        assert!(matches!(
            Source::of_workload(&s, &web).unwrap(),
            Source::Files { .. }
        ));
        std::fs::create_dir_all(t.path().join("pods/web")).unwrap();
        assert!(matches!(
            Source::of_workload(&s, &web).unwrap(),
            Source::Pod {
                rootless_user: None
            }
        ));
        std::fs::write(t.path().join("pods/web/rootless"), "").unwrap();
        let e = Source::of_workload(&s, &web).unwrap_err();
        assert!(e.to_string().contains("ROOTLESS_USER"), "{e}");
        match Source::of_workload(&settings(Some("root")), &web).unwrap() {
            Source::Pod {
                rootless_user: Some(u),
            } => assert_eq!(u.uid.as_raw(), 0),
            other => panic!("{other:?}"),
        }
    }
}
