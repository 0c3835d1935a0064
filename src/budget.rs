//! The device budget: what workloads may use in total, and a tracker that turns usage samples
//! into "exceeded" and "recovered" (under the low watermark for the hold time) signals. The
//! first memory breach of an episode counts at once; while the device stays over, the next
//! decision waits until the previous victim's memory is released (an eviction in progress,
//! see [`PressureTracker::observe`]) and the breach has lasted BUDGET_WINDOW since (a
//! sustained breach, not the first one's transient); a cpu breach must always last at least
//! [`CPU_WINDOW_MIN`].

use std::time::{Duration, Instant};

use crate::sampler::DeviceTotals;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    pub memory_bytes: u64,
    pub cpu_millicores: u64,
}

impl Budget {
    pub fn of(device: &DeviceTotals, reserved_memory: u64, reserved_cpu: u64) -> Budget {
        Budget {
            memory_bytes: device.memory_total_bytes.saturating_sub(reserved_memory),
            cpu_millicores: (device.cpus * 1000).saturating_sub(reserved_cpu),
        }
    }

    /// Usage at or above `fraction` of the budget (the sampler then samples faster, so a
    /// breach is seen within a tenth of a second instead of a whole interval).
    pub fn near(&self, memory: u64, cpu: u64, fraction: f64) -> bool {
        memory as f64 >= self.memory_bytes as f64 * fraction
            || cpu as f64 >= self.cpu_millicores as f64 * fraction
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pressure {
    Exceeded(String),
    Recovered,
}

/// Usage at or above this fraction of the budget is near it: the sampler samples fast, and on
/// cgroup v1 the kernel notifies the agent when usage crosses it.
pub const NEAR_FRACTION: f64 = 0.8;

/// A cpu breach must last at least this long whatever BUDGET_WINDOW says: the kernel already
/// caps all workloads' cpu at the budget, so a figure over it is the jitter of rates measured
/// over 100 ms samples against 100 ms quota periods, not a danger to the device.
pub const CPU_WINDOW_MIN: Duration = Duration::from_secs(1);

/// Time-based hysteresis over the budget.
#[derive(Debug, Clone)]
pub struct PressureTracker {
    /// Once exceeded, memory must stay over the budget this long before it counts again (cpu
    /// always, at least [`CPU_WINDOW_MIN`]).
    pub window: Duration,
    /// Usage must stay under the low watermark this long before it counts as recovered.
    pub hold: Duration,
    /// Low watermark as a fraction of the budget.
    pub low_watermark: f64,
    memory_over_since: Option<Instant>,
    /// Since when the workloads other than the victims of an eviction in progress have been
    /// over the memory budget by themselves.
    rest_over_since: Option<Instant>,
    cpu_over_since: Option<Instant>,
    under_since: Option<Instant>,
    exceeded: bool,
    /// The last sample's breach waits for an eviction in progress: no decision is pending.
    waiting_for_victim: bool,
}

impl PressureTracker {
    pub fn new(window: Duration, hold: Duration, low_watermark: f64) -> Self {
        PressureTracker {
            window,
            hold,
            low_watermark,
            memory_over_since: None,
            rest_over_since: None,
            cpu_over_since: None,
            under_since: None,
            exceeded: false,
            waiting_for_victim: false,
        }
    }

    pub fn is_exceeded(&self) -> bool {
        self.exceeded
    }

    fn cpu_window(&self) -> Duration {
        self.window.max(CPU_WINDOW_MIN)
    }

    /// Feeds one sample taken at `now`; returns a signal when the pressure state changes (and
    /// again, while it stays exceeded, each time the breach has lasted another window, so the
    /// device keeps shedding load).
    ///
    /// `evicting`: an eviction is in progress, and its victims still hold this much of
    /// `memory` (released only when their processes are gone). Deciding again meanwhile would
    /// count memory that is on its way out and cost a second workload, so no decision is
    /// taken, and the window starts again once the victims' memory is released; unless usage
    /// has risen beyond what the victims hold: the rest alone over the budget, for the window
    /// (their eviction cannot bring the device back within it).
    pub fn observe(
        &mut self,
        memory: u64,
        cpu: u64,
        budget: &Budget,
        now: Instant,
        evicting: Option<u64>,
    ) -> Option<Pressure> {
        let over_mem = memory > budget.memory_bytes;
        let over_cpu = cpu > budget.cpu_millicores;
        let low = |used: u64, b: u64| (used as f64) < (b as f64) * self.low_watermark;
        let under = low(memory, budget.memory_bytes) && low(cpu, budget.cpu_millicores);
        // The rest, without what the victims of an eviction in progress still hold.
        let over_rest =
            evicting.is_some_and(|held| memory.saturating_sub(held) > budget.memory_bytes);
        self.waiting_for_victim = evicting.is_some() && !over_rest;
        if !over_rest {
            self.rest_over_since = None;
        }
        if !over_mem {
            self.memory_over_since = None;
        }
        if !over_cpu {
            self.cpu_over_since = None;
        }
        if over_mem || over_cpu {
            self.under_since = None;
            if self.waiting_for_victim {
                self.memory_over_since = over_mem.then_some(now);
                self.cpu_over_since = over_cpu.then_some(now);
                return None;
            }
            let lasted = |since: &mut Option<Instant>, window: Duration| {
                now.duration_since(*since.get_or_insert(now)) >= window
            };
            if let Some(held) = evicting {
                // Only the rest's own memory breach counts, from the first sample that saw it.
                self.memory_over_since = Some(now);
                self.cpu_over_since = over_cpu.then_some(now);
                if !lasted(&mut self.rest_over_since, self.window) {
                    return None;
                }
                self.rest_over_since = None;
                self.exceeded = true;
                return Some(Pressure::Exceeded(format!(
                    "workloads use {} of memory, budget {}, even without the {} workloads being evicted still hold",
                    crate::units::Bytes(memory),
                    crate::units::Bytes(budget.memory_bytes),
                    crate::units::Bytes(held)
                )));
            }
            // The first decision of an episode does not wait (see `decision_due_in`'s users
            // and README: a plain allocator crosses the headroom to the kernel cap in tens of
            // ms); a further one waits until the breach has outlasted the window, so the
            // transient of the first breach does not cost a second workload.
            let window = if self.exceeded {
                self.window
            } else {
                Duration::ZERO
            };
            let mem_due = over_mem && lasted(&mut self.memory_over_since, window);
            let cpu_window = self.cpu_window();
            let cpu_due = over_cpu && lasted(&mut self.cpu_over_since, cpu_window);
            if mem_due || cpu_due {
                self.memory_over_since = over_mem.then_some(now);
                self.cpu_over_since = over_cpu.then_some(now);
                self.exceeded = true;
                let what = if mem_due {
                    format!(
                        "workloads use {} of memory, budget {}",
                        crate::units::Bytes(memory),
                        crate::units::Bytes(budget.memory_bytes)
                    )
                } else {
                    format!(
                        "workloads use {cpu}m cpu, budget {}m",
                        budget.cpu_millicores
                    )
                };
                return Some(Pressure::Exceeded(what));
            }
        } else if self.exceeded && under {
            let since = *self.under_since.get_or_insert(now);
            if now.duration_since(since) >= self.hold {
                self.under_since = None;
                self.exceeded = false;
                return Some(Pressure::Recovered);
            }
        } else {
            self.under_since = None;
        }
        None
    }

    /// How long until a breach seen by the last sample has lasted its window (`None`: no
    /// decision pending). The sampler samples again by then, so the decision is not late by
    /// up to a sampling period.
    pub fn decision_due_in(&self, now: Instant) -> Option<Duration> {
        if self.waiting_for_victim {
            return None;
        }
        let left = |since: Option<Instant>, window: Duration| {
            since.map(|s| window.saturating_sub(now.duration_since(s)))
        };
        if let Some(rest) = left(self.rest_over_since, self.window) {
            return Some(rest);
        }
        let memory_window = if self.exceeded {
            self.window
        } else {
            Duration::ZERO
        };
        match (
            left(self.memory_over_since, memory_window),
            left(self.cpu_over_since, self.cpu_window()),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_subtracts_reservations() {
        let d = DeviceTotals {
            memory_total_bytes: 1 << 30,
            memory_available_bytes: 0,
            cpus: 2,
        };
        let b = Budget::of(&d, 256 << 20, 250);
        assert_eq!(b.memory_bytes, 768 << 20);
        assert_eq!(b.cpu_millicores, 1750);
        assert_eq!(Budget::of(&d, 2 << 30, 5000), Budget::default());
        assert!(b.near(700 << 20, 0, 0.8));
        assert!(!b.near(100 << 20, 100, 0.8));
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn budget() -> Budget {
        Budget {
            memory_bytes: 100,
            cpu_millicores: 1000,
        }
    }

    #[test]
    fn a_memory_breach_is_decided_by_the_first_sample_that_sees_it() {
        let (b, t0) = (budget(), Instant::now());
        // Whatever the window: it is for the breaches after the first.
        let mut t = PressureTracker::new(MS(500), MS(1000), 0.9);
        assert_eq!(t.observe(90, 0, &b, t0, None), None);
        assert!(matches!(
            t.observe(101, 0, &b, t0 + MS(1), None),
            Some(Pressure::Exceeded(r)) if r.contains("memory")
        ));
        assert!(t.is_exceeded());
    }

    #[test]
    fn no_second_eviction_while_the_victim_is_still_stopping_and_then_only_after_the_window() {
        let (b, t0) = (budget(), Instant::now());
        let mut t = PressureTracker::new(MS(500), MS(1000), 0.9);
        assert!(
            t.observe(150, 0, &b, t0, None).is_some(),
            "the first at once"
        );
        for i in 1..20 {
            // The victim still holds 60: without it the rest would be within the budget.
            assert_eq!(t.observe(150, 0, &b, t0 + MS(i * 100), Some(60)), None);
            assert_eq!(t.decision_due_in(t0 + MS(i * 100)), None);
        }
        // Stopped, and the workloads are still over: the next one goes once the breach has
        // outlasted the window since the victim was last seen stopping (not for the first
        // breach's transient).
        assert_eq!(t.observe(150, 0, &b, t0 + MS(2000), None), None);
        assert_eq!(t.decision_due_in(t0 + MS(2000)), Some(MS(400)));
        assert_eq!(
            t.observe(50, 0, &b, t0 + MS(2200), None),
            None,
            "transient over"
        );
        assert_eq!(t.observe(150, 0, &b, t0 + MS(2300), None), None);
        assert_eq!(t.observe(150, 0, &b, t0 + MS(2700), None), None);
        assert!(t.observe(150, 0, &b, t0 + MS(2800), None).is_some());
    }

    #[test]
    fn usage_rising_beyond_what_the_victim_holds_is_decided_after_the_window() {
        let (b, t0) = (budget(), Instant::now());
        let mut t = PressureTracker::new(MS(500), MS(1000), 0.9);
        assert!(t.observe(150, 0, &b, t0, None).is_some());
        assert_eq!(t.observe(150, 0, &b, t0 + MS(100), Some(60)), None);
        // The rest alone is over (170 - 60): the victim cannot bring the device back; still a
        // breach that must last the window, from the first sample that saw it.
        assert_eq!(t.observe(170, 0, &b, t0 + MS(200), Some(60)), None);
        assert_eq!(t.decision_due_in(t0 + MS(200)), Some(MS(500)));
        assert_eq!(t.observe(190, 0, &b, t0 + MS(600), Some(60)), None);
        assert_eq!(t.decision_due_in(t0 + MS(600)), Some(MS(100)));
        assert!(matches!(
            t.observe(200, 0, &b, t0 + MS(700), Some(60)),
            Some(Pressure::Exceeded(r)) if r.contains("without the 60")
        ));
        // A cpu breach waits for the victim whatever it is.
        let mut t = PressureTracker::new(MS(500), MS(1000), 0.9);
        assert!(t.observe(150, 0, &b, t0, None).is_some());
        for i in 1..30 {
            assert_eq!(t.observe(50, 1500, &b, t0 + MS(i * 100), Some(40)), None);
        }
    }

    #[test]
    fn a_cpu_breach_must_last_at_least_the_cpu_minimum() {
        let (b, t0) = (budget(), Instant::now());
        let mut t = PressureTracker::new(Duration::ZERO, MS(1000), 0.9);
        assert_eq!(t.observe(0, 1100, &b, t0, None), None);
        assert_eq!(t.observe(0, 1100, &b, t0 + MS(500), None), None);
        assert_eq!(t.decision_due_in(t0 + MS(500)), Some(MS(500)));
        assert!(matches!(
            t.observe(0, 1100, &b, t0 + CPU_WINDOW_MIN, None),
            Some(Pressure::Exceeded(r)) if r.contains("cpu")
        ));
    }

    #[test]
    fn recovery_needs_the_hold_time_under_the_low_watermark() {
        let (b, t0) = (budget(), Instant::now());
        let mut t = PressureTracker::new(Duration::ZERO, MS(1000), 0.9);
        assert!(t.observe(150, 0, &b, t0, None).is_some());
        assert_eq!(
            t.observe(95, 0, &b, t0 + MS(100), None),
            None,
            "above the low watermark"
        );
        assert_eq!(t.observe(80, 0, &b, t0 + MS(200), None), None);
        assert_eq!(t.observe(80, 0, &b, t0 + MS(800), None), None);
        assert_eq!(
            t.observe(80, 0, &b, t0 + MS(1200), None),
            Some(Pressure::Recovered)
        );
        assert!(!t.is_exceeded());
        assert_eq!(t.observe(80, 0, &b, t0 + MS(3000), None), None);
    }
}
