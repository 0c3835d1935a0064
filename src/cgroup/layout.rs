//! Which cgroup hierarchy the host has, read from /proc/self/mountinfo.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::CgroupError;

/// Mount points of the v1 controllers the agent uses (cpu and cpuacct may share one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct V1Mounts {
    pub memory: PathBuf,
    pub cpu: PathBuf,
    pub cpuacct: PathBuf,
    pub pids: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Layout {
    /// Pure cgroup v2 (RHEL 9, current distros).
    Unified { root: PathBuf },
    /// cgroup v1 only (RHEL 8 style).
    Legacy(V1Mounts),
    /// v1 controllers plus a cgroup2 mount without them: the v1 controllers are used.
    Hybrid(V1Mounts),
}

impl Layout {
    pub fn name(&self) -> &'static str {
        match self {
            Layout::Unified { .. } => "v2",
            Layout::Legacy(_) => "v1",
            Layout::Hybrid(_) => "v1-hybrid",
        }
    }
}

pub fn detect() -> Result<Layout, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(super::io_err(path))?;
    detect_from(&text, |p| {
        std::fs::read_to_string(p.join("cgroup.controllers")).unwrap_or_default()
    })
}

/// Decides the layout from mountinfo text; `controllers_of` reads a cgroup2 mount's
/// `cgroup.controllers` (injected so tests need no real mount).
pub fn detect_from(
    mountinfo: &str,
    controllers_of: impl Fn(&Path) -> String,
) -> Result<Layout, CgroupError> {
    let mut v2: Option<PathBuf> = None;
    let (mut memory, mut cpu, mut cpuacct, mut pids) = (None, None, None, None);
    for m in crate::mountinfo::parse(mountinfo) {
        match m.fstype.as_str() {
            "cgroup2" => {
                v2.get_or_insert(m.mount_point);
            }
            "cgroup" => {
                for o in m.super_options.split(',') {
                    match o {
                        "memory" => memory = Some(m.mount_point.clone()),
                        "cpu" => cpu = Some(m.mount_point.clone()),
                        "cpuacct" => cpuacct = Some(m.mount_point.clone()),
                        "pids" => pids = Some(m.mount_point.clone()),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let v1 = match (memory, cpu, cpuacct, pids) {
        (Some(memory), Some(cpu), Some(cpuacct), Some(pids)) => Some(V1Mounts {
            memory,
            cpu,
            cpuacct,
            pids,
        }),
        (None, None, None, None) => None,
        (m, c, a, p) => {
            let missing: Vec<&str> = [("memory", m), ("cpu", c), ("cpuacct", a), ("pids", p)]
                .into_iter()
                .filter(|(_, v)| v.is_none())
                .map(|(n, _)| n)
                .collect();
            if v2.is_none() {
                return Err(CgroupError::Layout(format!(
                    "cgroup v1 controllers {} are not mounted",
                    missing.join(", ")
                )));
            }
            None
        }
    };
    match (v1, v2) {
        (Some(m), Some(_)) => Ok(Layout::Hybrid(m)),
        (Some(m), None) => Ok(Layout::Legacy(m)),
        (None, Some(root)) => {
            let ctrls = controllers_of(&root);
            let has = |c: &str| ctrls.split_whitespace().any(|x| x == c);
            if has("memory") && has("cpu") && has("pids") {
                Ok(Layout::Unified { root })
            } else {
                Err(CgroupError::Layout(format!(
                    "cgroup2 at {} offers '{}', but memory, cpu and pids are needed",
                    root.display(),
                    ctrls.trim()
                )))
            }
        }
        (None, None) => Err(CgroupError::Layout(
            "no cgroup filesystem is mounted".to_string(),
        )),
    }
}
