//! Runs the real `device-worker-ng` binary for integration tests: its own state dir, control
//! socket, desired-state file and cgroup subtree, all removed again on drop. Root only (the
//! tests register with [`ROOT_CGROUPS`](crate::harness::ROOT_CGROUPS)).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use device_worker_ng::cgroup::{self, Hierarchy};
use device_worker_ng::status::{socket, Snapshot, WorkloadInfo};
use device_worker_ng::workload::WorkloadName;

use crate::wait::poll_until;

pub struct Agent {
    /// The binary cargo built for the test (`env!("CARGO_BIN_EXE_device-worker-ng")`: only
    /// the test crate knows it).
    bin: PathBuf,
    pub dir: tempfile::TempDir,
    pub cgroup_root: String,
    pub child: Option<Child>,
    pub extra_env: Vec<(String, String)>,
    /// Arguments after `run` (e.g. `--config FILE`).
    pub extra_args: Vec<std::ffi::OsString>,
}

impl Agent {
    /// Prepares (does not start) the agent `bin` with `desired` as its desired-state file.
    pub fn new(bin: impl AsRef<Path>, desired: &str) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("dwng-test-")
            .tempdir()
            .unwrap();
        std::fs::write(dir.path().join("desired.yaml"), desired).unwrap();
        let cgroup_root = format!(
            "device-worker-ng-test-{}",
            dir.path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .trim_start_matches("dwng-test-")
        )
        .to_lowercase();
        Agent {
            bin: bin.as_ref().to_path_buf(),
            dir,
            cgroup_root,
            child: None,
            extra_env: Vec::new(),
            extra_args: Vec::new(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn desired_path(&self) -> PathBuf {
        self.dir.path().join("desired.yaml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// Atomically replaces the desired-state file (the agent watches it).
    pub fn set_desired(&self, text: &str) {
        let tmp = self.dir.path().join(".desired.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.desired_path()).unwrap();
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("EDGE_DEVICE_STATE_DIR", self.state_dir())
            .env("EDGE_DEVICE_CONTROL_SOCKET", self.socket())
            .env("EDGE_DEVICE_DESIRED_STATE", self.desired_path())
            .env("EDGE_DEVICE_CGROUP_ROOT", &self.cgroup_root)
            .env("EDGE_DEVICE_LOG_LEVEL", "debug")
            .env("EDGE_DEVICE_RESTART_BACKOFF_INITIAL", "200ms")
            .env("EDGE_DEVICE_RESTART_BACKOFF_MAX", "2s")
            .env("EDGE_DEVICE_STOP_TIMEOUT", "2s");
        for (k, v) in &self.extra_env {
            c.env(k, v);
        }
        c
    }

    /// Starts the agent and waits until it answers `status`.
    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = self
            .command()
            .arg("run")
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_for("agent answers status", Duration::from_secs(10), |_| true);
    }

    pub fn try_status(&self) -> Option<Snapshot> {
        socket::request_status(&self.socket()).ok().map(|(s, _)| s)
    }

    pub fn status(&self) -> Snapshot {
        self.try_status()
            .unwrap_or_else(|| panic!("agent does not answer; log:\n{}", self.log()))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Polls the status until `pred` holds; panics with the last status and the log if not.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Snapshot) -> bool,
    ) -> Snapshot {
        let mut last = None;
        let found = poll_until(timeout, Duration::from_millis(100), || {
            let s = self.try_status()?;
            if pred(&s) {
                return Some(s);
            }
            last = Some(s);
            None
        });
        if let Some(s) = found {
            return s;
        }
        panic!(
            "timed out after {timeout:?} waiting for: {what}\nlast status: {}\nagent log:\n{}",
            last.map(|s| s.render()).unwrap_or_else(|| "none".into()),
            self.log()
        );
    }

    pub fn workload<'a>(s: &'a Snapshot, name: &str) -> Option<&'a WorkloadInfo> {
        s.workloads.iter().find(|w| w.name == name)
    }

    /// Sends `signal` to the running agent.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let c = self.child.as_ref().expect("the agent runs");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), signal).unwrap();
    }

    /// SIGKILL: the agent gets no chance to clean anything up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let exited = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
            c.try_wait().ok().flatten()
        });
        if exited.is_some() {
            return exited;
        }
        let _ = c.kill();
        c.wait().ok()
    }

    pub fn hierarchy(&self) -> Hierarchy {
        Hierarchy::new(cgroup::detect().unwrap(), &self.cgroup_root, None)
    }

    /// The cgroup of a workload of this agent.
    pub fn cgroup(&self, workload: &str) -> cgroup::WorkloadCgroup {
        self.hierarchy().workload(&name(workload))
    }

    pub fn cgroup_procs(&self, workload: &str) -> Vec<i32> {
        self.cgroup(workload).pids().unwrap_or_default()
    }

    pub fn cgroup_file(&self, workload: &str, file: &str) -> String {
        let cg = self.cgroup(workload);
        cg.dirs()
            .iter()
            .map(|d| d.join(file))
            .find(|p| p.exists())
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

/// A workload name the test knows to be valid.
pub fn name(s: &str) -> WorkloadName {
    WorkloadName::parse(s).unwrap_or_else(|e| panic!("{e}"))
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        let _ = self.hierarchy().remove_all();
    }
}
