//! What the agent reports: events into the log and, with a server, the durable heartbeat
//! outbox; and the storage problem (STATE_DIR cannot be written: disk full, read-only), which
//! clears on the next successful write, after which every file whose write failed is written
//! again, as it is by then. While it fails, the failed writes are tried again now and then.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::effects::{Write, Written, FORGET_SERVER_STATE};
use super::workloads::Workloads;
use super::{unix_now, Ctx, Internal};
use crate::machines::device::ProblemKey;
use crate::store::{Loaded, Outbox, Store};
use crate::workload::WorkloadName;

/// How often failed writes are tried again while STATE_DIR cannot be written.
const STORAGE_RETRY: Duration = Duration::from_secs(10);

pub struct Reports {
    pub outbox: Outbox,
    /// With a server, events go into the outbox for the heartbeats.
    server: bool,
    /// Workloads whose record on disk may be stale: its last write (or removal) failed.
    stale_records: BTreeSet<WorkloadName>,
    /// The other files of STATE_DIR whose last write failed, by file, with that write.
    failed_files: BTreeMap<&'static str, Write>,
    storage_failing: bool,
    last_retry: Option<Instant>,
}

impl Reports {
    pub fn new(store: &Store, server: bool) -> Reports {
        let outbox = if server {
            match store.load_outbox() {
                Loaded::Ok(o) => o,
                Loaded::Missing => Outbox::default(),
                Loaded::Corrupt { why, kept } => {
                    error!(
                        "the outbox was corrupt ({why}); its undelivered events are lost{}",
                        kept.map(|k| format!(" (kept as {})", k.display()))
                            .unwrap_or_default()
                    );
                    Outbox::default()
                }
            }
        } else {
            Outbox::default()
        };
        Reports {
            outbox,
            server,
            stale_records: BTreeSet::new(),
            failed_files: BTreeMap::new(),
            storage_failing: false,
            last_retry: None,
        }
    }

    pub fn report(&mut self, warn_level: bool, reason: String, message: String, cx: &mut Ctx) {
        if warn_level {
            warn!(reason = %reason, "{message}");
        } else {
            info!(reason = %reason, "{message}");
        }
        if self.server {
            self.outbox.push(warn_level, reason, message, unix_now());
            cx.push(Internal::Persist(Write::Outbox(self.outbox.clone())));
        }
    }

    /// Forgets the events a heartbeat delivered.
    pub fn acknowledge(&mut self, up_to: u64, cx: &mut Ctx) {
        if up_to == 0 {
            return;
        }
        self.outbox.acknowledge(up_to);
        cx.push(Internal::Persist(Write::Outbox(self.outbox.clone())));
    }

    /// An operator's reset: the events of the old registration are not sent.
    pub fn clear_outbox(&mut self) {
        self.outbox = Outbox::default();
    }

    pub fn storage_failing(&self) -> bool {
        self.storage_failing
    }

    /// A write finished.
    pub fn persisted(
        &mut self,
        written: Written,
        error: Option<String>,
        workloads: &Workloads,
        cx: &mut Ctx,
    ) {
        match (error, written.state_dir) {
            (Some(e), true) => {
                if let Some(name) = written.record_of {
                    self.stale_records.insert(name);
                }
                if let (Some(file), Some(w)) = (written.file, written.failed) {
                    self.failed_files.insert(file, *w);
                }
                if !self.storage_failing {
                    self.storage_failing = true;
                    self.last_retry = Some(Instant::now());
                    let message = format!(
                        "STATE_DIR cannot be written ({}): {e}; what failed is written again once it can",
                        written.what
                    );
                    error!("{message}");
                    cx.problem(ProblemKey::Storage, Some(message.clone()));
                    self.report(true, "StorageFailing".into(), message, cx);
                }
            }
            (Some(e), false) => error!("{}: {e}", written.what),
            (None, true) => {
                if let Some(name) = &written.record_of {
                    self.stale_records.remove(name);
                }
                if let Some(file) = written.file {
                    self.failed_files.remove(file);
                }
                if written.file == Some(FORGET_SERVER_STATE) {
                    // Those files are gone for good: a failed earlier write is not redone.
                    for f in crate::store::SERVER_STATE_FILES {
                        self.failed_files.remove(f);
                    }
                }
                if self.storage_failing {
                    self.storage_failing = false;
                    info!("STATE_DIR can be written again");
                    cx.problem(ProblemKey::Storage, None);
                    self.rewrite_failed(workloads, cx);
                }
            }
            (None, false) => {}
        }
    }

    /// While STATE_DIR fails, tries the failed writes again now and then (called with every
    /// sample's time): nothing else may write, and a write is what tells that it works again.
    pub fn retry_storage(&mut self, now: Instant, workloads: &Workloads, cx: &mut Ctx) {
        let recent = matches!(self.last_retry,
            Some(t) if now.saturating_duration_since(t) < STORAGE_RETRY);
        if !self.storage_failing || recent {
            return;
        }
        self.last_retry = Some(now);
        self.rewrite_failed(workloads, cx);
    }

    /// Writes again what failed, as it is now; a write that fails again comes back here.
    fn rewrite_failed(&mut self, workloads: &Workloads, cx: &mut Ctx) {
        for name in std::mem::take(&mut self.stale_records) {
            // The workload's record as it is now (it may have restarted meanwhile); a workload
            // that is gone has none, and one between runs gets its next at its next start.
            match workloads.record_of(&name) {
                Some(r) => cx.push(Internal::Persist(Write::Record(r))),
                None if !workloads.entries().contains_key(&name) => {
                    cx.push(Internal::Persist(Write::RemoveRecord(name)))
                }
                None => {}
            }
        }
        for (_, write) in std::mem::take(&mut self.failed_files) {
            cx.push(Internal::Persist(write));
        }
        if self.server {
            cx.push(Internal::Persist(Write::Outbox(self.outbox.clone())));
        }
    }
}
