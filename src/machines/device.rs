//! The device machine: registering → enrolled → reconciling, with degraded and over-budget.
//! Pure handlers; the controller executes the [`DeviceCommand`]s.

use std::collections::BTreeMap;

use serde::Serialize;
use statig::prelude::*;

use super::Row;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The agent started: serverless, or with a valid device certificate, it skips enrolment.
    Boot {
        serverless: bool,
        has_certificate: bool,
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
        key: String,
        reason: String,
    },
    ProblemCleared {
        key: String,
    },
    /// Measured usage of the workloads is over the budget (sustained).
    BudgetExceeded {
        reason: String,
    },
    /// Usage has stayed under the low watermark for the hold time.
    BudgetRecovered,
    /// The server told the device to disconnect (PROTOCOL §2.6).
    Disconnect,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceCommand {
    /// Enrol and register with the bootstrap certificate.
    Enrol,
    /// Stop and remove every workload and wipe the desired state.
    WipeWorkloads,
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
    pub problems: BTreeMap<String, String>,
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
    visibility = "pub"
)]
impl DeviceMachine {
    #[state]
    fn registering(
        &mut self,
        reason: &mut String,
        event: &DeviceEvent,
        context: &mut Vec<DeviceCommand>,
    ) -> Outcome<State> {
        match event {
            DeviceEvent::Boot {
                serverless,
                has_certificate,
            } => {
                if *serverless || *has_certificate {
                    Transition(State::enrolled())
                } else {
                    *reason = "enrolling with the bootstrap certificate".into();
                    context.push(DeviceCommand::Enrol);
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
        context: &mut Vec<DeviceCommand>,
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
    fn enter_over_budget(context: &mut Vec<DeviceCommand>) {
        context.push(DeviceCommand::ShedLoad);
    }

    /// Handles what every state after registration handles the same way.
    #[superstate]
    fn operational(
        &mut self,
        event: &DeviceEvent,
        context: &mut Vec<DeviceCommand>,
    ) -> Outcome<State> {
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
                context.push(DeviceCommand::WipeWorkloads);
                Transition(State::registering(
                    "disconnected by the server: waiting for a restart or re-enrolment".into(),
                ))
            }
            DeviceEvent::IdentityLost { reason } => {
                context.push(DeviceCommand::Enrol);
                Transition(State::registering(reason.clone()))
            }
            _ => Handled,
        }
    }
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
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
        }
    }

    /// The heartbeat's `status` (PROTOCOL §5.1); `None` before registration.
    pub fn heartbeat_status(&self) -> Option<&'static str> {
        match self {
            State::Registering { .. } => None,
            State::Enrolled {} | State::Reconciling {} => Some("up"),
            State::Degraded { .. } | State::OverBudget { .. } => Some("degraded"),
        }
    }
}

pub type Machine = statig::blocking::InitializedStateMachine<DeviceMachine>;

pub fn new_machine() -> Machine {
    DeviceMachine::default()
        .uninitialized_state_machine()
        .init_with_context(&mut Vec::new())
}

pub fn sample_states() -> Vec<(String, DeviceMachine, State)> {
    let none = DeviceMachine::default();
    let configured = DeviceMachine {
        configured: true,
        ..DeviceMachine::default()
    };
    let one = DeviceMachine {
        problems: [("server".to_string(), "server unreachable".to_string())].into(),
        configured: true,
    };
    vec![
        (
            "registering".into(),
            none.clone(),
            State::registering("starting".into()),
        ),
        ("enrolled".into(), none.clone(), State::enrolled()),
        (
            "reconciling".into(),
            configured.clone(),
            State::reconciling(),
        ),
        (
            "degraded[problem]".into(),
            one.clone(),
            State::degraded("server unreachable".into()),
        ),
        (
            "over-budget".into(),
            configured,
            State::over_budget("memory".into()),
        ),
        (
            "over-budget[problems]".into(),
            one,
            State::over_budget("memory".into()),
        ),
    ]
}

pub fn sample_events() -> Vec<(String, DeviceEvent)> {
    vec![
        (
            "Boot[serverless]".into(),
            DeviceEvent::Boot {
                serverless: true,
                has_certificate: false,
            },
        ),
        (
            "Boot[certificate]".into(),
            DeviceEvent::Boot {
                serverless: false,
                has_certificate: true,
            },
        ),
        (
            "Boot[no-certificate]".into(),
            DeviceEvent::Boot {
                serverless: false,
                has_certificate: false,
            },
        ),
        ("Registered".into(), DeviceEvent::Registered),
        (
            "IdentityLost".into(),
            DeviceEvent::IdentityLost {
                reason: "404".into(),
            },
        ),
        (
            "DesiredStateApplied".into(),
            DeviceEvent::DesiredStateApplied,
        ),
        (
            "ProblemRaised".into(),
            DeviceEvent::ProblemRaised {
                key: "w".into(),
                reason: "broken".into(),
            },
        ),
        (
            "ProblemCleared[last]".into(),
            DeviceEvent::ProblemCleared {
                key: "server".into(),
            },
        ),
        (
            "BudgetExceeded".into(),
            DeviceEvent::BudgetExceeded {
                reason: "memory".into(),
            },
        ),
        ("BudgetRecovered".into(), DeviceEvent::BudgetRecovered),
        ("Disconnect".into(), DeviceEvent::Disconnect),
    ]
}

pub fn transition_table() -> Vec<Row> {
    let mut rows = Vec::new();
    for (state_name, shared, state) in sample_states() {
        for (event_name, event) in sample_events() {
            let mut u = shared.clone().uninitialized_state_machine();
            *u.state_mut() = state.clone();
            let mut cmds = Vec::new();
            let mut m = u.init_with_context(&mut cmds);
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

pub fn command_name(c: &DeviceCommand) -> String {
    match c {
        DeviceCommand::Enrol => "Enrol".into(),
        DeviceCommand::WipeWorkloads => "WipeWorkloads".into(),
        DeviceCommand::ShedLoad => "ShedLoad".into(),
        DeviceCommand::Readmit => "Readmit".into(),
        DeviceCommand::Report { reason, .. } => format!("Report({reason})"),
    }
}

#[cfg(test)]
mod tests;
