//! The resource sampler: reads every workload cgroup's counters and the device totals.
//! Runs on a blocking thread each SAMPLE_INTERVAL; the controller turns counters into rates.

use std::time::Instant;

use crate::cgroup::{CounterReader, Counters, WorkloadCgroup};
use crate::workload::WorkloadName;

/// What the sampler is asked to look at for one workload.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: WorkloadName,
    pub cgroup: WorkloadCgroup,
}

#[derive(Debug, Clone)]
pub struct WorkloadSample {
    pub name: WorkloadName,
    pub counters: Option<Counters>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceTotals {
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub cpus: u64,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub at: Instant,
    pub workloads: Vec<WorkloadSample>,
    /// The workloads' parent cgroup's own memory counter (what the kernel's notifications and
    /// cap count), when readable.
    pub parent_memory: Option<u64>,
    pub device: DeviceTotals,
    /// Use of the file system holding STATE_DIR, in percent.
    pub disk_percent: Option<f64>,
    /// Processes on the device as a percentage of the kernel's pid_max.
    pub pids_percent: f64,
    /// The kernel's memory pressure (PSI `some avg10`, percent of time stalled), if it has PSI.
    pub memory_pressure: Option<f64>,
    /// Profile variables fed through the local input file (fresh ones only).
    pub variables: std::collections::BTreeMap<String, crate::profiles::expr::Value>,
}

/// What the sampler thread reads besides the cgroups.
#[derive(Debug, Clone)]
pub struct SamplerConfig {
    pub state_dir: std::path::PathBuf,
    pub variables_file: std::path::PathBuf,
    pub variables_ttl: std::time::Duration,
    /// `memory.usage_in_bytes` (v1) / `memory.current` (v2) of the workloads' parent.
    pub parent_memory_file: Option<std::path::PathBuf>,
}

pub fn sample(targets: &[Target], reader: &mut CounterReader, config: &SamplerConfig) -> Report {
    let workloads = targets
        .iter()
        .map(|t| WorkloadSample {
            name: t.name.clone(),
            counters: t.cgroup.counters_with(reader).ok(),
        })
        .collect();
    let parent_memory = config
        .parent_memory_file
        .as_deref()
        .and_then(|f| reader.read_u64(f).ok());
    reader.sweep();
    Report {
        at: Instant::now(),
        workloads,
        parent_memory,
        device: device_totals(),
        disk_percent: disk_percent(&config.state_dir),
        pids_percent: pids_percent(),
        memory_pressure: memory_pressure(),
        variables: crate::variables::read(&config.variables_file, config.variables_ttl),
    }
}

fn disk_percent(path: &std::path::Path) -> Option<f64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    let total = st.blocks() as f64;
    if total <= 0.0 {
        return None;
    }
    Some((total - st.blocks_available() as f64) * 100.0 / total)
}

/// `some avg10` of /proc/pressure/memory: the share of the last 10 s in which some task
/// stalled on memory. The kernel's own early warning, ahead of any OOM kill.
fn memory_pressure() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/pressure/memory").ok()?;
    parse_pressure(&text)
}

pub fn parse_pressure(text: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with("some "))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?
        .parse()
        .ok()
}

fn pids_percent() -> f64 {
    let max: f64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768.0);
    // /proc/loadavg's fourth field is "running/total" scheduling entities.
    let total: f64 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().nth(3)?.split('/').nth(1)?.parse().ok())
        .unwrap_or(0.0);
    total * 100.0 / max
}

/// The sampler thread: samples whenever the controller hands it the current targets (once
/// per SAMPLE_INTERVAL) and sends the report back. It keeps the counter files open between
/// rounds, which is most of its cost.
pub fn spawn(
    events: async_channel::Sender<crate::controller::Event>,
    config: SamplerConfig,
) -> std::io::Result<async_channel::Sender<Vec<Target>>> {
    let (tx, rx) = async_channel::bounded::<Vec<Target>>(1);
    std::thread::Builder::new()
        .name("sampler".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let mut reader = CounterReader::cached();
            while let Ok(targets) = rx.recv_blocking() {
                let report = sample(&targets, &mut reader, &config);
                if events
                    .send_blocking(crate::controller::Event::Sampled(Box::new(report)))
                    .is_err()
                {
                    break;
                }
            }
        })?;
    Ok(tx)
}

pub fn device_totals() -> DeviceTotals {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let (total, available) = parse_meminfo(&meminfo);
    DeviceTotals {
        memory_total_bytes: total,
        memory_available_bytes: available,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
    }
}

/// (MemTotal, MemAvailable) in bytes.
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// CPU use in millicores between two cumulative readings.
pub fn millicores(prev_ns: u64, now_ns: u64, elapsed: std::time::Duration) -> u64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 || now_ns < prev_ns {
        return 0;
    }
    ((now_ns - prev_ns) as f64 / 1e6 / secs).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn meminfo_fields() {
        let t = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_meminfo(t), (24576000 * 1024, 20000000 * 1024));
        assert_eq!(parse_meminfo(""), (0, 0));
    }

    #[test]
    fn psi_some_avg10() {
        let t = "some avg10=12.50 avg60=3.00 avg300=0.01 total=4910470\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=2615138\n";
        assert_eq!(parse_pressure(t), Some(12.5));
        assert_eq!(parse_pressure("garbage"), None);
    }

    #[test]
    fn millicores_from_cpu_time() {
        assert_eq!(millicores(0, 500_000_000, Duration::from_secs(1)), 500);
        assert_eq!(millicores(0, 2_000_000_000, Duration::from_secs(1)), 2000);
        assert_eq!(millicores(10, 5, Duration::from_secs(1)), 0);
    }
}
