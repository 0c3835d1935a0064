//! device-worker-ng: the Flotta edge device agent.
//!
//! Where things live: `machines/` (the statig state machines: device, workload), `controller/`
//! (the one task that owns them and executes their commands), `drivers/` (running workloads),
//! `cgroup/` (layout detection, limits, counters, kernel notifications), `sampler`, `budget`
//! and `alerts` (resource accounting and the kernel's alerts about it), `workload/` (the
//! desired state and its validation), `store/` (persistence), `status/` (the snapshot, control
//! socket and `status` table), `logs` (the `logs` command), `config/` (settings).

pub mod alerts;
pub mod budget;
pub mod cgroup;
pub mod clock;
pub mod config;
pub mod controller;
pub mod cron;
pub mod daemon;
pub mod drivers;
pub mod flotta;
pub mod heap;
pub mod logging;
pub mod logs;
pub mod machines;
pub mod metrics;
pub mod mountinfo;
pub mod notify;
pub mod pool;
pub mod profiles;
pub mod sampler;
pub mod status;
pub mod store;
pub mod units;
pub mod variables;
pub mod workload;
pub mod yaml;
