//! Event sources outside the controller: timers, signals, the desired-state file watcher, and
//! the (blocking) read of the desired state that runs off the controller task.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use async_channel::Sender;
use tracing::{error, warn};

use super::effects::ReadDesired;
use super::{DesiredRead, Event};
use crate::store::Store;
use crate::workload::{parse_desired, DesiredError, MAX_DESIRED_BYTES};

/// Sends `make()` every `period`, until the controller is gone.
pub fn every(tx: Sender<Event>, period: Duration, make: fn() -> Event) {
    smol::spawn(async move {
        let mut timer = smol::Timer::interval(period);
        use smol::stream::StreamExt;
        while timer.next().await.is_some() {
            if tx.send(make()).await.is_err() {
                break;
            }
        }
    })
    .detach();
}

/// SIGTERM/SIGINT → Shutdown, SIGHUP → Reload, on a plain thread (no blocked signal masks
/// that spawned workloads would inherit).
pub fn signals(tx: Sender<Event>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            for sig in signals.forever() {
                let ev = if sig == SIGHUP {
                    Event::Reload
                } else {
                    Event::Shutdown
                };
                if tx.send_blocking(ev).is_err() {
                    break;
                }
            }
        })?;
    Ok(())
}

/// How long the desired-state file must stay quiet before it is read: an editor that
/// truncates and then writes, or deletes and recreates, is read once, when it is done.
pub const DESIRED_QUIET: Duration = Duration::from_millis(150);

/// Watches the desired-state file with inotify on the reactor (on its directory, so editors
/// that replace the file by rename are seen too) and sends `DesiredFileChanged` once the
/// file has been quiet for [`DESIRED_QUIET`].
pub fn watch_file(tx: Sender<Event>, path: &Path) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let (Some(dir), Some(file)) = (path.parent(), path.file_name()) else {
        return;
    };
    let (dir, file) = (dir.to_path_buf(), file.to_os_string());
    let inotify = match Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK) {
        Ok(i) => i,
        Err(e) => {
            warn!(
                "cannot watch {}: {e}; changes are picked up on SIGHUP",
                path.display()
            );
            return;
        }
    };
    let flags = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MODIFY;
    if let Err(e) = inotify.add_watch(&dir, flags) {
        warn!(
            "cannot watch {}: {e}; changes are picked up on SIGHUP",
            dir.display()
        );
        return;
    }
    let inotify = match smol::Async::new(inotify) {
        Ok(a) => a,
        Err(e) => {
            warn!("cannot watch {}: {e}", dir.display());
            return;
        }
    };
    smol::spawn(async move {
        let ours = |i: &Inotify| -> std::io::Result<bool> {
            let events = i.read_events().map_err(std::io::Error::from)?;
            Ok(events
                .iter()
                .any(|e| e.name.as_deref() == Some(file.as_os_str())))
        };
        loop {
            match inotify.read_with(|i| ours(i)).await {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => {
                    error!("desired-state watcher stopped: {e}");
                    return;
                }
            }
            // Debounce: more events within the quiet time restart the wait.
            loop {
                let more = smol::future::or(
                    async { Some(inotify.read_with(|i| ours(i)).await) },
                    async {
                        smol::Timer::after(DESIRED_QUIET).await;
                        None
                    },
                )
                .await;
                match more {
                    None => break,
                    Some(Err(e)) => {
                        error!("desired-state watcher stopped: {e}");
                        return;
                    }
                    Some(Ok(_)) => continue,
                }
            }
            if tx.send(Event::DesiredFileChanged).await.is_err() {
                return;
            }
        }
    })
    .detach();
}

/// Reads the desired-state file safely: only a regular file (opened non-blocking, checked on
/// the opened descriptor, so a FIFO or a device put there cannot block the read), at most
/// [`MAX_DESIRED_BYTES`] + 1 bytes, and an empty or blank file is unreadable (never an empty
/// desired state: `workloads: []` says that explicitly).
pub fn read_desired_file(path: &Path) -> Result<crate::workload::DesiredState, DesiredError> {
    use std::io::Read;
    let shown = path.display().to_string();
    let unreadable = |why: String| DesiredError::Unreadable {
        path: shown.clone(),
        why,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| unreadable(crate::config::io_why(&e)))?;
    let meta = f.metadata().map_err(|e| unreadable(e.to_string()))?;
    if !meta.is_file() {
        return Err(unreadable(
            "not a regular file (a FIFO, socket or device is never read)".into(),
        ));
    }
    let mut bytes = Vec::new();
    f.take(MAX_DESIRED_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| unreadable(e.to_string()))?;
    if bytes.len() as u64 > MAX_DESIRED_BYTES {
        return Err(DesiredError::Malformed {
            path: shown,
            why: format!("larger than the {MAX_DESIRED_BYTES} byte cap"),
        });
    }
    let text = String::from_utf8(bytes).map_err(|_| DesiredError::Malformed {
        path: shown.clone(),
        why: "not UTF-8 text".into(),
    })?;
    if text.trim().is_empty() {
        return Err(unreadable(
            "empty (being written? an empty desired state is `workloads: []`)".into(),
        ));
    }
    parse_desired(&text).map_err(|why| DesiredError::Malformed { path: shown, why })
}

/// The blocking work of [`super::effects::Effect::ReadDesired`].
pub fn read_desired(r: &ReadDesired, store: &Store) -> DesiredRead {
    let validate = |d: crate::workload::DesiredState| {
        let v = d.validated(&r.defaults, r.max_workloads);
        (d, v)
    };
    let path = match (&r.path, r.serverless) {
        (Some(p), _) => p,
        // Serverless without DESIRED_STATE: nothing is desired.
        (None, true) => {
            return DesiredRead {
                file_error: None,
                desired: Some(validate(Default::default())),
                source: "no DESIRED_STATE".into(),
            }
        }
        // With a server: the last configuration accepted from it, at start.
        (None, false) => {
            return DesiredRead {
                file_error: None,
                desired: store.load_desired().ok().map(validate),
                source: "the last configuration accepted from the server".into(),
            }
        }
    };
    let file_error = match read_desired_file(path) {
        Ok(d) => {
            return DesiredRead {
                file_error: None,
                desired: Some(validate(d)),
                source: path.display().to_string(),
            }
        }
        Err(e) => e,
    };
    // At start, the file's problem must not stop what runs: the last accepted desired state
    // stands in; without one, nothing is stopped or started (adopted runs keep running).
    let desired = if r.fallback {
        store.load_desired().ok().map(validate)
    } else {
        None
    };
    DesiredRead {
        file_error: Some(file_error),
        desired,
        source: "the last accepted desired state (STATE_DIR/desired.json)".into(),
    }
}
