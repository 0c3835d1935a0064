//! What the systemd cgroup driver makes of a workload: a shell workload's transient service
//! (`cgroup::systemd::ServiceUnit`) from its spec, and how a unit's state reads as the end of
//! a run.

use std::path::Path;
use std::time::Duration;

use crate::cgroup::systemd::{ServiceUnit, UnitEnd, UnitNames};
use crate::workload::WorkloadSpec;

use super::shell::ShellError;
use super::RunEnd;

/// The PATH a shell workload gets, as with the cgroupfs driver.
pub const WORKLOAD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Who the service runs as: a named user, or a uid of its own (no passwd entry: its own
/// group too, so systemd does not fall back to root's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    Root,
    User(String),
    Uid(u32),
}

/// A shell workload's transient service in `slice`.
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
    let argv = shell.command.clone();
    let mut env = vec![
        format!("PATH={WORKLOAD_PATH}"),
        format!("WORKLOAD_NAME={}", spec.name),
    ];
    env.extend(shell.env.iter().map(|(k, v)| format!("{k}={v}")));
    let (user, group) = match run_as {
        RunAs::Root => (None, None),
        RunAs::User(u) => (Some(u), None),
        RunAs::Uid(uid) => (Some(uid.to_string()), Some(uid.to_string())),
    };
    Ok(ServiceUnit {
        names: UnitNames::of(slice, spec.name.as_str()),
        description: format!("device-worker-ng workload {}", spec.name),
        argv,
        env,
        user,
        group,
        working_dir: shell.working_dir.clone(),
        limits: spec.limits,
        stop_timeout,
        workload: spec.name.to_string(),
    })
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
            ]
        );
        assert_eq!(s.user.as_deref(), Some("nobody"));
        assert_eq!(s.group, None);
        assert_eq!(s.working_dir, Some(PathBuf::from("/tmp")));
        assert_eq!(s.limits.memory_bytes, Some(64 << 20));
        assert_eq!(s.workload, "collector");

        let own = service_for(
            &spec("[\"/bin/true\"]"),
            "dwng.slice",
            RunAs::Uid(61234),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(
            (own.user.as_deref(), own.group.as_deref()),
            (Some("61234"), Some("61234"))
        );
        assert_eq!(own.names.service, "dwng-collector.service");
    }
}
