//! Hardware inventory for `enrolment`, `registration` and heartbeats
//! (PROTOCOL.md §5.3). Cheap (a handful of small /proc and /sys reads plus one
//! getifaddrs) and infallible: whatever cannot be read is left empty.
//!
//! File-based sources are read under configurable roots so tests can lay out
//! a fake /proc and /sys in a temp directory.

use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::messages::{
    Cpu, HardwareInfo, HardwareProfileConfiguration, HardwareProfileScope, Interface, Memory,
    Mount, SystemVendor,
};

/// Where to read from; `Default` is the live system.
#[derive(Debug, Clone)]
pub struct HardwareSources {
    pub proc_root: PathBuf,
    pub sys_root: PathBuf,
    /// Whether to query the kernel for interface addresses (getifaddrs).
    pub live_interfaces: bool,
}

impl Default for HardwareSources {
    fn default() -> Self {
        HardwareSources {
            proc_root: PathBuf::from("/proc"),
            sys_root: PathBuf::from("/sys"),
            live_interfaces: true,
        }
    }
}

/// Gather from the live system.
pub fn gather() -> HardwareInfo {
    gather_from(&HardwareSources::default())
}

/// Gather from `src`. Arrays the agent does not fill (`disks`, `gpus`,
/// `host_devices`) stay `None` and go out as `null`, as with the official
/// agent (§5.3 example).
pub fn gather_from(src: &HardwareSources) -> HardwareInfo {
    let cpuinfo = read(&src.proc_root.join("cpuinfo"));
    let vendor = system_vendor(&src.sys_root, &cpuinfo);
    HardwareInfo {
        hostname: hostname(&src.proc_root),
        interfaces: Some(if src.live_interfaces {
            interfaces(&src.sys_root)
        } else {
            Vec::new()
        }),
        disks: None,
        boot: None,
        system_vendor: Some(vendor),
        memory: Some(memory(&src.proc_root, &src.sys_root)),
        cpu: Some(cpu(&src.proc_root, &cpuinfo)),
        gpus: None,
        host_devices: None,
        mounts: Some(mounts(&src.proc_root)),
    }
}

/// `modelName` for enrolment features: the devicetree model on boards that
/// have one (the CRD documents this source, §2.4.1).
pub fn model_name(src: &HardwareSources) -> String {
    let p = src.sys_root.join("firmware/devicetree/base/model");
    read(&p).trim_end_matches('\0').trim().to_owned()
}

/// The part that can change at run time: hostname, interfaces, mounts
/// (`[dw]` "mutable", §5.3).
pub fn mutable_part(hw: &HardwareInfo) -> HardwareInfo {
    HardwareInfo {
        hostname: hw.hostname.clone(),
        interfaces: hw.interfaces.clone(),
        mounts: hw.mounts.clone(),
        ..HardwareInfo::default()
    }
}

/// The hardware to put in a heartbeat, following the official agent (§5.3):
/// nothing unless `include`; everything on the first successful heartbeat
/// (`last_sent == None`); later only the mutable part, and with `scope:
/// delta` only the changed hostname/interfaces (mounts are not compared),
/// `None` if nothing changed.
pub fn heartbeat_hardware(
    profile: &HardwareProfileConfiguration,
    current: &HardwareInfo,
    last_sent: Option<&HardwareInfo>,
) -> Option<HardwareInfo> {
    if !profile.include {
        return None;
    }
    let Some(last) = last_sent else {
        return Some(current.clone());
    };
    if profile.scope != Some(HardwareProfileScope::Delta) {
        return Some(mutable_part(current));
    }
    let mut delta = HardwareInfo::default();
    let mut changed = false;
    if current.hostname != last.hostname {
        delta.hostname = current.hostname.clone();
        changed = true;
    }
    if current.interfaces != last.interfaces {
        delta.interfaces = current.interfaces.clone();
        changed = true;
    }
    changed.then_some(delta)
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_default()
}

fn read_trim(p: &Path) -> String {
    read(p).trim().to_owned()
}

fn hostname(proc_root: &Path) -> String {
    let h = read_trim(&proc_root.join("sys/kernel/hostname"));
    if !h.is_empty() {
        return h;
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|s| s.into_string().ok())
        .unwrap_or_default()
}

/// `key : value` lines of the first processor block, plus the processor count.
fn cpuinfo_fields(cpuinfo: &str) -> (BTreeMap<String, String>, i64) {
    let mut first = BTreeMap::new();
    let mut count = 0;
    let mut in_first = true;
    for line in cpuinfo.lines() {
        let Some((k, v)) = line.split_once(':') else {
            if line.trim().is_empty() && count > 0 {
                in_first = false;
            }
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k == "processor" {
            count += 1;
        }
        if in_first || !first.contains_key(k) {
            first.entry(k.to_owned()).or_insert_with(|| v.to_owned());
        }
    }
    (first, count)
}

fn cpu(proc_root: &Path, cpuinfo: &str) -> Cpu {
    let (fields, count) = cpuinfo_fields(cpuinfo);
    // x86 says "model name"; arm64 has none per core, but may have "Hardware"
    // or "Model"; others use "cpu model" / "cpu".
    let model_name = ["model name", "Model", "Hardware", "cpu model", "cpu"]
        .iter()
        .find_map(|k| fields.get(*k).filter(|v| !v.is_empty()).cloned())
        .unwrap_or_default();
    let count = if count > 0 {
        Some(count)
    } else {
        std::thread::available_parallelism()
            .ok()
            .and_then(|n| i64::try_from(n.get()).ok())
    };
    let frequency = fields.get("cpu MHz").and_then(|v| v.parse::<f64>().ok());
    // /proc/sys/kernel/arch is `uname -m` (Linux >= 6.1); older kernels fall
    // back to the compile-time arch, which matches for x86_64/aarch64.
    let mut architecture = read_trim(&proc_root.join("sys/kernel/arch"));
    if architecture.is_empty() {
        architecture = std::env::consts::ARCH.to_owned();
    }
    Cpu {
        count,
        frequency,
        // The official agent sends `[]` (§5.3); the full flag list would add
        // about a kilobyte to every hardware heartbeat for no consumer.
        flags: Some(Vec::new()),
        model_name,
        architecture,
    }
}

fn memory(proc_root: &Path, sys_root: &Path) -> Memory {
    let meminfo = read(&proc_root.join("meminfo"));
    let usable = meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemTotal:")?;
        let kib: i64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        kib.checked_mul(1024)
    });
    // Physical = memory blocks × block size, which includes what the kernel
    // reserved; only counting directories keeps it cheap.
    let mem_dir = sys_root.join("devices/system/memory");
    let physical = i64::from_str_radix(read_trim(&mem_dir.join("block_size_bytes")).as_str(), 16)
        .ok()
        .and_then(|block| {
            let blocks = fs::read_dir(&mem_dir)
                .ok()?
                .filter_map(Result::ok)
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.strip_prefix("memory")
                        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                })
                .count();
            let blocks = i64::try_from(blocks).ok()?;
            (blocks > 0).then(|| block.saturating_mul(blocks))
        })
        .or(usable);
    Memory {
        physical_bytes: physical,
        usable_bytes: usable,
    }
}

fn system_vendor(sys_root: &Path, cpuinfo: &str) -> SystemVendor {
    let dmi = sys_root.join("class/dmi/id");
    let manufacturer = read_trim(&dmi.join("sys_vendor"));
    let mut product_name = read_trim(&dmi.join("product_name"));
    if product_name.is_empty() {
        product_name = read(&sys_root.join("firmware/devicetree/base/model"))
            .trim_end_matches('\0')
            .trim()
            .to_owned();
    }
    // product_serial is root-only; empty when unreadable.
    let serial_number = read_trim(&dmi.join("product_serial"));
    let hypervisor_flag = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    let known_vm = [
        "QEMU",
        "KVM",
        "VMware",
        "VirtualBox",
        "Xen",
        "Bochs",
        "Parallels",
    ]
    .iter()
    .any(|v| manufacturer.contains(v) || product_name.contains(v))
        || (manufacturer.contains("Microsoft") && product_name.contains("Virtual"));
    SystemVendor {
        manufacturer,
        product_name,
        serial_number,
        is_virtual: hypervisor_flag || known_vm,
    }
}

/// Interfaces with at least one address, loopback excluded, like the
/// official agent which lists only interfaces that have addresses (§5.3).
fn interfaces(sys_root: &Path) -> Vec<Interface> {
    use nix::net::if_::InterfaceFlags;

    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut by_name: BTreeMap<String, Interface> = BTreeMap::new();
    for a in addrs {
        if a.flags.contains(InterfaceFlags::IFF_LOOPBACK) {
            continue;
        }
        let (ip, prefix) = match (&a.address, &a.netmask) {
            (Some(addr), mask) => {
                if let Some(v4) = addr.as_sockaddr_in() {
                    let bits = mask
                        .as_ref()
                        .and_then(|m| m.as_sockaddr_in())
                        .map(|m| u32::from(m.ip()).count_ones())
                        .unwrap_or(32);
                    (IpAddr::V4(v4.ip()), bits)
                } else if let Some(v6) = addr.as_sockaddr_in6() {
                    let bits = mask
                        .as_ref()
                        .and_then(|m| m.as_sockaddr_in6())
                        .map(|m| u128::from(m.ip()).count_ones())
                        .unwrap_or(128);
                    (IpAddr::V6(v6.ip()), bits)
                } else {
                    continue;
                }
            }
            (None, _) => continue,
        };
        let entry = by_name.entry(a.interface_name.clone()).or_insert_with(|| {
            let dir = sys_root.join("class/net").join(&a.interface_name);
            let num = |f: &str| read_trim(&dir.join(f)).parse::<i64>().ok();
            let mut flags = Vec::new();
            for (flag, name) in [
                (InterfaceFlags::IFF_UP, "up"),
                (InterfaceFlags::IFF_RUNNING, "running"),
                (InterfaceFlags::IFF_BROADCAST, "broadcast"),
                (InterfaceFlags::IFF_MULTICAST, "multicast"),
                (InterfaceFlags::IFF_POINTOPOINT, "pointtopoint"),
            ] {
                if a.flags.contains(flag) {
                    flags.push(name.to_owned());
                }
            }
            Interface {
                ipv4_addresses: Some(Vec::new()),
                ipv6_addresses: Some(Vec::new()),
                flags: Some(flags),
                name: a.interface_name.clone(),
                mac_address: read_trim(&dir.join("address")),
                mtu: num("mtu"),
                // Reading `speed` fails with EINVAL on links that are down.
                speed_mbps: num("speed").filter(|s| *s > 0),
                has_carrier: num("carrier") == Some(1),
                ..Interface::default()
            }
        });
        let text = format!("{ip}/{prefix}");
        let list = match ip {
            IpAddr::V4(_) => entry.ipv4_addresses.get_or_insert_with(Vec::new),
            IpAddr::V6(_) => entry.ipv6_addresses.get_or_insert_with(Vec::new),
        };
        if !list.contains(&text) {
            list.push(text);
        }
    }
    by_name.into_values().collect()
}

/// Block-device mounts from /proc/self/mounts. Pseudo filesystems (proc,
/// cgroup, overlay, tmpfs, ...) are left out: they are dozens of entries that
/// say nothing about the device and would bloat every heartbeat.
fn mounts(proc_root: &Path) -> Vec<Mount> {
    read(&proc_root.join("self/mounts"))
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (device, directory, mount_type, options) =
                (f.next()?, f.next()?, f.next()?, f.next()?);
            device.starts_with('/').then(|| Mount {
                device: crate::mountinfo::unescape(device),
                directory: crate::mountinfo::unescape(directory),
                mount_type: mount_type.to_owned(),
                options: options.to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root() -> (tempfile::TempDir, HardwareSources) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("proc");
        let s = d.path().join("sys");
        let w = |rel: &Path, content: &str| {
            fs::create_dir_all(rel.parent().unwrap()).unwrap();
            fs::write(rel, content).unwrap();
        };
        w(&p.join("sys/kernel/hostname"), "edge1\n");
        w(&p.join("sys/kernel/arch"), "x86_64\n");
        w(
            &p.join("cpuinfo"),
            "processor\t: 0\nmodel name\t: Intel(R) Core(TM) i7\ncpu MHz\t\t: 2400.000\nflags\t\t: fpu hypervisor\n\nprocessor\t: 1\nmodel name\t: Intel(R) Core(TM) i7\n\n",
        );
        w(
            &p.join("meminfo"),
            "MemTotal:        2048 kB\nMemFree: 1 kB\n",
        );
        w(
            &p.join("self/mounts"),
            "proc /proc proc rw 0 0\n/dev/vda4 /sysroot xfs ro,seclabel 0 0\n/dev/vdb1 /mnt/my\\040data ext4 rw 0 0\n",
        );
        w(&s.join("class/dmi/id/sys_vendor"), "QEMU\n");
        w(
            &s.join("class/dmi/id/product_name"),
            "Standard PC (Q35 + ICH9, 2009)\n",
        );
        w(
            &s.join("devices/system/memory/block_size_bytes"),
            "8000000\n",
        );
        fs::create_dir_all(s.join("devices/system/memory/memory0")).unwrap();
        fs::create_dir_all(s.join("devices/system/memory/memory1")).unwrap();
        let src = HardwareSources {
            proc_root: p,
            sys_root: s,
            live_interfaces: false,
        };
        (d, src)
    }

    #[test]
    fn reads_fake_proc_and_sys() {
        let (_d, src) = fake_root();
        let hw = gather_from(&src);
        assert_eq!(hw.hostname, "edge1");
        let cpu = hw.cpu.clone().unwrap();
        assert_eq!(cpu.architecture, "x86_64");
        assert_eq!(cpu.model_name, "Intel(R) Core(TM) i7");
        assert_eq!(cpu.count, Some(2));
        assert_eq!(cpu.frequency, Some(2400.0));
        let mem = hw.memory.clone().unwrap();
        assert_eq!(mem.usable_bytes, Some(2048 * 1024));
        assert_eq!(mem.physical_bytes, Some(2 * 0x800_0000));
        let v = hw.system_vendor.clone().unwrap();
        assert_eq!(v.manufacturer, "QEMU");
        assert!(v.is_virtual);
        let mounts = hw.mounts.clone().unwrap();
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].directory, "/sysroot");
        assert_eq!(mounts[0].mount_type, "xfs");
        assert_eq!(mounts[1].directory, "/mnt/my data");
        // Unfilled arrays go out as null, like Go.
        let json = serde_json::to_value(&hw).unwrap();
        assert!(json["disks"].is_null() && json["gpus"].is_null());
        assert_eq!(json["cpu"]["flags"], serde_json::json!([]));
    }

    #[test]
    fn missing_files_give_empty_fields() {
        let d = tempfile::tempdir().unwrap();
        let src = HardwareSources {
            proc_root: d.path().join("none"),
            sys_root: d.path().join("none"),
            live_interfaces: false,
        };
        let hw = gather_from(&src);
        assert_eq!(hw.mounts, Some(vec![]));
        assert_eq!(hw.system_vendor.unwrap().manufacturer, "");
        assert!(!hw.cpu.unwrap().architecture.is_empty());
        assert_eq!(model_name(&src), "");
    }

    #[test]
    fn live_system_does_not_fail() {
        let hw = gather();
        assert!(hw.cpu.is_some());
        for i in hw.interfaces.unwrap() {
            assert!(!i.name.is_empty());
            assert_ne!(i.name, "lo");
        }
    }

    #[test]
    fn heartbeat_scope() {
        let (_d, src) = fake_root();
        let full = gather_from(&src);
        let off = HardwareProfileConfiguration::default();
        assert_eq!(heartbeat_hardware(&off, &full, None), None);
        let on = HardwareProfileConfiguration {
            include: true,
            scope: Some(HardwareProfileScope::Full),
        };
        assert_eq!(heartbeat_hardware(&on, &full, None), Some(full.clone()));
        let later = heartbeat_hardware(&on, &full, Some(&full)).unwrap();
        assert!(later.cpu.is_none() && later.mounts.is_some());
        let delta = HardwareProfileConfiguration {
            include: true,
            scope: Some(HardwareProfileScope::Delta),
        };
        assert_eq!(heartbeat_hardware(&delta, &full, Some(&full)), None);
        let mut renamed = full.clone();
        renamed.hostname = "edge2".into();
        let d = heartbeat_hardware(&delta, &renamed, Some(&full)).unwrap();
        assert_eq!(d.hostname, "edge2");
        assert!(d.mounts.is_none());
    }

    #[test]
    fn mount_unescape() {
        assert_eq!(crate::mountinfo::unescape("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(crate::mountinfo::unescape("/trailing\\04"), "/trailing\\04");
    }
}
