//! Drivers run workloads. Each call is blocking and runs on a workload's lane (a blocking
//! thread, one command at a time per workload), never on the controller task.

pub mod process;
pub mod shell;
