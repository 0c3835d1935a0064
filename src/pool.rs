//! The agent's threads for blocking work (driver calls, store writes, server requests).
//!
//! A small pool of its own rather than `smol::unblock`'s: that pool keeps every thread it
//! ever started until the process ends, so one burst of 200 starts left the agent with its
//! maximum of threads for good. Here a thread leaves after `IDLE` without work, at most
//! `MAX_THREADS` run at once, and a job that panics is logged and answered with `None`
//! instead of taking its caller down.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tracing::error;

/// Threads doing the workloads' blocking work at once: a burst of starts runs this many at
/// a time (the host has few cores; a podman start is mostly CPU).
pub const MAX_THREADS: usize = 4;
/// Threads kept apart for the agent's own work (state writes, server requests, the cluster
/// prune, the budget's kernel thresholds), so slow workload stops never hold up a heartbeat,
/// a record or the budget's watch.
pub const MAX_CONTROL_THREADS: usize = 2;

/// Which threads a job runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Workloads,
    Control,
}
/// How long a thread waits for work before it leaves.
const IDLE: Duration = Duration::from_secs(2);

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    threads: usize,
    idle: usize,
}

struct Pool {
    queue: Mutex<Queue>,
    wake: Condvar,
    max: usize,
    name: &'static str,
}

fn pool(class: Class) -> &'static Pool {
    static WORKLOADS: OnceLock<Pool> = OnceLock::new();
    static CONTROL: OnceLock<Pool> = OnceLock::new();
    let (cell, max, name) = match class {
        Class::Workloads => (&WORKLOADS, MAX_THREADS, "dwng-blocking"),
        Class::Control => (&CONTROL, MAX_CONTROL_THREADS, "dwng-control"),
    };
    cell.get_or_init(|| Pool {
        queue: Mutex::new(Queue::default()),
        wake: Condvar::new(),
        max,
        name,
    })
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Jobs run outside the lock, so a poisoned lock only means a panic in this file's
        // few lines of bookkeeping; the queue is still consistent.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn submit(&'static self, job: Job) {
        let mut q = self.lock();
        q.jobs.push_back(job);
        if q.idle > 0 {
            self.wake.notify_one();
        }
        // More jobs waiting than idle threads to take them: one more thread, up to the cap.
        if q.jobs.len() > q.idle && q.threads < self.max {
            q.threads += 1;
            drop(q);
            let spawned = std::thread::Builder::new()
                .name(self.name.into())
                .spawn(move || self.work());
            if let Err(e) = spawned {
                // The queued job waits for a running thread; with none, the next submit retries.
                error!(error = %e, "cannot start a thread for blocking work");
                self.lock().threads -= 1;
            }
        }
    }

    fn work(&'static self) {
        let mut q = self.lock();
        loop {
            if let Some(job) = q.jobs.pop_front() {
                drop(q);
                run(job);
                q = self.lock();
                continue;
            }
            q.idle += 1;
            let (back, waited) = self
                .wake
                .wait_timeout(q, IDLE)
                .unwrap_or_else(|p| p.into_inner());
            q = back;
            q.idle -= 1;
            if waited.timed_out() && q.jobs.is_empty() {
                q.threads -= 1;
                return;
            }
        }
    }
}

/// Runs `job`, logging a panic instead of passing it on (for callers that run several jobs
/// in one pool job, like a lane).
pub fn run(job: impl FnOnce()) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(job)) {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        error!(panic = %what, "a blocking operation panicked; the agent goes on without its result");
    }
}

/// Runs `f` on the class's threads; the future ends with its result, or `None` if it
/// panicked.
pub fn unblock<T: Send + 'static>(
    class: Class,
    f: impl FnOnce() -> T + Send + 'static,
) -> impl Future<Output = Option<T>> {
    let (tx, rx) = async_channel::bounded(1);
    spawn(class, move || {
        let _ = tx.try_send(f());
    });
    async move { rx.recv().await.ok() }
}

/// Runs `f` on the class's threads without waiting for it.
pub fn spawn(class: Class, f: impl FnOnce() + Send + 'static) {
    pool(class).submit(Box::new(f));
}

/// Threads of a class now (for tests).
pub fn threads(class: Class) -> usize {
    pool(class).lock().threads
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn results_come_back_panics_are_none_and_idle_threads_leave() {
        // One test: the pool is process-wide and tests run in parallel.
        assert_eq!(
            smol::block_on(unblock(Class::Workloads, || 6 * 7)),
            Some(42)
        );
        let boom: Option<()> = smol::block_on(unblock(Class::Workloads, || panic!("on purpose")));
        assert_eq!(boom, None);

        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let jobs: Vec<_> = (0..20)
            .map(|_| {
                let (running, most) = (running.clone(), most.clone());
                unblock(Class::Workloads, move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    running.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for j in jobs {
            assert_eq!(smol::block_on(j), Some(()));
        }
        let most = most.load(Ordering::SeqCst);
        assert!(most > 1, "jobs ran one at a time");
        assert!(most <= MAX_THREADS, "{most} jobs ran at once");

        let deadline = Instant::now() + IDLE * 5;
        while threads(Class::Workloads) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(threads(Class::Workloads), 0, "idle threads stayed");
    }
}
