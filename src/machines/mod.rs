//! The state machines (statig): the device and one per workload. Their transition tables are
//! computed by running the real handlers over every (state, event) sample, which gives both the
//! transition-table tests and the Mermaid diagrams in `state-diagrams/`.

pub mod device;
pub mod workload;

use std::collections::BTreeSet;

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
