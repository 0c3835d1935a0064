//! /proc/self/mountinfo and /proc/self/mounts: the one parser of mount tables.

use std::path::PathBuf;

/// One line of /proc/self/mountinfo (the fields the agent uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_point: PathBuf,
    pub fstype: String,
    /// Per-superblock options (for cgroup v1: the controllers, e.g. `rw,memory`).
    pub super_options: String,
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            // "36 25 0:31 / /sys/fs/cgroup/memory rw,relatime shared:15 - cgroup cgroup rw,memory"
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            let mut r = right.split_whitespace();
            let fstype = r.next()?;
            let _source = r.next();
            let super_options = r.next().unwrap_or("");
            Some(MountInfo {
                mount_point: PathBuf::from(unescape(mount_point)),
                fstype: fstype.to_string(),
                super_options: super_options.to_string(),
            })
        })
        .collect()
}

/// The kernel escapes space, tab, newline and backslash in mount tables as `\ooo` (octal
/// bytes); the result is decoded as UTF-8 (lossily: a path is shown, not reopened, from it).
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_utf8_survive() {
        assert_eq!(unescape("/mnt/my\\040disk"), "/mnt/my disk");
        assert_eq!(unescape("/mnt/caf\\303\\251"), "/mnt/café");
        assert_eq!(unescape("/mnt/日本"), "/mnt/日本");
        assert_eq!(unescape("a\\\\b\\04"), "a\\\\b\\04");
        let m = parse(
            "36 25 0:31 / /sys/fs/cgroup/mem\\040ory rw - cgroup cgroup rw,memory\ngarbage\n",
        );
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].mount_point, PathBuf::from("/sys/fs/cgroup/mem ory"));
        assert_eq!(m[0].fstype, "cgroup");
        assert_eq!(m[0].super_options, "rw,memory");
    }
}
