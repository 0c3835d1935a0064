//! The device budget: what workloads may use in total, and a tracker that turns usage samples
//! into "exceeded" (sustained over a window) and "recovered" (under the low watermark for a
//! hold time) signals, so one spike does not evict anything and recovery does not flap.

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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pressure {
    Exceeded(String),
    Recovered,
}

/// Consecutive-sample hysteresis over the budget.
#[derive(Debug, Clone)]
pub struct PressureTracker {
    /// Samples over the budget before it counts as exceeded.
    pub window: u32,
    /// Samples under the low watermark before it counts as recovered.
    pub hold: u32,
    /// Low watermark as a fraction of the budget.
    pub low_watermark: f64,
    over: u32,
    under: u32,
    exceeded: bool,
}

impl PressureTracker {
    pub fn new(window: u32, hold: u32, low_watermark: f64) -> Self {
        PressureTracker {
            window: window.max(1),
            hold: hold.max(1),
            low_watermark,
            over: 0,
            under: 0,
            exceeded: false,
        }
    }

    /// Feeds one sample; returns a signal when the pressure state changes (and again every
    /// `window` samples while it stays exceeded, so the device keeps shedding load).
    pub fn observe(&mut self, memory: u64, cpu: u64, budget: &Budget) -> Option<Pressure> {
        let over_mem = memory > budget.memory_bytes;
        let over_cpu = cpu > budget.cpu_millicores;
        let low = |used: u64, b: u64| (used as f64) < (b as f64) * self.low_watermark;
        let under = low(memory, budget.memory_bytes) && low(cpu, budget.cpu_millicores);
        if over_mem || over_cpu {
            self.under = 0;
            self.over += 1;
            if self.over >= self.window {
                self.over = 0;
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
            self.over = 0;
            if self.exceeded && under {
                self.under += 1;
                if self.under >= self.hold {
                    self.under = 0;
                    self.exceeded = false;
                    return Some(Pressure::Recovered);
                }
            } else {
                self.under = 0;
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
    }

    #[test]
    fn a_spike_does_not_count_and_recovery_needs_the_hold_time() {
        let b = Budget {
            memory_bytes: 100,
            cpu_millicores: 1000,
        };
        let mut t = PressureTracker::new(3, 2, 0.9);
        assert_eq!(t.observe(150, 0, &b), None);
        assert_eq!(t.observe(50, 0, &b), None, "spike over");
        assert_eq!(t.observe(150, 0, &b), None);
        assert_eq!(t.observe(150, 0, &b), None);
        assert!(matches!(t.observe(150, 0, &b), Some(Pressure::Exceeded(_))));
        assert_eq!(
            t.observe(95, 0, &b),
            None,
            "under budget but above the low watermark"
        );
        assert_eq!(t.observe(95, 0, &b), None);
        assert_eq!(t.observe(80, 0, &b), None);
        assert_eq!(t.observe(80, 0, &b), Some(Pressure::Recovered));
        assert_eq!(t.observe(80, 0, &b), None);
        assert!(matches!(
            PressureTracker::new(1, 1, 0.9).observe(0, 2000, &b),
            Some(Pressure::Exceeded(r)) if r.contains("cpu")
        ));
    }
}
