//! Polling for something another process or thread brings about: the one place tests wait.

use std::time::{Duration, Instant};

/// Polls `done` every `poll` until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, poll: Duration, mut done: impl FnMut() -> bool) {
    if poll_until(timeout, poll, || done().then_some(())).is_none() {
        panic!("timed out after {timeout:?} waiting for: {what}");
    }
}

/// Polls `probe` every `poll` until it yields a value, for at most `timeout`; `None` when it
/// never did (for callers that add their own diagnostics to the failure).
pub fn poll_until<T>(
    timeout: Duration,
    poll: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(poll);
    }
}
