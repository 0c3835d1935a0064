//! Lanes: queues of blocking operations, each run one at a time and in order on the agent's
//! pool (`crate::pool`). Every workload has its own (its driver calls never overtake one another); the store,
//! the session and the cluster have one each.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::workload::WorkloadName;

/// A blocking operation queued on a lane.
pub type LaneOp = Box<dyn FnOnce() + Send>;

/// One queue of blocking operations. No task or thread of its own: the first operation
/// pushed to an idle lane starts a pool job, which runs the queued operations one after the
/// other until none is left.
pub struct Lane {
    queue: Arc<Mutex<Queue>>,
    class: crate::pool::Class,
}

#[derive(Default)]
struct Queue {
    ops: VecDeque<LaneOp>,
    /// A pool job is running this lane's operations.
    running: bool,
}

fn lock(q: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // Operations run outside the lock (and a panicking one is caught): a poisoned lock
    // still holds a consistent queue.
    q.lock().unwrap_or_else(|p| p.into_inner())
}

impl Lane {
    /// A lane whose operations run on `class`'s threads.
    pub fn new(class: crate::pool::Class) -> Lane {
        Lane {
            queue: Arc::default(),
            class,
        }
    }

    pub fn push(&self, op: LaneOp) {
        let mut q = lock(&self.queue);
        q.ops.push_back(op);
        if q.running {
            return;
        }
        q.running = true;
        drop(q);
        let queue = self.queue.clone();
        crate::pool::spawn(self.class, move || loop {
            let op = {
                let mut q = lock(&queue);
                match q.ops.pop_front() {
                    Some(op) => op,
                    None => {
                        q.running = false;
                        // Capacity a burst left behind goes.
                        q.ops = VecDeque::new();
                        return;
                    }
                }
            };
            // A panicking operation is logged by the pool; the lane goes on with the next.
            crate::pool::run(op);
        });
    }

    fn idle(&self) -> bool {
        let q = lock(&self.queue);
        !q.running && q.ops.is_empty()
    }
}

/// The workloads' lanes. A gone workload's lane is retired and dropped once its last
/// operation has run; a workload desired again meanwhile gets its old lane back, so a start
/// never overtakes the cleanup before it.
#[derive(Default)]
pub struct WorkloadLanes {
    lanes: HashMap<WorkloadName, Lane>,
    retired: Vec<WorkloadName>,
}

impl WorkloadLanes {
    pub fn push(&mut self, name: &WorkloadName, op: LaneOp) {
        self.retired.retain(|n| n != name);
        self.lanes
            .entry(name.clone())
            .or_insert_with(|| Lane::new(crate::pool::Class::Workloads))
            .push(op);
    }

    /// The workload is gone: its lane goes once idle (see [`WorkloadLanes::sweep`]).
    pub fn retire(&mut self, name: WorkloadName) {
        if !self.retired.contains(&name) {
            self.retired.push(name);
        }
        self.sweep();
    }

    /// Drops the retired lanes that are idle. The operation that reported a workload's end
    /// is usually still finishing when the workload is retired, so this runs again later.
    pub fn sweep(&mut self) {
        let lanes = &mut self.lanes;
        self.retired.retain(|n| match lanes.get(n) {
            Some(l) if !l.idle() => true,
            _ => {
                lanes.remove(n);
                false
            }
        });
        if self.lanes.capacity() > 2 * self.lanes.len() + 32 {
            self.lanes.shrink_to_fit();
        }
    }

    /// Lanes held now (retired ones not yet dropped included).
    pub fn held(&self) -> usize {
        self.lanes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn name(n: &str) -> WorkloadName {
        WorkloadName::parse(n).unwrap()
    }

    #[test]
    fn a_lane_retired_while_its_last_operation_reports_is_dropped_later() {
        let mut lanes = WorkloadLanes::default();
        let (tx, rx) = async_channel::unbounded();
        let (release_tx, release) = std::sync::mpsc::channel::<()>();
        lanes.push(
            &name("a"),
            Box::new(move || {
                // Reports its outcome, then is still running when the workload is retired.
                let _ = tx.send_blocking("done");
                let _ = release.recv();
            }),
        );
        assert_eq!(smol::block_on(rx.recv()), Ok("done"));
        lanes.retire(name("a"));
        assert_eq!(lanes.held(), 1, "busy: kept");
        release_tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while lanes.held() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            lanes.sweep();
        }
        assert_eq!(lanes.held(), 0, "an idle retired lane is dropped");
    }

    #[test]
    fn a_workload_desired_again_keeps_its_lane_and_its_order() {
        let mut lanes = WorkloadLanes::default();
        let (tx, rx) = async_channel::unbounded();
        let slow = tx.clone();
        lanes.push(
            &name("a"),
            Box::new(move || {
                std::thread::sleep(Duration::from_millis(200));
                let _ = slow.send_blocking("cleanup");
            }),
        );
        lanes.retire(name("a"));
        lanes.push(
            &name("a"),
            Box::new(move || {
                let _ = tx.send_blocking("start");
            }),
        );
        assert_eq!(lanes.held(), 1);
        assert_eq!(smol::block_on(rx.recv()), Ok("cleanup"));
        assert_eq!(smol::block_on(rx.recv()), Ok("start"));
        lanes.sweep();
        assert_eq!(lanes.held(), 1, "not retired any more");
    }
}
