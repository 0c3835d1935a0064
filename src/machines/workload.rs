//! The workload machine: one per workload. Pure handlers: they decide the next state and push
//! [`WorkloadCommand`]s; the controller executes the commands through a driver and feeds the
//! results back as [`WorkloadEvent`]s.

use std::time::Duration;

use serde::Serialize;
use statig::prelude::*;

use super::Output;
use crate::workload::{BackoffPolicy, RestartPolicy};

/// The context of the workload machine's handlers.
pub type Context = Output<WorkloadCommand>;

/// What happened to a workload (from the controller, its driver, or a timer).
#[derive(Debug, Clone, PartialEq)]
pub enum WorkloadEvent {
    /// Allowed to run now (budget, profile conditions and cron window permit it).
    Admit,
    /// Not allowed to run now; stays or goes back to pending with the reason.
    Hold {
        reason: String,
    },
    /// The run started; `pid` is its main process (`None`: no local process, e.g. k8s).
    Started {
        pid: Option<i32>,
    },
    /// How a run without a local process stands (a Deployment's availability): not ready
    /// keeps a start `starting` and makes a running workload `unavailable`, with the reason.
    Progress {
        ready: bool,
        reason: String,
    },
    StartFailed {
        error: String,
    },
    Exited(ExitInfo),
    RetryDue,
    /// The desired spec changed, or the workload is desired again while a removal stops it:
    /// apply it (restart if running).
    Update,
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
            // An adopted process (no child of this agent), or a k8s workload whose pods the
            // cluster removed without a termination record.
            (None, None) => "ended (its exit status is unknown)".into(),
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

    /// Decides what follows the end of a run: restart (after a delay), stop, or fail.
    fn run_ended(&mut self, exit: &ExitInfo, context: &mut Context) -> Outcome<State> {
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

    /// Decides what follows a failed start or run: back off, or give up as broken.
    fn after_failure(&mut self, reason: String, cmds: &mut Context) -> Outcome<State> {
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
    after_transition = "Self::after_transition",
    visibility = "pub"
)]
impl WorkloadMachine {
    #[state(superstate = "present")]
    fn pending(reason: &mut String, event: &WorkloadEvent) -> Outcome<State> {
        match event {
            WorkloadEvent::Admit => Transition(starting()),
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
        reason: &mut String,
        event: &WorkloadEvent,
        context: &mut Context,
    ) -> Outcome<State> {
        match event {
            WorkloadEvent::Started { pid } => Transition(State::running(*pid)),
            WorkloadEvent::Progress { ready: true, .. } => Transition(State::running(None)),
            WorkloadEvent::Progress { reason: r, .. } => {
                *reason = r.clone();
                Handled
            }
            WorkloadEvent::StartFailed { error } => {
                self.after_failure(format!("start failed: {error}"), context)
            }
            // A run without a local process (a Deployment) can end before it was ever
            // available: a pod that crashes from the start.
            WorkloadEvent::Exited(exit) => self.run_ended(exit, context),
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
    fn enter_starting(context: &mut Context) {
        context.push(WorkloadCommand::Start);
    }

    #[state(superstate = "up")]
    fn running(pid: &mut Option<i32>, event: &WorkloadEvent) -> Outcome<State> {
        match event {
            WorkloadEvent::Started { pid: p } => {
                *pid = *p;
                Handled
            }
            WorkloadEvent::Progress {
                ready: false,
                reason,
            } => Transition(State::unavailable(reason.clone())),
            _ => Super,
        }
    }

    /// Started, but not available (a Deployment whose pod is not ready).
    #[state(superstate = "up")]
    fn unavailable(reason: &mut String, event: &WorkloadEvent) -> Outcome<State> {
        match event {
            WorkloadEvent::Progress { ready: true, .. } => Transition(State::running(None)),
            WorkloadEvent::Progress { reason: r, .. } => {
                *reason = r.clone();
                Handled
            }
            _ => Super,
        }
    }

    /// A run that has started: it ends, is replaced, removed or evicted the same way whether
    /// it is available or not.
    #[superstate(superstate = "present")]
    fn up(&mut self, event: &WorkloadEvent, context: &mut Context) -> Outcome<State> {
        match event {
            WorkloadEvent::Exited(exit) => self.run_ended(exit, context),
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
        context: &mut Context,
    ) -> Outcome<State> {
        match event {
            WorkloadEvent::StopCompleted => match after {
                AfterStop::Restart => Transition(starting()),
                AfterStop::Remove => {
                    context.push(WorkloadCommand::Cleanup);
                    Transition(State::removed())
                }
                AfterStop::Evict(reason) => Transition(State::evicted(reason.clone())),
            },
            // The process ending is what a stop waits for; the driver reports StopCompleted.
            WorkloadEvent::Exited(_)
            | WorkloadEvent::Started { .. }
            | WorkloadEvent::Progress { .. } => Handled,
            WorkloadEvent::Remove => {
                *after = AfterStop::Remove;
                Handled
            }
            // Desired (again, or anew): start it once stopped, whatever the stop was for.
            WorkloadEvent::Update => {
                *after = AfterStop::Restart;
                Handled
            }
            WorkloadEvent::Evict { .. } | WorkloadEvent::Admit | WorkloadEvent::Hold { .. } => {
                Handled
            }
            _ => Super,
        }
    }

    #[action]
    fn enter_stopping(context: &mut Context) {
        context.push(WorkloadCommand::Stop);
    }

    #[state(superstate = "present")]
    fn backoff(reason: &String, event: &WorkloadEvent) -> Outcome<State> {
        let _ = reason;
        match event {
            WorkloadEvent::RetryDue => Transition(starting()),
            WorkloadEvent::Update => Transition(starting()),
            WorkloadEvent::Hold { reason } => Transition(State::pending(reason.clone())),
            _ => Super,
        }
    }

    #[state(superstate = "present")]
    fn stopped(reason: &String, event: &WorkloadEvent) -> Outcome<State> {
        let _ = reason;
        match event {
            // A new spec, or a cron workload's next scheduled run.
            WorkloadEvent::Update | WorkloadEvent::Admit => Transition(starting()),
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
            WorkloadEvent::Admit => Transition(starting()),
            WorkloadEvent::Update => Handled,
            _ => Super,
        }
    }

    /// Everything not removed: removal works the same from every state without a run.
    #[superstate]
    fn present(event: &WorkloadEvent, context: &mut Context) -> Outcome<State> {
        match event {
            WorkloadEvent::Remove => {
                context.push(WorkloadCommand::Cleanup);
                Transition(State::removed())
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
    /// A workload waiting for admission.
    pub fn waiting(reason: String) -> State {
        State::pending(reason)
    }

    /// A run found up after an agent restart: its process runs; a run without a local
    /// process (a Deployment) is not known to be available until its watch has looked.
    pub fn adopted(pid: Option<i32>) -> State {
        match pid {
            Some(_) => State::running(pid),
            None => State::unavailable("adopted; waiting for its first look".into()),
        }
    }
}

/// A run about to start.
fn starting() -> State {
    State::starting("starting".into())
}

impl WorkloadMachine {
    fn after_transition(&mut self, source: &State, target: &State, context: &mut Context) {
        super::note_transition(context, source, target);
    }
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Pending { .. } => "pending",
            State::Starting { .. } => "starting",
            State::Running { .. } => "running",
            State::Unavailable { .. } => "unavailable",
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
            | State::Starting { reason }
            | State::Unavailable { reason }
            | State::Stopped { reason }
            | State::Failed { reason }
            | State::Evicted { reason }
            | State::Backoff { reason } => reason.clone(),
            State::Running { pid: Some(pid) } => format!("pid {pid}"),
            State::Running { pid: None } => "running and available".into(),
            State::Stopping { after } => match after {
                AfterStop::Restart => "stopping to start again with the desired spec".into(),
                AfterStop::Remove => "stopping: removed from the desired state".into(),
                AfterStop::Evict(r) => format!("stopping to evict: {r}"),
            },
            State::Removed {} => "removed from the desired state".into(),
        }
    }
}

impl State {
    pub fn pid(&self) -> Option<i32> {
        match self {
            State::Running { pid } => *pid,
            _ => None,
        }
    }

    /// Does the workload hold resources in this state (started, running, about to restart,
    /// stopping)? Admission counts these against the budget.
    pub fn holds_resources(&self) -> bool {
        matches!(
            self,
            State::Starting { .. }
                | State::Running { .. }
                | State::Unavailable { .. }
                | State::Backoff { .. }
                | State::Stopping { .. }
        )
    }

    /// Is a run of the workload going (started and not yet ended)?
    pub fn is_up(&self) -> bool {
        matches!(self, State::Running { .. } | State::Unavailable { .. })
    }

    /// The heartbeat's workload status (swagger enum `deploying|running|crashed|stopped`).
    pub fn heartbeat_status(&self) -> crate::flotta::messages::WorkloadState {
        use crate::flotta::messages::WorkloadState as W;
        match self {
            State::Pending { .. } | State::Starting { .. } | State::Unavailable { .. } => {
                W::Deploying
            }
            State::Running { .. } => W::Running,
            State::Backoff { .. } | State::Failed { .. } => W::Crashed,
            State::Stopping { .. } | State::Stopped { .. } | State::Evicted { .. } => W::Stopped,
            State::Removed {} => W::Stopped,
        }
    }
}

#[cfg(test)]
mod tests;

/// Sample states, one per state (and per variant that changes behaviour).
pub fn sample_states() -> Vec<(String, (WorkloadMachine, State))> {
    let shared = WorkloadMachine::new(RestartPolicy::Always, BackoffPolicy::default());
    let states: Vec<(String, State)> = vec![
        ("pending".into(), State::pending("waiting".into())),
        ("starting".into(), starting()),
        ("running".into(), State::running(Some(42))),
        (
            "unavailable".into(),
            State::unavailable("pod not ready".into()),
        ),
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
    ];
    states
        .into_iter()
        .map(|(n, st)| (n, (shared.clone(), st)))
        .collect()
}

/// Sample events, with the machine settings that select a guard.
pub fn sample_events() -> Vec<(String, (Option<WorkloadMachine>, WorkloadEvent))> {
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
    let progress = |ready| WorkloadEvent::Progress {
        ready,
        reason: "0/1 nodes are available".into(),
    };
    use RestartPolicy::*;
    let rows: Vec<(&str, WorkloadMachine, WorkloadEvent)> = vec![
        ("Admit", fresh(Always), WorkloadEvent::Admit),
        (
            "Hold",
            fresh(Always),
            WorkloadEvent::Hold {
                reason: "no budget".into(),
            },
        ),
        (
            "Started",
            fresh(Always),
            WorkloadEvent::Started { pid: Some(7) },
        ),
        ("Progress[ready]", fresh(Always), progress(true)),
        ("Progress[not-ready]", fresh(Always), progress(false)),
        (
            "StartFailed[retries-left]",
            fresh(Always),
            WorkloadEvent::StartFailed {
                error: "ENOENT".into(),
            },
        ),
        (
            "StartFailed[limit-reached]",
            at_limit(Always),
            WorkloadEvent::StartFailed {
                error: "ENOENT".into(),
            },
        ),
        ("Exited[success,Always]", fresh(Always), exit(0, false)),
        (
            "Exited[success,OnFailure|Never]",
            fresh(OnFailure),
            exit(0, false),
        ),
        (
            "Exited[failure,retries-left]",
            fresh(Always),
            exit(1, false),
        ),
        (
            "Exited[oom,retries-left]",
            fresh(OnFailure),
            exit(137, true),
        ),
        (
            "Exited[failure,limit-reached]",
            at_limit(Always),
            exit(1, false),
        ),
        ("Exited[failure,Never]", fresh(Never), exit(1, false)),
        ("RetryDue", fresh(Always), WorkloadEvent::RetryDue),
        ("Update", fresh(Always), WorkloadEvent::Update),
        (
            "Evict",
            fresh(Always),
            WorkloadEvent::Evict {
                reason: "over budget".into(),
            },
        ),
        ("Remove", fresh(Always), WorkloadEvent::Remove),
        ("StopCompleted", fresh(Always), WorkloadEvent::StopCompleted),
    ];
    rows.into_iter()
        .map(|(n, m, e)| (n.to_string(), (Some(m), e)))
        .collect()
}

pub type Machine = statig::blocking::InitializedStateMachine<WorkloadMachine>;

/// A machine that starts in `state` (a new workload starts pending; an adopted one running).
/// Entry actions of `state` push their commands into `out`.
pub fn machine_in(shared: WorkloadMachine, state: State, out: &mut Context) -> Machine {
    super::machine_in(shared, state, out)
}

/// The computed transition table over every sample (state, event) pair.
pub fn transition_table() -> Vec<Row> {
    super::transition_table(&sample_states(), &sample_events(), command_name)
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

impl super::Named for State {
    fn name(&self) -> &'static str {
        State::name(self)
    }

    fn reason(&self) -> String {
        State::reason(self)
    }
}
