//! Everything the agent persists under STATE_DIR, written atomically (temp file, fsync,
//! rename, fsync of the directory) so a crash or a full disk never leaves a torn file.
//!
//! ```text
//! STATE_DIR/workloads/<name>.json   what runs where (cgroup, pid), for adoption after a restart
//! STATE_DIR/logs/<name>.log         stdout/stderr of shell workloads
//! STATE_DIR/desired.json            the last accepted desired state
//! STATE_DIR/outbox.json             events not yet acknowledged by the server
//! ```

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cgroup::WorkloadCgroup;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt record: {why}")]
    Corrupt { path: PathBuf, why: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically with the given mode.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
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
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// What the agent knows about a workload it started, enough to adopt it after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadRecord {
    pub name: String,
    pub kind: String,
    pub fingerprint: String,
    pub cgroup: WorkloadCgroup,
    pub pid: i32,
    /// Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22): guards against
    /// a recycled pid being adopted as ours.
    pub pid_start_ticks: u64,
    pub started_at_unix: u64,
    pub restarts: u32,
    pub oom_kills_at_start: u64,
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

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        for sub in ["workloads", "logs"] {
            let d = state_dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        Ok(Store {
            dir: state_dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join("workloads").join(format!("{name}.json"))
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    pub fn save_record(&self, r: &WorkloadRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(r).unwrap_or_default();
        write_atomic(&self.record_path(&r.name), &bytes, 0o600)
    }

    pub fn remove_record(&self, name: &str) -> Result<(), StoreError> {
        let p = self.record_path(name);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&p)(e)),
            _ => Ok(()),
        }
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

    pub fn load_desired(&self) -> Option<crate::workload::DesiredState> {
        let bytes = std::fs::read(self.desired_path()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn outbox_path(&self) -> PathBuf {
        self.dir.join("outbox.json")
    }

    /// The events not yet acknowledged by the server (a corrupt file starts a new outbox).
    pub fn load_outbox(&self) -> Outbox {
        std::fs::read(self.outbox_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save_outbox(&self, o: &Outbox) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(o).unwrap_or_default();
        write_atomic(&self.outbox_path(), &bytes, 0o600)
    }

    /// Every record; a corrupt one is reported (and skipped by the caller), never fatal.
    pub fn load_records(&self) -> Vec<Result<WorkloadRecord, StoreError>> {
        let dir = self.dir.join("workloads");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut paths: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        paths.sort();
        paths
            .into_iter()
            .map(|p| {
                let bytes = std::fs::read(&p).map_err(io(&p))?;
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                    path: p.clone(),
                    why: e.to_string(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn record(name: &str) -> WorkloadRecord {
        WorkloadRecord {
            name: name.into(),
            kind: "shell".into(),
            fingerprint: "f".into(),
            cgroup: WorkloadCgroup::V2 {
                dir: "/sys/fs/cgroup/x".into(),
            },
            pid: 42,
            pid_start_ticks: 7,
            started_at_unix: 1,
            restarts: 0,
            oom_kills_at_start: 0,
        }
    }

    #[test]
    fn records_round_trip_and_corruption_is_reported() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        s.save_record(&record("a")).unwrap();
        s.save_record(&record("b")).unwrap();
        std::fs::write(t.path().join("workloads/c.json"), b"{torn").unwrap();
        let loaded = s.load_records();
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
        s.remove_record("a").unwrap();
        s.remove_record("a").unwrap();
        assert_eq!(s.load_records().len(), 2);
    }

    #[test]
    fn outbox_survives_a_restart_and_acknowledges_by_id() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let mut o = s.load_outbox();
        o.push(true, "Failed".into(), "a".into(), 1);
        o.push(false, "Started".into(), "b".into(), 2);
        s.save_outbox(&o).unwrap();
        let mut o = Store::open(t.path()).unwrap().load_outbox();
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
        std::fs::write(t.path().join("outbox.json"), b"{garbage").unwrap();
        assert_eq!(s.load_outbox(), Outbox::default());
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
