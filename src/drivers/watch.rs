//! How the end of a run is awaited: on the smol reactor, a pidfd per watched process, never
//! a thread per workload. A run without a local process (a k8s Deployment) is asked
//! periodically instead, its blocking look on the bounded blocking pool.

use std::future::Future;
use std::os::fd::{FromRawFd, OwnedFd};
use std::pin::Pin;
use std::task::Poll as TaskPoll;
use std::time::Duration;

use super::process;
use super::RunEnd;

/// How a driver's run is watched (part of what a start or an adoption returns).
pub enum Watch {
    /// The agent's own child: its pidfd says when it ends, waitpid(2) gives the status.
    Child { pid: i32 },
    /// Processes that are not the agent's children (a pod's containers, a process adopted
    /// after an agent restart), each as (pid, start ticks): the run ends when the first of
    /// them ends; `finish` (blocking) is told which one and asks the driver how it ended.
    Processes {
        pids: Vec<(i32, u64)>,
        finish: Finish,
    },
    /// No local process (a Deployment on the cluster): `look` (blocking) is asked every
    /// `every` how the run stands.
    Poll { every: Duration, look: Look },
}

pub type Finish = Box<dyn FnOnce(usize) -> RunEnd + Send>;
pub type Look = Box<dyn FnMut() -> Poll + Send>;

/// How a run without a local process stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    Up { ready: bool, reason: String },
    Ended(RunEnd),
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Watch::Child { pid } => write!(f, "Child({pid})"),
            Watch::Processes { pids, .. } => write!(f, "Processes({pids:?})"),
            Watch::Poll { every, .. } => write!(f, "Poll(every {every:?})"),
        }
    }
}

/// Waits for the run's end; `progress(ready, reason)` hears every change of a polled run.
pub async fn until_end(watch: Watch, mut progress: impl FnMut(bool, String)) -> RunEnd {
    match watch {
        Watch::Child { pid } => child_end(pid).await,
        Watch::Processes { pids, finish } => {
            let first = first_to_end(&pids).await;
            // A `finish` that panicked (logged by the pool) leaves the end unknown.
            crate::pool::unblock(crate::pool::Class::Workloads, move || finish(first))
                .await
                .unwrap_or_default()
        }
        Watch::Poll { every, mut look } => {
            let mut last: Option<(bool, String)> = None;
            loop {
                let Some((answer, back)) =
                    crate::pool::unblock(crate::pool::Class::Workloads, move || (look(), look))
                        .await
                else {
                    // The look panicked (logged by the pool) and took itself along: the run
                    // can no longer be followed, so it ends with its status unknown.
                    return RunEnd::default();
                };
                look = back;
                match answer {
                    Poll::Ended(end) => return end,
                    Poll::Up { ready, reason } => {
                        let now = Some((ready, reason.clone()));
                        if now != last {
                            last = now;
                            progress(ready, reason);
                        }
                    }
                }
                smol::Timer::after(every).await;
            }
        }
    }
}

/// Opens a pidfd for `pid` (Linux 5.3+).
fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// How often a process is looked at where the kernel has no pidfd.
const FALLBACK_POLL: Duration = Duration::from_millis(250);

/// Resolves when the process ends (readable pidfd), or, without pidfd, when it is seen gone.
async fn process_gone(pid: i32, is_gone: impl Fn() -> bool) {
    if let Ok(fd) = pidfd_open(pid) {
        if let Ok(a) = smol::Async::new(fd) {
            // The pidfd refers to the process alive when it was opened; if that is already
            // not ours (pid recycled) or gone, there is nothing to wait for.
            if !is_gone() {
                let _ = a.readable().await;
            }
            return;
        }
    }
    while !is_gone() {
        smol::Timer::after(FALLBACK_POLL).await;
    }
}

/// Waits for the agent's own child and reaps it.
async fn child_end(pid: i32) -> RunEnd {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let nix_pid = nix::unistd::Pid::from_raw(pid);
    loop {
        match waitpid(nix_pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => {
                return RunEnd {
                    code: Some(code),
                    ..RunEnd::default()
                }
            }
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                return RunEnd {
                    signal: Some(sig as i32),
                    ..RunEnd::default()
                }
            }
            Ok(WaitStatus::StillAlive) | Ok(_) => {}
            // Someone else reaped it (ECHILD): ended, status unknown.
            Err(_) => return RunEnd::default(),
        }
        process_gone(pid, || {
            // A zombie child counts as gone here; the next waitpid reaps it.
            !process::is_same_process(pid, process::start_ticks(pid).unwrap_or(0))
        })
        .await;
    }
}

/// Resolves with the index of the first of `pids` to end.
async fn first_to_end(pids: &[(i32, u64)]) -> usize {
    if pids.is_empty() {
        return 0;
    }
    let mut waits: Vec<Pin<Box<dyn Future<Output = ()> + Send>>> = pids
        .iter()
        .map(|&(pid, ticks)| {
            Box::pin(process_gone(pid, move || {
                !process::is_same_process(pid, ticks)
            })) as Pin<Box<dyn Future<Output = ()> + Send>>
        })
        .collect();
    std::future::poll_fn(move |cx| {
        for (i, w) in waits.iter_mut().enumerate() {
            if w.as_mut().poll(cx).is_ready() {
                return TaskPoll::Ready(i);
            }
        }
        TaskPoll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    // The children are reaped by the watch (waitpid), which is what is tested.
    #[allow(clippy::zombie_processes)]
    #[test]
    fn a_child_is_reaped_with_its_status_and_a_stranger_is_seen_gone() {
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let end = smol::block_on(until_end(
            Watch::Child {
                pid: child.id() as i32,
            },
            |_, _| {},
        ));
        assert_eq!(end.code, Some(7));

        let killed = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = killed.id() as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let end = smol::block_on(until_end(Watch::Child { pid }, |_, _| {}));
        assert_eq!(end.signal, Some(9));

        // Not awaited as a child: a process of which only pid and ticks are known.
        let mut sleeper = std::process::Command::new("/bin/sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let pid = sleeper.id() as i32;
        let ticks = process::start_ticks(pid).unwrap();
        let reaper = std::thread::spawn(move || sleeper.wait());
        let which = smol::block_on(until_end(
            Watch::Processes {
                pids: vec![(std::process::id() as i32, 1), (pid, ticks)],
                finish: Box::new(|i| RunEnd {
                    code: Some(i as i32),
                    ..RunEnd::default()
                }),
            },
            |_, _| {},
        ));
        // Index 0 (this test process with wrong ticks) counts as gone at once.
        assert_eq!(which.code, Some(0));
        reaper.join().unwrap().unwrap();
    }

    #[test]
    fn a_polled_run_reports_changes_until_it_ends() {
        let answers = std::sync::Mutex::new(vec![
            Poll::Ended(RunEnd {
                code: Some(3),
                ..RunEnd::default()
            }),
            Poll::Up {
                ready: true,
                reason: "available".into(),
            },
            Poll::Up {
                ready: false,
                reason: "pending".into(),
            },
            Poll::Up {
                ready: false,
                reason: "pending".into(),
            },
        ]);
        let mut seen = Vec::new();
        let end = smol::block_on(until_end(
            Watch::Poll {
                every: Duration::from_millis(1),
                look: Box::new(move || answers.lock().unwrap().pop().unwrap()),
            },
            |ready, reason| seen.push((ready, reason)),
        ));
        assert_eq!(end.code, Some(3));
        assert_eq!(
            seen,
            vec![(false, "pending".into()), (true, "available".into())]
        );
    }
}
