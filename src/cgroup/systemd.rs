//! systemd as the cgroup manager (the `systemd` cgroup driver): the device budget is a slice,
//! every workload a unit inside it, and systemd, not the agent, creates, limits and removes
//! their cgroups, over its D-Bus API (org.freedesktop.systemd1(5)).
//!
//! Why a transient *service* per shell workload rather than a scope around a process the
//! agent forks: systemd starts the service's process in the unit's cgroup before its first
//! instruction, records how its main process ended (`ExecMainCode`/`ExecMainStatus`,
//! `Result=oom-kill`) even while no agent runs, and keeps that record until it is collected.
//! A scope's process would be the agent's child: its exit status dies with the agent that
//! forked it, and a restarted agent could not learn what happened while it was away.
//!
//! Lifecycle of a workload unit: `Restart=no` (the agent's state machine decides restarts),
//! `RemainAfterExit=yes` (a clean end stays visible as "active (exited)" with its status)
//! and `OOMPolicy=kill` (an OOM kill ends the whole workload, as the kubelet's memory.oom.group
//! does on cgroup v2, with `Result=oom-kill`). A failed run stays "failed" until the agent has
//! read it. `CollectMode=inactive-or-failed` is deliberately not set: it would let systemd
//! drop a failed unit, and with it the exit code, while the agent is down. Removal is
//! therefore StopUnit + ResetFailedUnit (cgroups-rs' `SystemdClient::stop`), which leaves no
//! unit and, with it, no cgroup.
//!
//! cgroups-rs provides the property names and conversions (`cgroups_rs::systemd`) and the
//! client that stops and re-limits units (`SystemdClient`). What it lacks is done here with
//! zbus (the transport cgroups-rs itself uses): `SystemdClient::start` refuses a unit without
//! `PIDs` (it only makes scopes around running processes), so transient services and slices are
//! started here; and it has no way to read a unit's state, wait for a job or list units.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use cgroups_rs::systemd::{
    cpu, memory, pids, props::PropertiesBuilder, utils::expand_slice, Property, SystemdClient,
};
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};

use super::{cpu_quota_us, Layout, Limits, Sealed, WorkloadCgroup, CPU_PERIOD_US};

const DESTINATION: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";
const UNIT_EXISTS: &str = "org.freedesktop.systemd1.UnitExists";

/// systemd's "no limit" for u64 properties (USEC_INFINITY, CGROUP_LIMIT_MAX, TASKS_MAX).
const INFINITY: u64 = u64::MAX;

/// How long one D-Bus call may take (systemd answers in milliseconds; a stuck PID 1 must not
/// hang a workload lane forever).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// The pauses between looks at a unit's state while waiting for systemd: short at first (a
/// unit usually starts or stops within tens of milliseconds), then longer, since each look
/// (GetUnit and two GetAll, the Service interface's with hundreds of properties) is work
/// for PID 1, which runs the very jobs being waited for.
struct Poll(Duration);

impl Poll {
    const FIRST: Duration = Duration::from_millis(5);
    const MOST: Duration = Duration::from_millis(50);

    fn new() -> Poll {
        Poll(Poll::FIRST)
    }

    fn sleep(&mut self) {
        std::thread::sleep(self.0);
        self.0 = (self.0 * 2).min(Poll::MOST);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("systemd D-Bus: {0}")]
    Bus(#[from] zbus::Error),
    #[error("systemd D-Bus: {0}")]
    Client(#[from] cgroups_rs::systemd::dbus::error::Error),
    #[error("systemd: {0}")]
    Property(#[from] cgroups_rs::systemd::error::Error),
    #[error("systemd: unit {unit}: unexpected reply: {why}")]
    Reply { unit: String, why: String },
    #[error("systemd: unit {unit} {what} within {waited:?}")]
    Timeout {
        unit: String,
        what: &'static str,
        waited: Duration,
    },
    #[error("systemd: {0} is not a valid unit name")]
    BadName(String),
}

impl SystemdError {
    /// The D-Bus error name systemd answered with, if it answered with one.
    fn bus_error_name(&self) -> Option<&str> {
        match self {
            SystemdError::Bus(zbus::Error::MethodError(name, _, _)) => Some(name.as_str()),
            _ => None,
        }
    }
}

/// Whether systemd is PID 1 (sd_booted(3): it creates /run/systemd/system early at boot).
pub fn booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// `name` with the characters systemd does not keep as they are in one unit name component
/// written as `\xNN` (systemd-escape(1)); in particular `-`, which in a slice name means
/// nesting. Workload names are RFC 1123 labels, so only `-` is ever escaped in practice.
pub fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, b) in name.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b'_' || (b == b'.' && i > 0) || b == b':';
        if plain {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The slice's name without `.slice` ("device-worker-ng" for `device-worker-ng.slice`).
fn stem(slice: &str) -> &str {
    slice.strip_suffix(".slice").unwrap_or(slice)
}

/// Names of one workload's units. Every workload has a slice of its own in the agent's
/// slice (its limits, its cgroup: what the sampler reads, and what stays after a run, with
/// its counters): a shell workload's service runs in it, podman puts a pod's slice below it.
/// All derive from the agent's slice, so two agents with different slices share no unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitNames {
    pub agent_slice: String,
    pub slice: String,
    pub service: String,
}

impl UnitNames {
    /// `workload` must already be a validated workload name (lowercase RFC 1123 label).
    pub fn of(agent_slice: &str, workload: &str) -> UnitNames {
        let s = stem(agent_slice);
        UnitNames {
            agent_slice: agent_slice.to_string(),
            // A slice's parent is the name up to its last unescaped `-`.
            slice: format!("{s}-{}.slice", escape(workload)),
            service: format!("{s}-{workload}.service"),
        }
    }
}

/// The workload name of a workload slice of `agent_slice` (`None` for anything else).
pub fn workload_of_slice(agent_slice: &str, slice: &str) -> Option<String> {
    let rest = slice
        .strip_prefix(stem(agent_slice))?
        .strip_prefix('-')?
        .strip_suffix(".slice")?;
    let name = unescape(rest)?;
    // an unescaped dash would be a deeper slice (podman's pod slices are such)
    (!rest.contains('-') && !name.is_empty()).then_some(name)
}

/// The inverse of [`escape`]; `None` for a malformed escape.
fn unescape(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            let hex = s.get(i + 2..i + 4)?;
            if b.get(i + 1) != Some(&b'x') {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Checks a configured slice name: `<name>.slice`, characters systemd accepts in unit names,
/// no empty nesting level.
pub fn valid_slice_name(slice: &str) -> bool {
    let Some(s) = slice.strip_suffix(".slice") else {
        return false;
    };
    !s.is_empty()
        && slice.len() <= 255
        && s.split('-').all(|part| !part.is_empty())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:\\".contains(&b))
        && expand_slice(slice).is_ok()
}

/// The cgroup of a unit in `slice` (`unit` itself may be a slice), in the host's layout:
/// systemd names the directories after the units, parents first.
pub fn unit_cgroup(
    layout: &Layout,
    slice: &str,
    unit: &str,
) -> Result<WorkloadCgroup, SystemdError> {
    Ok(match slice_cgroup(layout, slice)? {
        WorkloadCgroup::V2 { dir, .. } => WorkloadCgroup::V2 {
            dir: dir.join(unit),
            sealed: Sealed(()),
        },
        WorkloadCgroup::V1 {
            memory,
            cpu,
            cpuacct,
            pids,
            ..
        } => WorkloadCgroup::V1 {
            memory: memory.join(unit),
            cpu: cpu.join(unit),
            cpuacct: cpuacct.join(unit),
            pids: pids.join(unit),
            sealed: Sealed(()),
        },
    })
}

/// The cgroup of the slice itself.
pub fn slice_cgroup(layout: &Layout, slice: &str) -> Result<WorkloadCgroup, SystemdError> {
    let rel = expand_slice(slice).map_err(|_| SystemdError::BadName(slice.into()))?;
    Ok(match layout {
        Layout::Unified { root } => WorkloadCgroup::V2 {
            dir: root.join(&rel),
            sealed: Sealed(()),
        },
        Layout::Legacy(m) | Layout::Hybrid(m) => WorkloadCgroup::V1 {
            memory: m.memory.join(&rel),
            cpu: m.cpu.join(&rel),
            cpuacct: m.cpuacct.join(&rel),
            pids: m.pids.join(&rel),
            sealed: Sealed(()),
        },
    })
}

/// `limits` as unit properties (systemd.resource-control(5)). `None` is "infinity", so the
/// same list also lifts a limit on a running unit. The cpu quota is the same µs per 100 ms
/// period the cgroupfs driver writes, expressed per second as systemd wants it.
pub fn limit_properties(limits: &Limits, v2: bool) -> Result<Vec<Property<'static>>, SystemdError> {
    let mut props: Vec<Property<'static>> = Vec::new();
    let mem = limits
        .memory_bytes
        .map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX));
    let (id, value) = memory::limit(mem, v2)?;
    props.push((id, Value::U64(value)));
    if v2 {
        // No swapping past the limit (as the cgroupfs driver's memory.swap.max = 0).
        let swap = if limits.memory_bytes.is_some() { 0 } else { -1 };
        let (id, value) = memory::swap(swap, v2)?;
        props.push((id, Value::U64(value)));
    }
    let (id, value) = cpu::period(CPU_PERIOD_US)?;
    props.push((id, Value::U64(value)));
    let per_sec = limits
        .cpu_millicores
        .map_or(INFINITY, |m| cpu_quota_us(m) * (1_000_000 / CPU_PERIOD_US));
    let (id, value) = cpu::quota(per_sec)?;
    props.push((id, Value::U64(value)));
    let tasks = limits
        .pids
        .map_or(-1, |p| i64::try_from(p).unwrap_or(i64::MAX));
    let (id, value) = pids::max(tasks)?;
    props.push((id, Value::U64(value)));
    Ok(props)
}

/// What a shell workload's service runs, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUnit {
    pub names: UnitNames,
    pub description: String,
    /// argv; `argv[0]` an absolute path.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries (the only environment the process gets, besides what User= sets).
    pub env: Vec<String>,
    /// `None`: root.
    pub user: Option<String>,
    pub working_dir: Option<PathBuf>,
    pub limits: Limits,
    /// SIGTERM, this long, then SIGKILL, when the unit is stopped.
    pub stop_timeout: Duration,
    /// The workload's name: the journal's SYSLOG_IDENTIFIER and DWNG_WORKLOAD= field.
    pub workload: String,
}

impl ServiceUnit {
    pub fn properties(&self, v2: bool) -> Result<Vec<Property<'static>>, SystemdError> {
        let mut props = PropertiesBuilder::default()
            .cpu_accounting(true)
            .memory_accounting(true)
            .task_accounting(true)
            .description(self.description.clone())
            .slice(self.names.slice.clone())
            .timeout_stop_usec(u64::try_from(self.stop_timeout.as_micros()).unwrap_or(INFINITY))
            .build();
        let exec = vec![(self.argv[0].clone(), self.argv.clone(), false)];
        props.extend([
            ("Type", Value::from("exec")),
            ("ExecStart", Value::from(exec)),
            ("Restart", Value::from("no")),
            ("RemainAfterExit", Value::Bool(true)),
            ("OOMPolicy", Value::from("kill")),
            ("Environment", Value::from(self.env.clone())),
            ("StandardInput", Value::from("null")),
            ("StandardOutput", Value::from("journal")),
            ("StandardError", Value::from("journal")),
            ("SyslogIdentifier", Value::from(self.workload.clone())),
            (
                "LogExtraFields",
                Value::from(vec![format!("DWNG_WORKLOAD={}", self.workload).into_bytes()]),
            ),
        ]);
        if let Some(u) = &self.user {
            props.push(("User", Value::from(u.clone())));
        }
        let dir = self
            .working_dir
            .as_ref()
            .map_or("/".to_string(), |d| d.display().to_string());
        props.push(("WorkingDirectory", Value::from(dir)));
        props.extend(limit_properties(&self.limits, v2)?);
        Ok(props)
    }
}

/// What systemd knows about one unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitState {
    pub active_state: String,
    pub sub_state: String,
    /// `success`, `exit-code`, `signal`, `oom-kill`, `timeout`, ... (services only).
    pub result: String,
    pub main_pid: u32,
    /// CLD_EXITED (1), CLD_KILLED (2), CLD_DUMPED (3); 0 before the process ended.
    pub exec_main_code: i32,
    pub exec_main_status: i32,
    pub control_group: String,
}

/// How a service's main process ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnitEnd {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub oom_killed: bool,
}

impl UnitState {
    /// Still starting or running (or being stopped).
    pub fn is_running(&self) -> bool {
        matches!(
            (self.active_state.as_str(), self.sub_state.as_str()),
            ("activating", _) | ("active", "running") | ("deactivating", _) | ("reloading", _)
        )
    }

    /// How the main process ended, once it has (`None` while the unit still runs).
    pub fn end(&self) -> Option<UnitEnd> {
        if self.is_running() {
            return None;
        }
        let (code, signal) = match self.exec_main_code {
            1 => (Some(self.exec_main_status), None),
            2 | 3 => (None, Some(self.exec_main_status)),
            _ => (None, None),
        };
        Some(UnitEnd {
            code,
            signal,
            oom_killed: self.result == "oom-kill",
        })
    }

    /// systemd's own exit statuses for a process that never ran the workload's program
    /// (systemd.exec(5) "Process Exit Codes"): 200 CHDIR, 203 EXEC, 217 USER, ...
    pub fn setup_failure(&self) -> Option<String> {
        if self.exec_main_code != 1 || !(200..=245).contains(&self.exec_main_status) {
            return None;
        }
        let what = match self.exec_main_status {
            200 => "cannot change to the working directory",
            203 => "cannot execute the command",
            216 => "cannot set the group",
            217 => "cannot set the user (does it exist?)",
            _ => "systemd could not set up the process",
        };
        Some(format!("{what} (systemd status {})", self.exec_main_status))
    }
}

/// A connection to systemd's system manager.
pub struct Systemd {
    conn: zbus::blocking::Connection,
}

impl Systemd {
    pub fn connect() -> Result<Systemd, SystemdError> {
        let conn = zbus::blocking::connection::Builder::system()?
            .method_timeout(CALL_TIMEOUT)
            .build()?;
        Ok(Systemd { conn })
    }

    fn manager<B>(&self, method: &str, body: &B) -> Result<zbus::message::Message, SystemdError>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        Ok(self
            .conn
            .call_method(Some(DESTINATION), MANAGER_PATH, Some(MANAGER), method, body)?)
    }

    /// systemd's version (also proves it answers).
    pub fn version(&self) -> Result<String, SystemdError> {
        let reply = self.conn.call_method(
            Some(DESTINATION),
            MANAGER_PATH,
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &(MANAGER, "Version"),
        )?;
        let v: OwnedValue = reply.body().deserialize()?;
        String::try_from(v).map_err(|e| SystemdError::Reply {
            unit: "manager".into(),
            why: e.to_string(),
        })
    }

    fn start_transient(&self, unit: &str, props: &[Property<'_>]) -> Result<(), SystemdError> {
        let props: Vec<(&str, &Value)> = props.iter().map(|(k, v)| (*k, v)).collect();
        let aux: Vec<(&str, Vec<(&str, Value)>)> = Vec::new();
        // "fail": never replace a job already queued for this name.
        self.manager("StartTransientUnit", &(unit, "fail", props, aux))?;
        Ok(())
    }

    /// The unit's object path; `None` when systemd has no such unit loaded.
    fn unit_path(&self, unit: &str) -> Result<Option<OwnedObjectPath>, SystemdError> {
        match self.manager("GetUnit", &(unit,)) {
            Ok(reply) => Ok(Some(reply.body().deserialize()?)),
            Err(e) if e.bus_error_name() == Some(NO_SUCH_UNIT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn properties(
        &self,
        path: &OwnedObjectPath,
        interface: &str,
    ) -> Result<HashMap<String, OwnedValue>, SystemdError> {
        let reply = self.conn.call_method(
            Some(DESTINATION),
            path.as_str(),
            Some("org.freedesktop.DBus.Properties"),
            "GetAll",
            &(interface,),
        )?;
        Ok(reply.body().deserialize()?)
    }

    /// The unit's state; `None` when systemd has no such unit.
    pub fn state(&self, unit: &str) -> Result<Option<UnitState>, SystemdError> {
        let Some(path) = self.unit_path(unit)? else {
            return Ok(None);
        };
        let general = self.properties(&path, "org.freedesktop.systemd1.Unit")?;
        let reply_err = |why: String| SystemdError::Reply {
            unit: unit.into(),
            why,
        };
        let text = |m: &HashMap<String, OwnedValue>, k: &str| -> Result<String, SystemdError> {
            match m.get(k) {
                Some(v) => String::try_from(v.try_clone().map_err(|e| reply_err(e.to_string()))?)
                    .map_err(|e| reply_err(format!("{k}: {e}"))),
                None => Ok(String::new()),
            }
        };
        let mut state = UnitState {
            active_state: text(&general, "ActiveState")?,
            sub_state: text(&general, "SubState")?,
            ..UnitState::default()
        };
        let interface = if unit.ends_with(".service") {
            "org.freedesktop.systemd1.Service"
        } else if unit.ends_with(".slice") {
            "org.freedesktop.systemd1.Slice"
        } else {
            "org.freedesktop.systemd1.Scope"
        };
        let specific = self.properties(&path, interface)?;
        state.control_group = text(&specific, "ControlGroup")?;
        state.result = text(&specific, "Result")?;
        let num = |k: &str| -> Option<&OwnedValue> { specific.get(k) };
        if let Some(v) = num("MainPID") {
            state.main_pid = u32::try_from(v).unwrap_or(0);
        }
        if let Some(v) = num("ExecMainCode") {
            state.exec_main_code = i32::try_from(v).unwrap_or(0);
        }
        if let Some(v) = num("ExecMainStatus") {
            state.exec_main_status = i32::try_from(v).unwrap_or(0);
        }
        Ok(Some(state))
    }

    /// Creates a slice with `limits`, or sets them on the slice if it exists already (made
    /// by a previous agent). Slices are parents only: nothing runs in them directly.
    pub fn ensure_slice(
        &self,
        slice: &str,
        description: &str,
        limits: &Limits,
        v2: bool,
    ) -> Result<(), SystemdError> {
        let mut props = PropertiesBuilder::default()
            .cpu_accounting(true)
            .memory_accounting(true)
            .task_accounting(true)
            .description(description.to_string())
            .build();
        props.extend(limit_properties(limits, v2)?);
        match self.start_transient(slice, &props) {
            Ok(()) => Ok(()),
            Err(e) if e.bus_error_name() == Some(UNIT_EXISTS) => self.set_limits(slice, limits, v2),
            Err(e) => Err(e),
        }
    }

    /// New limits on a unit that exists (`SetUnitProperties`, runtime only: a transient unit
    /// has no file to persist them to).
    pub fn set_limits(&self, unit: &str, limits: &Limits, v2: bool) -> Result<(), SystemdError> {
        let mut client = SystemdClient::new(unit, Vec::new())?;
        client.set_properties(&limit_properties(limits, v2)?)?;
        Ok(())
    }

    /// Starts a workload's transient service and waits until its program runs (Type=exec:
    /// systemd reports a failed exec as a failed start). Returns its state then: the main
    /// pid, or already the end of a run that was over before the answer came.
    pub fn start_service(&self, unit: &ServiceUnit, v2: bool) -> Result<UnitState, SystemdError> {
        let name = &unit.names.service;
        // The name may still be held by the previous run's unit (stopped and reset, but not
        // yet collected: systemd collects in its next event loop iteration).
        self.wait_gone(name, Duration::from_secs(5))?;
        self.start_transient(name, &unit.properties(v2)?)?;
        let deadline = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut pause = Poll::new();
        loop {
            if let Some(s) = self.state(name)? {
                if s.active_state != "activating" && (s.main_pid != 0 || s.end().is_some()) {
                    return Ok(s);
                }
            }
            if t0.elapsed() > deadline {
                return Err(SystemdError::Timeout {
                    unit: name.clone(),
                    what: "did not start",
                    waited: deadline,
                });
            }
            pause.sleep();
        }
    }

    /// Stops the unit (systemd: SIGTERM to all its processes, its TimeoutStopSec, SIGKILL) and
    /// waits until it has stopped; `grace` bounds only the wait. The grace itself is the
    /// unit's, set when it was made: systemd takes TimeoutStopUSec only then (at run time
    /// SetUnitProperties accepts resource-control properties, not this one). The unit's
    /// record stays for [`Systemd::remove`].
    pub fn stop(&self, unit: &str, grace: Duration) -> Result<(), SystemdError> {
        if self.unit_path(unit)?.is_none() {
            return Ok(());
        }
        match self.manager("StopUnit", &(unit, "replace")) {
            Ok(_) => {}
            Err(e) if e.bus_error_name() == Some(NO_SUCH_UNIT) => return Ok(()),
            Err(e) => return Err(e),
        }
        let deadline = grace + Duration::from_secs(10);
        let t0 = Instant::now();
        let mut pause = Poll::new();
        loop {
            match self.state(unit)? {
                None => return Ok(()),
                Some(s) if !s.is_running() => return Ok(()),
                Some(_) if t0.elapsed() > deadline => {
                    return Err(SystemdError::Timeout {
                        unit: unit.into(),
                        what: "did not stop",
                        waited: deadline,
                    })
                }
                Some(_) => pause.sleep(),
            }
        }
    }

    /// Stops the unit and makes systemd forget it (cgroups-rs: StopUnit + ResetFailedUnit),
    /// then waits until it is gone: no unit and no cgroup left.
    pub fn remove(&self, unit: &str, grace: Duration) -> Result<(), SystemdError> {
        self.stop(unit, grace)?;
        SystemdClient::new(unit, Vec::new())?.stop()?;
        self.wait_gone(unit, Duration::from_secs(5))
    }

    fn wait_gone(&self, unit: &str, timeout: Duration) -> Result<(), SystemdError> {
        let t0 = Instant::now();
        let mut pause = Poll::new();
        loop {
            match self.state(unit)? {
                None => return Ok(()),
                // Stopped units that linger (a failed run, "active (exited)" after a clean end)
                // are reset so systemd collects them.
                Some(s) if !s.is_running() => {
                    let _ = self.manager("StopUnit", &(unit, "replace"));
                    let _ = self.manager("ResetFailedUnit", &(unit,));
                }
                Some(_) => {}
            }
            if t0.elapsed() > timeout {
                return Err(SystemdError::Timeout {
                    unit: unit.into(),
                    what: "is still loaded",
                    waited: timeout,
                });
            }
            pause.sleep();
        }
    }

    /// Names of the loaded units whose names match `pattern` (a glob, e.g. "prefix-*.service").
    pub fn units_matching(&self, pattern: &str) -> Result<Vec<String>, SystemdError> {
        type UnitRow = (
            String,
            String,
            String,
            String,
            String,
            String,
            OwnedObjectPath,
            u32,
            String,
            OwnedObjectPath,
        );
        let states: Vec<&str> = Vec::new();
        let reply = self.manager("ListUnitsByPatterns", &(states, vec![pattern]))?;
        let rows: Vec<UnitRow> = reply.body().deserialize()?;
        let mut names: Vec<String> = rows.into_iter().map(|r| r.0).collect();
        names.sort();
        Ok(names)
    }
}

/// The systemd driver's placement of workloads: the agent's slice, limited to the device
/// budget, with one slice per workload in it (see [`UnitNames`]). The counterpart of the
/// cgroupfs driver's `<CGROUP_ROOT>/workloads/<name>` directories, made by systemd.
#[derive(Clone)]
pub struct SliceTree {
    pub layout: Layout,
    pub slice: String,
    /// The agent's slice's cgroup, relative to the hierarchy's root.
    rel: PathBuf,
    systemd: std::sync::Arc<Systemd>,
}

impl std::fmt::Debug for SliceTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SliceTree({})", self.slice)
    }
}

impl SliceTree {
    /// `slice` must be a valid slice name (checked: a configured name arrives here).
    pub fn new(layout: Layout, slice: &str, systemd: Systemd) -> Result<SliceTree, SystemdError> {
        if !valid_slice_name(slice) {
            return Err(SystemdError::BadName(slice.into()));
        }
        let rel =
            PathBuf::from(expand_slice(slice).map_err(|_| SystemdError::BadName(slice.into()))?);
        Ok(SliceTree {
            layout,
            slice: slice.to_string(),
            rel,
            systemd: std::sync::Arc::new(systemd),
        })
    }

    pub fn systemd(&self) -> &Systemd {
        &self.systemd
    }

    pub fn v2(&self) -> bool {
        matches!(self.layout, Layout::Unified { .. })
    }

    pub fn names(&self, workload: &str) -> UnitNames {
        UnitNames::of(&self.slice, workload)
    }

    fn at(&self, rel: &Path) -> WorkloadCgroup {
        match &self.layout {
            Layout::Unified { root } => WorkloadCgroup::V2 {
                dir: root.join(rel),
                sealed: Sealed(()),
            },
            Layout::Legacy(m) | Layout::Hybrid(m) => WorkloadCgroup::V1 {
                memory: m.memory.join(rel),
                cpu: m.cpu.join(rel),
                cpuacct: m.cpuacct.join(rel),
                pids: m.pids.join(rel),
                sealed: Sealed(()),
            },
        }
    }

    /// The cgroup of the agent's slice.
    pub fn cgroup(&self) -> WorkloadCgroup {
        self.at(&self.rel)
    }

    /// The cgroup of a workload's slice (`workload`: a validated workload name).
    pub fn workload_cgroup(&self, workload: &str) -> WorkloadCgroup {
        self.at(&self.rel.join(self.names(workload).slice))
    }

    /// The cgroup of a workload's service.
    pub fn service_cgroup(&self, workload: &str) -> WorkloadCgroup {
        let n = self.names(workload);
        self.at(&self.rel.join(n.slice).join(n.service))
    }

    /// The agent's slice, without limits until [`SliceTree::cap`] sets the budget.
    pub fn setup(&self) -> Result<(), SystemdError> {
        self.systemd.ensure_slice(
            &self.slice,
            "device-worker-ng workloads",
            &Limits::default(),
            self.v2(),
        )
    }

    /// The device budget on all workloads together: the agent's slice's limits.
    pub fn cap(&self, limits: &Limits) -> Result<(), SystemdError> {
        self.systemd.set_limits(&self.slice, limits, self.v2())
    }

    /// cgroup v2: the agent's slice's `MemoryHigh` (the kernel alerts' budget mark). A
    /// property, not a write to the slice's `memory.high`: systemd owns that file and writes
    /// it again from the unit's properties whenever it applies them (e.g. at the next
    /// [`SliceTree::cap`]). cgroups-rs has no MemoryHigh property.
    pub fn set_memory_high(&self, bytes: u64) -> Result<(), SystemdError> {
        let mut client = SystemdClient::new(&self.slice, Vec::new())?;
        client.set_properties(&[("MemoryHigh", Value::U64(bytes))])?;
        Ok(())
    }

    /// A workload's slice with its limits (created, or re-limited when it exists).
    pub fn prepare(&self, workload: &str, limits: &Limits) -> Result<(), SystemdError> {
        self.systemd.ensure_slice(
            &self.names(workload).slice,
            &format!("device-worker-ng workload {workload}"),
            limits,
            self.v2(),
        )
    }

    /// New limits for a workload: its slice's, and its service's while it is loaded.
    pub fn limit(&self, workload: &str, limits: &Limits) -> Result<(), SystemdError> {
        let n = self.names(workload);
        self.systemd.set_limits(&n.slice, limits, self.v2())?;
        if self.systemd.state(&n.service)?.is_some() {
            self.systemd.set_limits(&n.service, limits, self.v2())?;
        }
        Ok(())
    }

    /// Removes a workload's units (its service, then its slice with whatever is left in it):
    /// nothing of it stays, neither unit nor cgroup.
    pub fn remove(&self, workload: &str, grace: Duration) -> Result<(), SystemdError> {
        let n = self.names(workload);
        self.systemd.remove(&n.service, grace)?;
        self.systemd.remove(&n.slice, grace)
    }

    /// The workloads that have a slice (to find orphans after a restart), read from the
    /// agent's slice's cgroup; a directory that is no workload slice is left alone.
    pub fn existing(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.cgroup().display_path()) else {
            return Vec::new();
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| workload_of_slice(&self.slice, &e.file_name().to_string_lossy()))
            .collect();
        names.sort();
        names
    }

    /// Stops the agent's slice and everything in it (tests, package removal).
    pub fn remove_all(&self, grace: Duration) -> Result<(), SystemdError> {
        for w in self.existing() {
            self.remove(&w, grace)?;
        }
        self.systemd.remove(&self.slice, grace)
    }
}

#[cfg(test)]
mod tests;
