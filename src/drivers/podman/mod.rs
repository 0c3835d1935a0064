//! The podman driver: a `pod` workload (PROTOCOL §4.3) run with `podman kube play`.
//!
//! **CLI, not the libpod REST socket.** The CLI needs no long-running `podman system service`
//! that the agent would have to supervise (and run once per rootless user), its failures come
//! with podman's own message on stderr (which becomes the workload's reason as is), and every
//! call already runs on the workload's blocking lane. The REST API would save a fork+exec per
//! call (tens of ms, see `bench/pod-start.sh`); that is small next to podman's own work.
//!
//! **Placement.** Every pod lives under the agent's workload cgroup, so the sampler measures
//! it, the device budget counts it and the agent's pod-level limits (sum of the containers'
//! limits, a pids limit) hold on top of podman's per-container ones. `podman kube play` (4.3)
//! has no `--cgroup-parent`, so a rootful pod is played stopped under a staging name, then
//! `podman pod clone --cgroup-parent=<workload cgroup> --destroy` recreates it, with all its
//! containers, under the workload's cgroup and its real name; the app containers are renamed
//! back to `<pod>-<container>` and the pod is started. A rootless pod cannot get a cgroup
//! parent (rootless podman on cgroup v1 creates no cgroups at all), so `kube play` itself is
//! started inside the workload cgroup and the containers inherit it.
//!
//! Podman does not restart containers (the manifest says `restartPolicy: Never`): the run ends
//! when an app container exits, and the workload machine restarts the pod per policy. An OOM
//! kill shows as exit 137 (podman reports `OOMKilled=false` on cgroup v1) and as the workload
//! cgroup's `oom_kill` counter rising; the kernel notifies it (an eventfd per memory cgroup of
//! the pod on v1), and an OOM-killed container ends the run without asking podman.

pub mod cli;
pub mod secrets;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

pub use cli::{Podman, RootlessUser};

use super::{Driver, DriverError, Placement, Run, RunEnd, Started, Watch};
use crate::cgroup::systemd::SliceTree;
use crate::cgroup::{notify, CgroupError, Layout, WorkloadCgroup};
use crate::store::WorkloadRecord;
use crate::workload::{DesiredSecret, WorkloadName, WorkloadSpec};

#[derive(Debug, thiserror::Error)]
pub enum PodmanError {
    #[error("podman is not installed (no `podman` in PATH)")]
    NotInstalled,
    #[error("{command}: {why}")]
    Command { command: String, why: String },
    /// Podman ran and refused: `message` is podman's own.
    #[error("{message}")]
    Failed { command: String, message: String },
    #[error("rootless: {0}")]
    Rootless(String),
    #[error("{path}: {why}")]
    Io { path: String, why: String },
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("not a pod workload")]
    NotPod,
    #[error("{0}")]
    Unexpected(String),
}

/// Agent settings the driver needs.
#[derive(Debug, Clone)]
pub struct PodmanSettings {
    /// Per-workload files (registry auth file, rootless marker) go to `<state_dir>/pods/<name>`.
    pub state_dir: PathBuf,
    /// The host's cgroup layout (detected once at start-up).
    pub layout: Layout,
    /// The unprivileged user `rootless: true` pods run as (`ROOTLESS_USER`).
    pub rootless_user: Option<String>,
    /// XDG_RUNTIME_DIR of that user; default `/run/user/<uid>`.
    pub xdg_runtime_dir: Option<PathBuf>,
    /// The systemd cgroup driver's slices (`None`: cgroupfs). Under systemd, podman runs with
    /// its systemd cgroup manager: a rootful pod's slice goes below the workload's slice; a
    /// rootless pod lives in its user's own systemd instance, which enforces its limits on
    /// cgroup v2 (delegated memory, cpu and pids).
    pub systemd: Option<SliceTree>,
    /// How long systemd gives a removed workload's processes between SIGTERM and SIGKILL.
    pub stop_timeout: Duration,
}

/// The pod driver.
#[derive(Debug)]
pub struct PodDriver {
    settings: PodmanSettings,
    /// The podman secret ledger is read and written one sync at a time.
    secrets_lock: std::sync::Mutex<()>,
}

fn staging_name(name: &str) -> String {
    format!("{name}-dwng-staging")
}

/// The manifest without the containers' `resources` (every document of kind Pod).
fn without_container_resources(manifest: &str) -> String {
    let mut out = Vec::new();
    for doc in manifest.split("\n---\n") {
        let Ok(mut v) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(doc) else {
            out.push(doc.to_string());
            continue;
        };
        if v.get("kind").and_then(|k| k.as_str()) == Some("Pod") {
            for list in ["containers", "initContainers"] {
                if let Some(serde_yaml_ng::Value::Sequence(cs)) =
                    v.get_mut("spec").and_then(|s| s.get_mut(list))
                {
                    for c in cs {
                        if let serde_yaml_ng::Value::Mapping(m) = c {
                            m.remove("resources");
                        }
                    }
                }
            }
        }
        out.push(serde_yaml_ng::to_string(&v).unwrap_or_else(|_| doc.to_string()));
    }
    out.join("\n---\n")
}

impl PodDriver {
    pub fn new(settings: PodmanSettings) -> PodDriver {
        PodDriver {
            settings,
            secrets_lock: std::sync::Mutex::new(()),
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.settings.state_dir
    }

    fn pod_dir(&self, name: &WorkloadName) -> PathBuf {
        self.settings.state_dir.join("pods").join(name.as_str())
    }

    /// `--cgroup-manager` for podman: systemd's under the systemd driver; under cgroupfs,
    /// what containers.conf says (as before there were two drivers).
    fn cgroup_manager(&self) -> Option<&'static str> {
        self.settings.systemd.as_ref().map(|_| "systemd")
    }

    /// The podman that holds (or will hold) a workload's pod.
    fn podman_for(&self, rootless: bool) -> Result<Podman, PodmanError> {
        let manager = self.cgroup_manager();
        if !rootless {
            return Ok(Podman::rootful().with_cgroup_manager(manager));
        }
        let s = &self.settings;
        let user = s.rootless_user.as_deref().ok_or_else(|| {
            PodmanError::Rootless(
                "the workload asks for rootless podman, but ROOTLESS_USER is not configured".into(),
            )
        })?;
        Ok(
            Podman::rootless(RootlessUser::resolve(user, s.xdg_runtime_dir.clone())?)?
                .with_cgroup_manager(manager),
        )
    }

    /// The podman of an existing workload (its rootless marker, written at start).
    fn podman_of(&self, name: &WorkloadName) -> Podman {
        if self.pod_dir(name).join("rootless").exists() {
            if let Ok(p) = self.podman_for(true) {
                return p;
            }
        }
        Podman::rootful().with_cgroup_manager(self.cgroup_manager())
    }

    /// Makes the desired state's secrets exist as podman secrets, as listed (a pod reads
    /// them when it is created).
    pub fn sync_secrets(&self, secrets: &[DesiredSecret]) -> Result<(), PodmanError> {
        let report = secrets::sync(self, secrets)?;
        match report.failed.first() {
            Some((name, why)) => Err(PodmanError::Unexpected(format!("secret {name}: {why}"))),
            None => Ok(()),
        }
    }

    /// Starts one run of a pod workload under `cgroup`.
    fn start_pod(
        &self,
        spec: &WorkloadSpec,
        cgroup: &WorkloadCgroup,
        log_path: &Path,
    ) -> Result<Started, PodmanError> {
        let pod = spec.pod.as_ref().ok_or(PodmanError::NotPod)?;
        let name = &spec.name;
        let podman = self.podman_for(pod.rootless)?;
        let t0 = Instant::now();

        // Whatever an earlier run or agent left behind goes first: a fresh pod each run.
        remove_pods(&podman, name);
        self.prepare_cgroup(spec, cgroup)?;
        let oom_kills_at_start = cgroup.oom_kills();

        let auth = self.pod_files(name, pod, &podman)?;
        let mut play: Vec<String> = vec!["kube".into(), "play".into(), "--quiet".into()];
        if let Some(p) = &auth {
            play.push(format!("--authfile={}", p.display()));
        }

        let result = self.play(&podman, spec, pod, cgroup, play);
        let notice = match result {
            Ok(notice) => notice,
            Err(e) => {
                remove_pods(&podman, name);
                return Err(e);
            }
        };
        let podman_took = t0.elapsed();

        let containers: Vec<String> = pod
            .containers
            .iter()
            .map(|c| format!("{name}-{c}"))
            .collect();
        if containers.is_empty() {
            return Err(PodmanError::Unexpected("pod without containers".into()));
        }
        let pids = container_pids(&podman, &containers)?;
        append_log(
            log_path,
            &format!(
                "pod {name} started in {:?} (podman), containers {}{}\n",
                podman_took,
                containers.join(", "),
                notice
                    .as_deref()
                    .map(|n| format!("; {n}"))
                    .unwrap_or_default()
            ),
        );
        let oom = self.oom_watch(&podman, cgroup, pids[0].0);
        Ok(Started {
            pid: Some(pids[0].0),
            start_ticks: pids[0].1,
            oom_kills_at_start,
            watch: Watch::Processes {
                pids,
                finish: Box::new(move |first| {
                    oom.finish().unwrap_or_else(|| {
                        exit_of(&podman, &containers[first.min(containers.len() - 1)])
                    })
                }),
            },
            notice,
        })
    }

    /// A fresh cgroup (or systemd slice) for the pod, with the workload's limits.
    fn prepare_cgroup(
        &self,
        spec: &WorkloadSpec,
        cgroup: &WorkloadCgroup,
    ) -> Result<(), PodmanError> {
        match &self.settings.systemd {
            // systemd makes and limits the workload's slice; podman's units below it are
            // podman's to remove (remove_pods).
            Some(tree) => tree
                .prepare(spec.name.as_str(), &spec.limits)
                .map_err(CgroupError::from)?,
            None => {
                cgroup.create()?;
                self.prune_children(cgroup)?;
                cgroup.apply(&spec.limits)?;
            }
        }
        Ok(())
    }

    /// `podman kube play` of the pod, under the workload's cgroup or slice; `Ok` carries a
    /// notice for the log and status when a limit cannot be enforced.
    fn play(
        &self,
        podman: &Podman,
        spec: &WorkloadSpec,
        pod: &crate::workload::PodSpecData,
        cgroup: &WorkloadCgroup,
        mut play: Vec<String>,
    ) -> Result<Option<String>, PodmanError> {
        let name = &spec.name;
        let layout = &self.settings.layout;
        let mut notice = None;
        // A rootless pod under systemd is its user's systemd's: kube play does not join the
        // workload's cgroup (a cgroup of the system's manager the user cannot use).
        let join = self.settings.systemd.is_none().then_some(cgroup);
        let result = if podman.is_rootless() {
            let mut manifest = pod.manifest.clone();
            if !matches!(layout, Layout::Unified { .. }) {
                notice = Some(
                    "rootless pod on cgroup v1: podman cannot enforce the containers' limits; \
                     only the pod's total (the agent's workload cgroup) is enforced"
                        .to_string(),
                );
                // runc refuses to start a rootless container with limits it cannot set on v1.
                manifest = without_container_resources(&manifest);
            }
            play.push("-".into());
            let args: Vec<&str> = play.iter().map(String::as_str).collect();
            podman
                .run_with(&args, Some(manifest.as_bytes()), join, cli::PLAY_TIMEOUT)
                .map(|_| ())
        } else {
            let parent = match &self.settings.systemd {
                // podman's systemd manager takes a slice: the pod's slice goes below it.
                Some(tree) => Ok(tree.names(name.as_str()).slice),
                None => cgroup_parent(cgroup, layout).map(|p| p.display().to_string()),
            };
            parent.and_then(|parent| {
                play_under(
                    podman,
                    &mut play,
                    name.as_str(),
                    &pod.manifest,
                    &pod.containers,
                    &parent,
                )
            })
        };
        result.map(|()| notice)
    }

    /// The files the agent keeps for a pod (`<state_dir>/pods/<name>`): the rootless marker
    /// and the registry auth file, whose path is returned.
    fn pod_files(
        &self,
        name: &WorkloadName,
        pod: &crate::workload::PodSpecData,
        podman: &Podman,
    ) -> Result<Option<PathBuf>, PodmanError> {
        let dir = self.pod_dir(name);
        crate::store::private_dir(&dir).map_err(|e| PodmanError::Io {
            path: dir.display().to_string(),
            why: e.to_string(),
        })?;
        let marker = dir.join("rootless");
        if pod.rootless {
            std::fs::write(&marker, b"").map_err(io(&marker))?;
        } else {
            let _ = std::fs::remove_file(&marker);
        }
        match &pod.auth_file {
            None => Ok(None),
            Some(a) => {
                let p = dir.join("auth.json");
                write_private(&p, a.as_bytes(), podman.user.as_ref())?;
                Ok(Some(p))
            }
        }
    }

    /// The workload's running app containers, by the label the agent puts on each, with
    /// their host pids.
    fn running_containers(&self, podman: &Podman, name: &WorkloadName) -> Vec<(String, i32)> {
        let Ok(out) = podman.run(&[
            "ps",
            "--filter",
            &format!("label={}={name}", crate::workload::WORKLOAD_LABEL),
            "--format",
            "{{.Names}} {{.Pid}}",
        ]) else {
            return Vec::new();
        };
        out.stdout
            .lines()
            .filter_map(|l| {
                let (n, pid) = l.trim().split_once(' ')?;
                let pid: i32 = pid.trim().parse().ok().filter(|p| *p > 0)?;
                Some((n.to_string(), pid))
            })
            .collect()
    }

    /// Whether `pid` runs inside the workload cgroup or one of its descendants (podman's pod
    /// and container cgroups are children of the workload cgroup).
    pub fn in_subtree(&self, cgroup: &WorkloadCgroup, pid: i32) -> bool {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            return false;
        };
        let layout = &self.settings.layout;
        let Ok(rel) = cgroup_parent(cgroup, layout) else {
            return false;
        };
        let want = rel.display().to_string();
        text.lines().any(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
            let relevant = match layout {
                Layout::Unified { .. } => ctrls.is_empty(),
                _ => ctrls.split(',').any(|c| c == "memory"),
            };
            relevant && (path == want || path.starts_with(&format!("{want}/")))
        })
    }

    /// The workload cgroup's path in every hierarchy.
    fn everywhere(&self, cgroup: &WorkloadCgroup) -> Vec<PathBuf> {
        let Ok(rel) = cgroup_parent(cgroup, &self.settings.layout) else {
            return Vec::new();
        };
        let rel = rel.strip_prefix("/").unwrap_or(&rel).to_path_buf();
        all_hierarchies()
            .into_iter()
            .map(|m| m.join(&rel))
            .collect()
    }

    /// Removes every cgroup below the workload cgroup, in every hierarchy (podman leaves its
    /// pod cgroups behind, and a cgroup with children cannot be removed).
    fn prune_children(&self, cgroup: &WorkloadCgroup) -> Result<(), PodmanError> {
        for dir in self.everywhere(cgroup) {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.filter_map(Result::ok) {
                    if e.path().is_dir() {
                        remove_tree(&e.path())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// How a run's OOM kills are seen: in the workload's cgroup, or, for a rootless pod under
    /// systemd, in the pod's own cgroup in its user's tree (found from a container's pid).
    fn oom_watch(&self, podman: &Podman, cgroup: &WorkloadCgroup, pid: i32) -> OomWatch {
        if podman.is_rootless() && self.settings.systemd.is_some() {
            if let Some(events) = pod_memory_events(pid) {
                return OomWatch::of_file(events);
            }
        }
        OomWatch::start(cgroup)
    }

    fn remove_in_other_hierarchies(&self, cgroup: &WorkloadCgroup) {
        for dir in self.everywhere(cgroup) {
            if dir.is_dir() {
                if let Err(e) = remove_tree(&dir) {
                    tracing::warn!("removing {}: {e}", dir.display());
                }
            }
        }
    }
}

impl Driver for PodDriver {
    fn start(&self, run: &Run) -> Result<Started, DriverError> {
        self.sync_secrets(run.secrets)?;
        Ok(self.start_pod(run.spec, run.cgroup, run.log)?)
    }

    /// Stops the pod (podman's SIGTERM, `grace`, SIGKILL), then whatever is left in the cgroup.
    fn stop(&self, at: &Placement, grace: Duration) -> Result<(), DriverError> {
        let podman = self.podman_of(&at.name);
        let secs = grace.as_secs().max(1).to_string();
        if let Err(e) = podman.run(&["pod", "stop", "--ignore", "-t", &secs, at.name.as_str()]) {
            tracing::warn!(workload = %at.name, "podman pod stop: {e}");
        }
        // cgroupfs: what podman left in the workload's cgroup. Under systemd the slice has
        // no processes of its own: podman's scopes below it stopped with the pod.
        if self.settings.systemd.is_none() && at.cgroup.exists() {
            at.cgroup.stop_all(grace)?;
        }
        Ok(())
    }

    /// Removes the pod, its containers, the files the agent wrote for it and its cgroup
    /// subtree.
    fn cleanup(&self, at: &Placement) -> Result<(), DriverError> {
        let podman = self.podman_of(&at.name);
        remove_pods(&podman, &at.name);
        match &self.settings.systemd {
            Some(tree) => tree
                .remove(at.name.as_str(), self.settings.stop_timeout)
                .map_err(CgroupError::from)?,
            None => {
                self.prune_children(&at.cgroup)?;
                at.cgroup.remove()?;
                self.remove_in_other_hierarchies(&at.cgroup);
            }
        }
        let dir = self.pod_dir(&at.name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        Ok(())
    }

    /// The pod's app containers, if they all still run under the workload's cgroup; when
    /// one ends, its exit code and OOM kill come from podman and the cgroup counters.
    fn adopt(&self, at: &Placement, record: &WorkloadRecord) -> Option<Started> {
        let podman = self.podman_of(&at.name);
        let containers = self.running_containers(&podman, &at.name);
        let pids: Vec<(i32, u64)> = containers
            .iter()
            .filter_map(|(_, pid)| {
                let ticks = super::process::start_ticks(*pid)?;
                // A rootless pod under systemd lives in its user's systemd instance, not
                // below the workload's slice: its user's podman and the label vouch for it.
                let ours = (podman.is_rootless() && self.settings.systemd.is_some())
                    || self.in_subtree(&at.cgroup, *pid);
                ours.then_some((*pid, ticks))
            })
            .collect();
        if pids.is_empty() || pids.len() != containers.len() {
            return None;
        }
        let names: Vec<String> = containers.into_iter().map(|(n, _)| n).collect();
        let oom = self.oom_watch(&podman, &at.cgroup, pids[0].0);
        Some(Started {
            pid: Some(pids[0].0),
            start_ticks: pids[0].1,
            oom_kills_at_start: record.oom_kills_at_start,
            watch: Watch::Processes {
                pids,
                finish: Box::new(move |first| {
                    oom.finish()
                        .unwrap_or_else(|| exit_of(&podman, &names[first.min(names.len() - 1)]))
                }),
            },
            notice: None,
        })
    }
}

/// Host pid and start ticks of each container's main process.
fn container_pids(podman: &Podman, containers: &[String]) -> Result<Vec<(i32, u64)>, PodmanError> {
    containers
        .iter()
        .map(|c| {
            let out = podman.run(&["inspect", "--format", "{{.State.Pid}}", c])?;
            let pid: i32 = out.stdout.trim().parse().unwrap_or(0);
            Ok((pid, super::process::start_ticks(pid).unwrap_or(0)))
        })
        .collect()
}

/// The exit of a container that has ended, as podman recorded it (conmon writes the exit
/// code a moment after the process is gone: ask until podman says it exited).
fn exit_of(podman: &Podman, container: &str) -> RunEnd {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = podman
            .run(&[
                "inspect",
                "--format",
                "{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}",
                container,
            ])
            .ok();
        let fields: Vec<String> = answer
            .map(|o| o.stdout.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        if let [status, code, oom] = fields.as_slice() {
            if status == "exited" || status == "stopped" || Instant::now() >= deadline {
                return RunEnd {
                    code: code.parse().ok(),
                    signal: None,
                    oom_killed: oom == "true",
                };
            }
        } else if Instant::now() >= deadline {
            // Gone from podman altogether (removed meanwhile): ended, status unknown.
            return RunEnd::default();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Watches a pod's OOM kills while it runs. On cgroup v1 a kill is counted only in the
/// container's cgroup, which podman deletes right after the container exits: the kernel
/// signals an eventfd registered on every memory cgroup of the pod instead, and the count
/// waits in it (v2 counts descendants in the workload's own memory.events).
struct OomWatch {
    counted: OomCount,
    baseline: u64,
    signals: Vec<notify::EventSignal>,
}

/// Where a pod's OOM kills are counted.
enum OomCount {
    Cgroup(WorkloadCgroup),
    /// A cgroup v2 `memory.events` outside the agent's cgroups (a rootless pod's, under its
    /// user's systemd): read only.
    Events(PathBuf),
}

impl OomCount {
    fn read(&self) -> u64 {
        match self {
            OomCount::Cgroup(cg) => subtree_oom_kills(cg),
            OomCount::Events(f) => crate::cgroup::read_keyed(f, "oom_kill").unwrap_or(0),
        }
    }
}

impl OomWatch {
    /// A v2 pod's kills, counted in `events` (v2 counts descendants: no notification needed).
    fn of_file(events: PathBuf) -> OomWatch {
        let counted = OomCount::Events(events);
        OomWatch {
            baseline: counted.read(),
            counted,
            signals: Vec::new(),
        }
    }

    fn start(cgroup: &WorkloadCgroup) -> OomWatch {
        let signals = match cgroup {
            WorkloadCgroup::V1 { memory, .. } => memory_subtree(memory)
                .iter()
                .filter_map(|d| {
                    notify::oom(d)
                        .map_err(|e| tracing::warn!("no OOM notification: {e}"))
                        .ok()
                })
                .collect(),
            WorkloadCgroup::V2 { .. } => Vec::new(),
        };
        OomWatch {
            counted: OomCount::Cgroup(cgroup.clone()),
            baseline: subtree_oom_kills(cgroup),
            signals,
        }
    }

    /// How the run ended if a container was OOM-killed (the kernel's kill is a SIGKILL: exit
    /// 137, as podman would report it, without waiting for podman to write it); ends the
    /// watch.
    fn finish(self) -> Option<RunEnd> {
        let killed =
            self.signals.iter().any(|s| s.take() > 0) || self.counted.read() > self.baseline;
        killed.then_some(RunEnd {
            code: Some(137),
            signal: None,
            oom_killed: true,
        })
    }
}

/// A memory cgroup directory and every one below it.
fn memory_subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = std::fs::read_dir(&out[i]) {
            out.extend(
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        i += 1;
    }
    out
}

/// The `memory.events` of the pod slice a (rootless, systemd-managed) container's process is
/// in: `/proc/PID/cgroup` names `.../<x>-libpod_pod_<id>.slice/libpod-<id>.scope/...`. v2
/// counts its containers' OOM kills there, and it stays while the pod exists.
fn pod_memory_events(pid: i32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mut pod = PathBuf::from("/sys/fs/cgroup");
    for part in path.trim_start_matches('/').split('/') {
        // the path comes from the kernel, but no component may climb out of cgroupfs
        if part.is_empty() || part == "." || part == ".." {
            return None;
        }
        pod.push(part);
        if part.contains("libpod_pod_") && part.ends_with(".slice") {
            return Some(pod.join("memory.events"));
        }
    }
    None
}

/// The rootful path: play stopped under a staging name, clone under `parent` (the workload
/// cgroup's path for podman's cgroupfs manager, the workload's slice for its systemd one).
fn play_under(
    podman: &Podman,
    play: &mut Vec<String>,
    name: &str,
    manifest: &str,
    containers: &[String],
    parent: &str,
) -> Result<(), PodmanError> {
    let staging = staging_name(name);
    let staged = stage_manifest(manifest, name, &staging);
    play.push("--start=false".into());
    play.push("-".into());
    let args: Vec<&str> = play.iter().map(String::as_str).collect();
    podman.run_with(&args, Some(staged.as_bytes()), None, cli::PLAY_TIMEOUT)?;
    podman.run(&[
        "pod",
        "clone",
        "--destroy",
        &format!("--cgroup-parent={parent}"),
        "--name",
        name,
        &staging,
    ])?;
    for c in containers {
        podman.run(&[
            "rename",
            &format!("{staging}-{c}-clone"),
            &format!("{name}-{c}"),
        ])?;
    }
    podman.run(&["pod", "start", name])?;
    Ok(())
}

/// The manifest with the pod renamed (only the Pod document's `metadata.name`).
fn stage_manifest(manifest: &str, name: &str, staging: &str) -> String {
    let (pod, rest) = manifest.split_once("\n---\n").unwrap_or((manifest, ""));
    let pod = match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(pod) {
        Ok(mut v) => {
            if let Some(m) = v.get_mut("metadata").and_then(|m| m.as_mapping_mut()) {
                m.insert("name".into(), staging.into());
            }
            serde_yaml_ng::to_string(&v).unwrap_or_else(|_| pod.replacen(name, staging, 1))
        }
        Err(_) => pod.to_string(),
    };
    if rest.is_empty() {
        pod
    } else {
        format!("{}\n---\n{rest}", pod.trim_end())
    }
}

/// `--cgroup-parent` for the cgroupfs manager: the workload cgroup relative to the root of its
/// hierarchy.
fn cgroup_parent(cgroup: &WorkloadCgroup, layout: &Layout) -> Result<PathBuf, PodmanError> {
    let (path, root) = match (cgroup, layout) {
        (WorkloadCgroup::V1 { memory, .. }, Layout::Legacy(m) | Layout::Hybrid(m)) => {
            (memory, &m.memory)
        }
        (WorkloadCgroup::V2 { dir, .. }, Layout::Unified { root }) => (dir, root),
        _ => {
            return Err(PodmanError::Unexpected(
                "the workload cgroup does not match the host's cgroup layout".into(),
            ))
        }
    };
    let rel = path.strip_prefix(root).map_err(|_| {
        PodmanError::Unexpected(format!(
            "{} is not under {}",
            path.display(),
            root.display()
        ))
    })?;
    Ok(Path::new("/").join(rel))
}

/// OOM kills in the workload cgroup and every cgroup below it (memory controller). On cgroup
/// v2 `memory.events` already counts descendants; on v1 the kill is counted only in the
/// victim's own cgroup, i.e. the container's, so the subtree is summed.
pub fn subtree_oom_kills(cgroup: &WorkloadCgroup) -> u64 {
    fn walk(dir: &Path) -> u64 {
        let own = std::fs::read_to_string(dir.join("memory.oom_control"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .unwrap_or(0);
        let children: u64 = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.path().is_dir())
                    .map(|e| walk(&e.path()))
                    .sum()
            })
            .unwrap_or(0);
        own + children
    }
    match cgroup {
        WorkloadCgroup::V1 { memory, .. } => walk(memory),
        WorkloadCgroup::V2 { .. } => cgroup.oom_kills(),
    }
}

/// `podman kube down` of the workload's pods: the pod of that name and a staging leftover.
fn remove_pods(podman: &Podman, name: &WorkloadName) {
    let staging = staging_name(name.as_str());
    if let Err(e) = podman.run(&["pod", "rm", "--force", "--ignore", name.as_str(), &staging]) {
        tracing::warn!(workload = %name, "podman pod rm: {e}");
    }
}

/// Mount points of every cgroup hierarchy (podman's cgroupfs manager creates the pod's cgroup
/// in all of them, not only in the four the agent uses).
fn all_hierarchies() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = crate::mountinfo::parse(&text)
        .into_iter()
        .filter(|m| m.fstype == "cgroup" || m.fstype == "cgroup2")
        .map(|m| m.mount_point)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Depth first: kill what is left inside, then rmdir (EBUSY for a moment after the last task).
fn remove_tree(dir: &Path) -> Result<(), PodmanError> {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.filter_map(Result::ok) {
            if e.path().is_dir() {
                remove_tree(&e.path())?;
            }
        }
    }
    let procs = dir.join("cgroup.procs");
    let start = Instant::now();
    loop {
        let pids: Vec<i32> = std::fs::read_to_string(&procs)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        for p in &pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), Signal::SIGKILL);
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if start.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io(dir)(e)),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PodmanError + '_ {
    move |e| PodmanError::Io {
        path: path.display().to_string(),
        why: e.to_string(),
    }
}

/// Writes a file only its owner can read (registry credentials); owned by the rootless user
/// when podman runs as that user.
fn write_private(
    path: &Path,
    data: &[u8],
    owner: Option<&RootlessUser>,
) -> Result<(), PodmanError> {
    let owner = owner.map(|u| (u.uid.as_raw(), u.gid.as_raw()));
    if let (Some((uid, gid)), Some(parent)) = (owner, path.parent()) {
        let _ = std::os::unix::fs::chown(parent, Some(uid), Some(gid));
    }
    crate::store::write_atomic_owned(path, data, 0o600, owner).map_err(|e| PodmanError::Io {
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

/// A pod's containers log through podman; its `<name>.log` holds only the agent's lines about
/// its runs (started, ended), about 100 bytes each: a pod restarting every few minutes for
/// months must still not fill STATE_DIR.
const POD_LOG_MAX: u64 = crate::drivers::output::MIN_LOG_MAX;

fn append_log(path: &Path, line: &str) {
    crate::drivers::output::append_bounded(path, line, POD_LOG_MAX);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_renames_only_the_pod() {
        let m = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  labels:\n    app: web\nspec:\n  containers: []\n---\nkind: ConfigMap\nmetadata: {name: web}\n";
        let s = stage_manifest(m, "web", "web-dwng-staging");
        let (pod, cm) = s.split_once("\n---\n").unwrap();
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(pod).unwrap();
        assert_eq!(
            v["metadata"]["name"],
            serde_yaml_ng::Value::from("web-dwng-staging")
        );
        assert_eq!(
            v["metadata"]["labels"]["app"],
            serde_yaml_ng::Value::from("web")
        );
        assert!(cm.contains("name: web}"));
    }

    #[test]
    fn cgroup_parent_is_relative_to_the_hierarchy() {
        let m = crate::cgroup::V1Mounts {
            memory: "/sys/fs/cgroup/memory".into(),
            cpu: "/sys/fs/cgroup/cpu,cpuacct".into(),
            cpuacct: "/sys/fs/cgroup/cpu,cpuacct".into(),
            pids: "/sys/fs/cgroup/pids".into(),
        };
        let web = WorkloadName::parse("web").unwrap();
        let hybrid = Layout::Hybrid(m);
        let cg = crate::cgroup::Hierarchy::new(hybrid.clone(), "dwng", None).workload(&web);
        assert_eq!(
            cgroup_parent(&cg, &hybrid).unwrap(),
            PathBuf::from("/dwng/workloads/web")
        );
        let root = Layout::Unified {
            root: "/sys/fs/cgroup".into(),
        };
        let v2 = crate::cgroup::Hierarchy::new(
            root.clone(),
            "dwng",
            Some("/sys/fs/cgroup/system.slice/dwng.service".into()),
        )
        .workload(&web);
        assert_eq!(
            cgroup_parent(&v2, &root).unwrap(),
            PathBuf::from("/system.slice/dwng.service/workloads/web")
        );
    }
}

#[cfg(test)]
mod manifest_tests {
    #[test]
    fn rootless_v1_manifest_loses_only_the_container_resources() {
        let m = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n  - name: a\n    image: x\n    resources:\n      limits:\n        memory: 64Mi\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  resources: keep\n";
        let out = super::without_container_resources(m);
        let docs: Vec<serde_yaml_ng::Value> = out
            .split("\n---\n")
            .map(|d| serde_yaml_ng::from_str(d).unwrap())
            .collect();
        assert!(docs[0]["spec"]["containers"][0].get("resources").is_none());
        assert_eq!(docs[0]["spec"]["containers"][0]["image"], "x");
        assert_eq!(docs[1]["data"]["resources"], "keep");
    }
}
