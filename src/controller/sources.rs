//! Event sources outside the controller: timers, signals, the desired-state file watcher.

use std::path::Path;
use std::time::Duration;

use async_channel::Sender;
use tracing::{error, warn};

use super::Event;

/// Sends `event` once after `delay`.
pub fn after(tx: Sender<Event>, delay: Duration, event: Event) {
    smol::spawn(async move {
        smol::Timer::after(delay).await;
        let _ = tx.send(event).await;
    })
    .detach();
}

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

/// Watches the desired-state file with inotify (on its directory, so editors that replace
/// the file by rename are seen too) and sends `DesiredStateChanged`.
pub fn watch_file(tx: Sender<Event>, path: &Path) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let Some(dir) = path.parent().map(Path::to_path_buf) else {
        return;
    };
    let Some(file) = path.file_name().map(|f| f.to_os_string()) else {
        return;
    };
    let inotify = match Inotify::init(InitFlags::IN_CLOEXEC) {
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
        | AddWatchFlags::IN_DELETE;
    if let Err(e) = inotify.add_watch(&dir, flags) {
        warn!(
            "cannot watch {}: {e}; changes are picked up on SIGHUP",
            dir.display()
        );
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("watch-desired".into())
        .stack_size(64 * 1024)
        .spawn(move || loop {
            match inotify.read_events() {
                Ok(events) => {
                    let ours = events
                        .iter()
                        .any(|e| e.name.as_deref() == Some(file.as_os_str()));
                    if ours && tx.send_blocking(Event::DesiredStateChanged).is_err() {
                        break;
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    error!("desired-state watcher stopped: {e}");
                    break;
                }
            }
        });
    if let Err(e) = spawned {
        warn!("cannot start the desired-state watcher: {e}");
    }
}
