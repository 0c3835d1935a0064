//! Logging to stderr, with a level that SIGHUP can change.
//!
//! Under systemd, stderr is usually a stream to journald, which stamps every line itself and
//! reads a syslog priority from a `<N>` prefix (sd-daemon(3)). When `JOURNAL_STREAM` names the
//! file stderr actually is, lines carry that prefix instead of a timestamp and a level word,
//! so `journalctl -p warning -u device-worker-ng` selects by the agent's own levels.

use std::sync::atomic::{AtomicU8, Ordering};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
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

/// The syslog priority journald gives a line with this level (`<3>` err ... `<7>` debug).
pub fn syslog_priority(l: &Level) -> u8 {
    match *l {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Whether `journal_stream` (the `JOURNAL_STREAM` value, "DEVICE:INODE") names the file whose
/// fstat is `(dev, ino)`. systemd sets the variable for the service's own stderr; a child
/// whose stderr was redirected inherits it, hence the comparison (systemd.exec(5)).
pub fn is_journal_stream(journal_stream: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = journal_stream.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

/// Whether this process's stderr is connected to the journal.
pub fn stderr_is_journal() -> bool {
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(2) else {
        return false;
    };
    is_journal_stream(&var.to_string_lossy(), st.st_dev, st.st_ino)
}

pub fn set_level(level: LogLevel) {
    LEVEL.store(rank(&level.as_tracing()), Ordering::Relaxed);
}

/// `<N>` before every line of an event (a multi-line message stays at one priority), no
/// timestamp, no level word: the journal has both.
struct JournalFormat<F>(F);

impl<S, N, F> FormatEvent<S, N> for JournalFormat<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let prefix = format!("<{}>", syslog_priority(event.metadata().level()));
        for l in line.trim_end_matches('\n').split('\n') {
            writer.write_str(&prefix)?;
            writer.write_str(l)?;
            writer.write_char('\n')?;
        }
        Ok(())
    }
}

pub fn init(level: LogLevel) {
    set_level(level);
    let filter = tracing_subscriber::filter::filter_fn(|meta| {
        rank(meta.level()) <= LEVEL.load(Ordering::Relaxed)
    });
    let registry = tracing_subscriber::registry();
    let _ = if stderr_is_journal() {
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_level(false)
            .with_target(false)
            .with_ansi(false);
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(JournalFormat(format))
            .with_filter(filter);
        registry.with(fmt).try_init()
    } else {
        let ansi = nix::unistd::isatty(2).unwrap_or(false);
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_target(false)
            .with_filter(filter);
        registry.with(fmt).try_init()
    };
}

/// The line that ends the process: written once, at error priority when stderr is the
/// journal, and without a timestamp (a configuration error comes before logging is set up,
/// and a supervisor stamps lines itself).
pub fn fatal(message: &str) {
    let line = if stderr_is_journal() {
        format!(
            "<{}>device-worker-ng: {message}\n",
            syslog_priority(&Level::ERROR)
        )
    } else {
        format!("device-worker-ng: {message}\n")
    };
    use std::io::Write;
    let _ = std::io::stderr().write_all(line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_stderr() {
        assert!(is_journal_stream("8:1234", 8, 1234));
        assert!(is_journal_stream("8:1234\n", 8, 1234));
        assert!(!is_journal_stream("8:1234", 8, 1235));
        assert!(!is_journal_stream("9:1234", 8, 1234));
        assert!(!is_journal_stream("garbage", 8, 1234));
        assert!(!is_journal_stream("", 0, 0));
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(syslog_priority(&Level::ERROR), 3);
        assert_eq!(syslog_priority(&Level::WARN), 4);
        assert_eq!(syslog_priority(&Level::INFO), 6);
        assert_eq!(syslog_priority(&Level::DEBUG), 7);
    }
}
