//! The state machines (statig): the device and one per workload. Their transition tables are
//! computed by running the real handlers over every (state, event) sample, which gives both the
//! transition-table tests and the Mermaid diagrams in `state-diagrams/`.

pub mod device;
pub mod session;
pub mod workload;

use std::collections::BTreeSet;

use statig::blocking::{InitializedStateMachine, IntoStateMachine, IntoStateMachineExt};

/// A change of state, recorded by each machine's `after_transition` hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: &'static str,
    pub to: &'static str,
    /// Why the machine is in `to` (the target state's reason).
    pub reason: String,
}

/// What a machine's handlers leave for the controller: the commands to execute and the
/// transitions taken (the statig context of every machine).
#[derive(Debug)]
pub struct Output<C> {
    pub commands: Vec<C>,
    pub transitions: Vec<Transition>,
}

impl<C> Default for Output<C> {
    fn default() -> Self {
        Output {
            commands: Vec::new(),
            transitions: Vec::new(),
        }
    }
}

impl<C> Output<C> {
    pub fn push(&mut self, c: C) {
        self.commands.push(c);
    }

    pub fn clear(&mut self) {
        self.commands.clear();
        self.transitions.clear();
    }
}

/// One row of a computed transition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Source state, with the variant that matters in brackets (e.g. `stopping[remove]`).
    pub from: String,
    /// Event, with the guard that matters in brackets (e.g. `Exited[failure,limit]`).
    pub event: String,
    pub to: String,
    /// Commands emitted, by name.
    pub commands: Vec<String>,
}

/// What every machine's state says about itself.
pub trait Named {
    fn name(&self) -> &'static str;
    fn reason(&self) -> String;
}

/// The body of every machine's `after_transition` hook: records the transition, unless the
/// handler landed where it was (e.g. `reconciling` after a problem that was not open).
pub fn note_transition<S: Named + PartialEq, C>(out: &mut Output<C>, source: &S, target: &S) {
    if source == target {
        return;
    }
    out.transitions.push(Transition {
        from: source.name(),
        to: target.name(),
        reason: target.reason(),
    });
}

/// A machine (shared storage `shared`) put in `state`, its entry actions' output discarded.
pub fn machine_in<M, C>(
    shared: M,
    state: M::State,
    out: &mut Output<C>,
) -> InitializedStateMachine<M>
where
    M: IntoStateMachine,
    for<'c> M: IntoStateMachine<Context<'c> = Output<C>>,
    M::State: statig::blocking::State<M>,
    for<'s> M::Superstate<'s>: statig::blocking::Superstate<M>,
{
    let mut u = shared.uninitialized_state_machine();
    *u.state_mut() = state;
    u.init_with_context(out)
}

/// A named sample state, with the shared storage it needs.
pub type SampleState<M> = (String, (M, <M as IntoStateMachine>::State));
/// A named sample event, with the shared storage it needs (for guards), if any.
pub type SampleEvent<M> = (String, (Option<M>, <M as IntoStateMachine>::Event<'static>));

/// The rows of a machine's transition table: every (sample state, sample event) pair run
/// through the real handlers; a sample state comes with the shared storage it needs, a
/// sample event with its own (for guards that look at counters).
pub fn transition_table<M, C>(
    states: &[SampleState<M>],
    events: &[SampleEvent<M>],
    command_name: impl Fn(&C) -> String,
) -> Vec<Row>
where
    M: IntoStateMachine + Clone,
    for<'c> M: IntoStateMachine<Context<'c> = Output<C>>,
    M::State: statig::blocking::State<M> + Named + Clone,
    for<'s> M::Superstate<'s>: statig::blocking::Superstate<M>,
{
    let mut rows = Vec::new();
    for (state_name, (shared, state)) in states {
        for (event_name, (event_shared, event)) in events {
            let mut out = Output::default();
            let shared = event_shared.clone().unwrap_or_else(|| shared.clone());
            let mut m = machine_in(shared, state.clone(), &mut out);
            out.clear();
            m.handle_with_context(event, &mut out);
            rows.push(Row {
                from: state_name.clone(),
                event: event_name.clone(),
                to: m.state().name().to_string(),
                commands: out.commands.iter().map(&command_name).collect(),
            });
        }
    }
    rows
}

fn bare(s: &str) -> &str {
    s.split('[').next().unwrap_or(s)
}

/// Mermaid `stateDiagram-v2` of a table: ignored events (no state change, no command) left out.
pub fn mermaid(title: &str, initial: &str, rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "%% {title}: generated from the code by `cargo run --example state-diagrams`; checked by a test.\n"
    ));
    out.push_str("stateDiagram-v2\n");
    out.push_str(&format!("    [*] --> {initial}\n"));
    let mut edges = BTreeSet::new();
    for r in rows {
        let from = bare(&r.from);
        if from == r.to && r.commands.is_empty() {
            continue;
        }
        let mut label = r.event.clone();
        if r.from.contains('[') {
            label = format!("{label} {}", &r.from[from.len()..]);
        }
        if !r.commands.is_empty() {
            label = format!("{label} / {}", r.commands.join(", "));
        }
        edges.insert((from.to_string(), r.to.clone(), label));
    }
    for (from, to, label) in edges {
        out.push_str(&format!("    {from} --> {to} : {label}\n"));
    }
    out
}

/// Markdown document for `state-diagrams/<name>.md`.
pub fn diagram_document(title: &str, initial: &str, rows: &[Row]) -> String {
    format!(
        "# {title}\n\nGenerated from the transition table of the code (`cargo run --example state-diagrams`).\nA test fails when this file and the code disagree.\n\n```mermaid\n{}```\n",
        mermaid(title, initial, rows)
    )
}

#[cfg(test)]
/// The two checks every machine's table gets: [`check_table`], and its diagram file
/// (`state-diagrams/<file>`) is what the code generates.
pub(crate) fn check_machine(
    expected: &str,
    computed: &[Row],
    (states, events): (usize, usize),
    (file, title, initial): (&str, &str, &str),
) {
    check_table(expected, computed, states, events);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("state-diagrams")
        .join(file);
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == diagram_document(title, initial, computed),
        "state-diagrams/{file} is stale: run `cargo run --example state-diagrams`"
    );
}

#[cfg(test)]
/// Checks the computed table against the expected one: every listed row must match exactly, and
/// every (state, event) pair not listed must leave the state unchanged and emit nothing.
pub(crate) fn check_table(expected: &str, computed: &[Row], states: usize, events: usize) {
    assert_eq!(
        computed.len(),
        states * events,
        "every (state, event) pair is computed"
    );
    let mut listed = std::collections::BTreeMap::new();
    for line in expected.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let cmds: Vec<String> = f
            .get(3)
            .map(|c| c.split(',').map(String::from).collect())
            .unwrap_or_default();
        assert!(
            listed
                .insert(
                    (f[0].to_string(), f[1].to_string()),
                    (f[2].to_string(), cmds)
                )
                .is_none(),
            "duplicate expected row {line}"
        );
    }
    let mut seen = 0;
    for r in computed {
        match listed.get(&(r.from.clone(), r.event.clone())) {
            Some((to, cmds)) => {
                seen += 1;
                assert_eq!(
                    (&r.to, &r.commands),
                    (to, cmds),
                    "{} --{}-->",
                    r.from,
                    r.event
                );
            }
            None => {
                let bare = r.from.split('[').next().unwrap();
                assert!(
                    r.to == bare && r.commands.is_empty(),
                    "{} --{}--> {} {:?} is not in the expected table",
                    r.from,
                    r.event,
                    r.to,
                    r.commands
                );
            }
        }
    }
    assert_eq!(
        seen,
        listed.len(),
        "every expected row names a real (state, event) pair"
    );
}
