//! The controller's resources side: the device's totals and budget, what the workloads use
//! together, the time-based pressure tracker, the kernel cap on all workloads, the marks the
//! kernel notifies at (crate::alerts), the profile variables and their evaluation, and when
//! the next sample is due: at once for a kernel alert, else from what the last sample saw.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::alerts::{Alert, Mark, Marks};
use crate::budget::{Budget, Pressure, PressureTracker, NEAR_FRACTION};
use crate::cgroup::Limits;
use crate::config::Settings;
use crate::profiles::expr::Value;
use crate::profiles::{DeviceProfiles, Evaluation};
use crate::sampler::{self, DeviceTotals, Report};

/// PSI memory stall share (percent) from which the sampler speeds up.
const MEMORY_PRESSURE_ALERT: f64 = 10.0;

/// Sampling period while usage is near or over the budget.
pub const FAST_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Alerts may come in bursts (reclaim, a usage oscillating around a mark): at most one
/// sample per this spacing is started for them; a later alert is served when it is over.
const MIN_ALERT_SPACING: Duration = Duration::from_millis(10);

/// The spacing of the samples that confirm a budget alert (see `Sampling::confirm_until`):
/// a fast allocator adds megabytes in that time, more than the marks can be off by.
const CONFIRM_SPACING: Duration = Duration::from_millis(2);

/// How far the usage marks may drift before they are placed again: what the parent counts
/// beyond the live workloads moves by hundreds of KiB when workloads start and stop.
const MARK_TOLERANCE: u64 = 64 << 10;

/// When samples were asked for, and how fast the sampler goes.
#[derive(Debug, Default)]
struct Sampling {
    last_request: Option<Instant>,
    /// Sampling faster than SAMPLE_INTERVAL (logged when it changes: when the device is calm
    /// again is worth knowing, and bench/budget.sh waits for it).
    fast: bool,
    /// After the kernel announced the budget crossed: sample at [`CONFIRM_SPACING`] until a
    /// decision or this deadline. The mark sits at the budget plus what the parent counts
    /// beyond the workloads, a figure that moves (a new workload's cgroup is charged to the
    /// parent as it is created, just before that workload allocates) and is moved after it
    /// (a v1 registration waits for an RCU grace period): the alert's own sample may still
    /// find the sum under the budget, and the next fast period would be 100 ms away.
    confirm_until: Option<Instant>,
    /// The marks last handed to the kernel.
    armed: Option<Marks>,
}

/// What all workloads use together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    pub memory_bytes: u64,
    pub cpu_millicores: u64,
}

/// Device profiles, their variables and the value of every condition.
#[derive(Debug, Default)]
pub struct ProfilesState {
    pub profiles: DeviceProfiles,
    pub variables: BTreeMap<String, Value>,
    pub evaluation: Evaluation,
}

pub struct Resources {
    totals: DeviceTotals,
    used: Used,
    pressure: PressureTracker,
    /// The kernel's memory pressure (PSI some avg10) at the last sample.
    memory_pressure: Option<f64>,
    /// The cap last written on all workloads together.
    cap: Option<Limits>,
    last_sample: Option<Instant>,
    sampling: Sampling,
    reserved_memory: u64,
    reserved_cpu: u64,
    pub profiles: ProfilesState,
}

impl Resources {
    pub fn new(settings: &Settings) -> Resources {
        Resources {
            totals: sampler::device_totals(),
            used: Used::default(),
            pressure: PressureTracker::new(
                settings.budget_window,
                settings.budget_hold,
                settings.budget_low_watermark,
            ),
            memory_pressure: None,
            cap: None,
            last_sample: None,
            sampling: Sampling::default(),
            reserved_memory: settings.reserved_memory,
            reserved_cpu: settings.reserved_cpu_millis,
            profiles: ProfilesState::default(),
        }
    }

    pub fn reconfigure(&mut self, settings: &Settings) {
        self.reserved_memory = settings.reserved_memory;
        self.reserved_cpu = settings.reserved_cpu_millis;
        self.pressure.window = settings.budget_window;
        self.pressure.hold = settings.budget_hold;
        self.pressure.low_watermark = settings.budget_low_watermark;
    }

    pub fn budget(&self) -> Budget {
        Budget::of(&self.totals, self.reserved_memory, self.reserved_cpu)
    }

    pub fn totals(&self) -> DeviceTotals {
        self.totals
    }

    pub fn used(&self) -> Used {
        self.used
    }

    pub fn last_sample(&self) -> Option<Instant> {
        self.last_sample
    }

    /// Takes in a sample (`used`: the workloads' total from it; `evicting`: what the victims
    /// of an eviction for the budget still in progress hold of it); says when the pressure
    /// state changes.
    pub fn observe(
        &mut self,
        report: &Report,
        used: Used,
        at: Instant,
        evicting: Option<u64>,
    ) -> Option<Pressure> {
        self.last_sample = Some(at);
        self.totals = report.device;
        self.used = used;
        self.memory_pressure = report.memory_pressure;
        self.native_variables(report.disk_percent, report.pids_percent);
        self.fed_variables(report.variables.clone());
        let budget = self.budget();
        self.pressure.observe(
            used.memory_bytes,
            used.cpu_millicores,
            &budget,
            at,
            evicting,
        )
    }

    /// How soon the next sample is due, from what the sample just taken saw (no one-period
    /// lag): near or over the budget, or when the kernel reports memory stalls, ten times a
    /// second; a breach waiting for its window, when the window ends; a budget alert being
    /// confirmed, every [`CONFIRM_SPACING`]; otherwise the configured period.
    pub fn next_interval(&mut self, base: Duration, now: Instant) -> Duration {
        let stalled = self
            .memory_pressure
            .is_some_and(|p| p >= MEMORY_PRESSURE_ALERT);
        let near = self.budget().near(
            self.used.memory_bytes,
            self.used.cpu_millicores,
            NEAR_FRACTION,
        );
        let s = &mut self.sampling;
        if self.pressure.is_exceeded() || s.confirm_until.is_some_and(|t| now >= t) {
            s.confirm_until = None;
        }
        let next = next_sample_in(
            base,
            self.pressure.is_exceeded() || stalled || near,
            self.pressure.decision_due_in(now),
            s.confirm_until.is_some(),
        );
        let fast = next < base;
        if fast != s.fast {
            s.fast = fast;
            if fast {
                tracing::info!(period = ?next, "sampling fast: usage near or over the budget, or memory stalls");
            } else {
                tracing::info!(period = ?next, "sampling at SAMPLE_INTERVAL again: the device is calm");
            }
        }
        next
    }

    /// A sample is being asked for now.
    pub fn sample_requested(&mut self, now: Instant) {
        self.sampling.last_request = Some(now);
    }

    /// A kernel alert: how long until its sample may start (`None`: at once).
    pub fn on_alert(&mut self, alert: &Alert, now: Instant) -> Option<Duration> {
        if *alert == Alert::MemoryMark(Mark::Budget) && !self.pressure.is_exceeded() {
            self.sampling.confirm_until = Some(now + FAST_SAMPLE_INTERVAL);
        }
        let since = self
            .sampling
            .last_request
            .map(|t| now.saturating_duration_since(t));
        since
            .filter(|d| *d < MIN_ALERT_SPACING)
            .map(|d| MIN_ALERT_SPACING - d)
    }

    /// The marks the kernel should notify at, when they moved: the budget and the near mark
    /// of the agent's own figure, plus what the parent counts beyond the live workloads
    /// (`parent_memory`: its own counter in the same sample).
    pub fn marks_due(&mut self, parent_memory: Option<u64>) -> Option<Marks> {
        let budget = self.budget().memory_bytes;
        if budget == 0 {
            return None;
        }
        let offset = parent_memory.map_or(0, |p| p.saturating_sub(self.used.memory_bytes));
        let marks = Marks {
            near: (budget as f64 * NEAR_FRACTION) as u64 + offset,
            budget: budget + offset,
        };
        let close = |a: u64, b: u64| a.abs_diff(b) <= MARK_TOLERANCE;
        if self
            .sampling
            .armed
            .is_some_and(|a| close(a.near, marks.near) && close(a.budget, marks.budget))
        {
            return None;
        }
        self.sampling.armed = Some(marks);
        Some(marks)
    }

    /// The cap on all workloads together, when it must be (re)written: cpu at the budget,
    /// memory at the budget plus half of RESERVED_MEMORY, so the agent's priority-aware
    /// eviction normally acts first and the kernel's OOM killer (within the workloads only)
    /// is the last resort that keeps the OS and the agent alive.
    pub fn cap_due(&mut self, reserved_memory: u64) -> Option<Limits> {
        let b = self.budget();
        if b.memory_bytes == 0 || b.cpu_millicores == 0 {
            return None;
        }
        let cap = Limits {
            memory_bytes: Some(b.memory_bytes + reserved_memory / 2),
            cpu_millicores: Some(b.cpu_millicores),
            pids: None,
        };
        if self.cap == Some(cap) {
            return None;
        }
        self.cap = Some(cap);
        Some(cap)
    }

    /// New device profiles; true when the evaluation changed.
    pub fn set_profiles(&mut self, profiles: DeviceProfiles) -> bool {
        for e in profiles.errors() {
            tracing::warn!("device profile rejected: {e}");
        }
        self.profiles.profiles = profiles;
        self.reevaluate()
    }

    /// Evaluates the conditions over the current variables; true when a value changed.
    pub fn reevaluate(&mut self) -> bool {
        let p = &mut self.profiles;
        let evaluation = p.profiles.evaluate(&p.variables);
        let changed = evaluation != p.evaluation;
        p.evaluation = evaluation;
        changed
    }

    /// Native profile variables from a sample: usage as percentages of the budget.
    fn native_variables(&mut self, disk_percent: Option<f64>, pids_percent: f64) {
        let b = self.budget();
        let pct = |used: u64, of: u64| {
            if of == 0 {
                100.0
            } else {
                used as f64 * 100.0 / of as f64
            }
        };
        let (mem, cpu) = (self.used.memory_bytes, self.used.cpu_millicores);
        let v = &mut self.profiles.variables;
        v.insert("cpu".into(), Value::percent(pct(cpu, b.cpu_millicores)));
        v.insert("memory".into(), Value::percent(pct(mem, b.memory_bytes)));
        v.insert("pids".into(), Value::percent(pids_percent));
        match disk_percent {
            Some(d) => {
                v.insert("disk".into(), Value::percent(d));
            }
            None => {
                v.remove("disk");
            }
        }
    }

    /// Variables fed through the local input (replacing the previous ones).
    fn fed_variables(&mut self, fed: BTreeMap<String, Value>) {
        let v = &mut self.profiles.variables;
        v.retain(|k, _| crate::profiles::expr::NATIVE_VARIABLES.contains(&k.as_str()));
        for (k, val) in fed {
            if !crate::profiles::expr::NATIVE_VARIABLES.contains(&k.as_str()) {
                v.insert(k, val);
            }
        }
    }
}

/// The period until the next sample. Near or over the budget, or with the kernel reporting
/// memory stalls, sample fast; when a breach has yet to last its window, sample when the
/// window ends; while a budget alert is being confirmed, every [`CONFIRM_SPACING`].
fn next_sample_in(
    interval: Duration,
    near_or_over_or_stalled: bool,
    decision_due_in: Option<Duration>,
    confirming: bool,
) -> Duration {
    let mut next = if near_or_over_or_stalled {
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

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn the_sample_that_sees_usage_near_the_budget_sets_the_fast_period() {
        assert_eq!(next_sample_in(S(30), false, None, false), S(30));
        assert_eq!(
            next_sample_in(S(30), true, None, false),
            FAST_SAMPLE_INTERVAL
        );
        assert_eq!(next_sample_in(MS(50), true, None, false), MS(50));
    }

    #[test]
    fn a_pending_decision_is_sampled_when_its_window_ends() {
        let next = |due| next_sample_in(S(1), true, Some(due), false);
        assert_eq!(next(MS(40)), MS(40));
        assert_eq!(next(S(5)), FAST_SAMPLE_INTERVAL);
        // A zero window does not turn into a busy loop.
        assert_eq!(next(Duration::ZERO), MIN_ALERT_SPACING);
    }

    #[test]
    fn a_budget_alert_is_confirmed_at_its_own_spacing() {
        assert_eq!(next_sample_in(S(1), true, None, true), CONFIRM_SPACING);
    }
}
