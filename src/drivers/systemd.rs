//! The shell driver under the systemd cgroup driver: a workload's run is a transient service
//! in the workload's slice (`cgroup::systemd`), started, stopped, adopted and removed through
//! systemd; how it ended is systemd's record of it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cgroup::systemd::{ServiceUnit, SliceTree, SystemdError, UnitEnd, UnitNames};
use crate::cgroup::CgroupError;
use crate::store::WorkloadRecord;
use crate::workload::WorkloadSpec;

use super::shell::ShellError;
use super::{DriverError, Placement, Run, RunEnd, Started, Watch};

fn sd(e: SystemdError) -> DriverError {
    DriverError::Cgroup(CgroupError::from(e))
}

/// The PATH a shell workload gets, as with the cgroupfs driver.
pub const WORKLOAD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Who the service runs as: a named user, or a uid of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    Root,
    User(String),
    /// A uid (and gid) without a passwd entry, from WORKLOAD_UIDS. systemd's User= refuses a
    /// uid the user database does not know (status 217/USER), so the service starts the
    /// agent's own binary (`exe`), whose `exec-as` drops to the uid and execs the workload's
    /// program: the same process, already in the unit's cgroup.
    Uid {
        uid: u32,
        exe: PathBuf,
    },
}

/// A shell workload's transient service in the workload's slice, below `slice`.
pub fn service_for(
    spec: &WorkloadSpec,
    slice: &str,
    run_as: RunAs,
    stop_timeout: Duration,
) -> Result<ServiceUnit, ShellError> {
    let shell = spec.shell.as_ref().ok_or(ShellError::NotShell)?;
    // ExecStart= wants an absolute path; the spec's validation already insists on one.
    let program = shell.command.first().ok_or(ShellError::NotShell)?;
    if !Path::new(program).is_absolute() {
        return Err(ShellError::Exec {
            program: program.clone(),
            why: "not an absolute path".into(),
        });
    }
    let mut argv = shell.command.clone();
    let mut env = vec![
        format!("PATH={WORKLOAD_PATH}"),
        format!("WORKLOAD_NAME={}", spec.name),
    ];
    // User= sets HOME and USER itself; the others get what the cgroupfs driver gives them.
    let user = match run_as {
        RunAs::Root => {
            env.extend(["HOME=/root".to_string(), "USER=root".to_string()]);
            None
        }
        RunAs::User(u) => Some(u),
        RunAs::Uid { uid, exe } => {
            env.extend(["HOME=/".to_string(), format!("USER=dwng-{uid}")]);
            let mut wrapped = vec![
                exe.display().to_string(),
                "exec-as".into(),
                uid.to_string(),
                "--".into(),
            ];
            wrapped.append(&mut argv);
            argv = wrapped;
            None
        }
    };
    env.extend(shell.env.iter().map(|(k, v)| format!("{k}={v}")));
    Ok(ServiceUnit {
        names: UnitNames::of(slice, spec.name.as_str()),
        description: format!("device-worker-ng workload {}", spec.name),
        argv,
        env,
        user,
        working_dir: shell.working_dir.clone(),
        limits: spec.limits,
        stop_timeout,
        workload: spec.name.to_string(),
    })
}

/// Starts a run: the workload's slice with its limits, then its service in it.
pub fn start(
    tree: &SliceTree,
    run: &Run,
    stop_timeout: Duration,
    exe: &Path,
) -> Result<Started, DriverError> {
    let spec = run.spec;
    let shell = spec.shell.as_ref().ok_or(ShellError::NotShell)?;
    let name = spec.name.as_str();
    tree.prepare(name, &spec.limits).map_err(sd)?;
    let oom_kills_at_start = tree.workload_cgroup(name).oom_kills();
    let run_as = match (shell.user.as_deref(), run.uid) {
        (Some("root"), _) | (None, None) => RunAs::Root,
        (Some(user), _) => RunAs::User(user.to_string()),
        (None, Some(uid)) => RunAs::Uid {
            uid,
            exe: exe.to_path_buf(),
        },
    };
    let unit = service_for(spec, &tree.slice, run_as, stop_timeout)?;
    let state = tree.systemd().start_service(&unit, tree.v2()).map_err(sd)?;
    if let Some(why) = state.setup_failure() {
        return Err(ShellError::Exec {
            program: shell.command[0].clone(),
            why,
        }
        .into());
    }
    Ok(started(tree, name, state.main_pid, oom_kills_at_start))
}

/// A run of the workload's service: its main process watched by pid; how it ended is asked
/// of systemd once it has.
fn started(tree: &SliceTree, workload: &str, main_pid: u32, oom_kills_at_start: u64) -> Started {
    let pid = i32::try_from(main_pid).ok().filter(|p| *p > 0);
    let ticks = pid.and_then(super::process::start_ticks).unwrap_or(0);
    let service = tree.names(workload).service;
    let tree = tree.clone();
    Started {
        pid,
        start_ticks: ticks,
        oom_kills_at_start,
        // Ended already (no main pid): the watch asks systemd at once.
        watch: Watch::Processes {
            pids: pid.map(|p| vec![(p, ticks)]).unwrap_or_default(),
            finish: Box::new(move |_| end_of(&tree, &service)),
        },
        notice: None,
    }
}

/// How the service's main process ended, as systemd recorded it (it takes systemd a moment
/// after the process is gone).
fn end_of(tree: &SliceTree, service: &str) -> RunEnd {
    let t0 = Instant::now();
    loop {
        match tree.systemd().state(service) {
            Ok(Some(s)) => {
                if let Some(end) = s.end() {
                    return end.into();
                }
            }
            // Collected (or removed) meanwhile: ended, status unknown.
            Ok(None) => return RunEnd::default(),
            Err(e) => tracing::warn!(unit = %service, "asking systemd how the run ended: {e}"),
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return RunEnd::default();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops the run: systemd sends SIGTERM to the service's processes, SIGKILL after `grace`.
pub fn stop(tree: &SliceTree, at: &Placement, grace: Duration) -> Result<(), DriverError> {
    let n = tree.names(at.name.as_str());
    tree.systemd().stop(&n.service, grace).map_err(sd)
}

/// Removes the workload's service and slice: no unit and no cgroup of it stay.
pub fn cleanup(tree: &SliceTree, at: &Placement, grace: Duration) -> Result<(), DriverError> {
    tree.remove(at.name.as_str(), grace).map_err(sd)
}

/// After an agent restart: the workload's service, whatever became of it. Still running: its
/// main process is watched again. Ended while no agent ran: systemd kept how (exit code,
/// signal, OOM kill), and the watch reports it at once. Gone (a reboot, or removed by hand):
/// nothing to adopt.
pub fn adopt(tree: &SliceTree, at: &Placement, record: &WorkloadRecord) -> Option<Started> {
    let n = tree.names(at.name.as_str());
    let state = match tree.systemd().state(&n.service) {
        Ok(Some(s)) => s,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(unit = %n.service, "cannot adopt: {e}");
            return None;
        }
    };
    let main_pid = if state.is_running() {
        state.main_pid
    } else {
        0
    };
    Some(started(
        tree,
        at.name.as_str(),
        main_pid,
        record.oom_kills_at_start,
    ))
}

/// `device-worker-ng exec-as UID -- PROGRAM ARGS...`, the first instruction of a service
/// that runs as a uid of its own (see [`RunAs::Uid`]): drops to `uid` (gid the same, no
/// supplementary groups, as the cgroupfs driver's child does), then execs the program in
/// this same process. Returns only if that failed.
pub fn exec_as(uid: u32, argv: &[String]) -> String {
    use std::ffi::CString;
    // Never root, nor (uid_t)-1: the uids WORKLOAD_UIDS allows.
    if uid < 1000 || uid == u32::MAX {
        return format!("refusing uid {uid}");
    }
    let Some(program) = argv.first() else {
        return "no program".into();
    };
    let args: Result<Vec<CString>, _> = argv.iter().map(|a| CString::new(a.as_bytes())).collect();
    let Ok(args) = args else {
        return "an argument holds a NUL byte".into();
    };
    let (u, g) = (
        nix::unistd::Uid::from_raw(uid),
        nix::unistd::Gid::from_raw(uid),
    );
    let dropped = nix::unistd::setgroups(&[g])
        .and_then(|_| nix::unistd::setgid(g))
        .and_then(|_| nix::unistd::setuid(u));
    if let Err(e) = dropped {
        return format!("cannot become uid {uid}: {e}");
    }
    match nix::unistd::execv(&args[0], &args) {
        Err(e) => format!("cannot execute {program}: {e}"),
        Ok(never) => match never {},
    }
}

impl From<UnitEnd> for RunEnd {
    fn from(e: UnitEnd) -> RunEnd {
        RunEnd {
            code: e.code,
            signal: e.signal,
            oom_killed: e.oom_killed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::BackoffPolicy;
    use crate::workload::{parse_desired, SpecDefaults};
    use std::path::PathBuf;

    fn spec(command: &str) -> WorkloadSpec {
        let text = format!(
            "workloads:\n  - name: collector\n    kind: shell\n    specification: |\n      command: {command}\n      args: [\"-v\"]\n      env: [{{name: MODE, value: edge}}]\n      workingDir: /tmp\n      resources:\n        limits: {{memory: 64Mi, cpu: 250m, pids: 32}}\n"
        );
        let defaults = SpecDefaults {
            workload_user: Some("nobody".into()),
            backoff: BackoffPolicy::default(),
            default_limits: Default::default(),
        };
        parse_desired(&text).unwrap().validate(&defaults)[0]
            .clone()
            .unwrap()
    }

    #[test]
    fn a_shell_spec_becomes_a_service() {
        let s = service_for(
            &spec("[\"/bin/sh\", \"-c\", \"echo hi\"]"),
            "device-worker-ng.slice",
            RunAs::User("nobody".into()),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(s.names.service, "device-worker-ng-collector.service");
        assert_eq!(s.argv, ["/bin/sh", "-c", "echo hi", "-v"]);
        assert_eq!(
            s.env,
            [
                format!("PATH={WORKLOAD_PATH}"),
                "WORKLOAD_NAME=collector".into(),
                "MODE=edge".into()
            ],
            "User= sets HOME and USER"
        );
        assert_eq!(s.user.as_deref(), Some("nobody"));
        assert_eq!(s.working_dir, Some(PathBuf::from("/tmp")));
        assert_eq!(s.limits.memory_bytes, Some(64 << 20));
        assert_eq!(s.workload, "collector");

        let own = service_for(
            &spec("[\"/bin/true\"]"),
            "dwng.slice",
            RunAs::Uid {
                uid: 524300,
                exe: "/usr/bin/device-worker-ng".into(),
            },
            Duration::from_secs(1),
        )
        .unwrap();
        // systemd knows no such user: the agent's exec-as drops to it, then execs the program
        assert_eq!(own.user, None);
        assert_eq!(
            own.argv,
            [
                "/usr/bin/device-worker-ng",
                "exec-as",
                "524300",
                "--",
                "/bin/true",
                "-v"
            ]
        );
        assert!(own.env.contains(&"USER=dwng-524300".to_string()));
        assert!(own.env.contains(&"HOME=/".to_string()));
        assert_eq!(own.names.service, "dwng-collector.service");
    }
}
