use super::*;
use crate::machines::check_machine;

/// The device machine's transitions that do something; every other pair is ignored.
const EXPECTED: &str = "
registering            Boot[serverless]                 enrolled
registering            Boot[certificate]                enrolled
registering            Boot[disconnected]               disconnected
registering            Registered                       enrolled
enrolled               IdentityLost                     registering
enrolled               DesiredStateApplied              reconciling
enrolled               ProblemRaised                    degraded
enrolled               BudgetExceeded                   over-budget  Report(OverBudget),ShedLoad
enrolled               Disconnect                       disconnected PersistDisconnect,WipeWorkloads
reconciling            IdentityLost                     registering
reconciling            ProblemRaised                    degraded
reconciling            BudgetExceeded                   over-budget  Report(OverBudget),ShedLoad
reconciling            Disconnect                       disconnected PersistDisconnect,WipeWorkloads
degraded[problem]      IdentityLost                     registering
degraded[problem]      ProblemCleared[last]             reconciling
degraded[problem]      BudgetExceeded                   over-budget  Report(OverBudget),ShedLoad
degraded[problem]      Disconnect                       disconnected PersistDisconnect,WipeWorkloads
over-budget            IdentityLost                     registering
over-budget            BudgetExceeded                   over-budget  ShedLoad
over-budget            BudgetRecovered                  reconciling  Readmit
over-budget            Disconnect                       disconnected PersistDisconnect,WipeWorkloads
over-budget[problems]  IdentityLost                     registering
over-budget[problems]  BudgetExceeded                   over-budget  ShedLoad
over-budget[problems]  BudgetRecovered                  degraded     Readmit
over-budget[problems]  Disconnect                       disconnected PersistDisconnect,WipeWorkloads
disconnected           Reset                            registering
";

#[test]
fn transition_table_covers_every_pair_and_matches_its_diagram() {
    check_machine(
        EXPECTED,
        &transition_table(),
        (sample_states().len(), sample_events().len()),
        ("device.md", "Device machine", "registering"),
    );
}

#[test]
fn degraded_reason_lists_open_problems_and_recovers() {
    let mut m = new_machine();
    let mut cmds = Context::default();
    for e in [
        DeviceEvent::Boot {
            serverless: true,
            has_certificate: false,
            disconnected: false,
        },
        DeviceEvent::DesiredStateApplied,
        DeviceEvent::ProblemRaised {
            key: ProblemKey::Workload("a".into()),
            reason: "workload a is broken".into(),
        },
        DeviceEvent::ProblemRaised {
            key: ProblemKey::Workload("b".into()),
            reason: "workload b is broken".into(),
        },
    ] {
        m.handle_with_context(&e, &mut cmds);
    }
    assert_eq!(m.state().name(), "degraded");
    assert_eq!(
        m.state().reason(),
        "workload a is broken; workload b is broken"
    );
    m.handle_with_context(
        &DeviceEvent::ProblemCleared {
            key: ProblemKey::Workload("a".into()),
        },
        &mut cmds,
    );
    assert_eq!(m.state().reason(), "workload b is broken");
    m.handle_with_context(
        &DeviceEvent::ProblemCleared {
            key: ProblemKey::Workload("b".into()),
        },
        &mut cmds,
    );
    assert_eq!(m.state().name(), "reconciling");
    assert_eq!(
        m.state().heartbeat_status(),
        Some(crate::flotta::messages::DeviceStatus::Up)
    );
    assert_eq!(
        cmds.transitions
            .iter()
            .map(|t| (t.from, t.to))
            .collect::<Vec<_>>(),
        vec![
            ("registering", "enrolled"),
            ("enrolled", "reconciling"),
            ("reconciling", "degraded"),
            ("degraded", "reconciling")
        ],
        "the after_transition hook records every transition"
    );
}

#[test]
fn a_disconnect_is_a_state_of_its_own_until_a_reset() {
    let mut m = new_machine();
    let mut out = Context::default();
    for e in [
        DeviceEvent::Boot {
            serverless: false,
            has_certificate: true,
            disconnected: false,
        },
        DeviceEvent::DesiredStateApplied,
        DeviceEvent::Disconnect,
    ] {
        m.handle_with_context(&e, &mut out);
    }
    assert_eq!(m.state().name(), "disconnected");
    assert_eq!(m.state().heartbeat_status(), None, "nothing is sent");
    assert_eq!(
        out.commands,
        vec![
            DeviceCommand::PersistDisconnect,
            DeviceCommand::WipeWorkloads
        ]
    );
    // A restart finds the persisted disconnect: still disconnected.
    let mut again = new_machine();
    again.handle_with_context(
        &DeviceEvent::Boot {
            serverless: false,
            has_certificate: true,
            disconnected: true,
        },
        &mut out,
    );
    assert_eq!(again.state().name(), "disconnected");
    again.handle_with_context(&DeviceEvent::Reset, &mut out);
    assert_eq!(again.state().name(), "registering");
}
