//! The controller's resources side: the device's totals and budget, what the workloads use
//! together, the time-based pressure tracker, the kernel cap on all workloads, the profile
//! variables and their evaluation, and how soon the next sample is due.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::budget::{Budget, Pressure, PressureTracker};
use crate::cgroup::Limits;
use crate::config::Settings;
use crate::profiles::expr::Value;
use crate::profiles::{DeviceProfiles, Evaluation};
use crate::sampler::{self, DeviceTotals, Report};

/// PSI memory stall share (percent) from which the sampler speeds up.
const MEMORY_PRESSURE_ALERT: f64 = 10.0;

/// Sampling period while usage is near or over the budget.
const FAST_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Usage near the budget from this fraction on: sample fast.
const NEAR_BUDGET: f64 = 0.8;

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

    /// Takes in a sample (`used`: the workloads' total from it); says when the pressure
    /// state changes.
    pub fn observe(&mut self, report: &Report, used: Used, at: Instant) -> Option<Pressure> {
        self.last_sample = Some(at);
        self.totals = report.device;
        self.used = used;
        self.memory_pressure = report.memory_pressure;
        self.native_variables(report.disk_percent, report.pids_percent);
        self.fed_variables(report.variables.clone());
        let budget = self.budget();
        self.pressure
            .observe(used.memory_bytes, used.cpu_millicores, &budget, at)
    }

    /// How soon the next sample is due: near or over the budget, or when the kernel reports
    /// memory stalls, ten times a second; otherwise the configured period.
    pub fn next_interval(&self, base: Duration) -> Duration {
        let stalled = self
            .memory_pressure
            .is_some_and(|p| p >= MEMORY_PRESSURE_ALERT);
        let near = self.budget().near(
            self.used.memory_bytes,
            self.used.cpu_millicores,
            NEAR_BUDGET,
        );
        if self.pressure.is_exceeded() || stalled || near {
            base.min(FAST_SAMPLE_INTERVAL)
        } else {
            base
        }
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
