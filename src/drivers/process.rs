//! Facts about host processes read from /proc.

/// Start time of a process in clock ticks since boot (/proc/PID/stat field 22), or `None` if
/// the process does not exist. Together with the pid it identifies one process for good.
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_ticks(&stat)
}

/// Parses field 22 of /proc/PID/stat; the command name (field 2) may contain spaces and
/// parentheses, so fields are counted after its last ')'.
pub fn parse_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); field 22 is the 20th from there.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is still the process that started at `ticks` (and not a zombie).
pub fn is_same_process(pid: i32, ticks: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state_is_zombie = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .is_some_and(|s| s == "Z" || s == "X");
    !state_is_zombie && parse_start_ticks(&stat) == Some(ticks)
}

/// Resident set size of a process in bytes (/proc/PID/statm), for the benchmark and status.
pub fn rss_bytes(pid: i32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |v| v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_comm() {
        let stat = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(parse_start_ticks(stat), Some(987654));
        assert_eq!(parse_start_ticks("garbage"), None);
    }

    #[test]
    fn own_process_is_recognised() {
        let me = std::process::id() as i32;
        let t = start_ticks(me).unwrap();
        assert!(is_same_process(me, t));
        assert!(!is_same_process(me, t + 1));
        assert!(rss_bytes(me).unwrap() > 0);
    }
}

/// Who a child becomes after joining its cgroup: uid, gid, supplementary groups.
pub type Credentials = (nix::unistd::Uid, nix::unistd::Gid, Vec<nix::unistd::Gid>);

/// Arranges for `cmd`'s child to join `cgroups` (every `cgroup.procs` of one workload) between
/// fork and exec, still as root, then optionally start a new session and drop to `creds`:
/// whatever it executes is already limited, and it cannot write to the root-owned
/// `cgroup.procs` to leave. The returned files must stay open until `cmd.spawn()` returns.
pub fn join_cgroup_before_exec(
    cmd: &mut std::process::Command,
    cgroup_procs: &[std::path::PathBuf],
    creds: Option<Credentials>,
    new_session: bool,
) -> Result<Vec<std::os::fd::OwnedFd>, crate::cgroup::CgroupError> {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    // Opened before the fork: the child only write(2)s its pid into them.
    let files: Vec<OwnedFd> = cgroup_procs
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_CLOEXEC)
                .open(p)
                .map(OwnedFd::from)
                .map_err(|source| crate::cgroup::CgroupError::Io {
                    path: p.clone(),
                    source,
                })
        })
        .collect::<Result<_, _>>()?;
    let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe system calls (setsid, getpid, write, setgroups, setgid, setuid) on
    // memory prepared before the fork; it does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            if new_session {
                nix::unistd::setsid()?;
            }
            let mut buf = [0u8; 12];
            let pid = itoa(nix::libc::getpid() as u32, &mut buf);
            for fd in &fds {
                if nix::libc::write(*fd, pid.as_ptr().cast(), pid.len()) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some((uid, gid, groups)) = &creds {
                nix::unistd::setgroups(groups)?;
                nix::unistd::setgid(*gid)?;
                nix::unistd::setuid(*uid)?;
            }
            Ok(())
        });
    }
    Ok(files)
}

/// Formats `n` in decimal into `buf` without allocating (safe between fork and exec).
fn itoa(mut n: u32, buf: &mut [u8; 12]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod itoa_tests {
    #[test]
    fn itoa_formats_without_allocating() {
        let mut b = [0u8; 12];
        assert_eq!(super::itoa(0, &mut b), b"0");
        assert_eq!(super::itoa(4194304, &mut b), b"4194304");
        assert_eq!(super::itoa(u32::MAX, &mut b), b"4294967295");
    }
}
