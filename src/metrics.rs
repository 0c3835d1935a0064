//! The agent's numbers in Prometheus text format (exposition format 0.0.4), rendered from the
//! status snapshot and written to METRICS_TEXTFILE: node_exporter's textfile collector (or
//! any agent that reads such files) serves them. No listening port of the agent's own.

use std::fmt::Write;

use crate::status::Snapshot;

/// Every device state, so that `device_worker_ng_device_state` is a complete one-hot set.
const DEVICE_STATES: &[&str] = &[
    "registering",
    "enrolled",
    "reconciling",
    "degraded",
    "over-budget",
    "disconnected",
];

/// A label value: backslash, double quote and newline escaped; bounded, as workload names
/// and reasons come from the desired state.
fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars().take(128) {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes one metric family: HELP, TYPE and its samples (`labels`, value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    if samples.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP device_worker_ng_{name} {help}");
    let _ = writeln!(out, "# TYPE device_worker_ng_{name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "device_worker_ng_{name} {value}");
        } else {
            let _ = writeln!(out, "device_worker_ng_{name}{{{labels}}} {value}");
        }
    }
}

fn one(v: f64) -> Vec<(String, f64)> {
    vec![(String::new(), v)]
}

/// The text-format file for `snap`.
pub fn render(snap: &Snapshot) -> String {
    let mut out = String::new();
    device_families(&mut out, snap);
    workload_families(&mut out, snap);
    server_families(&mut out, snap);
    out
}

/// The agent, device and budget families.
fn device_families(out: &mut String, snap: &Snapshot) {
    let a = &snap.agent;
    family(
        out,
        "info",
        "gauge",
        "The agent's version (always 1).",
        &[(format!("version=\"{}\"", label(&a.version)), 1.0)],
    );
    family(
        out,
        "agent_resident_memory_bytes",
        "gauge",
        "Resident memory of the agent process.",
        &a.rss_bytes.map(|b| one(b as f64)).unwrap_or_default(),
    );
    family(
        out,
        "agent_uptime_seconds",
        "gauge",
        "Seconds since the agent started.",
        &one(a.uptime_seconds as f64),
    );
    let states: Vec<(String, f64)> = DEVICE_STATES
        .iter()
        .map(|s| {
            let on = if snap.device.state == *s { 1.0 } else { 0.0 };
            (format!("state=\"{s}\""), on)
        })
        .collect();
    family(
        out,
        "device_state",
        "gauge",
        "The device state (1 for the current one).",
        &states,
    );
    family(
        out,
        "device_problems",
        "gauge",
        "Open device problems (device-worker-ng status lists them).",
        &one(snap.device.problems.len() as f64),
    );
    let b = &snap.budget;
    family(
        out,
        "budget_memory_bytes",
        "gauge",
        "Memory the workloads may use together (total minus RESERVED_MEMORY).",
        &one(b.memory_budget_bytes as f64),
    );
    family(
        out,
        "budget_memory_used_bytes",
        "gauge",
        "Memory the workloads use together.",
        &one(b.memory_used_bytes as f64),
    );
    family(
        out,
        "budget_cpu_cores",
        "gauge",
        "CPU the workloads may use together, in cores.",
        &one(b.cpu_budget_millicores as f64 / 1000.0),
    );
    family(
        out,
        "budget_cpu_used_cores",
        "gauge",
        "CPU the workloads use together, in cores.",
        &one(b.cpu_used_millicores as f64 / 1000.0),
    );
    family(
        out,
        "evictions_total",
        "counter",
        "Workloads evicted to bring the device back under its budget since the agent started.",
        &one(a.evictions_total as f64),
    );
}

/// One family per workload measure, a sample per workload.
fn workload_families(out: &mut String, snap: &Snapshot) {
    let wl = |w: &crate::status::WorkloadInfo| {
        format!(
            "workload=\"{}\",kind=\"{}\"",
            label(&w.name),
            label(&w.kind)
        )
    };
    let per = |f: &dyn Fn(&crate::status::WorkloadInfo) -> Option<f64>| -> Vec<(String, f64)> {
        snap.workloads
            .iter()
            .filter_map(|w| f(w).map(|v| (wl(w), v)))
            .collect()
    };
    let states: Vec<(String, f64)> = snap
        .workloads
        .iter()
        .map(|w| (format!("{},state=\"{}\"", wl(w), label(&w.state)), 1.0))
        .collect();
    family(
        out,
        "workload_state",
        "gauge",
        "Each workload's state (1 for the current one).",
        &states,
    );
    family(
        out,
        "workload_memory_bytes",
        "gauge",
        "Memory a workload uses.",
        &per(&|w| w.usage.as_ref().map(|u| u.memory_bytes as f64)),
    );
    family(
        out,
        "workload_memory_limit_bytes",
        "gauge",
        "A workload's memory limit.",
        &per(&|w| w.limits.memory_bytes.map(|v| v as f64)),
    );
    family(
        out,
        "workload_cpu_cores",
        "gauge",
        "CPU a workload uses, in cores.",
        &per(&|w| w.usage.as_ref().map(|u| u.cpu_millicores as f64 / 1000.0)),
    );
    family(
        out,
        "workload_cpu_limit_cores",
        "gauge",
        "A workload's cpu limit, in cores.",
        &per(&|w| w.limits.cpu_millicores.map(|v| v as f64 / 1000.0)),
    );
    family(
        out,
        "workload_pids",
        "gauge",
        "Processes of a workload.",
        &per(&|w| w.usage.as_ref().map(|u| u.pids as f64)),
    );
    family(
        out,
        "workload_pids_limit",
        "gauge",
        "A workload's pids limit.",
        &per(&|w| w.limits.pids.map(|v| v as f64)),
    );
    family(
        out,
        "workload_restarts_total",
        "counter",
        "Restarts of a workload since the agent started it.",
        &per(&|w| Some(w.restarts as f64)),
    );
    family(
        out,
        "workload_oom_kills_total",
        "counter",
        "OOM kills of a workload.",
        &per(&|w| Some(w.oom_kills as f64)),
    );
}

/// The server families (only with a server).
fn server_families(out: &mut String, snap: &Snapshot) {
    let Some(sv) = &snap.server else { return };
    family(
        out,
        "server_last_contact_timestamp_seconds",
        "gauge",
        "When the Flotta server last answered (unix time).",
        &sv.last_contact_unix
            .map(|t| one(t as f64))
            .unwrap_or_default(),
    );
    family(
        out,
        "server_failures",
        "gauge",
        "Requests to the server failed in a row.",
        &one(sv.failures as f64),
    );
    family(
        out,
        "certificate_expiry_timestamp_seconds",
        "gauge",
        "When the device certificate expires (unix time).",
        &sv.certificate_expires_unix
            .map(|t| one(t as f64))
            .unwrap_or_default(),
    );
    family(
        out,
        "outbox_events",
        "gauge",
        "Events waiting for a heartbeat to deliver them.",
        &one(sv.outbox_length as f64),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_bounded() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(label(&"x".repeat(500)).len(), 128);
    }
}
