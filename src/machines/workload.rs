//! The workload machine: one per workload. Pure handlers: they decide the next state and push
//! [`WorkloadCommand`]s; the controller executes the commands through a driver and feeds the
//! results back as [`WorkloadEvent`]s.

use std::time::Duration;

use serde::Serialize;
use statig::prelude::*;

use crate::workload::{BackoffPolicy, RestartPolicy};

/// What happened to a workload (from the controller, its driver, or a timer).
#[derive(Debug, Clone, PartialEq)]
pub enum WorkloadEvent {
    /// Allowed to run now (budget, profile conditions and cron window permit it).
    Admit,
    /// Not allowed to run now; stays or goes back to pending with the reason.
    Hold {
        reason: String,
    },
    Started {
        pid: i32,
    },
    StartFailed {
        error: String,
    },
    Exited(ExitInfo),
    RetryDue,
    /// The desired spec changed: apply it (restart if running).
    Update,
    /// The desired spec became invalid.
    Invalidate {
        reason: String,
    },
    Evict {
        reason: String,
    },
    Remove,
    /// The driver finished stopping it: the cgroup is empty.
    StopCompleted,
}

/// How a workload's process ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The cgroup's oom_kill counter rose during this run.
    pub oom_killed: bool,
    pub ran_for: Duration,
}

impl ExitInfo {
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.oom_killed
    }

    pub fn describe(&self) -> String {
        if self.oom_killed {
            return "OOMKilled: exceeded its memory limit".into();
        }
        match (self.code, self.signal) {
            (Some(0), _) => "completed (exit code 0)".into(),
            (Some(c), _) => format!("exited with code {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "exited (status unknown: adopted process)".into(),
        }
    }
}

/// What the controller must do for a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadCommand {
    /// Create/refresh the cgroup with the limits and start the process inside it.
    Start,
    /// Stop every process of the workload (SIGTERM, grace, SIGKILL), then report StopCompleted.
    Stop,
    /// Empty and delete the cgroup, forget the record.
    Cleanup,
    /// Send `RetryDue` after the delay.
    ScheduleRetry(Duration),
    /// An event for the heartbeat outbox and the log.
    Report {
        warn: bool,
        reason: String,
        message: String,
    },
}

/// What to do once a stop has completed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterStop {
    Restart,
    Remove,
    Evict(String),
}

/// Shared storage of a workload machine.
#[derive(Debug, Clone)]
pub struct WorkloadMachine {
    pub restart: RestartPolicy,
    pub backoff: BackoffPolicy,
    /// Consecutive failed runs (reset by a run that lasted `backoff.reset_after`).
    pub failures: u32,
    pub restarts: u32,
    pub oom_kills: u32,
    pub last_exit: Option<String>,
}

impl WorkloadMachine {
    pub fn new(restart: RestartPolicy, backoff: BackoffPolicy) -> Self {
        WorkloadMachine {
            restart,
            backoff,
            failures: 0,
            restarts: 0,
            oom_kills: 0,
            last_exit: None,
        }
    }

    /// Decides what follows a failed start or run: back off, or give up as broken.
    fn after_failure(&mut self, reason: String, cmds: &mut Vec<WorkloadCommand>) -> Outcome<State> {
        self.failures += 1;
        if self.failures > self.backoff.max_failures {
            let reason = format!(
                "broken: {} consecutive failures, last: {reason}",
                self.failures
            );
            cmds.push(WorkloadCommand::Report {
                warn: true,
                reason: "Broken".into(),
                message: reason.clone(),
            });
            return Transition(State::failed(reason));
        }
        let delay = self.backoff.delay(self.failures);
        cmds.push(WorkloadCommand::Report {
            warn: true,
            reason: "Failed".into(),
            message: reason.clone(),
        });
        cmds.push(WorkloadCommand::ScheduleRetry(delay));
        Transition(State::backoff(format!(
            "{reason}; restart {} in {:.1}s",
            self.failures,
            delay.as_secs_f64()
        )))
    }
}

#[state_machine(
    initial = "State::pending(String::from(\"waiting for admission\"))",
    state(derive(Debug, Clone, PartialEq, Eq, Serialize)),
    superstate(derive(Debug)),
    visibility = "pub"
)]
impl WorkloadMachine {
    #[state(superstate = "present")]
    fn pending(reason: &mut String, event: &WorkloadEvent) -> Outcome<State> {
        match event {
            WorkloadEvent::Admit => Transition(State::starting()),
            WorkloadEvent::Hold { reason: r } => {
                *reason = r.clone();
                Handled
            }
            WorkloadEvent::Update => Handled,
            _ => Super,
        }
    }

    #[state(superstate = "present", entry_action = "enter_starting")]
    fn starting(
        &mut self,
        event: &WorkloadEvent,
        context: &mut Vec<WorkloadCommand>,
    ) -> Outcome<State> {
        match event {
            WorkloadEvent::Started { pid } => Transition(State::running(*pid)),
            WorkloadEvent::StartFailed { error } => {
                self.after_failure(format!("start failed: {error}"), context)
            }
            // Stopping kills whatever the start has spawned: commands of one workload run in order.
            WorkloadEvent::Update => Transition(State::stopping(AfterStop::Restart)),
            WorkloadEvent::Remove => Transition(State::stopping(AfterStop::Remove)),
            // Its process may already be running (and allocating): evicted like a running one.
            WorkloadEvent::Evict { reason } => {
                context.push(WorkloadCommand::Report {
                    warn: true,
                    reason: "Evicted".into(),
                    message: reason.clone(),
                });
                Transition(State::stopping(AfterStop::Evict(reason.clone())))
            }
            _ => Super,
        }
    }

    #[action]
    fn enter_starting(context: &mut Vec<WorkloadCommand>) {
        context.push(WorkloadCommand::Start);
    }

    #[state(superstate = "present")]
    fn running(
        &mut self,
        pid: &mut i32,
        event: &WorkloadEvent,
        context: &mut Vec<WorkloadCommand>,
    ) -> Outcome<State> {
        match event {
            WorkloadEvent::Exited(exit) => {
                if exit.ran_for >= self.backoff.reset_after {
                    self.failures = 0;
                }
                if exit.oom_killed {
                    self.oom_kills += 1;
                }
                let what = exit.describe();
                self.last_exit = Some(what.clone());
                let restart = match self.restart {
                    RestartPolicy::Always => true,
                    RestartPolicy::OnFailure => !exit.success(),
                    RestartPolicy::Never => false,
                };
                if !restart {
                    return if exit.success() {
                        Transition(State::stopped(what))
                    } else {
                        context.push(WorkloadCommand::Report {
                            warn: true,
                            reason: "Failed".into(),
                            message: what.clone(),
                        });
                        Transition(State::failed(format!("{what} (restart policy Never)")))
                    };
                }
                self.restarts += 1;
                if exit.success() {
                    // A clean exit under Always is not a failure: restart after the first delay.
                    let delay = self.backoff.delay(1);
                    context.push(WorkloadCommand::ScheduleRetry(delay));
                    return Transition(State::backoff(format!(
                        "{what}; restarting in {:.1}s",
                        delay.as_secs_f64()
                    )));
                }
                self.after_failure(what, context)
            }
            WorkloadEvent::Started { pid: p } => {
                *pid = *p;
                Handled
            }
            WorkloadEvent::Update => Transition(State::stopping(AfterStop::Restart)),
            WorkloadEvent::Remove => Transition(State::stopping(AfterStop::Remove)),
            WorkloadEvent::Evict { reason } => {
                context.push(WorkloadCommand::Report {
                    warn: true,
                    reason: "Evicted".into(),
                    message: reason.clone(),
                });
                Transition(State::stopping(AfterStop::Evict(reason.clone())))
            }
            _ => Super,
        }
    }

    #[state(superstate = "present", entry_action = "enter_stopping")]
    fn stopping(
        after: &mut AfterStop,
        event: &WorkloadEvent,
        context: &mut Vec<WorkloadCommand>,
    ) -> Outcome<State> {
        match event {
            WorkloadEvent::StopCompleted => match after {
                AfterStop::Restart => Transition(State::starting()),
                AfterStop::Remove => {
                    context.push(WorkloadCommand::Cleanup);
                    Transition(State::removed())
                }
                AfterStop::Evict(reason) => Transition(State::evicted(reason.clone())),
            },
            // The process ending is what a stop waits for; the driver reports StopCompleted.
            WorkloadEvent::Exited(_) | WorkloadEvent::Started { .. } => Handled,
            WorkloadEvent::Remove => {
                *after = AfterStop::Remove;
                Handled
            }
            WorkloadEvent::Update => {
                if *after != AfterStop::Remove {
                    *after = AfterStop::Restart;
                }
                Handled
            }
            WorkloadEvent::Evict { .. } | WorkloadEvent::Admit | WorkloadEvent::Hold { .. } => {
                Handled
            }
            _ => Super,
        }
    }

    #[action]
    fn enter_stopping(context: &mut Vec<WorkloadCommand>) {
        context.push(WorkloadCommand::Stop);
    }

    #[state(superstate = "present")]
    fn backoff(reason: &String, event: &WorkloadEvent) -> Outcome<State> {
        let _ = reason;
        match event {
            WorkloadEvent::RetryDue => Transition(State::starting()),
            WorkloadEvent::Update => Transition(State::starting()),
            WorkloadEvent::Hold { reason } => Transition(State::pending(reason.clone())),
            _ => Super,
        }
    }

    #[state(superstate = "present")]
    fn stopped(reason: &String, event: &WorkloadEvent) -> Outcome<State> {
        let _ = reason;
        match event {
            // A new spec, or a cron workload's next scheduled run.
            WorkloadEvent::Update | WorkloadEvent::Admit => Transition(State::starting()),
            _ => Super,
        }
    }

    #[state(superstate = "present")]
    fn failed(&mut self, reason: &String, event: &WorkloadEvent) -> Outcome<State> {
        let _ = reason;
        match event {
            // A new spec gets a fresh start: the failures belonged to the old one.
            WorkloadEvent::Update => {
                self.failures = 0;
                Transition(State::pending("spec updated".into()))
            }
            _ => Super,
        }
    }

    #[state(superstate = "present")]
    fn evicted(reason: &String, event: &WorkloadEvent) -> Outcome<State> {
        let _ = reason;
        match event {
            WorkloadEvent::Admit => Transition(State::starting()),
            WorkloadEvent::Update => Handled,
            _ => Super,
        }
    }

    /// Everything not removed: removal and invalidation work the same from every state.
    #[superstate]
    fn present(event: &WorkloadEvent, context: &mut Vec<WorkloadCommand>) -> Outcome<State> {
        match event {
            WorkloadEvent::Remove => {
                context.push(WorkloadCommand::Cleanup);
                Transition(State::removed())
            }
            WorkloadEvent::Invalidate { reason } => {
                context.push(WorkloadCommand::Cleanup);
                Transition(State::failed(format!("invalid spec: {reason}")))
            }
            _ => Handled,
        }
    }

    #[state]
    fn removed(event: &WorkloadEvent) -> Outcome<State> {
        let _ = event;
        Handled
    }
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Pending { .. } => "pending",
            State::Starting {} => "starting",
            State::Running { .. } => "running",
            State::Stopping { .. } => "stopping",
            State::Backoff { .. } => "backoff",
            State::Stopped { .. } => "stopped",
            State::Failed { .. } => "failed",
            State::Evicted { .. } => "evicted",
            State::Removed {} => "removed",
        }
    }

    pub fn reason(&self) -> String {
        match self {
            State::Pending { reason }
            | State::Stopped { reason }
            | State::Failed { reason }
            | State::Evicted { reason }
            | State::Backoff { reason } => reason.clone(),
            State::Starting {} => "starting the process".into(),
            State::Running { pid } => format!("pid {pid}"),
            State::Stopping { after } => match after {
                AfterStop::Restart => "stopping to restart with a new spec".into(),
                AfterStop::Remove => "stopping: removed from the desired state".into(),
                AfterStop::Evict(r) => format!("stopping to evict: {r}"),
            },
            State::Removed {} => "removed from the desired state".into(),
        }
    }

    pub fn pid(&self) -> Option<i32> {
        match self {
            State::Running { pid } => Some(*pid),
            _ => None,
        }
    }

    /// The heartbeat's workload status (swagger enum `deploying|running|crashed|stopped`).
    pub fn heartbeat_status(&self) -> &'static str {
        match self {
            State::Pending { .. } | State::Starting {} => "deploying",
            State::Running { .. } => "running",
            State::Backoff { .. } | State::Failed { .. } => "crashed",
            State::Stopping { .. } | State::Stopped { .. } | State::Evicted { .. } => "stopped",
            State::Removed {} => "stopped",
        }
    }
}

#[cfg(test)]
mod tests;

/// Sample states, one per state (and per variant that changes behaviour).
pub fn sample_states() -> Vec<(String, State)> {
    vec![
        ("pending".into(), State::pending("waiting".into())),
        ("starting".into(), State::starting()),
        ("running".into(), State::running(42)),
        (
            "stopping[restart]".into(),
            State::stopping(AfterStop::Restart),
        ),
        (
            "stopping[remove]".into(),
            State::stopping(AfterStop::Remove),
        ),
        (
            "stopping[evict]".into(),
            State::stopping(AfterStop::Evict("over budget".into())),
        ),
        (
            "backoff".into(),
            State::backoff("exited with code 1".into()),
        ),
        ("stopped".into(), State::stopped("completed".into())),
        ("failed".into(), State::failed("broken".into())),
        ("evicted".into(), State::evicted("over budget".into())),
        ("removed".into(), State::removed()),
    ]
}

/// Sample events, with the machine settings that select a guard.
pub fn sample_events() -> Vec<(String, WorkloadMachine, WorkloadEvent)> {
    let policy = BackoffPolicy::default();
    let fresh = |restart| WorkloadMachine::new(restart, policy);
    let at_limit = |restart| {
        let mut m = WorkloadMachine::new(restart, policy);
        m.failures = policy.max_failures;
        m
    };
    let exit = |code: i32, oom: bool| {
        WorkloadEvent::Exited(ExitInfo {
            code: Some(code),
            signal: None,
            oom_killed: oom,
            ran_for: Duration::from_secs(1),
        })
    };
    use RestartPolicy::*;
    vec![
        ("Admit".into(), fresh(Always), WorkloadEvent::Admit),
        (
            "Hold".into(),
            fresh(Always),
            WorkloadEvent::Hold {
                reason: "no budget".into(),
            },
        ),
        (
            "Started".into(),
            fresh(Always),
            WorkloadEvent::Started { pid: 7 },
        ),
        (
            "StartFailed[retries-left]".into(),
            fresh(Always),
            WorkloadEvent::StartFailed {
                error: "ENOENT".into(),
            },
        ),
        (
            "StartFailed[limit-reached]".into(),
            at_limit(Always),
            WorkloadEvent::StartFailed {
                error: "ENOENT".into(),
            },
        ),
        (
            "Exited[success,Always]".into(),
            fresh(Always),
            exit(0, false),
        ),
        (
            "Exited[success,OnFailure|Never]".into(),
            fresh(OnFailure),
            exit(0, false),
        ),
        (
            "Exited[failure,retries-left]".into(),
            fresh(Always),
            exit(1, false),
        ),
        (
            "Exited[oom,retries-left]".into(),
            fresh(OnFailure),
            exit(137, true),
        ),
        (
            "Exited[failure,limit-reached]".into(),
            at_limit(Always),
            exit(1, false),
        ),
        ("Exited[failure,Never]".into(), fresh(Never), exit(1, false)),
        ("RetryDue".into(), fresh(Always), WorkloadEvent::RetryDue),
        ("Update".into(), fresh(Always), WorkloadEvent::Update),
        (
            "Invalidate".into(),
            fresh(Always),
            WorkloadEvent::Invalidate {
                reason: "bad".into(),
            },
        ),
        (
            "Evict".into(),
            fresh(Always),
            WorkloadEvent::Evict {
                reason: "over budget".into(),
            },
        ),
        ("Remove".into(), fresh(Always), WorkloadEvent::Remove),
        (
            "StopCompleted".into(),
            fresh(Always),
            WorkloadEvent::StopCompleted,
        ),
    ]
}

pub type Machine = statig::blocking::InitializedStateMachine<WorkloadMachine>;

/// A machine that starts in `state` (a new workload starts pending; an adopted one running).
/// Entry actions of `state` push their commands into `cmds`.
pub fn machine_in(
    shared: WorkloadMachine,
    state: State,
    cmds: &mut Vec<WorkloadCommand>,
) -> Machine {
    let mut u = shared.uninitialized_state_machine();
    *u.state_mut() = state;
    u.init_with_context(cmds)
}

/// The computed transition table over every sample (state, event) pair.
pub fn transition_table() -> Vec<Row> {
    let mut rows = Vec::new();
    for (state_name, state) in sample_states() {
        for (event_name, shared, event) in sample_events() {
            let mut cmds = Vec::new();
            let mut m = machine_in(shared, state.clone(), &mut cmds);
            cmds.clear();
            m.handle_with_context(&event, &mut cmds);
            rows.push(Row {
                from: state_name.clone(),
                event: event_name.clone(),
                to: m.state().name().to_string(),
                commands: cmds.iter().map(command_name).collect(),
            });
        }
    }
    rows
}

pub fn command_name(c: &WorkloadCommand) -> String {
    match c {
        WorkloadCommand::Start => "Start".into(),
        WorkloadCommand::Stop => "Stop".into(),
        WorkloadCommand::Cleanup => "Cleanup".into(),
        WorkloadCommand::ScheduleRetry(_) => "ScheduleRetry".into(),
        WorkloadCommand::Report { reason, .. } => format!("Report({reason})"),
    }
}

use super::Row;
