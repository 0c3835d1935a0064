//! Creating, limiting, attaching to and removing cgroups directly in cgroupfs, through
//! cgroups-rs' per-controller API (`cgroups_rs::fs`): the cgroupfs driver's half of the work
//! (the systemd driver's units are created by systemd, see `super::systemd`).
//!
//! cgroups-rs' controllers are built on an explicit directory, so they work on the agent's
//! own subtree wherever the layout puts it (and on the temporary trees of the unit tests).
//! Its `Cgroup`/`Hierarchy` layer is not used: it assumes `/sys/fs/cgroup`, loses a custom
//! hierarchy on `clone()`, and enables v2 controllers ignoring write errors.
//!
//! What stays in-house, and why:
//! - the memory limit is read back after writing: cgroups-rs' `apply()` ignores a failed
//!   limit write, and even a successful write is rounded by the kernel;
//! - reading `cgroup.procs` (`WorkloadCgroup::pids`): cgroups-rs' `procs()` reads a file it
//!   cannot read as an empty list, which would let a stop or a removal go ahead on a cgroup
//!   that still holds processes;
//! - joining a cgroup between fork and exec (`drivers::process::join_cgroup_before_exec`):
//!   cgroups-rs attaches a running process from outside, after it has already run;
//! - counters (`files::CounterReader`: kept-open files, no v2 `memory.events` reader in
//!   cgroups-rs), `cgroup.kill`, and layout detection (cgroups-rs has no hybrid layout).

use std::path::Path;
use std::time::{Duration, Instant};

use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Controller, MaxValue};
use cgroups_rs::CgroupPid;

use super::{cpu_quota_us, files, CgroupError, Limits, WorkloadCgroup, CPU_PERIOD_US};

/// A cgroups-rs error as ours: the file or directory, what failed and the OS's reason.
fn kernel_err(path: &Path) -> impl FnOnce(cgroups_rs::fs::error::Error) -> CgroupError + '_ {
    move |e| {
        let why = match std::error::Error::source(&e) {
            Some(cause) => format!("{}: {cause}", e.kind()),
            None => e.kind().to_string(),
        };
        CgroupError::Kernel {
            path: path.to_path_buf(),
            why,
        }
    }
}

/// The controllers of one cgroup (on v2 all in the same directory).
struct Controllers {
    memory: MemController,
    cpu: CpuController,
    pids: PidController,
    v2: bool,
}

impl Controllers {
    fn of(cg: &WorkloadCgroup) -> Controllers {
        match cg {
            WorkloadCgroup::V1 {
                memory, cpu, pids, ..
            } => Controllers {
                memory: MemController::new(memory.clone(), memory.clone(), false),
                cpu: CpuController::new(cpu.clone(), cpu.clone(), false),
                pids: PidController::new(pids.clone(), pids.clone(), false),
                v2: false,
            },
            WorkloadCgroup::V2 { dir, .. } => Controllers {
                memory: MemController::new(dir.clone(), dir.clone(), true),
                cpu: CpuController::new(dir.clone(), dir.clone(), true),
                pids: PidController::new(dir.clone(), dir.clone(), true),
                v2: true,
            },
        }
    }
}

pub(super) fn create(cg: &WorkloadCgroup) -> Result<(), CgroupError> {
    // cgroups-rs creates a controller's directory with create_dir_all; one handle per
    // directory is enough (they are all plain directories to create).
    for d in cg.dirs() {
        PidController::new(d.to_path_buf(), d.to_path_buf(), false)
            .create()
            .map_err(kernel_err(d))?;
    }
    Ok(())
}

/// Writes the limits; a limit set to `None` is reset to unlimited.
pub(super) fn apply(cg: &WorkloadCgroup, limits: &Limits) -> Result<(), CgroupError> {
    let c = Controllers::of(cg);
    let mem_dir = c.memory.path().to_path_buf();
    let memory = limits.memory_bytes.map_or(-1, saturating_i64);
    if c.v2 {
        c.memory
            .set_limit(memory)
            .map_err(kernel_err(&mem_dir.join("memory.max")))?;
        // No swapping past the limit (the kernel has memory.swap.max only with swap accounting).
        if mem_dir.join("memory.swap.max").exists() {
            let swap = if limits.memory_bytes.is_some() { 0 } else { -1 };
            c.memory
                .set_memswap_limit(swap)
                .map_err(kernel_err(&mem_dir.join("memory.swap.max")))?;
        }
        check_memory(&mem_dir.join("memory.max"), limits.memory_bytes)?;
    } else {
        // memsw must stay >= limit_in_bytes: raise it first when lowering both would fail,
        // and cap it to the same value so a workload cannot swap past its limit.
        let memsw = mem_dir.join("memory.memsw.limit_in_bytes");
        let has_memsw = memsw.exists();
        if has_memsw {
            let _ = c.memory.set_memswap_limit(-1);
        }
        let limit_file = mem_dir.join("memory.limit_in_bytes");
        c.memory
            .set_limit(memory)
            .map_err(kernel_err(&limit_file))?;
        if has_memsw {
            c.memory
                .set_memswap_limit(memory)
                .map_err(kernel_err(&memsw))?;
        }
        check_memory(&limit_file, limits.memory_bytes)?;
    }
    let quota = limits
        .cpu_millicores
        .map_or(-1, |m| saturating_i64(cpu_quota_us(m)));
    let cpu_dir = c.cpu.path().to_path_buf();
    if c.v2 {
        c.cpu
            .set_cfs_quota_and_period(Some(quota), Some(CPU_PERIOD_US))
            .map_err(kernel_err(&cpu_dir.join("cpu.max")))?;
    } else {
        c.cpu
            .set_cfs_period(CPU_PERIOD_US)
            .map_err(kernel_err(&cpu_dir.join("cpu.cfs_period_us")))?;
        c.cpu
            .set_cfs_quota(quota)
            .map_err(kernel_err(&cpu_dir.join("cpu.cfs_quota_us")))?;
    }
    let pids = limits
        .pids
        .map_or(MaxValue::Max, |p| MaxValue::Value(saturating_i64(p)));
    c.pids
        .set_pid_max(pids)
        .map_err(kernel_err(&c.pids.path().join("pids.max")))?;
    Ok(())
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The kernel rounds a memory limit down to whole pages and may refuse it without the write
/// failing loudly everywhere: what it kept must be what was asked for.
fn check_memory(file: &Path, wanted: Option<u64>) -> Result<(), CgroupError> {
    let got = files::read_u64(file)?;
    let ok = match wanted {
        // v2 says "max"; v1 says PAGE_COUNTER_MAX pages, a number near 2^63.
        None => got >= 1 << 62,
        Some(w) => {
            let page = page_size();
            got == w / page * page || got == w
        }
    };
    if ok {
        Ok(())
    } else {
        Err(CgroupError::NotApplied {
            path: file.to_path_buf(),
            wanted: wanted.map_or("unlimited".into(), |w| w.to_string()),
            got: got.to_string(),
        })
    }
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .filter(|v| *v > 0)
        .unwrap_or(4096)
}

/// Moves process `pid` (all its threads) into the cgroup, in every hierarchy.
pub(super) fn attach(cg: &WorkloadCgroup, pid: u32) -> Result<(), CgroupError> {
    for d in cg.dirs() {
        PidController::new(d.to_path_buf(), d.to_path_buf(), false)
            .add_task_by_tgid(&CgroupPid::from(u64::from(pid)))
            .map_err(kernel_err(&d.join("cgroup.procs")))?;
    }
    Ok(())
}

/// Removes one cgroup directory (and empty cgroups below it). rmdir fails with EBUSY for a
/// moment after the last process exited (the kernel still tears the task down): cgroups-rs
/// retries for ~150 ms, and this keeps trying for up to 2 s. A missing directory is fine.
pub(super) fn remove_dir(d: &Path) -> Result<(), CgroupError> {
    let handle = PidController::new(d.to_path_buf(), d.to_path_buf(), false);
    let start = Instant::now();
    loop {
        match handle.delete() {
            Ok(()) => return Ok(()),
            Err(_) if !d.exists() => return Ok(()),
            Err(_) if start.elapsed() < Duration::from_secs(2) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(kernel_err(d)(e)),
        }
    }
}
