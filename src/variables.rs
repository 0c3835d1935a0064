//! Extra profile variables fed through a local, root-only file (VARIABLES_FILE), e.g. by a
//! temperature probe: `temperature: 65`, `battery: 40%`, `free_ram: 300Mi`, `load: 750m`.
//!
//! The file must belong to root and not be writable by group or others (anyone else could
//! otherwise start and stop workloads); it is ignored, with a warning, when it is not. Its
//! values count as missing once the file is older than VARIABLES_TTL, so a dead probe cannot
//! pin a condition forever. Native variables (cpu, memory, disk, pids) cannot be overridden.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::profiles::expr::Value;

/// Fresh variables from `path` (empty when missing, stale, unsafe or malformed).
pub fn read(path: &Path, ttl: Duration) -> BTreeMap<String, Value> {
    let Ok(meta) = std::fs::metadata(path) else {
        return BTreeMap::new();
    };
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        tracing::warn!(
            "ignoring {}: it must belong to root and not be writable by others",
            path.display()
        );
        return BTreeMap::new();
    }
    let fresh = meta
        .modified()
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .is_some_and(|age| age <= ttl);
    if !fresh {
        return BTreeMap::new();
    }
    let Ok(text) = std::fs::read_to_string(path) else {
        return BTreeMap::new();
    };
    parse(&text).unwrap_or_else(|e| {
        tracing::warn!("ignoring {}: {e}", path.display());
        BTreeMap::new()
    })
}

/// `NAME: value` lines (YAML mapping); a value is a number with an optional unit.
pub fn parse(text: &str) -> Result<BTreeMap<String, Value>, String> {
    let doc: Option<BTreeMap<String, serde_yaml_ng::Value>> =
        crate::yaml::from_str(text).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for (k, v) in doc.unwrap_or_default() {
        let text = match v {
            serde_yaml_ng::Value::Number(n) => n.to_string(),
            serde_yaml_ng::Value::String(s) => s,
            _ => return Err(format!("{k}: expected a number with an optional unit")),
        };
        out.insert(
            k.clone(),
            value(&text).ok_or_else(|| format!("{k}: '{text}' is not a value"))?,
        );
    }
    Ok(out)
}

fn value(text: &str) -> Option<Value> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    if !n.is_finite() {
        return None;
    }
    Some(match unit.trim() {
        "" => Value::plain(n),
        "%" => Value::percent(n),
        "m" => Value::millicores(n.max(0.0) as u64),
        "Ki" => Value::bytes((n * 1024.0) as u64),
        "Mi" => Value::bytes((n * 1048576.0) as u64),
        "Gi" => Value::bytes((n * 1073741824.0) as u64),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn values_with_units() {
        let v = parse("temperature: 65\nbattery: 40%\nfree: 300Mi\nload: 750m\n").unwrap();
        assert_eq!(v["temperature"], Value::plain(65.0));
        assert_eq!(v["battery"], Value::percent(40.0));
        assert_eq!(v["free"], Value::bytes(300 << 20));
        assert_eq!(v["load"], Value::millicores(750));
        assert!(parse("x: hot\n").is_err());
        assert!(parse("x: [1]\n").is_err());
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn unsafe_or_stale_files_are_ignored() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("vars.yaml");
        std::fs::write(&p, "temperature: 80\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let root = nix::unistd::Uid::effective().is_root();
        assert_eq!(read(&p, Duration::from_secs(60)).len(), usize::from(root));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(
            read(&p, Duration::from_secs(60)).is_empty(),
            "world-writable"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read(&p, Duration::ZERO).is_empty() || !root, "stale");
        assert!(read(&t.path().join("missing"), Duration::from_secs(60)).is_empty());
    }
}
