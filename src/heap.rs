//! How the agent's heap gives memory back to the device.
//!
//! An agent that starts and stops hundreds of workloads allocates a few MiB at the peak and
//! must return to its idle size afterwards (README, Performance). glibc keeps freed memory in
//! three places: per-thread arenas (one per thread that ever allocated), the heap itself
//! (returned by `malloc_trim`, page by page, once a sample sees the workload count settled)
//! and a per-thread cache of up to seven freed chunks per size class. `malloc_trim` cannot
//! reach that cache, and its chunks lie scattered over the heap, each keeping its page
//! resident: measured with 200 workloads started and removed, the cache alone kept about
//! 550 KiB resident, and what it held grew with every churn. The cache can only be switched
//! off before the process starts (`GLIBC_TUNABLES`), so `run` re-executes itself once with
//! it off; freed chunks then go straight back to the bins that `malloc_trim` empties.

/// The tunable that switches the per-thread cache off.
#[cfg(target_env = "gnu")]
const NO_THREAD_CACHE: &str = "glibc.malloc.tcache_count=0";

/// Set on the re-executed agent: `GLIBC_TUNABLES` as it was before (empty if unset), so
/// that it is restored for the agent's children and the agent never re-executes twice.
#[cfg(target_env = "gnu")]
const BEFORE: &str = "DEVICE_WORKER_NG_GLIBC_TUNABLES_BEFORE";

/// For `run`, before anything else (no thread may exist yet: the environment changes):
/// re-executes the binary with glibc's per-thread cache off, or, in the re-executed process,
/// puts the environment back as it was. If the re-execution fails the agent runs on as it
/// is, saying what it costs.
pub fn without_thread_cache() {
    #[cfg(target_env = "gnu")]
    {
        use std::os::unix::process::CommandExt;
        if let Some(before) = std::env::var_os(BEFORE) {
            restore_name();
            std::env::remove_var(BEFORE);
            if before.is_empty() {
                std::env::remove_var("GLIBC_TUNABLES");
            } else {
                std::env::set_var("GLIBC_TUNABLES", before);
            }
            return;
        }
        let before = std::env::var_os("GLIBC_TUNABLES").unwrap_or_default();
        let mut tunables = before.clone();
        if !tunables.is_empty() {
            tunables.push(":");
        }
        tunables.push(NO_THREAD_CACHE);
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_else(|| "device-worker-ng".into());
        // /proc/self/exe: the very binary running now, even if a package upgrade has just
        // replaced the file.
        let err = std::process::Command::new("/proc/self/exe")
            .arg0(arg0)
            .args(args)
            .env("GLIBC_TUNABLES", tunables)
            .env(BEFORE, before)
            .exec();
        eprintln!(
            "device-worker-ng: could not re-execute with glibc's thread cache off ({err}); \
             memory freed after many workloads may stay resident"
        );
    }
}

/// Executed as `/proc/self/exe`, the process is named `exe` (what `ps`, `top` and `pgrep`
/// show): it takes back its binary's name, as the kernel would have cut it (15 bytes).
#[cfg(target_env = "gnu")]
fn restore_name() {
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let Some(file) = exe.file_name().and_then(|f| f.to_str()) else {
        return;
    };
    // A binary replaced by an upgrade since: the link reads "<path> (deleted)".
    let file = file.trim_end_matches(" (deleted)");
    let mut name = file.as_bytes().to_vec();
    name.truncate(15);
    name.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes, which `name` is.
    unsafe {
        nix::libc::prctl(nix::libc::PR_SET_NAME, name.as_ptr());
    }
}

/// Tunes the allocator for the daemon; called once at its start.
pub fn tune() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator. One arena: glibc's default (8 per core) gives
    // each short-lived blocking thread its own, which keeps its pages; the agent's threads
    // mostly wait, so there is nothing to contend for. Allocations of 64 KiB and more get
    // their own mapping, returned whole when freed.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 64 << 10);
    }
}

/// Returns the heap's free pages to the system.
pub fn give_back() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory of the allocator to the system.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
