//! Kernel notifications about cgroups, awaited on the smol reactor (no thread per file).
//!
//! - cgroup v1: eventfds registered through `cgroup.event_control`: a threshold on
//!   `memory.usage_in_bytes` (signalled when usage crosses it, either way), a level of
//!   `memory.pressure_level` (reclaim within the cgroup), `memory.oom_control` (an OOM in the
//!   cgroup or an ancestor it belongs to: signalled *before* the OOM killer picks its victim).
//! - cgroup v2: `memory.events` and friends, watched with inotify (kernfs notifies a file's
//!   watchers when one of its counters changes, at most every 20 ms per file), and PSI
//!   triggers on `memory.pressure`.
//!
//! Every function takes the cgroup's directory: the agent's own subtree and a systemd slice
//! work alike.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use smol::Async;

use super::{files, io_err, CgroupError};

/// An eventfd the kernel signals (a cgroup v1 registration). Dropping it closes the eventfd,
/// and the kernel drops the registration when it sees the eventfd closed.
pub struct EventSignal {
    fd: Async<EventFd>,
}

impl EventSignal {
    /// Waits until the kernel signals; returns how many signals were pending.
    pub async fn next(&self) -> io::Result<u64> {
        self.fd
            .read_with(|e| e.read().map_err(io::Error::from))
            .await
    }

    /// Takes the pending signals without waiting (0 when there are none).
    pub fn take(&self) -> u64 {
        self.fd.get_ref().read().unwrap_or(0)
    }
}

/// `memory.pressure_level` levels (Documentation/admin-guide/cgroup-v1/memory.rst §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PressureLevel {
    /// Reclaiming memory for new allocations (includes routine page-cache reclaim).
    Low,
    /// Swapping or evicting the working set.
    Medium,
    /// About to OOM.
    Critical,
}

impl PressureLevel {
    fn as_str(self) -> &'static str {
        match self {
            PressureLevel::Low => "low",
            PressureLevel::Medium => "medium",
            PressureLevel::Critical => "critical",
        }
    }
}

/// Signals whenever the memory usage of the cgroup at `memory_dir` (v1) crosses `bytes`,
/// upwards or downwards. The kernel checks thresholds every 128 pages charged per CPU, so a
/// crossing is seen within half a MiB.
pub fn usage_threshold(memory_dir: &Path, bytes: u64) -> Result<EventSignal, CgroupError> {
    register_v1(memory_dir, "memory.usage_in_bytes", &bytes.to_string())
}

/// Signals when reclaim reaches `level` (v1): reclaim in the cgroup itself when `local`
/// (e.g. against its own limit), else also reclaim below it that no descendant listens to.
pub fn pressure_level(
    memory_dir: &Path,
    level: PressureLevel,
    local: bool,
) -> Result<EventSignal, CgroupError> {
    let mode = if local { ",local" } else { "" };
    register_v1(
        memory_dir,
        "memory.pressure_level",
        &format!("{}{mode}", level.as_str()),
    )
}

/// Signals when the cgroup, or an ancestor whose limit it counts against, is out of memory
/// (v1). The signal comes before the kill: the victim may still be alive when it arrives.
pub fn oom(memory_dir: &Path) -> Result<EventSignal, CgroupError> {
    register_v1(memory_dir, "memory.oom_control", "")
}

fn register_v1(memory_dir: &Path, file: &str, args: &str) -> Result<EventSignal, CgroupError> {
    let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map_err(|e| io_err(memory_dir)(e.into()))?;
    let target_path = memory_dir.join(file);
    // Only needed while registering: the kernel keeps the eventfd, not this file.
    let target = File::open(&target_path).map_err(io_err(&target_path))?;
    let line = format!("{} {} {args}", efd.as_raw_fd(), target.as_raw_fd());
    files::write(&memory_dir.join("cgroup.event_control"), line.trim_end())?;
    let fd = Async::new(efd).map_err(io_err(memory_dir))?;
    Ok(EventSignal { fd })
}

/// Watches cgroup files (v2 `memory.events`, ...) for changes: one inotify instance for any
/// number of files (instances are a scarce per-user resource, watches are not).
pub struct FileWatcher {
    inotify: Async<Inotify>,
}

impl FileWatcher {
    pub fn new() -> io::Result<FileWatcher> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?;
        Ok(FileWatcher {
            inotify: Async::new(inotify)?,
        })
    }

    pub fn add(&self, path: &Path) -> Result<WatchDescriptor, CgroupError> {
        self.inotify
            .get_ref()
            .add_watch(path, AddWatchFlags::IN_MODIFY)
            .map_err(|e| io_err(path)(e.into()))
    }

    pub fn remove(&self, wd: WatchDescriptor) {
        // Fails only when the watch is already gone (its cgroup was removed).
        let _ = self.inotify.get_ref().rm_watch(wd);
    }

    /// Waits for changes; returns the watches whose file changed, and those the kernel
    /// dropped because the file went away (`gone`).
    pub async fn changed(&self) -> io::Result<Changes> {
        let events = self
            .inotify
            .read_with(|i| i.read_events().map_err(io::Error::from))
            .await?;
        let mut c = Changes::default();
        for e in events {
            if e.mask.contains(AddWatchFlags::IN_IGNORED) {
                c.gone.push(e.wd);
            } else if !c.modified.contains(&e.wd) {
                c.modified.push(e.wd);
            }
        }
        Ok(c)
    }
}

#[derive(Debug, Default)]
pub struct Changes {
    pub modified: Vec<WatchDescriptor>,
    pub gone: Vec<WatchDescriptor>,
}

/// A PSI trigger: signals when tasks stalled on memory for `stall` within `window`
/// (Documentation/accounting/psi.rst). Works on `/proc/pressure/memory` and on a v2 cgroup's
/// `memory.pressure`.
pub struct PsiTrigger {
    /// Holds the trigger: closing the file removes it.
    _file: File,
    epoll: Async<PriorityEpoll>,
}

/// An epoll instance interested only in POLLPRI of the trigger file. The trigger file itself
/// always polls readable (POLLIN), which the reactor would report in a loop; the epoll fd is
/// readable only when the trigger has fired.
struct PriorityEpoll(Epoll);

impl AsFd for PriorityEpoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0 .0.as_fd()
    }
}

impl PsiTrigger {
    pub fn new(
        pressure_file: &Path,
        stall: Duration,
        window: Duration,
    ) -> Result<PsiTrigger, CgroupError> {
        use std::io::Write;
        let err = io_err(pressure_file);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(pressure_file)
            .map_err(io_err(pressure_file))?;
        let spec = format!("some {} {}\0", stall.as_micros(), window.as_micros());
        file.write_all(spec.as_bytes())
            .map_err(io_err(pressure_file))?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| err(e.into()))?;
        epoll
            .add(&file, EpollEvent::new(EpollFlags::EPOLLPRI, 0))
            .map_err(|e| io_err(pressure_file)(e.into()))?;
        let epoll = Async::new(PriorityEpoll(epoll)).map_err(io_err(pressure_file))?;
        Ok(PsiTrigger { _file: file, epoll })
    }

    /// Waits until the trigger fires.
    pub async fn next(&self) -> io::Result<()> {
        self.epoll.readable().await?;
        // Drain the ready list so the epoll fd stops polling readable. Polling the epoll fd
        // (which the reactor just did) may already have consumed the trigger's event: the
        // wake-up itself is the signal.
        let mut events = [EpollEvent::empty(); 1];
        let _ = self.epoll.get_ref().0.wait(&mut events, EpollTimeout::ZERO);
        Ok(())
    }
}
