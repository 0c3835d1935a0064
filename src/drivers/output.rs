//! A shell workload's output, bounded, with the agent out of its path.
//!
//! The workload's stdout and stderr are one pipe. What reads it is a log writer: this binary
//! executed again in a hidden mode (as conmon is for containers), one per run, in the child
//! cgroup [`WorkloadCgroup::log_writer`] of the workload's cgroup. It appends to
//! `STATE_DIR/logs/<name>.log` and, when that would grow past half of WORKLOAD_LOG_MAX,
//! renames it to `<name>.log.1` (replacing the one before) and starts a new one: one
//! workload's output never takes more than WORKLOAD_LOG_MAX of STATE_DIR.
//!
//! The agent is not in the path, so a workload keeps running (and writing) while the agent
//! restarts or is upgraded. The writer ignores the signals a stop sends and is not among the
//! workload's own processes: it ends when the last of them has closed the pipe, after having
//! written their last words.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use crate::cgroup::{CgroupError, WorkloadCgroup};

/// The hidden mode's argument: `device-worker-ng __log-writer <log file> <max bytes>`.
const WRITER_MODE: &str = "__log-writer";

/// Smallest WORKLOAD_LOG_MAX: two files of a pipe's default capacity.
pub const MIN_LOG_MAX: u64 = 128 << 10;

/// One read from the pipe (its default capacity).
const CHUNK: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("cannot make the output pipe: {0}")]
    Pipe(std::io::Error),
    #[error("cannot start the log writer for {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Starts the log writer of one run of a workload whose cgroup is `cgroup`: it appends what
/// comes through the returned pipe (the workload's stdout and stderr) to `log`, keeping at
/// most `max_bytes` in `log` and `log.1` together. A writer of an earlier run still there is
/// given a moment to finish, then killed (two writers must not rotate one file). Blocking (a
/// lane's work).
pub fn start_writer(
    cgroup: &WorkloadCgroup,
    log: &Path,
    max_bytes: u64,
) -> Result<OwnedFd, OutputError> {
    cgroup.retire_log_writer()?;
    let writer_cgroup = cgroup.log_writer();
    writer_cgroup.create()?;
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| OutputError::Pipe(e.into()))?;
    // /proc/self/exe in the child is this very binary, even when the file was replaced by an
    // upgrade since the agent started.
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("device-worker-ng")
        .arg(WRITER_MODE)
        .arg(log)
        .arg(max_bytes.to_string())
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::from(read_end))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: signal(2) is async-signal-safe; the closure touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            use nix::sys::signal::{signal, SigHandler, Signal};
            // Ignored dispositions survive exec: a stop's SIGTERM (or a terminal's SIGINT or
            // SIGHUP) cannot end the writer before the workload's last words are written.
            for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
                signal(s, SigHandler::SigIgn)?;
            }
            Ok(())
        });
    }
    let spawn_err = |source| OutputError::Spawn {
        path: log.to_path_buf(),
        source,
    };
    let procs = super::process::join_cgroup_before_exec(
        &mut cmd,
        &writer_cgroup.procs_files(),
        None,
        true,
    )?;
    let child = cmd.spawn().map_err(spawn_err)?;
    drop(procs);
    let writer_pid = child.id() as i32;
    // The writer is the agent's child until the agent restarts: reap it when it ends, on the
    // reactor (a pidfd), so no zombie is left behind.
    drop(child);
    smol::spawn(super::watch::until_end(
        super::Watch::Child { pid: writer_pid },
        |_, _| {},
    ))
    .detach();
    Ok(write_end)
}

/// Where the log `log` is rotated to: `<name>.log.1`.
pub fn rotated(log: &Path) -> PathBuf {
    let mut p = OsString::from(log.as_os_str());
    p.push(".1");
    PathBuf::from(p)
}

/// The hidden mode: when this process was started as a log writer, runs it and returns its
/// exit code; otherwise `None` (at the top of `main`, before anything else is set up).
pub fn run_if_log_writer() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != WRITER_MODE {
        return None;
    }
    let (Some(path), Some(max)) = (args.next(), args.next()) else {
        return Some(ExitCode::from(2));
    };
    let Some(max) = max.to_str().and_then(|m| m.parse::<u64>().ok()) else {
        return Some(ExitCode::from(2));
    };
    // SAFETY: fd 0 is the pipe the agent gave this process as stdin; nothing else owns it.
    let input = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(0) };
    let mut log = RotatingLog::open(PathBuf::from(path), max);
    match copy(input, &mut log) {
        Ok(()) => Some(ExitCode::SUCCESS),
        Err(_) => Some(ExitCode::FAILURE),
    }
}

/// Appends `text` to the log `path` with the same bound as a writer's (`max` for the log and
/// its rotated file together): for lines the agent itself adds to a workload's log.
pub fn append_bounded(path: &Path, text: &str, max: u64) {
    RotatingLog::open(path.to_path_buf(), max).write(text.as_bytes());
}

/// Copies `input` into `log` until the end of the input. Output that cannot be written
/// (disk full) is dropped, never waited for: the workload must not block on a full disk.
fn copy(mut input: impl Read, log: &mut RotatingLog) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        log.write(&buf[..n]);
    }
}

/// `<name>.log` and its one predecessor `<name>.log.1`, together at most `max` bytes.
struct RotatingLog {
    path: PathBuf,
    rotated: PathBuf,
    /// Largest size of one file: half the cap.
    file_max: u64,
    file: Option<File>,
    size: u64,
    /// Bytes dropped since the last successful write, and why.
    lost: Option<(u64, String)>,
}

impl RotatingLog {
    fn open(path: PathBuf, max: u64) -> RotatingLog {
        let mut log = RotatingLog {
            rotated: rotated(&path),
            path,
            file_max: (max / 2).max(1),
            file: None,
            size: 0,
            lost: None,
        };
        log.reopen(false);
        log
    }

    /// Opens the log (appending, or truncated after a rotation); a failure is remembered
    /// as lost output and tried again at the next write.
    fn reopen(&mut self, truncate: bool) {
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .append(!truncate)
            .write(true)
            .truncate(truncate)
            .mode(0o640)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&self.path)
            .and_then(|f| f.metadata().map(|m| (m.len(), f)));
        match opened {
            Ok((size, f)) => {
                self.size = size;
                self.file = Some(f);
            }
            Err(e) => {
                self.file = None;
                self.note_lost(0, &e);
            }
        }
    }

    fn note_lost(&mut self, bytes: u64, e: &std::io::Error) {
        let before = self.lost.as_ref().map_or(0, |l| l.0);
        self.lost = Some((before + bytes, e.to_string()));
    }

    /// The current file moves to `<name>.log.1`; the next output starts a new file.
    fn rotate(&mut self) {
        self.file = None;
        // Where it cannot be renamed, the file starts over in place: the bound matters more
        // than the history.
        let _ = std::fs::rename(&self.path, &self.rotated);
        self.reopen(true);
    }

    fn write(&mut self, mut chunk: &[u8]) {
        if chunk.len() as u64 > self.file_max {
            // Only the end of an oversized chunk fits (a tiny cap).
            chunk = &chunk[chunk.len() - self.file_max as usize..];
        }
        if self.file.is_none() {
            self.reopen(false);
        }
        let notice = self.lost.as_ref().map(|(n, why)| {
            format!("\n[device-worker-ng: {n} bytes of this workload's output were lost: {why}]\n")
        });
        let extra = notice.as_ref().map_or(0, |n| n.len() as u64);
        if self.size > 0 && self.size + extra + chunk.len() as u64 > self.file_max {
            self.rotate();
        }
        let Some(f) = self.file.as_mut() else {
            self.lost = self
                .lost
                .take()
                .map(|(n, why)| (n + chunk.len() as u64, why));
            return;
        };
        let result = match &notice {
            Some(n) => f.write_all(n.as_bytes()).and_then(|()| f.write_all(chunk)),
            None => f.write_all(chunk),
        };
        match result {
            Ok(()) => {
                self.size += extra + chunk.len() as u64;
                self.lost = None;
            }
            Err(e) => {
                // Part of it may have been written: the size is read back, not guessed.
                self.size = f.metadata().map_or(self.size, |m| m.len());
                self.note_lost(chunk.len() as u64, &e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(dir: &Path) -> (u64, u64) {
        let len = |p: &str| std::fs::metadata(dir.join(p)).map_or(0, |m| m.len());
        (len("w.log"), len("w.log.1"))
    }

    #[test]
    fn output_rotates_once_and_never_exceeds_the_cap() {
        let t = tempfile::tempdir().unwrap();
        let mut log = RotatingLog::open(t.path().join("w.log"), 1000);
        for i in 0..100 {
            log.write(format!("line {i:04}\n").as_bytes());
            let (cur, old) = sizes(t.path());
            assert!(cur <= 500 && old <= 500, "{cur} {old}");
        }
        let cur = std::fs::read_to_string(t.path().join("w.log")).unwrap();
        let old = std::fs::read_to_string(t.path().join("w.log.1")).unwrap();
        // Nothing between the rotated file and the current one is missing.
        assert!(cur.ends_with("line 0099\n"), "{cur}");
        let first_cur: u32 = cur[5..9].parse().unwrap();
        assert!(
            old.ends_with(&format!("line {:04}\n", first_cur - 1)),
            "{old}"
        );
        // A chunk larger than a file keeps only its end.
        log.write(&[b'x'; 2000]);
        assert_eq!(sizes(t.path()).0, 500);
    }

    #[test]
    fn an_existing_log_is_appended_to_and_rotated_when_too_big() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("w.log"), vec![b'a'; 5000]).unwrap();
        let mut log = RotatingLog::open(t.path().join("w.log"), 1000);
        log.write(b"new\n");
        assert_eq!(std::fs::read(t.path().join("w.log")).unwrap(), b"new\n");
        assert_eq!(sizes(t.path()).1, 5000, "kept once, as the rotated file");
        log.write(b"more\n");
        assert_eq!(
            std::fs::read(t.path().join("w.log")).unwrap(),
            b"new\nmore\n"
        );
    }

    #[test]
    fn lines_appended_one_at_a_time_stay_within_the_cap() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("pod.log");
        for i in 0..500 {
            append_bounded(&log, &format!("pod started, run {i:04}\n"), 2000);
        }
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        assert!(size(&log) + size(&rotated(&log)) <= 2000);
        let last = std::fs::read_to_string(&log).unwrap();
        assert!(last.ends_with("run 0499\n"), "{last}");
    }

    #[test]
    fn copy_ends_with_its_input() {
        let t = tempfile::tempdir().unwrap();
        let mut log = RotatingLog::open(t.path().join("w.log"), 1 << 20);
        copy(&b"last words\n"[..], &mut log).unwrap();
        assert_eq!(
            std::fs::read(t.path().join("w.log")).unwrap(),
            b"last words\n"
        );
    }

    #[test]
    fn lost_output_is_said_once_writing_works_again() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("logs");
        let mut log = RotatingLog::open(dir.join("w.log"), 1 << 20);
        // The directory does not exist yet: nothing can be written.
        log.write(b"gone\n");
        std::fs::create_dir(&dir).unwrap();
        log.write(b"back\n");
        let text = std::fs::read_to_string(dir.join("w.log")).unwrap();
        assert!(
            text.contains("5 bytes of this workload's output were lost")
                && text.ends_with("back\n"),
            "{text}"
        );
    }
}
