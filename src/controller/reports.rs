//! What the agent reports: events into the log and, with a server, the durable heartbeat
//! outbox; and the storage problem (STATE_DIR cannot be written: disk full, read-only), which
//! clears on the next successful write, after which every record that failed is written again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::effects::{Write, Written};
use super::workloads::Workloads;
use super::{unix_now, Ctx, Internal};
use crate::machines::device::ProblemKey;
use crate::store::{Loaded, Outbox, Store, WorkloadRecord};
use crate::workload::WorkloadName;

/// How often failed writes are tried again while STATE_DIR cannot be written.
const STORAGE_RETRY: Duration = Duration::from_secs(10);

pub struct Reports {
    pub outbox: Outbox,
    /// With a server, events go into the outbox for the heartbeats.
    server: bool,
    /// Records whose last write failed.
    dirty: BTreeMap<WorkloadName, WorkloadRecord>,
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
            dirty: BTreeMap::new(),
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
                if let Some(r) = &written.record {
                    self.dirty.insert(r.name.clone(), r.clone());
                }
                if !self.storage_failing {
                    self.storage_failing = true;
                    self.last_retry = Some(Instant::now());
                    let message = format!(
                        "STATE_DIR cannot be written ({}): {e}; records will be written again once it can",
                        written.what
                    );
                    error!("{message}");
                    cx.problem(ProblemKey::Storage, Some(message.clone()));
                    self.report(true, "StorageFailing".into(), message, cx);
                }
            }
            (Some(e), false) => error!("{}: {e}", written.what),
            (None, true) => {
                if let Some(r) = &written.record {
                    self.dirty.remove(&r.name);
                }
                if self.storage_failing {
                    self.storage_failing = false;
                    info!("STATE_DIR can be written again");
                    cx.problem(ProblemKey::Storage, None);
                    self.rewrite_dirty(workloads, cx);
                }
            }
            (None, false) => {}
        }
    }

    /// While STATE_DIR fails, tries the failed records again now and then.
    pub fn retry_storage(&mut self, workloads: &Workloads, cx: &mut Ctx) {
        if !self.storage_failing || self.last_retry.is_some_and(|t| t.elapsed() < STORAGE_RETRY) {
            return;
        }
        self.last_retry = Some(Instant::now());
        self.rewrite_dirty(workloads, cx);
        if self.server {
            cx.push(Internal::Persist(Write::Outbox(self.outbox.clone())));
        }
    }

    fn rewrite_dirty(&mut self, workloads: &Workloads, cx: &mut Ctx) {
        for (name, old) in std::mem::take(&mut self.dirty) {
            // The workload's record as it is now (it may have restarted meanwhile).
            let current = workloads.record_of(&name).or(Some(old));
            if let Some(r) = current {
                self.dirty.insert(name, r.clone());
                cx.push(Internal::Persist(Write::Record(r)));
            }
        }
    }
}
