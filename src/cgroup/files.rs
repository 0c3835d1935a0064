//! Reading and writing cgroupfs files.

use std::io::Write;
use std::path::Path;

use super::{io_err, CgroupError};

pub fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    // cgroupfs wants one write(2) per value and no temp file (O_TRUNC is harmless there).
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(value.as_bytes()).map_err(io_err(path))
}

pub fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let t = text.trim();
    if t == "max" {
        return Ok(u64::MAX);
    }
    t.parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        content: t.chars().take(64).collect(),
    })
}

/// `key value` lines (memory.events, cpu.stat, memory.oom_control, pids.events).
pub fn parse_flat_keyed(text: &str) -> Vec<(&str, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k, v))
        })
        .collect()
}

/// One value of a flat-keyed file; `None` when the file or key is missing.
pub fn keyed(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_flat_keyed(&text)
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}
