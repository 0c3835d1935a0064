//! The validated workload name: the only thing from which a cgroup path, a record or log file
//! name, a pod, Deployment or unit name is made. Functions that build paths take a
//! [`WorkloadName`], so untrusted text (a server message, the desired-state file, a record in
//! STATE_DIR, a directory listing) cannot reach the file system, cgroups or signals unchecked.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest name: one DNS label (RFC 1123), as Kubernetes object names of this kind require.
pub const MAX_NAME_LEN: usize = 63;

/// A lowercase RFC 1123 label of at most 63 characters: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
/// It holds no `/`, no `.`, nothing a path, a unit or a shell could read as structure.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{shown}' is not a workload name: must be a lowercase RFC 1123 label (a-z, 0-9 and '-', starting and ending with a letter or digit) of at most 63 characters")]
pub struct NameError {
    /// The rejected text, cut and escaped for messages (it may hold anything).
    pub shown: String,
}

impl WorkloadName {
    pub fn parse(s: &str) -> Result<WorkloadName, NameError> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_NAME_LEN
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-';
        if ok {
            Ok(WorkloadName(s.to_string()))
        } else {
            Err(NameError { shown: shown(s) })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Untrusted text made safe to show in one log line or status cell: at most 80 characters,
/// control characters escaped.
pub fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(80).flat_map(char::escape_debug).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

impl fmt::Display for WorkloadName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for WorkloadName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl AsRef<str> for WorkloadName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for WorkloadName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl Serialize for WorkloadName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Deserializing validates: a record in STATE_DIR cannot smuggle a path in.
impl<'de> Deserialize<'de> for WorkloadName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        WorkloadName::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rfc1123_labels_are_names() {
        for ok in ["a", "web-1", "0", "x".repeat(63).as_str()] {
            assert_eq!(WorkloadName::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "../../victim",
            "..",
            ".",
            "a/b",
            "a.b",
            "Web",
            "-a",
            "a-",
            "a b",
            "a\0b",
            "é",
            "x".repeat(64).as_str(),
        ] {
            assert!(WorkloadName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deserializing_validates_and_errors_show_safe_text() {
        assert!(serde_json::from_str::<WorkloadName>("\"../x\"").is_err());
        assert_eq!(
            serde_json::from_str::<WorkloadName>("\"ok\"").unwrap(),
            WorkloadName::parse("ok").unwrap()
        );
        let e = WorkloadName::parse(&format!("a\n{}", "b".repeat(200))).unwrap_err();
        assert!(
            e.shown.starts_with("a\\nbbb") && e.shown.ends_with('…'),
            "{e}"
        );
        assert!(!e.to_string().contains('\n'));
    }
}
