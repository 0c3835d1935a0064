//! The controller's device side: the device machine, its problems and what it asks for.

use super::{Ctx, Internal};
use crate::machines::device::{self, Context, DeviceCommand, DeviceEvent};

pub struct DevicePart {
    machine: device::Machine,
}

impl DevicePart {
    pub fn new() -> DevicePart {
        DevicePart {
            machine: device::new_machine(),
        }
    }

    pub fn state(&self) -> (&'static str, String) {
        (self.machine.state().name(), self.machine.state().reason())
    }

    pub fn problems(&self) -> Vec<String> {
        self.machine.inner().problems.values().cloned().collect()
    }

    pub fn problem_keys(&self) -> Vec<String> {
        self.machine
            .inner()
            .problems
            .keys()
            .map(|k| k.to_string())
            .collect()
    }

    /// The heartbeat's `status` (PROTOCOL §5.1); `None` before registration or after a
    /// disconnect.
    pub fn heartbeat_status(&self) -> Option<crate::flotta::messages::DeviceStatus> {
        self.machine.state().heartbeat_status()
    }

    pub fn is_disconnected(&self) -> bool {
        matches!(self.machine.state(), device::State::Disconnected {})
    }

    pub fn handle(&mut self, event: &DeviceEvent, cx: &mut Ctx) {
        let before = self.machine.state().reason();
        let mut out = Context::default();
        self.machine.handle_with_context(event, &mut out);
        for t in &out.transitions {
            cx.history.record("device", t);
        }
        let (state, reason) = self.state();
        if before != reason || !out.transitions.is_empty() {
            cx.fx.run(super::effects::Effect::Notify(format!(
                "STATUS={state}: {reason}"
            )));
        }
        for c in out.commands {
            match c {
                DeviceCommand::Report {
                    warn,
                    reason,
                    message,
                } => cx.push(Internal::Report {
                    warn,
                    reason,
                    message,
                }),
                DeviceCommand::ShedLoad => cx.push(Internal::ShedLoad),
                DeviceCommand::Readmit => cx.push(Internal::Readmit),
                DeviceCommand::WipeWorkloads => cx.push(Internal::WipeWorkloads),
                DeviceCommand::PersistDisconnect => cx.push(Internal::Persist(
                    super::effects::Write::Disconnected(crate::store::Disconnected {
                        at_unix: super::unix_now(),
                    }),
                )),
            }
        }
    }
}

impl Default for DevicePart {
    fn default() -> Self {
        Self::new()
    }
}
