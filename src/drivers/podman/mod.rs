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
//! cgroup's `oom_kill` counter rising. The waiter learns of exits and OOM kills from the kernel
//! (pidfds, v1 OOM eventfds): an OOM-killed container ends the run without waiting for
//! `podman wait`, which polls.

pub mod cli;
pub mod secrets;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

pub use cli::{Podman, RootlessUser};

use super::RunEnd;
use crate::cgroup::{CgroupError, Layout, WorkloadCgroup};
use crate::workload::WorkloadSpec;

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

/// Agent settings the driver needs (set once at start-up with [`configure`]).
#[derive(Debug, Clone)]
pub struct PodmanSettings {
    /// Per-workload files (registry auth file, rootless marker) go to `<state_dir>/pods/<name>`.
    pub state_dir: PathBuf,
    /// The unprivileged user `rootless: true` pods run as (`ROOTLESS_USER`).
    pub rootless_user: Option<String>,
    /// XDG_RUNTIME_DIR of that user; default `/run/user/<uid>`.
    pub xdg_runtime_dir: Option<PathBuf>,
}

impl Default for PodmanSettings {
    fn default() -> Self {
        PodmanSettings {
            state_dir: PathBuf::from("/var/lib/device-worker-ng"),
            rootless_user: None,
            xdg_runtime_dir: None,
        }
    }
}

static SETTINGS: OnceLock<PodmanSettings> = OnceLock::new();

/// Sets the driver's settings; the first call wins (the agent calls it once before any start).
pub fn configure(settings: PodmanSettings) {
    let _ = SETTINGS.set(settings);
}

fn settings() -> PodmanSettings {
    SETTINGS.get().cloned().unwrap_or_default()
}

/// A started pod.
pub struct Started {
    /// Host pid of the first app container's main process.
    pub pid: i32,
    pub start_ticks: u64,
    pub oom_kills_at_start: u64,
    pub waiter: Box<dyn FnOnce() -> RunEnd + Send>,
    /// Something the operator must know about this run (e.g. limits not enforced).
    pub notice: Option<String>,
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

/// The workload name of a workload cgroup (`.../workloads/<name>`).
pub fn workload_name(cgroup: &WorkloadCgroup) -> String {
    cgroup
        .display_path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn pod_dir(name: &str) -> PathBuf {
    settings().state_dir.join("pods").join(name)
}

/// The podman that holds (or will hold) a workload's pod.
fn podman_for(rootless: bool) -> Result<Podman, PodmanError> {
    if !rootless {
        return Ok(Podman::rootful());
    }
    let s = settings();
    let user = s.rootless_user.ok_or_else(|| {
        PodmanError::Rootless(
            "the workload asks for rootless podman, but ROOTLESS_USER is not configured".into(),
        )
    })?;
    Podman::rootless(RootlessUser::resolve(&user, s.xdg_runtime_dir)?)
}

/// The podman of an existing workload (its rootless marker, written at start).
fn podman_of(name: &str) -> Podman {
    if pod_dir(name).join("rootless").exists() {
        if let Ok(p) = podman_for(true) {
            return p;
        }
    }
    Podman::rootful()
}

/// Starts one run of a pod workload under `cgroup`.
pub fn start(
    spec: &WorkloadSpec,
    cgroup: &WorkloadCgroup,
    log_path: &Path,
) -> Result<Started, PodmanError> {
    let pod = spec.pod.as_ref().ok_or(PodmanError::NotPod)?;
    let name = spec.name.as_str();
    let podman = podman_for(pod.rootless)?;
    let t0 = Instant::now();

    // Whatever an earlier run or agent left behind goes first: a fresh pod each run.
    remove_pods(&podman, name);
    cgroup.create()?;
    prune_children(cgroup)?;
    cgroup.apply(&spec.limits)?;
    let oom_kills_at_start = cgroup.oom_kills();

    let dir = pod_dir(name);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let marker = dir.join("rootless");
    if pod.rootless {
        std::fs::write(&marker, b"").map_err(io(&marker))?;
    } else {
        let _ = std::fs::remove_file(&marker);
    }
    let auth = match &pod.auth_file {
        None => None,
        Some(a) => {
            let p = dir.join("auth.json");
            write_private(&p, a.as_bytes(), podman.user.as_ref())?;
            Some(p)
        }
    };
    let mut play: Vec<String> = vec!["kube".into(), "play".into(), "--quiet".into()];
    if let Some(p) = &auth {
        play.push(format!("--authfile={}", p.display()));
    }

    let layout = crate::cgroup::detect()?;
    let mut notice = None;
    let result = if podman.is_rootless() {
        let mut manifest = pod.manifest.clone();
        if !matches!(layout, Layout::Unified { .. }) {
            notice = Some(
                "rootless pod on cgroup v1: podman cannot enforce the containers' limits; only \
                 the pod's total (the agent's workload cgroup) is enforced"
                    .to_string(),
            );
            // runc refuses to start a rootless container with limits it cannot set on v1.
            manifest = without_container_resources(&manifest);
        }
        play.push("-".into());
        let args: Vec<&str> = play.iter().map(String::as_str).collect();
        podman
            .run_with(
                &args,
                Some(manifest.as_bytes()),
                Some(cgroup),
                cli::PLAY_TIMEOUT,
            )
            .map(|_| ())
    } else {
        play_under(
            &podman,
            &mut play,
            name,
            &pod.manifest,
            &pod.containers,
            cgroup,
            &layout,
        )
    };
    if let Err(e) = result {
        remove_pods(&podman, name);
        return Err(e);
    }
    let podman_took = t0.elapsed();

    let containers: Vec<String> = pod
        .containers
        .iter()
        .map(|c| format!("{name}-{c}"))
        .collect();
    let first = containers
        .first()
        .ok_or_else(|| PodmanError::Unexpected("pod without containers".into()))?;
    // The main process of every app container: the run ends when one of them exits.
    let mut inspect = vec!["inspect", "--format", "{{.State.Pid}}"];
    inspect.extend(containers.iter().map(String::as_str));
    let out = podman.run(&inspect)?;
    let mains: Vec<(i32, u64)> = out
        .stdout
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .filter(|p| *p > 0)
        .map(|p| (p, super::process::start_ticks(p).unwrap_or(0)))
        .collect();
    if mains.is_empty() {
        tracing::warn!(workload = %name, "podman reports no container process: {}", first);
    }
    let (pid, start_ticks) = mains.first().copied().unwrap_or((0, 0));
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
    let waiter_podman = podman.clone();
    let waiter_cgroup = cgroup.clone();
    let subtree_baseline = subtree_oom_kills(cgroup);
    Ok(Started {
        pid,
        start_ticks,
        oom_kills_at_start,
        waiter: Box::new(move || {
            wait_run(
                &waiter_podman,
                &containers,
                &mains,
                &waiter_cgroup,
                subtree_baseline,
            )
        }),
        notice,
    })
}

/// Waits for the end of a run: the first app container to exit. The exits come from the
/// kernel (a pidfd per container's main process), OOM kills too (on v1 an eventfd on each
/// memory cgroup of the pod: the kill is counted only in the container's own cgroup, which
/// podman deletes right after the container exits; on v2 the workload's `memory.events`
/// counts its whole subtree). An OOM-killed container ends the run at once; any other exit
/// waits for `podman wait`'s exit code.
fn wait_run(
    podman: &Podman,
    containers: &[String],
    mains: &[(i32, u64)],
    cgroup: &WorkloadCgroup,
    oom_baseline: u64,
) -> RunEnd {
    use crate::cgroup::notify;
    use smol::future::FutureExt;
    let codes = podman_waits(podman, containers);
    let oom_signals: Vec<notify::EventSignal> = match cgroup {
        WorkloadCgroup::V1 { memory, .. } => memory_subtree(memory)
            .iter()
            .filter_map(|d| notify::oom(d).ok())
            .collect(),
        WorkloadCgroup::V2 { .. } => Vec::new(),
    };
    let mut exits: Vec<super::process::ProcessExit> = mains
        .iter()
        .filter_map(|(p, t)| super::process::ProcessExit::watch(*p, *t))
        .collect();
    let mut oom_seen = false;
    let oom_now = |seen: bool| {
        seen || oom_signals.iter().any(|s| s.take() > 0) || subtree_oom_kills(cgroup) > oom_baseline
    };
    enum Wake {
        Code(Option<i32>),
        Oom,
        Exit,
    }
    smol::block_on(async {
        loop {
            let wake = async { Wake::Code(codes.recv().await.ok().flatten()) }
                .or(async {
                    first_of(oom_signals.iter().map(|s| s.next())).await;
                    Wake::Oom
                })
                .or(async {
                    first_of(exits.iter().map(|e| e.exited())).await;
                    Wake::Exit
                })
                .await;
            match wake {
                Wake::Code(code) => {
                    return RunEnd {
                        code,
                        signal: None,
                        oom_killed: oom_now(oom_seen),
                    }
                }
                // v1 announces the OOM before the kill: the exit follows.
                Wake::Oom => oom_seen = true,
                Wake::Exit => {
                    if oom_now(oom_seen) {
                        tracing::debug!(pod = %containers.join(","), "a container was OOM-killed: the run has ended");
                        return RunEnd {
                            code: Some(137),
                            signal: None,
                            oom_killed: true,
                        };
                    }
                    // An exit stays readable: from here on only podman's answer counts.
                    exits.clear();
                }
            }
        }
    })
}

/// Completes when any of `futures` does; never when there are none.
async fn first_of<F: std::future::Future>(futures: impl Iterator<Item = F>) {
    let mut futures: Vec<_> = futures.map(Box::pin).collect();
    smol::future::poll_fn(|cx| {
        for f in futures.iter_mut() {
            if f.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
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

/// The rootful path: play stopped under a staging name, clone under the workload cgroup.
fn play_under(
    podman: &Podman,
    play: &mut Vec<String>,
    name: &str,
    manifest: &str,
    containers: &[String],
    cgroup: &WorkloadCgroup,
    layout: &Layout,
) -> Result<(), PodmanError> {
    let staging = staging_name(name);
    let staged = stage_manifest(manifest, name, &staging);
    play.push("--start=false".into());
    play.push("-".into());
    let args: Vec<&str> = play.iter().map(String::as_str).collect();
    podman.run_with(&args, Some(staged.as_bytes()), None, cli::PLAY_TIMEOUT)?;
    let parent = cgroup_parent(cgroup, layout)?;
    podman.run(&[
        "pod",
        "clone",
        "--destroy",
        &format!("--cgroup-parent={}", parent.display()),
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
        (WorkloadCgroup::V2 { dir }, Layout::Unified { root }) => (dir, root),
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

/// `podman wait` for every app container, each on its own thread (it blocks until the
/// container exits): their exit codes arrive on the returned channel, in the order they exit.
fn podman_waits(podman: &Podman, containers: &[String]) -> async_channel::Receiver<Option<i32>> {
    let (tx, rx) = async_channel::bounded(containers.len().max(1));
    for c in containers {
        let (tx, failed, podman, c) = (tx.clone(), tx.clone(), podman.clone(), c.clone());
        let spawned = std::thread::Builder::new()
            .name("podman-wait".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                // `podman wait` has no deadline of its own: the container may run for months.
                let code = podman
                    .run_with(&["wait", &c], None, None, Duration::from_secs(u64::MAX / 4))
                    .ok()
                    .and_then(|o| o.stdout.trim().lines().last()?.trim().parse::<i32>().ok());
                let _ = tx.send_blocking(code);
            });
        if spawned.is_err() {
            let _ = failed.send_blocking(None);
        }
    }
    rx
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

/// Stops the pod (podman's SIGTERM, `grace`, SIGKILL), then whatever is left in the cgroup.
pub fn stop(cgroup: &WorkloadCgroup, grace: Duration) -> Result<(), PodmanError> {
    let name = workload_name(cgroup);
    let podman = podman_of(&name);
    let secs = grace.as_secs().max(1).to_string();
    if let Err(e) = podman.run(&["pod", "stop", "--ignore", "-t", &secs, &name]) {
        tracing::warn!(workload = %name, "podman pod stop: {e}");
    }
    if cgroup.exists() {
        cgroup.stop_all(grace)?;
    }
    Ok(())
}

/// Removes the pod, its containers, the files the agent wrote for it and its cgroup subtree.
pub fn cleanup(cgroup: &WorkloadCgroup) -> Result<(), PodmanError> {
    let name = workload_name(cgroup);
    let podman = podman_of(&name);
    remove_pods(&podman, &name);
    prune_children(cgroup)?;
    cgroup.remove()?;
    remove_in_other_hierarchies(cgroup);
    let dir = pod_dir(&name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    Ok(())
}

/// `podman kube down` of the workload's pods: the pod of that name and a staging leftover.
fn remove_pods(podman: &Podman, name: &str) {
    let staging = staging_name(name);
    if let Err(e) = podman.run(&["pod", "rm", "--force", "--ignore", name, &staging]) {
        tracing::warn!(workload = %name, "podman pod rm: {e}");
    }
}

/// Is a pod of this workload running (for adoption after an agent restart)? Found by the
/// label the agent puts on every container.
pub fn running_pid(name: &str) -> Option<i32> {
    let podman = podman_of(name);
    let out = podman
        .run(&[
            "ps",
            "--filter",
            &format!("label={}={name}", crate::workload::WORKLOAD_LABEL),
            "--format",
            "{{.Names}}",
        ])
        .ok()?;
    let first = out.stdout.lines().next()?.trim().to_string();
    let pid = podman
        .run(&["inspect", "--format", "{{.State.Pid}}", &first])
        .ok()?;
    pid.stdout.trim().parse().ok().filter(|p| *p > 0)
}

/// Whether `pid` runs inside the workload cgroup or one of its descendants (podman's pod and
/// container cgroups are children of the workload cgroup).
pub fn in_subtree(cgroup: &WorkloadCgroup, pid: i32) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    let Ok(layout) = crate::cgroup::detect() else {
        return false;
    };
    let Ok(rel) = cgroup_parent(cgroup, &layout) else {
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

/// Mount points of every cgroup hierarchy (podman's cgroupfs manager creates the pod's cgroup
/// in all of them, not only in the four the agent uses).
fn all_hierarchies() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The workload cgroup's path in every hierarchy.
fn everywhere(cgroup: &WorkloadCgroup) -> Vec<PathBuf> {
    let Ok(layout) = crate::cgroup::detect() else {
        return Vec::new();
    };
    let Ok(rel) = cgroup_parent(cgroup, &layout) else {
        return Vec::new();
    };
    let rel = rel.strip_prefix("/").unwrap_or(&rel).to_path_buf();
    all_hierarchies()
        .into_iter()
        .map(|m| m.join(&rel))
        .collect()
}

/// Removes every cgroup below the workload cgroup, in every hierarchy (podman leaves its pod
/// cgroups behind, and a cgroup with children cannot be removed).
fn prune_children(cgroup: &WorkloadCgroup) -> Result<(), PodmanError> {
    for dir in everywhere(cgroup) {
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

fn remove_in_other_hierarchies(cgroup: &WorkloadCgroup) {
    for dir in everywhere(cgroup) {
        if dir.is_dir() {
            if let Err(e) = remove_tree(&dir) {
                tracing::warn!("removing {}: {e}", dir.display());
            }
        }
    }
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
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    if let Some(u) = owner {
        nix::unistd::chown(&tmp, Some(u.uid), Some(u.gid)).map_err(|e| PodmanError::Io {
            path: tmp.display().to_string(),
            why: e.to_string(),
        })?;
        if let Some(parent) = path.parent() {
            let _ = nix::unistd::chown(parent, Some(u.uid), Some(u.gid));
        }
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn append_log(path: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
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
        let cg = WorkloadCgroup::V1 {
            memory: "/sys/fs/cgroup/memory/dwng/workloads/web".into(),
            cpu: "/sys/fs/cgroup/cpu,cpuacct/dwng/workloads/web".into(),
            cpuacct: "/sys/fs/cgroup/cpu,cpuacct/dwng/workloads/web".into(),
            pids: "/sys/fs/cgroup/pids/dwng/workloads/web".into(),
        };
        assert_eq!(
            cgroup_parent(&cg, &Layout::Hybrid(m)).unwrap(),
            PathBuf::from("/dwng/workloads/web")
        );
        assert_eq!(workload_name(&cg), "web");
        let v2 = WorkloadCgroup::V2 {
            dir: "/sys/fs/cgroup/system.slice/dwng.service/workloads/web".into(),
        };
        let root = Layout::Unified {
            root: "/sys/fs/cgroup".into(),
        };
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
