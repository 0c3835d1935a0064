//! The device budget: what workloads may use in total, and a tracker that turns usage samples
//! into "exceeded" (over the budget for the whole window) and "recovered" (under the low
//! watermark for the hold time) signals, so one spike does not evict anything and recovery
//! does not flap.

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

/// Time-based hysteresis over the budget.
#[derive(Debug, Clone)]
pub struct PressureTracker {
    /// Usage must stay over the budget this long before it counts as exceeded.
    pub window: Duration,
    /// Usage must stay under the low watermark this long before it counts as recovered.
    pub hold: Duration,
    /// Low watermark as a fraction of the budget.
    pub low_watermark: f64,
    over_since: Option<Instant>,
    under_since: Option<Instant>,
    exceeded: bool,
}

impl PressureTracker {
    pub fn new(window: Duration, hold: Duration, low_watermark: f64) -> Self {
        PressureTracker {
            window,
            hold,
            low_watermark,
            over_since: None,
            under_since: None,
            exceeded: false,
        }
    }

    pub fn is_exceeded(&self) -> bool {
        self.exceeded
    }

    /// Feeds one sample taken at `now`; returns a signal when the pressure state changes (and
    /// again every `window` while it stays exceeded, so the device keeps shedding load).
    pub fn observe(
        &mut self,
        memory: u64,
        cpu: u64,
        budget: &Budget,
        now: Instant,
    ) -> Option<Pressure> {
        let over_mem = memory > budget.memory_bytes;
        let over_cpu = cpu > budget.cpu_millicores;
        let low = |used: u64, b: u64| (used as f64) < (b as f64) * self.low_watermark;
        let under = low(memory, budget.memory_bytes) && low(cpu, budget.cpu_millicores);
        if over_mem || over_cpu {
            self.under_since = None;
            let since = *self.over_since.get_or_insert(now);
            if now.duration_since(since) >= self.window {
                self.over_since = Some(now);
                self.exceeded = true;
                let what = if over_mem {
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
        } else {
            self.over_since = None;
            if self.exceeded && under {
                let since = *self.under_since.get_or_insert(now);
                if now.duration_since(since) >= self.hold {
                    self.under_since = None;
                    self.exceeded = false;
                    return Some(Pressure::Recovered);
                }
            } else {
                self.under_since = None;
            }
        }
        None
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

    #[test]
    fn a_spike_does_not_count_and_recovery_needs_the_hold_time() {
        let b = Budget {
            memory_bytes: 100,
            cpu_millicores: 1000,
        };
        let ms = |n: u64| Duration::from_millis(n);
        let t0 = Instant::now();
        let mut t = PressureTracker::new(ms(500), ms(1000), 0.9);
        assert_eq!(t.observe(150, 0, &b, t0), None);
        assert_eq!(t.observe(50, 0, &b, t0 + ms(100)), None, "spike over");
        assert_eq!(t.observe(150, 0, &b, t0 + ms(200)), None);
        assert_eq!(t.observe(150, 0, &b, t0 + ms(600)), None);
        assert!(matches!(
            t.observe(150, 0, &b, t0 + ms(700)),
            Some(Pressure::Exceeded(_))
        ));
        assert!(t.is_exceeded());
        assert_eq!(t.observe(150, 0, &b, t0 + ms(800)), None);
        assert!(
            matches!(
                t.observe(150, 0, &b, t0 + ms(1200)),
                Some(Pressure::Exceeded(_))
            ),
            "still over after another window: shed more"
        );
        assert_eq!(
            t.observe(95, 0, &b, t0 + ms(1300)),
            None,
            "above the low watermark"
        );
        assert_eq!(t.observe(80, 0, &b, t0 + ms(1400)), None);
        assert_eq!(t.observe(80, 0, &b, t0 + ms(2000)), None);
        assert_eq!(
            t.observe(80, 0, &b, t0 + ms(2400)),
            Some(Pressure::Recovered)
        );
        assert_eq!(t.observe(80, 0, &b, t0 + ms(3000)), None);
        let mut c = PressureTracker::new(Duration::ZERO, ms(1), 0.9);
        assert!(matches!(
            c.observe(0, 2000, &b, t0),
            Some(Pressure::Exceeded(r)) if r.contains("cpu")
        ));
    }
}
