//! The state machines (statig): the device and one per workload. Their transition tables are
//! computed by running the real handlers over every (state, event) sample, which gives both the
//! transition-table tests and the Mermaid diagrams in `state-diagrams/`.

pub mod device;
pub mod session;
pub mod workload;

use std::collections::BTreeSet;

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

/// Runs `step` over every (sample state, sample event) pair: the rows of a transition table.
/// `step` returns the state reached and the names of the commands emitted.
pub fn compute_table<S, E>(
    states: &[(String, S)],
    events: &[(String, E)],
    step: impl Fn(&S, &E) -> (String, Vec<String>),
) -> Vec<Row> {
    let mut rows = Vec::new();
    for (state_name, state) in states {
        for (event_name, event) in events {
            let (to, commands) = step(state, event);
            rows.push(Row {
                from: state_name.clone(),
                event: event_name.clone(),
                to,
                commands,
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
