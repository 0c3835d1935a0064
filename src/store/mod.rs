//! Everything the agent persists under STATE_DIR, written atomically (temp file, fsync,
//! rename, fsync of the directory) so a crash or a full disk never leaves a torn file.
//!
//! ```text
//! STATE_DIR/workloads/<name>.json   what runs where (pid, uid), for adoption after a restart
//! STATE_DIR/logs/<name>.log[.1]     stdout/stderr of shell workloads (capped, one rotation;
//!                                   deleted with the workload)
//! STATE_DIR/desired.json            the last accepted desired state
//! STATE_DIR/applied.json            the server configuration applied last (version, fingerprint)
//! STATE_DIR/outbox.json             events not yet acknowledged by the server
//! STATE_DIR/disconnected            the server disconnected the device (until a reset)
//! ```
//!
//! Everything read back is untrusted (anything with root on the device, or a bug of an earlier
//! version, may have written it): a file is found only by a path built from a validated
//! [`WorkloadName`], a record whose content claims another name or another cgroup is ignored
//! with a warning naming it, and a corrupt file is moved aside as `*.corrupt` and logged.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::workload::{WorkloadKind, WorkloadName};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
}

impl StoreError {
    /// A problem of the file system (full, read-only), not of one file.
    pub fn is_storage(&self) -> bool {
        matches!(self, StoreError::Io { .. })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically with the given mode.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
    write_atomic_owned(path, bytes, mode, None)
}

/// [`write_atomic`], the file owned by `owner` (uid, gid) before it appears under its name.
pub fn write_atomic_owned(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), StoreError> {
    replace(path, bytes, mode, owner, true)
}

/// [`write_atomic`] without waiting for the disk: for a file rewritten every few seconds and
/// worthless after a power cut (the metrics), where a sync each time would only wear the
/// device's flash. Readers still never see a half-written file.
pub fn write_atomic_unsynced(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
    replace(path, bytes, mode, None, false)
}

fn replace(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
    sync: bool,
) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        if sync {
            f.sync_all().map_err(io(&tmp))?;
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, path).map_err(io(path))?;
        if sync {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates `dir` (and its parents) and makes it private to root: workload names, records,
/// logs and the identity are nobody else's business.
pub fn private_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let mode = std::fs::metadata(dir)
        .map_err(io(dir))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    Ok(())
}

/// What the agent knows about a workload it started, enough to adopt it after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadRecord {
    pub name: WorkloadName,
    pub kind: WorkloadKind,
    pub fingerprint: String,
    /// The main process; none for a run without a local process (k8s).
    pub pid: Option<i32>,
    /// Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22): guards against
    /// a recycled pid being adopted as ours.
    pub pid_start_ticks: u64,
    pub started_at_unix: u64,
    pub restarts: u32,
    pub oom_kills_at_start: u64,
    /// The uid the workload's processes run as (allocated from WORKLOAD_UID_RANGE).
    #[serde(default)]
    pub uid: Option<u32>,
    /// The run's restart policy: a run adopted before the desired state is read again may
    /// turn out to have ended meanwhile (systemd knows), and must not be restarted against
    /// its policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<crate::workload::RestartPolicy>,
    /// Where the workload's cgroup was, for people reading the file; checked on load, never
    /// used to find the cgroup (that comes from the name alone).
    #[serde(default)]
    pub cgroup: Option<serde_json::Value>,
}

/// An event for the server, kept until a heartbeat carrying it was acknowledged with 200.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEvent {
    pub id: u64,
    pub warn: bool,
    pub reason: String,
    pub message: String,
    pub at_unix: u64,
}

/// The durable outbox (STATE_DIR/outbox.json).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outbox {
    pub next_id: u64,
    pub events: Vec<OutboxEvent>,
    /// Events dropped because the outbox was full (oldest first).
    pub dropped: u64,
}

/// Most events kept while the server is unreachable.
pub const OUTBOX_CAPACITY: usize = 1000;

impl Outbox {
    pub fn push(&mut self, warn: bool, reason: String, message: String, at_unix: u64) {
        if self.events.len() >= OUTBOX_CAPACITY {
            self.events.remove(0);
            self.dropped += 1;
        }
        self.next_id += 1;
        self.events.push(OutboxEvent {
            id: self.next_id,
            warn,
            reason,
            message,
            at_unix,
        });
    }

    /// Forgets the events a heartbeat delivered.
    pub fn acknowledge(&mut self, up_to_id: u64) {
        self.events.retain(|e| e.id > up_to_id);
    }
}

/// The server configuration applied last (PROTOCOL §4.5: a new `version` alone is no change).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub version: String,
    /// Fingerprint of the configuration minus `version`.
    pub fingerprint: String,
}

/// The server's `disconnect`, remembered until an operator resets the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disconnected {
    pub at_unix: u64,
}

/// What a file under STATE_DIR held when read back.
#[derive(Debug)]
pub enum Loaded<T> {
    Missing,
    Ok(T),
    /// Unreadable or corrupt: moved aside (to the path given, if that worked) and logged.
    Corrupt {
        why: String,
        kept: Option<PathBuf>,
    },
}

impl<T> Loaded<T> {
    pub fn ok(self) -> Option<T> {
        match self {
            Loaded::Ok(t) => Some(t),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        private_dir(state_dir)?;
        for sub in ["workloads", "logs"] {
            private_dir(&state_dir.join(sub))?;
        }
        Ok(Store {
            dir: state_dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn record_path(&self, name: &WorkloadName) -> PathBuf {
        self.dir.join("workloads").join(format!("{name}.json"))
    }

    pub fn log_path(&self, name: &WorkloadName) -> PathBuf {
        log_path(&self.dir, name)
    }

    /// Deletes a workload's output (its log and the rotated one).
    pub fn remove_logs(&self, name: &WorkloadName) -> Result<(), StoreError> {
        let log = self.log_path(name);
        for p in [crate::drivers::output::rotated(&log), log] {
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&p)(e)),
                _ => {}
            }
        }
        Ok(())
    }

    pub fn save_record(&self, r: &WorkloadRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(r).unwrap_or_default();
        write_atomic(&self.record_path(&r.name), &bytes, 0o600)
    }

    pub fn remove_record(&self, name: &WorkloadName) -> Result<(), StoreError> {
        let p = self.record_path(name);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&p)(e)),
            _ => Ok(()),
        }
    }

    /// Every record. Only files named `<valid name>.json` are read; a record is refused
    /// (and reported, never acted on) when it is corrupt, names another workload than its
    /// file, or claims a cgroup other than `expected_cgroup(name)`.
    pub fn load_records(
        &self,
        expected_cgroup: impl Fn(&WorkloadName) -> serde_json::Value,
    ) -> Vec<Result<WorkloadRecord, StoreError>> {
        let dir = self.dir.join("workloads");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut paths: Vec<(PathBuf, Result<WorkloadName, String>)> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let file = e.file_name().to_string_lossy().into_owned();
                let stem = file.strip_suffix(".json")?.to_string();
                Some((
                    e.path(),
                    WorkloadName::parse(&stem).map_err(|e| e.to_string()),
                ))
            })
            .collect();
        paths.sort_by(|a, b| a.0.cmp(&b.0));
        paths
            .into_iter()
            .map(|(p, name)| {
                let corrupt = |why: String| StoreError::Corrupt {
                    path: p.clone(),
                    why,
                };
                let name = name.map_err(corrupt)?;
                let bytes = read_capped(&p, MAX_RECORD_BYTES)?;
                let r: WorkloadRecord =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                if r.name != name {
                    return Err(corrupt(format!(
                        "it names workload '{}', not '{name}'",
                        r.name
                    )));
                }
                if let Some(c) = &r.cgroup {
                    if *c != expected_cgroup(&name) {
                        return Err(corrupt(format!(
                            "it claims cgroup {}, which is not the workload's own",
                            crate::workload::name::shown(&c.to_string())
                        )));
                    }
                }
                Ok(r)
            })
            .collect()
    }

    fn desired_path(&self) -> PathBuf {
        self.dir.join("desired.json")
    }

    /// Persists the last accepted desired state (a restart while offline resumes from it).
    pub fn save_desired(&self, d: &crate::workload::DesiredState) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(d).unwrap_or_default();
        if std::fs::read(self.desired_path()).is_ok_and(|old| old == bytes) {
            return Ok(());
        }
        write_atomic(&self.desired_path(), &bytes, 0o600)
    }

    pub fn load_desired(&self) -> Loaded<crate::workload::DesiredState> {
        self.load_json(&self.desired_path(), MAX_DESIRED_JSON_BYTES)
    }

    fn outbox_path(&self) -> PathBuf {
        self.dir.join("outbox.json")
    }

    /// The events not yet acknowledged by the server.
    pub fn load_outbox(&self) -> Loaded<Outbox> {
        self.load_json(&self.outbox_path(), MAX_DESIRED_JSON_BYTES)
    }

    pub fn save_outbox(&self, o: &Outbox) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(o).unwrap_or_default();
        write_atomic(&self.outbox_path(), &bytes, 0o600)
    }

    pub fn load_applied(&self) -> Loaded<Applied> {
        self.load_json(&self.dir.join("applied.json"), MAX_RECORD_BYTES)
    }

    pub fn save_applied(&self, a: &Applied) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(a).unwrap_or_default();
        write_atomic(&self.dir.join("applied.json"), &bytes, 0o600)
    }

    pub fn load_disconnected(&self) -> Loaded<Disconnected> {
        self.load_json(&self.dir.join("disconnected"), MAX_RECORD_BYTES)
    }

    pub fn save_disconnected(&self, d: &Disconnected) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(d).unwrap_or_default();
        write_atomic(&self.dir.join("disconnected"), &bytes, 0o600)
    }

    /// Forgets what ties the device to the server (an operator's reset): the disconnect,
    /// the desired state, the applied configuration, the outbox.
    pub fn forget_server_state(&self) -> Result<(), StoreError> {
        for f in SERVER_STATE_FILES {
            let p = self.dir.join(f);
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&p)(e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// Reads a JSON file; a corrupt one is moved aside as `<file>.corrupt` and reported.
    fn load_json<T: serde::de::DeserializeOwned>(&self, path: &Path, cap: u64) -> Loaded<T> {
        let bytes = match read_capped(path, cap) {
            Ok(b) => b,
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Loaded::Missing
            }
            Err(e) => return set_aside(path, e.to_string()),
        };
        match serde_json::from_slice(&bytes) {
            Ok(t) => Loaded::Ok(t),
            Err(e) => set_aside(path, e.to_string()),
        }
    }
}

/// What ties the device to the server, under STATE_DIR (a reset forgets them).
pub const SERVER_STATE_FILES: [&str; 4] = [
    "disconnected",
    "desired.json",
    "applied.json",
    "outbox.json",
];

/// The log of a workload's output under `state_dir` (for readers without a [`Store`]).
pub fn log_path(state_dir: &Path, name: &WorkloadName) -> PathBuf {
    state_dir.join("logs").join(format!("{name}.log"))
}

/// Largest record read back (a record is a few hundred bytes).
const MAX_RECORD_BYTES: u64 = 64 << 10;
/// Largest desired.json / outbox.json read back.
const MAX_DESIRED_JSON_BYTES: u64 = 16 << 20;

/// Reads at most `cap` bytes of a regular file (a FIFO or device there is refused).
fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, StoreError> {
    use std::io::Read;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(io(path))?;
    let meta = f.metadata().map_err(io(path))?;
    if !meta.is_file() {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            why: "not a regular file".into(),
        });
    }
    let mut bytes = Vec::new();
    f.take(cap + 1).read_to_end(&mut bytes).map_err(io(path))?;
    if bytes.len() as u64 > cap {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            why: format!("larger than {cap} bytes"),
        });
    }
    Ok(bytes)
}

/// Moves a corrupt file aside (`<file>.corrupt`) so the next start does not trip over it and
/// someone can look at it; says so in the log.
fn set_aside<T>(path: &Path, why: String) -> Loaded<T> {
    let aside = PathBuf::from(format!("{}.corrupt", path.display()));
    let kept = match std::fs::rename(path, &aside) {
        Ok(()) => Some(aside),
        Err(_) => None,
    };
    match &kept {
        Some(a) => tracing::error!(
            "{}: corrupt ({why}); kept aside as {}",
            path.display(),
            a.display()
        ),
        None => tracing::error!("{}: corrupt ({why})", path.display()),
    }
    Loaded::Corrupt { why, kept }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn an_unsynced_write_replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.prom");
        write_atomic_unsynced(&p, b"a 1\n", 0o644).unwrap();
        write_atomic_unsynced(&p, b"b 2\n", 0o644).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"b 2\n");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    fn name(s: &str) -> WorkloadName {
        WorkloadName::parse(s).unwrap()
    }

    fn record(n: &str) -> WorkloadRecord {
        WorkloadRecord {
            restart: None,
            name: name(n),
            kind: WorkloadKind::Shell,
            fingerprint: "f".into(),
            pid: Some(42),
            pid_start_ticks: 7,
            started_at_unix: 1,
            restarts: 0,
            oom_kills_at_start: 0,
            uid: Some(524288),
            cgroup: Some(serde_json::json!({"version": "v2", "dir": format!("/cg/{n}")})),
        }
    }

    fn expected(n: &WorkloadName) -> serde_json::Value {
        serde_json::json!({"version": "v2", "dir": format!("/cg/{n}")})
    }

    #[test]
    fn records_round_trip_and_corruption_is_reported() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        s.save_record(&record("a")).unwrap();
        s.save_record(&record("b")).unwrap();
        std::fs::write(t.path().join("workloads/c.json"), b"{torn").unwrap();
        let loaded = s.load_records(expected);
        assert_eq!(loaded.len(), 3);
        assert_eq!(loaded[0].as_ref().unwrap(), &record("a"));
        assert!(loaded[2]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("c.json"));
        let mode = std::fs::metadata(t.path().join("workloads/a.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        s.remove_record(&name("a")).unwrap();
        s.remove_record(&name("a")).unwrap();
        assert_eq!(s.load_records(expected).len(), 2);
    }

    #[test]
    fn records_that_claim_anything_else_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let dir = t.path().join("workloads");
        // Another cgroup than the workload's own (e.g. the cgroup root's).
        let mut outside = record("x");
        outside.cgroup = Some(serde_json::json!({"version": "v2", "dir": "/cg"}));
        std::fs::write(dir.join("x.json"), serde_json::to_vec(&outside).unwrap()).unwrap();
        // A record naming another workload than its file.
        std::fs::write(
            dir.join("y.json"),
            serde_json::to_vec(&record("z")).unwrap(),
        )
        .unwrap();
        // A traversal name inside, and a file whose name is no workload name.
        let mut evil = serde_json::to_value(record("w")).unwrap();
        evil["name"] = "../../victim".into();
        std::fs::write(dir.join("w.json"), serde_json::to_vec(&evil).unwrap()).unwrap();
        std::fs::write(
            dir.join("Bad..json"),
            serde_json::to_vec(&record("a")).unwrap(),
        )
        .unwrap();
        let loaded = s.load_records(expected);
        assert_eq!(loaded.len(), 4, "{loaded:?}");
        let errors: Vec<String> = loaded
            .iter()
            .map(|r| r.as_ref().unwrap_err().to_string())
            .collect();
        assert!(
            errors.iter().any(|e| e.contains("claims cgroup")),
            "{errors:?}"
        );
        assert!(
            errors.iter().any(|e| e.contains("names workload 'z'")),
            "{errors:?}"
        );
        assert!(errors.iter().any(|e| e.contains("w.json")), "{errors:?}");
        assert!(
            errors.iter().any(|e| e.contains("not a workload name")),
            "{errors:?}"
        );
    }

    #[test]
    fn outbox_survives_a_restart_and_acknowledges_by_id() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let mut o = Outbox::default();
        o.push(true, "Failed".into(), "a".into(), 1);
        o.push(false, "Started".into(), "b".into(), 2);
        s.save_outbox(&o).unwrap();
        let mut o = Store::open(t.path()).unwrap().load_outbox().ok().unwrap();
        assert_eq!(o.events.len(), 2);
        o.acknowledge(1);
        assert_eq!(o.events[0].message, "b");
        o.push(false, "x".into(), "c".into(), 3);
        assert_eq!(o.events[1].id, 3, "ids keep growing");
        for i in 0..OUTBOX_CAPACITY {
            o.push(false, "x".into(), i.to_string(), 4);
        }
        assert_eq!(o.events.len(), OUTBOX_CAPACITY);
        assert_eq!(o.dropped, 2);
    }

    #[test]
    fn corrupt_files_are_kept_aside_and_special_files_never_read() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        std::fs::write(t.path().join("outbox.json"), b"{garbage").unwrap();
        match s.load_outbox() {
            Loaded::Corrupt { kept: Some(k), .. } => {
                assert_eq!(k, t.path().join("outbox.json.corrupt"));
                assert_eq!(std::fs::read(k).unwrap(), b"{garbage");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(s.load_outbox(), Loaded::Missing));
        std::fs::write(t.path().join("desired.json"), b"[1").unwrap();
        assert!(matches!(s.load_desired(), Loaded::Corrupt { .. }));
        assert!(t.path().join("desired.json.corrupt").exists());
        nix::unistd::mkfifo(
            &t.path().join("desired.json"),
            nix::sys::stat::Mode::S_IRWXU,
        )
        .unwrap();
        assert!(matches!(s.load_desired(), Loaded::Corrupt { why, .. } if why.contains("regular")));
    }

    #[test]
    fn the_state_dir_is_private() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("state");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        Store::open(&d).unwrap();
        for sub in ["", "workloads", "logs"] {
            let mode = std::fs::metadata(d.join(sub)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{sub}");
        }
    }

    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temp() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        write_atomic(&p, b"first version", 0o644).unwrap();
        write_atomic(&p, b"2", 0o644).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"2");
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
        let e = write_atomic(&t.path().join("missing/f"), b"x", 0o644).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
