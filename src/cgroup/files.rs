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

/// Reads cgroup files, optionally keeping them open between reads: the sampler reads the
/// same few files of every workload each second, and one pread(2) at offset 0 (which makes
/// kernfs regenerate the content) costs a third of open+read+close.
#[derive(Default)]
pub struct CounterReader {
    cache: Option<std::collections::HashMap<std::path::PathBuf, (std::fs::File, bool)>>,
    buf: Vec<u8>,
}

impl CounterReader {
    /// Opens, reads and closes every time.
    pub fn direct() -> Self {
        CounterReader::default()
    }

    /// Keeps files open; call [`CounterReader::sweep`] after each round.
    pub fn cached() -> Self {
        CounterReader {
            cache: Some(Default::default()),
            buf: Vec::with_capacity(512),
        }
    }

    pub fn read(&mut self, path: &Path) -> std::io::Result<&str> {
        use std::io::Read;
        use std::os::unix::fs::FileExt;
        self.buf.clear();
        match &mut self.cache {
            None => {
                std::fs::File::open(path)?.read_to_end(&mut self.buf)?;
            }
            Some(cache) => {
                if !cache.contains_key(path) {
                    cache.insert(path.to_path_buf(), (std::fs::File::open(path)?, true));
                }
                let Some((f, used)) = cache.get_mut(path) else {
                    return Ok("");
                };
                *used = true;
                self.buf.resize(4096, 0);
                let mut n = 0;
                loop {
                    if n == self.buf.len() {
                        self.buf.resize(n * 2, 0);
                    }
                    match f.read_at(&mut self.buf[n..], n as u64) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) => {
                            cache.remove(path);
                            return Err(e);
                        }
                    }
                }
                self.buf.truncate(n);
            }
        }
        Ok(std::str::from_utf8(&self.buf).unwrap_or(""))
    }

    pub fn read_u64(&mut self, path: &Path) -> Result<u64, CgroupError> {
        let t = self.read(path).map_err(io_err(path))?.trim();
        if t == "max" {
            return Ok(u64::MAX);
        }
        t.parse().map_err(|_| CgroupError::Parse {
            path: path.to_path_buf(),
            content: t.chars().take(64).collect(),
        })
    }

    /// One value of a flat-keyed file; `None` when the file or key is missing.
    pub fn keyed(&mut self, path: &Path, key: &str) -> Option<u64> {
        let text = self.read(path).ok()?;
        parse_flat_keyed(text)
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// Closes the files not read since the previous sweep (workloads that went away).
    pub fn sweep(&mut self) {
        if let Some(cache) = &mut self.cache {
            cache.retain(|_, (_, used)| std::mem::replace(used, false));
            // After many workloads are gone, the table shrinks with them.
            if cache.capacity() > 2 * cache.len() + 32 {
                cache.shrink_to_fit();
            }
        }
    }

    pub fn open_files(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.len())
    }
}
