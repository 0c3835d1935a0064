//! The controller's decisions on a controller without a loop: machines put in the states a
//! scenario needs, no drivers started.

use std::path::Path;

use super::*;
use crate::cgroup::Layout;
use crate::machines::workload::{self, State, WorkloadMachine};

fn controller(dir: &Path) -> Controller {
    let settings = Settings::load(&Inputs {
        file: None,
        env: vec![
            ("EDGE_DEVICE_STATE_DIR".into(), dir.display().to_string()),
            ("EDGE_DEVICE_CGROUP_ROOT".into(), "dwng-unit".into()),
        ],
        flags: Vec::new(),
    })
    .unwrap();
    let store = Store::open(dir).unwrap();
    let root = dir.join("cgroup");
    let hierarchy = Hierarchy::new(
        Layout::Unified { root: root.clone() },
        "dwng-unit",
        Some(root),
    );
    let (tx, _rx) = async_channel::bounded(EVENT_CAPACITY);
    Controller::new(settings, Inputs::default(), store, hierarchy, tx, None)
}

/// Adds a shell workload of `priority` in `state`, as if admitted in this order.
fn put(c: &mut Controller, name: &str, priority: i32, state: State) {
    let yaml = format!(
        "workloads:\n  - name: {name}\n    kind: shell\n    labels: {{device-worker-ng/priority: \"{priority}\"}}\n    specification: |\n      command: [/bin/sleep, '600']\n"
    );
    let desired = crate::workload::parse_desired(&yaml).unwrap();
    let spec = desired.validate(&c.defaults()).remove(0).unwrap();
    let mut cmds = Vec::new();
    let machine = workload::machine_in(
        WorkloadMachine::new(spec.restart, spec.backoff),
        state,
        &mut cmds,
    );
    let entry = workloads::Entry::for_test(spec, machine, c.hierarchy.workload(name), c.next_seq());
    c.workloads.insert(name.into(), entry);
}

fn state_of(c: &Controller, name: &str) -> &'static str {
    c.workloads[name].machine.state().name()
}

#[test]
fn a_starting_workload_is_evicted_before_a_higher_priority_running_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = controller(dir.path());
    put(&mut c, "important", 10, State::Running { pid: 42 });
    // Its process runs and allocates before the driver has reported it started.
    put(&mut c, "newcomer", 0, State::Starting {});
    c.shed_load();
    assert_eq!(state_of(&c, "newcomer"), "stopping");
    assert_eq!(state_of(&c, "important"), "running");
    assert!(c.evicting(), "the victim is still stopping");
}
