//! The controller's side of the kernel's alerts (crate::alerts) and of the sampling period:
//! an alert makes the controller sample at once, and each sample sets the next period from
//! what it saw itself.

use std::time::{Duration, Instant};

use tracing::{debug, info};

use super::{sources, Controller, Event};
use crate::alerts::{Alert, Mark, Marks};
use crate::budget::NEAR_FRACTION;
use crate::machines::workload::{AfterStop, State};

/// Sampling period while usage is near or over the budget, or the kernel reports stalls.
pub(crate) const FAST_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// PSI memory stall share (percent, `some avg10`) from which the sampler speeds up.
const MEMORY_PRESSURE_ALERT: f64 = 10.0;

/// Alerts may come in bursts (reclaim, a usage oscillating around a mark): at most one
/// sample per this spacing is started for them; a later alert is served when it is over.
const MIN_ALERT_SPACING: Duration = Duration::from_millis(10);

/// The spacing of the samples that confirm a budget alert (see `Sampling::confirm_until`):
/// a fast allocator adds megabytes in that time, more than the marks can be off by.
const CONFIRM_SPACING: Duration = Duration::from_millis(2);

/// How far the usage marks may drift before they are placed again: what the parent counts
/// beyond the live workloads moves by hundreds of KiB when workloads start and stop.
const MARK_TOLERANCE: u64 = 64 << 10;

/// The sampling clock: one pending tick at a time (older ones carry stale tokens).
#[derive(Debug, Default)]
pub(crate) struct Sampling {
    pub(crate) token: u64,
    last_request: Option<Instant>,
    /// Sampling faster than SAMPLE_INTERVAL (logged when it changes: when the device is calm
    /// again is worth knowing, and bench/budget.sh waits for it).
    fast: bool,
    /// After the kernel announced the budget crossed: re-sample at [`CONFIRM_SPACING`] until
    /// a decision or this deadline. The mark sits at the budget plus what the parent counts
    /// beyond the workloads, a figure that moves (a new workload's cgroup is charged to the
    /// parent as it is created, just before that workload allocates) and is moved after it
    /// (a registration waits for an RCU grace period): the alert's own sample may still find
    /// the sum under the budget, and the next fast period would be 100 ms away.
    confirm_until: Option<Instant>,
}

/// The period until the next sample, from what the sample just taken showed. Near or over
/// the budget, or with the kernel reporting memory stalls, sample fast; when a breach has yet
/// to last its window, sample when the window ends.
pub(crate) fn next_sample_in(
    interval: Duration,
    near_or_over: bool,
    stalled: bool,
    decision_due_in: Option<Duration>,
    confirming: bool,
) -> Duration {
    let mut next = if near_or_over || stalled {
        interval.min(FAST_SAMPLE_INTERVAL)
    } else {
        interval
    };
    if let Some(due) = decision_due_in {
        next = next.min(due.max(MIN_ALERT_SPACING));
    }
    if confirming {
        next = next.min(CONFIRM_SPACING);
    }
    next
}

impl Controller {
    /// Hands the sampler the current targets (a full queue: it is busy and will report).
    pub(crate) fn request_sample(&mut self) {
        if let Some(s) = &self.sampler {
            let _ = s.try_send(self.sample_targets());
        }
        self.sampling.last_request = Some(Instant::now());
    }

    /// Samples as soon as [`MIN_ALERT_SPACING`] allows.
    fn sample_soon(&mut self) {
        let since = self.sampling.last_request.map(|t| t.elapsed());
        match since {
            Some(d) if d < MIN_ALERT_SPACING => {
                self.sampling.token += 1;
                let token = self.sampling.token;
                sources::after(
                    self.tx.clone(),
                    MIN_ALERT_SPACING - d,
                    Event::SampleTick { token },
                );
            }
            _ => self.request_sample(),
        }
    }

    /// After each sample: the next tick, from that sample's own figures (no one-period lag
    /// between seeing usage near the budget and sampling fast).
    pub(crate) fn schedule_next_sample(&mut self) {
        let (mem, cpu) = self.used;
        let near_or_over =
            self.pressure.is_exceeded() || self.budget().near(mem, cpu, NEAR_FRACTION);
        let stalled = self
            .memory_pressure
            .is_some_and(|p| p >= MEMORY_PRESSURE_ALERT);
        let now = Instant::now();
        if self.pressure.is_exceeded() || self.sampling.confirm_until.is_some_and(|t| now >= t) {
            self.sampling.confirm_until = None;
        }
        let next = next_sample_in(
            self.settings.sample_interval,
            near_or_over,
            stalled,
            self.pressure.decision_due_in(now),
            self.sampling.confirm_until.is_some(),
        );
        let fast = next < self.settings.sample_interval;
        if fast != self.sampling.fast {
            self.sampling.fast = fast;
            if fast {
                info!(period = ?next, "sampling fast: usage near or over the budget, or memory stalls");
            } else {
                info!(period = ?next, "sampling at SAMPLE_INTERVAL again: the device is calm");
            }
        }
        self.sampling.token += 1;
        let token = self.sampling.token;
        sources::after(self.tx.clone(), next, Event::SampleTick { token });
    }

    pub(crate) fn on_alert(&mut self, alert: Alert) {
        debug!(?alert, "kernel alert: sampling now");
        if alert == Alert::MemoryMark(Mark::Budget) && !self.pressure.is_exceeded() {
            self.sampling.confirm_until = Some(Instant::now() + FAST_SAMPLE_INTERVAL);
        }
        if let Alert::Exited { workload, pid } = &alert {
            if self
                .workloads
                .get(workload)
                .and_then(|e| e.adopted)
                .is_some_and(|(p, _)| p == *pid)
            {
                let name = workload.clone();
                self.adopted_exited(&name);
                return;
            }
        }
        self.sample_soon();
    }

    /// Whether a workload evicted for the budget is still stopping.
    pub(crate) fn evicting(&self) -> bool {
        self.workloads.values().any(|e| {
            matches!(
                e.machine.state(),
                State::Stopping {
                    after: AfterStop::Evict(_)
                }
            )
        })
    }

    /// Places the kernel's usage marks on the workloads' parent: the budget and the near mark
    /// of the agent's own figure, plus what the parent counts beyond the live workloads.
    pub(crate) fn place_marks(&mut self, parent_memory: Option<u64>) {
        let budget = self.budget().memory_bytes;
        let Some(alerts) = &mut self.alerts else {
            return;
        };
        if budget == 0 {
            return;
        }
        let offset = parent_memory.map_or(0, |p| p.saturating_sub(self.used.0));
        let marks = Marks {
            near: (budget as f64 * NEAR_FRACTION) as u64 + offset,
            budget: budget + offset,
        };
        alerts.set_marks(marks, MARK_TOLERANCE);
    }

    /// Watches what runs already when the loop starts (booted or adopted workloads).
    pub(crate) fn watch_running_workloads(&mut self) {
        let Some(alerts) = &mut self.alerts else {
            return;
        };
        for (name, e) in &self.workloads {
            if matches!(e.machine.state(), State::Running { .. }) {
                alerts.watch_workload(name, &e.cgroup);
                if let Some((pid, ticks)) = e.adopted {
                    alerts.watch_exit(name, pid, ticks);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn the_sample_that_sees_usage_near_the_budget_sets_the_fast_period() {
        let fast = FAST_SAMPLE_INTERVAL;
        assert_eq!(next_sample_in(S(30), false, false, None, false), S(30));
        assert_eq!(next_sample_in(S(30), true, false, None, false), fast);
        assert_eq!(next_sample_in(S(30), false, true, None, false), fast);
        assert_eq!(next_sample_in(MS(50), true, false, None, false), MS(50));
    }

    #[test]
    fn a_pending_decision_is_sampled_when_its_window_ends() {
        let next = |due| next_sample_in(S(1), true, false, Some(due), false);
        assert_eq!(next(MS(40)), MS(40));
        assert_eq!(next(S(5)), FAST_SAMPLE_INTERVAL);
        // A zero window does not turn into a busy loop.
        assert_eq!(next(Duration::ZERO), MIN_ALERT_SPACING);
    }

    #[test]
    fn a_budget_alert_is_confirmed_at_the_alert_spacing() {
        let next = next_sample_in(S(1), true, false, None, true);
        assert_eq!(next, CONFIRM_SPACING);
    }
}
