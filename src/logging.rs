//! Logging to stderr (journald picks it up under systemd), with a level that SIGHUP can change.

use std::sync::atomic::{AtomicU8, Ordering};

use tracing::Level;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::LogLevel;

/// The one piece of global state: the log level (read by the log filter on every event).
static LEVEL: AtomicU8 = AtomicU8::new(2);

fn rank(l: &Level) -> u8 {
    match *l {
        Level::ERROR => 0,
        Level::WARN => 1,
        Level::INFO => 2,
        Level::DEBUG => 3,
        Level::TRACE => 4,
    }
}

pub fn set_level(level: LogLevel) {
    LEVEL.store(rank(&level.as_tracing()), Ordering::Relaxed);
}

pub fn init(level: LogLevel) {
    set_level(level);
    let ansi = nix::unistd::isatty(2).unwrap_or(false);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            rank(meta.level()) <= LEVEL.load(Ordering::Relaxed)
        }));
    let _ = tracing_subscriber::registry().with(fmt).try_init();
}
