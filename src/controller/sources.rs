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

/// SIGTERM/SIGINT → Shutdown, SIGHUP → Reload. The handlers only write a byte to a socket
/// the reactor watches: no thread of their own, and no signal mask for workloads to inherit.
pub fn signals(tx: Sender<Event>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    use signal_hook::low_level::pipe;
    use smol::io::AsyncReadExt;
    use std::os::unix::net::UnixStream;
    let (stop, stop_w) = UnixStream::pair()?;
    let (hup, hup_w) = UnixStream::pair()?;
    pipe::register(SIGTERM, stop_w.try_clone()?)?;
    pipe::register(SIGINT, stop_w)?;
    pipe::register(SIGHUP, hup_w)?;
    let (stop, hup) = (smol::Async::new(stop)?, smol::Async::new(hup)?);
    smol::spawn(async move {
        // Signals that come together are one event (a byte each; up to 16 read at once).
        async fn next(
            s: &'static str,
            mut from: &smol::Async<UnixStream>,
        ) -> std::io::Result<&'static str> {
            let mut buf = [0u8; 16];
            from.read(&mut buf).await.map(|_| s)
        }
        loop {
            let ev = match smol::future::or(next("stop", &stop), next("hup", &hup)).await {
                Ok("hup") => Event::Reload,
                Ok(_) => Event::Shutdown,
                Err(e) => {
                    error!("signal watcher stopped: {e}");
                    return;
                }
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    })
    .detach();
    Ok(())
}

/// What a batch of inotify events says about the desired-state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Touch {
    /// Not about the file.
    None,
    /// Changed, maybe not finished (truncated, written to, deleted, created).
    Busy,
    /// Complete: renamed into place, or closed by its writer.
    Done,
}

/// How long a desired-state file changed in place must stay quiet before it is read: an
/// editor that truncates and then writes, or deletes and recreates, is read once it is done.
pub const DESIRED_QUIET: Duration = Duration::from_millis(150);

/// Watches the desired-state file with inotify on the reactor (on its directory, so editors
/// that replace the file by rename are seen too) and sends `DesiredFileChanged` as soon as
/// the file is complete (renamed into place or closed by its writer), or once other changes
/// have been quiet for [`DESIRED_QUIET`].
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
        let ours = |i: &Inotify| -> std::io::Result<Touch> {
            let events = i.read_events().map_err(std::io::Error::from)?;
            let done = AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE;
            Ok(events
                .iter()
                .filter(|e| e.name.as_deref() == Some(file.as_os_str()))
                .map(|e| match e.mask.intersects(done) {
                    true => Touch::Done,
                    false => Touch::Busy,
                })
                .max()
                .unwrap_or(Touch::None))
        };
        loop {
            let mut touch = match inotify.read_with(|i| ours(i)).await {
                Ok(t) => t,
                Err(e) => {
                    error!("desired-state watcher stopped: {e}");
                    return;
                }
            };
            // A file renamed into place or closed by its writer is complete: read it now.
            // Anything else (truncated, half written, deleted) waits until it has been quiet
            // for a while; more events of the file within the quiet time restart the wait,
            // events of other files in its directory (the agent's own log, say) do not, or
            // they could put the read off for as long as they go on.
            let mut quiet_at = std::time::Instant::now() + DESIRED_QUIET;
            while touch == Touch::Busy {
                let more = smol::future::or(
                    async { Some(inotify.read_with(|i| ours(i)).await) },
                    async {
                        smol::Timer::at(quiet_at).await;
                        None
                    },
                )
                .await;
                touch = match more {
                    None => Touch::Done,
                    Some(Err(e)) => {
                        error!("desired-state watcher stopped: {e}");
                        return;
                    }
                    Some(Ok(Touch::None)) => Touch::Busy,
                    Some(Ok(Touch::Busy)) => {
                        quiet_at = std::time::Instant::now() + DESIRED_QUIET;
                        Touch::Busy
                    }
                    Some(Ok(Touch::Done)) => Touch::Done,
                };
            }
            if touch == Touch::Done && tx.send(Event::DesiredFileChanged).await.is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn next(rx: &async_channel::Receiver<Event>, within: Duration) -> Option<Event> {
        smol::block_on(smol::future::or(async { rx.recv().await.ok() }, async {
            smol::Timer::after(within).await;
            None
        }))
    }

    #[test]
    fn the_watcher_sees_renames_writes_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("desired.yaml");
        let (tx, rx) = async_channel::unbounded();
        watch_file(tx, &path);
        let long = Duration::from_secs(10);

        // Another file in the same directory is not ours.
        std::fs::write(dir.path().join("other.yaml"), "x").unwrap();
        assert!(next(&rx, DESIRED_QUIET * 3).is_none());

        // Renamed into place: one event.
        std::fs::write(dir.path().join("desired.tmp"), "workloads: []").unwrap();
        std::fs::rename(dir.path().join("desired.tmp"), &path).unwrap();
        assert!(matches!(next(&rx, long), Some(Event::DesiredFileChanged)));

        // Written in place and closed: read once the writer closes it.
        std::fs::write(&path, "workloads: []\n").unwrap();
        assert!(matches!(next(&rx, long), Some(Event::DesiredFileChanged)));

        // Truncated by a writer that keeps it open: read after the quiet time all the same.
        let held = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        assert!(matches!(next(&rx, long), Some(Event::DesiredFileChanged)));
        drop(held);
        assert!(matches!(next(&rx, long), Some(Event::DesiredFileChanged)));

        // Deleted: the reader finds it gone and says so.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(next(&rx, long), Some(Event::DesiredFileChanged)));
        assert!(next(&rx, DESIRED_QUIET * 3).is_none());
    }
}
