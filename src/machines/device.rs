//! The device machine: registering → enrolled → reconciling, with degraded and over-budget.
//! Pure handlers; the controller executes the [`DeviceCommand`]s.

use std::collections::BTreeMap;

use serde::Serialize;
use statig::prelude::*;

use super::{Output, Row};

/// The context of the device machine's handlers.
pub type Context = Output<DeviceCommand>;

/// What an open problem is about: one entry per key, replaced when raised again.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case", tag = "about", content = "name")]
pub enum ProblemKey {
    /// The server: unreachable, refusing the device, answering with errors.
    Server,
    /// The device certificate (renewal failing).
    Certificate,
    /// The desired state could not be read or was refused as a whole.
    DesiredState,
    /// STATE_DIR cannot be written (disk full, read-only file system).
    Storage,
    /// Too many workloads, or workloads of the desired state refused.
    Workloads,
    /// One workload (failed, broken, its update refused).
    Workload(String),
}

impl std::fmt::Display for ProblemKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProblemKey::Server => f.write_str("server"),
            ProblemKey::Certificate => f.write_str("certificate"),
            ProblemKey::DesiredState => f.write_str("desired-state"),
            ProblemKey::Storage => f.write_str("storage"),
            ProblemKey::Workloads => f.write_str("workloads"),
            ProblemKey::Workload(n) => write!(f, "workload/{n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The agent started: serverless, or with a valid device certificate, it skips enrolment;
    /// disconnected by the server earlier (persisted), it stays disconnected.
    Boot {
        serverless: bool,
        has_certificate: bool,
        disconnected: bool,
    },
    /// A device certificate was obtained (registration done).
    Registered,
    /// The server no longer accepts the device (certificate invalid past renewal, or deleted).
    IdentityLost {
        reason: String,
    },
    DesiredStateApplied,
    /// Something the operator must know about (a broken workload, an unreachable server...).
    ProblemRaised {
        key: ProblemKey,
        reason: String,
    },
    ProblemCleared {
        key: ProblemKey,
    },
    /// Measured usage of the workloads is over the budget (sustained).
    BudgetExceeded {
        reason: String,
    },
    /// Usage has stayed under the low watermark for the hold time.
    BudgetRecovered,
    /// The server told the device to disconnect (PROTOCOL §2.6).
    Disconnect,
    /// An operator rejoins a disconnected device (`device-worker-ng reset`): enrol afresh.
    Reset,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceCommand {
    /// Stop and remove every workload and wipe the desired state.
    WipeWorkloads,
    /// Remember the disconnect across restarts (until `device-worker-ng reset`).
    PersistDisconnect,
    /// Evict workloads by priority until usage is under the low watermark.
    ShedLoad,
    /// Re-admit evicted workloads.
    Readmit,
    Report {
        warn: bool,
        reason: String,
        message: String,
    },
}

#[derive(Debug, Clone, Default)]
pub struct DeviceMachine {
    /// Open problems by key; the degraded reason lists them.
    pub problems: BTreeMap<ProblemKey, String>,
    /// A desired state has been applied since the last (re-)registration.
    pub configured: bool,
}

impl DeviceMachine {
    fn summary(&self) -> String {
        self.problems
            .values()
            .cloned()
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Records a problem event; returns true when the set of problems changed.
    fn record(&mut self, event: &DeviceEvent) -> bool {
        match event {
            DeviceEvent::ProblemRaised { key, reason } => {
                self.problems.insert(key.clone(), reason.clone()).as_ref() != Some(reason)
            }
            DeviceEvent::ProblemCleared { key } => self.problems.remove(key).is_some(),
            _ => false,
        }
    }

    /// Where normal operation goes given the open problems.
    fn healthy_or_degraded(&self) -> State {
        if self.problems.is_empty() {
            if self.configured {
                State::reconciling()
            } else {
                State::enrolled()
            }
        } else {
            State::degraded(self.summary())
        }
    }
}

#[state_machine(
    initial = "State::registering(String::from(\"starting\"))",
    state(derive(Debug, Clone, PartialEq, Eq, Serialize)),
    superstate(derive(Debug)),
    after_transition = "Self::after_transition",
    visibility = "pub"
)]
impl DeviceMachine {
    #[state]
    fn registering(&mut self, reason: &mut String, event: &DeviceEvent) -> Outcome<State> {
        match event {
            DeviceEvent::Boot {
                disconnected: true, ..
            } => Transition(State::disconnected()),
            DeviceEvent::Boot {
                serverless,
                has_certificate,
                ..
            } => {
                if *serverless || *has_certificate {
                    Transition(State::enrolled())
                } else {
                    *reason = "enrolling with the bootstrap certificate".into();
                    Handled
                }
            }
            DeviceEvent::Registered => Transition(State::enrolled()),
            DeviceEvent::ProblemRaised { .. } | DeviceEvent::ProblemCleared { .. } => {
                self.record(event);
                Handled
            }
            _ => Handled,
        }
    }

    #[state(superstate = "operational")]
    fn enrolled(&mut self, event: &DeviceEvent) -> Outcome<State> {
        match event {
            DeviceEvent::DesiredStateApplied => {
                self.configured = true;
                Transition(self.healthy_or_degraded())
            }
            DeviceEvent::ProblemRaised { .. } | DeviceEvent::ProblemCleared { .. } => {
                self.record(event);
                Transition(self.healthy_or_degraded())
            }
            _ => Super,
        }
    }

    #[state(superstate = "operational")]
    fn reconciling(&mut self, event: &DeviceEvent) -> Outcome<State> {
        match event {
            DeviceEvent::ProblemRaised { .. } | DeviceEvent::ProblemCleared { .. } => {
                self.record(event);
                Transition(self.healthy_or_degraded())
            }
            _ => Super,
        }
    }

    #[state(superstate = "operational")]
    fn degraded(&mut self, reason: &mut String, event: &DeviceEvent) -> Outcome<State> {
        match event {
            DeviceEvent::DesiredStateApplied => {
                self.configured = true;
                Handled
            }
            DeviceEvent::ProblemRaised { .. } | DeviceEvent::ProblemCleared { .. } => {
                self.record(event);
                if self.problems.is_empty() {
                    Transition(self.healthy_or_degraded())
                } else {
                    *reason = self.summary();
                    Handled
                }
            }
            _ => Super,
        }
    }

    #[state(superstate = "operational", entry_action = "enter_over_budget")]
    fn over_budget(
        &mut self,
        reason: &mut String,
        event: &DeviceEvent,
        context: &mut Context,
    ) -> Outcome<State> {
        match event {
            DeviceEvent::BudgetRecovered => {
                context.push(DeviceCommand::Readmit);
                Transition(self.healthy_or_degraded())
            }
            // Still over after the last eviction took effect: shed more.
            DeviceEvent::BudgetExceeded { reason: r } => {
                *reason = r.clone();
                context.push(DeviceCommand::ShedLoad);
                Handled
            }
            DeviceEvent::ProblemRaised { .. } | DeviceEvent::ProblemCleared { .. } => {
                self.record(event);
                Handled
            }
            _ => Super,
        }
    }

    #[action]
    fn enter_over_budget(context: &mut Context) {
        context.push(DeviceCommand::ShedLoad);
    }

    /// Told by the server to disconnect: runs nothing and sends nothing, across restarts,
    /// until an operator rejoins it (`device-worker-ng reset`).
    #[state]
    fn disconnected(&mut self, event: &DeviceEvent) -> Outcome<State> {
        match event {
            DeviceEvent::Reset => {
                self.problems.clear();
                Transition(State::registering(
                    "reset by an operator: enrolling afresh".into(),
                ))
            }
            _ => Handled,
        }
    }

    /// Handles what every state after registration handles the same way.
    #[superstate]
    fn operational(&mut self, event: &DeviceEvent, context: &mut Context) -> Outcome<State> {
        match event {
            DeviceEvent::BudgetExceeded { reason } => {
                context.push(DeviceCommand::Report {
                    warn: true,
                    reason: "OverBudget".into(),
                    message: reason.clone(),
                });
                Transition(State::over_budget(reason.clone()))
            }
            DeviceEvent::Disconnect => {
                self.configured = false;
                context.push(DeviceCommand::PersistDisconnect);
                context.push(DeviceCommand::WipeWorkloads);
                Transition(State::disconnected())
            }
            DeviceEvent::IdentityLost { reason } => Transition(State::registering(reason.clone())),
            _ => Handled,
        }
    }
}

impl DeviceMachine {
    fn after_transition(&mut self, source: &State, target: &State, context: &mut Context) {
        super::note_transition(context, source, target);
    }
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Disconnected {} => "disconnected",
            State::Registering { .. } => "registering",
            State::Enrolled {} => "enrolled",
            State::Reconciling {} => "reconciling",
            State::Degraded { .. } => "degraded",
            State::OverBudget { .. } => "over-budget",
        }
    }

    pub fn reason(&self) -> String {
        match self {
            State::Registering { reason } | State::Degraded { reason } => reason.clone(),
            State::OverBudget { reason } => reason.clone(),
            State::Enrolled {} => "waiting for the first desired state".into(),
            State::Reconciling {} => "desired state applied".into(),
            State::Disconnected {} => {
                "disconnected by the server: runs nothing until `device-worker-ng reset`".into()
            }
        }
    }
}

impl State {
    /// The heartbeat's `status` (PROTOCOL §5.1); `None` before registration.
    pub fn heartbeat_status(&self) -> Option<crate::flotta::messages::DeviceStatus> {
        use crate::flotta::messages::DeviceStatus;
        match self {
            State::Registering { .. } | State::Disconnected {} => None,
            State::Enrolled {} | State::Reconciling {} => Some(DeviceStatus::Up),
            State::Degraded { .. } | State::OverBudget { .. } => Some(DeviceStatus::Degraded),
        }
    }
}

pub type Machine = statig::blocking::InitializedStateMachine<DeviceMachine>;

pub fn new_machine() -> Machine {
    DeviceMachine::default()
        .uninitialized_state_machine()
        .init_with_context(&mut Context::default())
}

pub fn sample_states() -> Vec<(String, (DeviceMachine, State))> {
    let none = DeviceMachine::default();
    let configured = DeviceMachine {
        configured: true,
        ..DeviceMachine::default()
    };
    let one = DeviceMachine {
        problems: [(ProblemKey::Server, "server unreachable".to_string())].into(),
        configured: true,
    };
    let rows = vec![
        (
            "registering",
            none.clone(),
            State::registering("starting".into()),
        ),
        ("enrolled", none.clone(), State::enrolled()),
        ("reconciling", configured.clone(), State::reconciling()),
        (
            "degraded[problem]",
            one.clone(),
            State::degraded("server unreachable".into()),
        ),
        (
            "over-budget",
            configured,
            State::over_budget("memory".into()),
        ),
        (
            "over-budget[problems]",
            one,
            State::over_budget("memory".into()),
        ),
        ("disconnected", none, State::disconnected()),
    ];
    rows.into_iter()
        .map(|(n, m, s)| (n.to_string(), (m, s)))
        .collect()
}

pub fn sample_events() -> Vec<(String, (Option<DeviceMachine>, DeviceEvent))> {
    let boot = |serverless, has_certificate, disconnected| DeviceEvent::Boot {
        serverless,
        has_certificate,
        disconnected,
    };
    let rows = vec![
        ("Boot[serverless]", boot(true, false, false)),
        ("Boot[certificate]", boot(false, true, false)),
        ("Boot[no-certificate]", boot(false, false, false)),
        ("Boot[disconnected]", boot(false, true, true)),
        ("Registered", DeviceEvent::Registered),
        (
            "IdentityLost",
            DeviceEvent::IdentityLost {
                reason: "404".into(),
            },
        ),
        ("DesiredStateApplied", DeviceEvent::DesiredStateApplied),
        (
            "ProblemRaised",
            DeviceEvent::ProblemRaised {
                key: ProblemKey::Workload("w".into()),
                reason: "broken".into(),
            },
        ),
        (
            "ProblemCleared[last]",
            DeviceEvent::ProblemCleared {
                key: ProblemKey::Server,
            },
        ),
        (
            "BudgetExceeded",
            DeviceEvent::BudgetExceeded {
                reason: "memory".into(),
            },
        ),
        ("BudgetRecovered", DeviceEvent::BudgetRecovered),
        ("Disconnect", DeviceEvent::Disconnect),
        ("Reset", DeviceEvent::Reset),
    ];
    rows.into_iter()
        .map(|(n, e)| (n.to_string(), (None, e)))
        .collect()
}

pub fn transition_table() -> Vec<Row> {
    super::transition_table(&sample_states(), &sample_events(), command_name)
}

pub fn command_name(c: &DeviceCommand) -> String {
    match c {
        DeviceCommand::WipeWorkloads => "WipeWorkloads".into(),
        DeviceCommand::PersistDisconnect => "PersistDisconnect".into(),
        DeviceCommand::ShedLoad => "ShedLoad".into(),
        DeviceCommand::Readmit => "Readmit".into(),
        DeviceCommand::Report { reason, .. } => format!("Report({reason})"),
    }
}

#[cfg(test)]
mod tests;

impl super::Named for State {
    fn name(&self) -> &'static str {
        State::name(self)
    }

    fn reason(&self) -> String {
        State::reason(self)
    }
}
