//! The status snapshot: what `device-worker-ng status` shows, served by the daemon on the
//! control socket as JSON and rendered as a table by the client.

pub mod socket;

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::cgroup::Limits;
use crate::units::Bytes;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub agent: AgentInfo,
    pub device: DeviceInfo,
    pub budget: BudgetInfo,
    /// The Flotta session; absent in serverless mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerInfo>,
    /// Device-profile variables and the value of every condition.
    #[serde(default)]
    pub profiles: ProfilesInfo,
    pub workloads: Vec<WorkloadInfo>,
    /// Most recent last.
    pub transitions: Vec<TransitionInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentInfo {
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub cgroup_layout: String,
    pub cgroup_base: String,
    pub state_dir: String,
    pub desired_state: Option<String>,
    pub server: Option<String>,
    pub rss_bytes: Option<u64>,
    /// The longest time the controller spent on one event since start, and on which kind.
    #[serde(default)]
    pub longest_handler_ms: f64,
    #[serde(default)]
    pub longest_handler_event: String,
    /// Workloads evicted since start (over budget, or a profile no longer holding).
    #[serde(default)]
    pub evictions_total: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceInfo {
    pub state: String,
    pub reason: String,
    pub problems: Vec<String>,
}

/// Profile variables and conditions (PROTOCOL §7).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ProfilesInfo {
    pub variables: std::collections::BTreeMap<String, String>,
    /// profile → condition → value.
    pub conditions: std::collections::BTreeMap<String, std::collections::BTreeMap<String, bool>>,
}

/// What `status` shows about the server side.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServerInfo {
    pub url: String,
    pub device_id: String,
    /// Where the session stands, in words.
    pub registration: String,
    /// The session machine's state (enrolling, registering, registered, ...).
    #[serde(default)]
    pub session_state: String,
    /// When the server last answered (with anything), and what.
    pub last_contact_unix: Option<u64>,
    #[serde(default)]
    pub last_answer: Option<String>,
    /// Requests failed in a row.
    #[serde(default)]
    pub failures: u32,
    /// The last failed request (unanswered ones included), and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_unix: Option<u64>,
    /// The next request the session waits for (timer, unix time).
    #[serde(default)]
    pub next_attempt: Option<(String, u64)>,
    pub certificate_expires_unix: Option<i64>,
    pub certificate_unproven: bool,
    pub applied_version: String,
    pub outbox_length: usize,
    pub heartbeat_period_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct BudgetInfo {
    pub memory_total_bytes: u64,
    pub memory_reserved_bytes: u64,
    pub memory_budget_bytes: u64,
    pub memory_used_bytes: u64,
    pub cpu_total_millicores: u64,
    pub cpu_reserved_millicores: u64,
    pub cpu_budget_millicores: u64,
    pub cpu_used_millicores: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Usage {
    pub memory_bytes: u64,
    pub cpu_millicores: u64,
    pub pids: u64,
    pub oom_kills: u64,
    pub cpu_throttled_periods: u64,
    pub pids_max_events: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkloadInfo {
    pub name: String,
    pub kind: String,
    pub state: String,
    pub reason: String,
    pub heartbeat_status: String,
    pub pid: Option<i32>,
    pub restarts: u32,
    pub oom_kills: u32,
    pub priority: i32,
    pub limits: Limits,
    pub usage: Option<Usage>,
    pub cgroup: Option<String>,
    pub log: Option<String>,
    /// What the driver said the operator must know (e.g. limits not enforced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// The uid its processes run as (a uid of its own unless its spec names a user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Which of `limits` are the device's DEFAULT_LIMITS (the workload declared none).
    #[serde(default, skip_serializing_if = "no_limits")]
    pub default_limits: Limits,
    /// A pod's memory limit is its containers' sum plus this (podman's infra container and
    /// conmon are charged to the pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_overhead_bytes: Option<u64>,
}

fn no_limits(l: &Limits) -> bool {
    *l == Limits::default()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TransitionInfo {
    pub at_unix: u64,
    pub machine: String,
    pub from: String,
    pub to: String,
    pub reason: String,
}

/// Exit status of `status`, `check` and `reset` when no agent answers (LSB's "not running").
pub const EXIT_NOT_RUNNING: u8 = 3;
/// Exit status of `check` when it cannot tell (not allowed to ask, a malformed answer).
pub const EXIT_UNKNOWN: u8 = 1;

/// The device's health as `device-worker-ng check` reports it: one exit status per kind of
/// device state, so a probe (greenboot, a fleet's monitoring) needs no parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// `reconciling`, or `enrolled` (registered, waiting for its first desired state).
    Healthy,
    /// `degraded`: running, but something needs the operator (see the problems).
    Degraded,
    /// `over-budget`: evicting workloads to get back under the budget.
    OverBudget,
    /// `registering`: no device certificate yet (enrolment pending or failing).
    NotRegistered,
    /// `disconnected` by the server: runs nothing until `device-worker-ng reset`.
    Disconnected,
    /// A state this client does not know (a newer agent): it cannot tell.
    Unknown,
}

impl Health {
    pub fn of(snapshot: &Snapshot) -> Health {
        Health::of_state(&snapshot.device.state)
    }

    pub fn of_state(state: &str) -> Health {
        match state {
            "reconciling" | "enrolled" => Health::Healthy,
            "degraded" => Health::Degraded,
            "over-budget" => Health::OverBudget,
            "registering" => Health::NotRegistered,
            "disconnected" => Health::Disconnected,
            _ => Health::Unknown,
        }
    }

    /// The exit status of `check` (documented in its --help, the man page and the README).
    pub fn exit_code(self) -> u8 {
        match self {
            Health::Healthy => 0,
            Health::Degraded => 4,
            Health::OverBudget => 5,
            Health::NotRegistered => 6,
            Health::Disconnected => 7,
            Health::Unknown => EXIT_UNKNOWN,
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::OverBudget => "over-budget",
            Health::NotRegistered => "not registered",
            Health::Disconnected => "disconnected",
            Health::Unknown => "unknown",
        }
    }

    /// `check`'s one line: the verdict, the device state and why.
    pub fn line(self, s: &Snapshot) -> String {
        format!(
            "{}: device {}: {}",
            self.word(),
            s.device.state,
            s.device.reason
        )
    }
}

/// `HH:MM:SS` UTC of a unix time.
pub fn clock(unix: u64) -> String {
    crate::clock::time_of_day(unix)
}

/// `2026-12-24 18:00 UTC` of a unix time.
pub fn date(unix: i64) -> String {
    match crate::clock::civil_from_days(unix.div_euclid(86_400)) {
        Some((y, m, d)) => {
            let s = unix.rem_euclid(86_400);
            format!(
                "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
                s / 3600,
                s / 60 % 60
            )
        }
        None => format!("unix time {unix}"),
    }
}

/// `12:00:01 (3s ago)` / `(in 3s)` relative to `now`.
fn when(unix: u64, now: u64) -> String {
    if unix <= now {
        format!("{} ({} ago)", clock(unix), duration(now - unix))
    } else {
        format!("{} (in {})", clock(unix), duration(unix - now))
    }
}

/// Word-wraps `text` to `width` columns; continuation lines start with `indent`.
fn wrap(first: &str, text: &str, indent: &str, width: usize) -> String {
    let mut out = String::from(first);
    let mut col = first.chars().count();
    let mut line_start = true;
    for word in text.split_whitespace() {
        let len = word.chars().count();
        if !line_start && col + 1 + len > width {
            out.push('\n');
            out.push_str(indent);
            col = indent.chars().count();
            line_start = true;
        }
        if !line_start {
            out.push(' ');
            col += 1;
        }
        out.push_str(word);
        col += len;
        line_start = false;
    }
    out.push('\n');
    out
}

/// Width of the human-readable status: an 80-column console.
const WIDTH: usize = 80;

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        s => format!("{}d{:02}h", s / 86400, s / 3600 % 24),
    }
}

fn opt_bytes(v: Option<u64>) -> String {
    v.map_or("-".into(), |b| Bytes(b).to_string())
}

fn opt_millis(v: Option<u64>) -> String {
    v.map_or("-".into(), |m| format!("{m}m"))
}

/// Renders aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let last = cells.len() - 1;
        for (i, c) in cells.iter().enumerate() {
            if i == last {
                out.push_str(c);
            } else {
                let _ = write!(out, "{:w$}  ", c, w = widths[i]);
            }
        }
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect(), &mut out);
    for r in rows {
        line(r.clone(), &mut out);
    }
    out
}

impl Snapshot {
    /// The server block: where the session stands and what the server last said.
    fn render_server(&self, sv: &ServerInfo, now: u64) -> String {
        let mut out = String::new();
        out.push_str(&wrap(
            &format!("server   {}: ", sv.session_state),
            &format!("{} (device {})", sv.registration, sv.device_id),
            "         ",
            WIDTH,
        ));
        let contact = match (&sv.last_answer, sv.last_contact_unix) {
            (Some(what), Some(at)) => format!("{}: {what}", when(at, now)),
            _ => "never answered".into(),
        };
        out.push_str(&wrap("  contact      ", &contact, "               ", WIDTH));
        if sv.failures > 0 {
            let failure = match (&sv.last_failure, sv.last_failure_unix) {
                (Some(what), Some(at)) => {
                    format!("{} in a row, last {}: {what}", sv.failures, when(at, now))
                }
                _ => format!("{} in a row", sv.failures),
            };
            out.push_str(&wrap("  failures     ", &failure, "               ", WIDTH));
        }
        if let Some((what, at)) = &sv.next_attempt {
            let _ = writeln!(out, "  next         {what} at {}", when(*at, now));
        }
        let cert = match sv.certificate_expires_unix {
            Some(t) => {
                let left = t - now as i64;
                let rel = if left >= 0 {
                    format!("in {}", duration(left as u64))
                } else {
                    format!("EXPIRED {} ago", duration(left.unsigned_abs()))
                };
                let unproven = if sv.certificate_unproven {
                    ", not yet accepted by the server"
                } else {
                    ""
                };
                format!("expires {} ({rel}){unproven}", date(t))
            }
            None => "none yet (enrolling with the bootstrap certificate)".into(),
        };
        let _ = writeln!(out, "  certificate  {cert}");
        let version = if sv.applied_version.is_empty() {
            "none applied yet".to_string()
        } else {
            format!("version {}", sv.applied_version)
        };
        let _ = writeln!(
            out,
            "  config       {version}   outbox {} event{}",
            sv.outbox_length,
            if sv.outbox_length == 1 { "" } else { "s" }
        );
        out
    }

    /// The human-readable form of `device-worker-ng status`.
    /// The profile conditions in force and the variables they were computed from.
    fn render_profiles(&self) -> String {
        if self.profiles.conditions.is_empty() {
            return String::new();
        }
        let vars: Vec<String> = self
            .profiles
            .variables
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let conds: Vec<String> = self
            .profiles
            .conditions
            .iter()
            .flat_map(|(p, cs)| cs.iter().map(move |(c, v)| format!("{p}/{c}={v}")))
            .collect();
        format!("profiles {}   ({})\n", conds.join(" "), vars.join(" "))
    }

    pub fn render(&self) -> String {
        let a = &self.agent;
        let b = &self.budget;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "device-worker-ng {}  pid {}  up {}  rss {}  cgroup {} ({})",
            a.version,
            a.pid,
            duration(a.uptime_seconds),
            opt_bytes(a.rss_bytes),
            a.cgroup_layout,
            a.cgroup_base
        );
        let source = match (&a.server, &a.desired_state) {
            (Some(s), _) => format!("server {s}"),
            (None, Some(f)) => format!("serverless, desired state {f}"),
            (None, None) => "serverless, no desired state".into(),
        };
        let _ = writeln!(out, "source   {source}");
        out.push_str(&wrap(
            &format!("device   {}: ", self.device.state),
            &self.device.reason,
            "         ",
            WIDTH,
        ));
        if !self.device.problems.is_empty() {
            let _ = writeln!(out, "problems {}", self.device.problems.len());
            for p in &self.device.problems {
                out.push_str(&wrap("  - ", p, "    ", WIDTH));
            }
        }
        if let Some(sv) = &self.server {
            out.push_str(&self.render_server(sv, crate::controller::unix_now()));
        }
        let _ = writeln!(
            out,
            "budget   memory {} used of {} ({} total - {} reserved)\n         cpu {}m used of {}m ({}m - {}m)",
            Bytes(b.memory_used_bytes),
            Bytes(b.memory_budget_bytes),
            Bytes(b.memory_total_bytes),
            Bytes(b.memory_reserved_bytes),
            b.cpu_used_millicores,
            b.cpu_budget_millicores,
            b.cpu_total_millicores,
            b.cpu_reserved_millicores
        );
        out.push_str(&self.render_profiles());
        out.push('\n');
        if self.workloads.is_empty() {
            out.push_str("no workloads\n");
        } else {
            let rows: Vec<Vec<String>> = self.workloads.iter().map(workload_row).collect();
            out.push_str(&table(
                &[
                    "WORKLOAD", "KIND", "STATE", "PID", "RESTARTS", "OOM", "MEMORY", "CPU", "PIDS",
                    "REASON",
                ],
                &rows,
            ));
            if self.workloads.iter().any(|w| !no_limits(&w.default_limits)) {
                out.push_str("* DEFAULT_LIMITS: the workload declares no such limit\n");
            }
            if let Some(o) = self.workloads.iter().find_map(|w| w.pod_overhead_bytes) {
                let _ = writeln!(
                    out,
                    "pod memory: the containers' limits + {} for podman's infra container and conmon",
                    Bytes(o)
                );
            }
        }
        if !self.transitions.is_empty() {
            out.push_str("\nrecent transitions (UTC)\n");
            let start = self.transitions.len().saturating_sub(10);
            for t in &self.transitions[start..] {
                let _ = writeln!(
                    out,
                    "  {}  {:<20} {} -> {}  {}",
                    clock(t.at_unix),
                    t.machine,
                    t.from,
                    t.to,
                    t.reason
                );
            }
        }
        out
    }
}

/// One row of the workload table.
fn workload_row(w: &WorkloadInfo) -> Vec<String> {
    let u = w.usage.clone().unwrap_or_default();
    let used = w.usage.is_some();
    let d = &w.default_limits;
    let mark = |default: Option<u64>| if default.is_some() { "*" } else { "" };
    let memory_limit = match (w.limits.memory_bytes, w.pod_overhead_bytes) {
        (Some(m), Some(o)) if m >= o => {
            format!("{}+{}", Bytes(m - o), Bytes(o))
        }
        (m, _) => opt_bytes(m),
    };
    vec![
        w.name.clone(),
        w.kind.clone(),
        w.state.clone(),
        w.pid.map_or("-".into(), |p| p.to_string()),
        w.restarts.to_string(),
        w.oom_kills.to_string(),
        format!(
            "{}/{}{}",
            if used {
                Bytes(u.memory_bytes).to_string()
            } else {
                "-".into()
            },
            memory_limit,
            mark(d.memory_bytes)
        ),
        format!(
            "{}/{}{}",
            if used {
                format!("{}m", u.cpu_millicores)
            } else {
                "-".into()
            },
            opt_millis(w.limits.cpu_millicores),
            mark(d.cpu_millicores)
        ),
        format!(
            "{}/{}{}",
            if used { u.pids.to_string() } else { "-".into() },
            w.limits.pids.map_or("-".into(), |p| p.to_string()),
            mark(d.pids)
        ),
        w.reason.clone(),
    ]
}

#[cfg(test)]
mod tests;
