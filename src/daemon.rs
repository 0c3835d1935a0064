//! `device-worker-ng run`: wires the sources, the drivers, the controller and the control
//! socket together.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::cgroup::systemd::{self, SliceTree, Systemd};
use crate::cgroup::{self, Hierarchy};
use crate::config::{CgroupDriverChoice, Inputs, Settings};
use crate::controller::effects::RealEffects;
use crate::controller::session::SessionPart;
use crate::controller::{sources, Controller, Event, Parts, EVENT_CAPACITY};
use crate::drivers::{DriverSettings, Drivers};
use crate::status::socket;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A configuration problem found at start-up (exit 78, like the settings' own errors).
    #[error("configuration error: {0}")]
    Config(String),
    #[error("cgroups: {0}")]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("{0}")]
    Socket(#[from] socket::SocketError),
    #[error("state directory: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("signals: {0}")]
    Signals(std::io::Error),
    #[error("{0}")]
    Systemd(String),
}

/// Detects the cgroup layout, picks the cgroup driver and prepares where workloads go.
///
/// systemd driver: a slice (SYSTEMD_SLICE) that systemd creates and limits, one unit per
/// workload in it; nothing of the agent's own in the cgroup tree, and the agent's service
/// needs no delegation. `auto` picks it when systemd is PID 1 and answers on D-Bus.
///
/// cgroupfs driver: on cgroup v2 the workloads live in a top-level subtree
/// (`/sys/fs/cgroup/<CGROUP_ROOT>`), not inside the agent's own (systemd service) cgroup:
/// once a cgroup enables controllers for its children it may hold no processes itself, and
/// systemd (before 254's `DelegateSubgroup=`) must put a restarted agent's main process right
/// there, so a restart with surviving workloads would fail with EBUSY. Outside the unit,
/// `systemctl restart` and package upgrades leave the workloads alone and the new agent
/// adopts them.
pub fn hierarchy(settings: &Settings) -> Result<Hierarchy, DaemonError> {
    let layout = cgroup::detect()?;
    let cgroupfs = Hierarchy::new(layout.clone(), &settings.cgroup_root, None);
    let h = match systemd_driver(settings, &layout)? {
        Some(tree) => {
            // The cgroupfs driver's workloads (an agent before this one, or CGROUP_DRIVER
            // changed): nothing would ever stop them. They start again as units.
            if cgroupfs.base_display().exists() {
                warn!(
                    subtree = %cgroupfs.base_display().display(),
                    "stopping the cgroupfs driver's workloads: they start again as units of {}",
                    tree.slice
                );
                if let Err(e) = cgroupfs.remove_all() {
                    error!("removing the cgroupfs driver's subtree: {e}");
                }
            }
            Hierarchy::under_systemd(tree)
        }
        None => cgroupfs,
    };
    h.setup()?;
    Ok(h)
}

/// The systemd driver's slices, when CGROUP_DRIVER picks systemd.
fn systemd_driver(
    settings: &Settings,
    layout: &cgroup::Layout,
) -> Result<Option<SliceTree>, DaemonError> {
    let open = || {
        let sd = Systemd::connect()?;
        let version = sd.version()?;
        info!(systemd = %version, slice = %settings.systemd_slice, "systemd cgroup driver");
        SliceTree::new(layout.clone(), &settings.systemd_slice, sd)
    };
    match settings.cgroup_driver {
        CgroupDriverChoice::Cgroupfs => Ok(None),
        CgroupDriverChoice::Systemd => open().map(Some).map_err(|e| {
            DaemonError::Config(format!(
                "CGROUP_DRIVER is systemd, but systemd does not answer on D-Bus: {e}"
            ))
        }),
        CgroupDriverChoice::Auto if !systemd::booted() => Ok(None),
        CgroupDriverChoice::Auto => {
            match open() {
                Ok(tree) => Ok(Some(tree)),
                // Units of an earlier run exist: falling back would start their workloads a
                // second time. Fail instead (not as a configuration error: systemd restarts the
                // agent, and the bus is usually back by then).
                Err(e) if slice_exists(settings, layout) => Err(DaemonError::Systemd(format!(
                "systemd does not answer on D-Bus ({e}), and {} holds workloads of an earlier run",
                settings.systemd_slice
            ))),
                Err(e) => {
                    warn!("systemd is PID 1 but does not answer on D-Bus ({e}): cgroupfs cgroup driver");
                    Ok(None)
                }
            }
        }
    }
}

/// Whether the agent's slice has a cgroup (systemd made it for an earlier run).
fn slice_exists(settings: &Settings, layout: &cgroup::Layout) -> bool {
    cgroup::systemd::slice_cgroup(layout, &settings.systemd_slice)
        .is_ok_and(|cg| cg.display_path().exists())
}

pub fn run(settings: Settings, inputs: Inputs) -> Result<(), DaemonError> {
    crate::heap::tune();
    let store = Store::open(&settings.state_dir)?;
    // The identity first: one that can never work stops the agent before it touches cgroups.
    let session = match &settings.server {
        Some(url) => {
            let s = SessionPart::open(&settings, url, &store)
                .map_err(|e| DaemonError::Config(e.to_string()))?;
            info!(server = %url, device = %s.device_id, "talking to the Flotta edge API");
            Some(s)
        }
        None => None,
    };
    let hierarchy = hierarchy(&settings)?;
    info!(
        layout = hierarchy.layout.name(),
        driver = hierarchy.driver_name(),
        base = %hierarchy.base_display().display(),
        "cgroup hierarchy ready"
    );
    let drivers = Arc::new(Drivers::new(&DriverSettings {
        state_dir: settings.state_dir.clone(),
        layout: hierarchy.layout.clone(),
        systemd: hierarchy.slice_tree().cloned(),
        stop_timeout: settings.stop_timeout,
        rootless_user: settings.rootless_user.clone(),
        xdg_runtime_dir: settings.xdg_runtime_dir.clone(),
        kubeconfig: settings.kubeconfig.clone(),
        log_max: settings.workload_log_max,
    }));
    let expected = {
        let h = hierarchy.clone();
        move |n: &crate::workload::WorkloadName| {
            serde_json::to_value(h.workload(n)).unwrap_or_default()
        }
    };
    let records = store.load_records(expected);
    let listener = socket::bind(&settings.control_socket)?;
    let (tx, rx) = async_channel::bounded(EVENT_CAPACITY);
    sources::signals(tx.clone()).map_err(DaemonError::Signals)?;
    let sampler = crate::sampler::spawn(
        tx.clone(),
        crate::sampler::SamplerConfig {
            state_dir: settings.state_dir.clone(),
            variables_file: settings.variables_file.clone(),
            variables_ttl: settings.variables_ttl,
            parent_memory_file: Some(hierarchy.workloads_parent().memory_usage_file()),
        },
    )
    .map_err(|e| error!("cannot start the sampler thread: {e}; no usage figures"))
    .ok();
    let socket_path = settings.control_socket.clone();
    let desired_path = settings.desired_state.clone();
    let fx = RealEffects::new(
        tx.clone(),
        drivers,
        store.clone(),
        hierarchy.clone(),
        sampler,
    );
    let mut controller = Controller::new(
        Parts {
            settings,
            inputs,
            hierarchy,
            store,
            session,
        },
        fx,
    );
    smol::block_on(async move {
        let server = smol::spawn(serve(listener, tx.clone()));
        if let Some(p) = &desired_path {
            sources::watch_file(tx.clone(), p);
        }
        controller.boot(records);
        let (state, reason) = controller.device_state();
        crate::notify::notify(&format!("READY=1\nSTATUS={state}: {reason}"));
        info!("agent ready");
        controller.run(rx, tx).await;
        drop(server);
    });
    let _ = std::fs::remove_file(&socket_path);
    Ok(())
}

async fn serve(listener: smol::net::unix::UnixListener, tx: async_channel::Sender<Event>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                smol::spawn(answer(stream, tx.clone())).detach();
            }
            Err(e) => {
                error!("control socket: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: smol::net::unix::UnixStream, tx: async_channel::Sender<Event>) {
    use smol::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 64];
    let read = smol::future::or(async { stream.read(&mut buf).await.ok() }, async {
        smol::Timer::after(Duration::from_secs(5)).await;
        None
    })
    .await;
    let Some(n) = read else { return };
    let request = String::from_utf8_lossy(&buf[..n]);
    match request.trim() {
        "status" => {
            let (reply_tx, reply_rx) = async_channel::bounded(1);
            if tx.send(Event::Status(reply_tx)).await.is_err() {
                return;
            }
            let Ok(snap) = reply_rx.recv().await else {
                return;
            };
            match serde_json::to_vec(&snap) {
                Ok(mut bytes) => {
                    bytes.push(b'\n');
                    let _ = stream.write_all(&bytes).await;
                }
                Err(e) => warn!("status: {e}"),
            }
        }
        "reset" => {
            let (reply_tx, reply_rx) = async_channel::bounded(1);
            if tx.send(Event::Reset(reply_tx)).await.is_err() {
                return;
            }
            let answer = reply_rx.recv().await.unwrap_or_default();
            let body = serde_json::json!({ "reset": answer });
            let _ = stream.write_all(format!("{body}\n").as_bytes()).await;
        }
        _ => {
            let _ = stream.write_all(b"{\"error\":\"unknown request\"}\n").await;
        }
    }
}
