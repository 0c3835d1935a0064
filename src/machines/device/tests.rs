use super::*;
use crate::machines::check_table as check;

/// The device machine's transitions that do something; every other pair is ignored.
const EXPECTED: &str = "
registering            Boot[serverless]                 enrolled
registering            Boot[certificate]                enrolled
registering            Boot[no-certificate]             registering  Enrol
registering            Registered                       enrolled
enrolled               IdentityLost                     registering  Enrol
enrolled               DesiredStateApplied              reconciling
enrolled               ProblemRaised                    degraded
enrolled               BudgetExceeded                   over-budget  Report(OverBudget),ShedLoad
enrolled               Disconnect                       registering  WipeWorkloads
reconciling            IdentityLost                     registering  Enrol
reconciling            ProblemRaised                    degraded
reconciling            BudgetExceeded                   over-budget  Report(OverBudget),ShedLoad
reconciling            Disconnect                       registering  WipeWorkloads
degraded[problem]      IdentityLost                     registering  Enrol
degraded[problem]      ProblemCleared[last]             reconciling
degraded[problem]      BudgetExceeded                   over-budget  Report(OverBudget),ShedLoad
degraded[problem]      Disconnect                       registering  WipeWorkloads
over-budget            IdentityLost                     registering  Enrol
over-budget            BudgetExceeded                   over-budget  ShedLoad
over-budget            BudgetRecovered                  reconciling  Readmit
over-budget            Disconnect                       registering  WipeWorkloads
over-budget[problems]  IdentityLost                     registering  Enrol
over-budget[problems]  BudgetExceeded                   over-budget  ShedLoad
over-budget[problems]  BudgetRecovered                  degraded     Readmit
over-budget[problems]  Disconnect                       registering  WipeWorkloads
";

#[test]
fn transition_table_covers_every_pair() {
    check(
        EXPECTED,
        &transition_table(),
        sample_states().len(),
        sample_events().len(),
    );
}

#[test]
fn diagram_file_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/state-diagrams/device.md");
    let on_disk = std::fs::read_to_string(path).unwrap_or_default();
    let generated =
        crate::machines::diagram_document("Device machine", "registering", &transition_table());
    assert!(
        on_disk == generated,
        "state-diagrams/device.md is stale: run `cargo run --example state-diagrams`"
    );
}

#[test]
fn degraded_reason_lists_open_problems_and_recovers() {
    let mut m = new_machine();
    let mut cmds = Vec::new();
    for e in [
        DeviceEvent::Boot {
            serverless: true,
            has_certificate: false,
        },
        DeviceEvent::DesiredStateApplied,
        DeviceEvent::ProblemRaised {
            key: "workload/a".into(),
            reason: "workload a is broken".into(),
        },
        DeviceEvent::ProblemRaised {
            key: "workload/b".into(),
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
            key: "workload/a".into(),
        },
        &mut cmds,
    );
    assert_eq!(m.state().reason(), "workload b is broken");
    m.handle_with_context(
        &DeviceEvent::ProblemCleared {
            key: "workload/b".into(),
        },
        &mut cmds,
    );
    assert_eq!(m.state().name(), "reconciling");
    assert_eq!(m.state().heartbeat_status(), Some("up"));
}
