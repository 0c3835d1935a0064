//! Device identity: the device ID, the ECDSA P-256 key, the CSR, the device
//! certificate's validity, and their crash-safe storage in STATE_DIR.
//!
//! The server takes the identity from the certificate CN and compares it with
//! the path ID case-insensitively, but names Kubernetes objects and signs the CN
//! with the path ID as given (PROTOCOL.md §1.3, §3.4): hence the strict
//! lowercase RFC 1123 rule here.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// Errors of identity handling, each with the path or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid device id `{id}` ({source_name}): {reason}; it must be a lowercase RFC 1123 name (a-z, 0-9, '-', '.', at most 253 characters, starting and ending with a letter or digit)")]
    InvalidDeviceId {
        id: String,
        source_name: String,
        reason: &'static str,
    },
    #[error("no device id: DEVICE_ID is unset, {state} does not exist and {machine_id} cannot be read: {reason}")]
    NoDeviceId {
        state: PathBuf,
        machine_id: PathBuf,
        reason: String,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("key generation failed: {0}")]
    KeyGeneration(String),
    #[error("CSR generation failed: {0}")]
    Csr(String),
    #[error("certificate {what}: {reason}")]
    Certificate { what: String, reason: String },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> IdentityError + 'a {
    move |source| IdentityError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

// ---------------------------------------------------------------------------
// Device ID
// ---------------------------------------------------------------------------

/// Where the device ID came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceIdSource {
    /// DEVICE_ID in the configuration.
    Explicit,
    /// The id persisted in STATE_DIR by an earlier run.
    Persisted,
    /// `/etc/machine-id`, as the official installer does (§1.3).
    MachineId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceId {
    pub id: String,
    pub source: DeviceIdSource,
}

/// File in STATE_DIR holding the resolved device ID.
pub const DEVICE_ID_FILE: &str = "device-id";

/// Check a lowercase RFC 1123 subdomain name (the rule for the EdgeDevice and
/// EDSR object names that the server derives from the ID, §1.3).
pub fn validate_device_id(id: &str, source_name: &str) -> Result<(), IdentityError> {
    let bad = |reason| IdentityError::InvalidDeviceId {
        id: id.to_owned(),
        source_name: source_name.to_owned(),
        reason,
    };
    if id.is_empty() {
        return Err(bad("empty"));
    }
    if id.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    if id.bytes().any(|c| c.is_ascii_uppercase()) {
        return Err(bad("contains uppercase letters"));
    }
    for label in id.split('.') {
        if label.is_empty() {
            return Err(bad("empty label (leading, trailing or double '.')"));
        }
        if label.len() > 63 {
            return Err(bad("a label is longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        {
            return Err(bad("contains characters other than a-z, 0-9, '-' and '.'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label starts or ends with '-'"));
        }
    }
    Ok(())
}

/// Resolve the device ID: explicit DEVICE_ID, else the one persisted in
/// `state_dir`, else `machine_id_path` (normally `/etc/machine-id`). The
/// result is persisted so that a later change of the machine-id (image
/// re-flash, cloning) does not silently turn the agent into another device.
pub fn resolve_device_id(
    explicit: Option<&str>,
    state_dir: &Path,
    machine_id_path: &Path,
) -> Result<DeviceId, IdentityError> {
    let state_file = state_dir.join(DEVICE_ID_FILE);
    let resolved = if let Some(id) = explicit.map(str::trim).filter(|s| !s.is_empty()) {
        validate_device_id(id, "DEVICE_ID")?;
        DeviceId {
            id: id.to_owned(),
            source: DeviceIdSource::Explicit,
        }
    } else {
        match fs::read_to_string(&state_file) {
            Ok(s) => {
                let id = s.trim();
                validate_device_id(id, &state_file.display().to_string())?;
                return Ok(DeviceId {
                    id: id.to_owned(),
                    source: DeviceIdSource::Persisted,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("reading", &state_file)(e)),
        }
        let mid = fs::read_to_string(machine_id_path).map_err(|e| IdentityError::NoDeviceId {
            state: state_file.clone(),
            machine_id: machine_id_path.to_owned(),
            reason: e.to_string(),
        })?;
        let id = mid.trim();
        validate_device_id(id, &machine_id_path.display().to_string())?;
        DeviceId {
            id: id.to_owned(),
            source: DeviceIdSource::MachineId,
        }
    };
    let current = fs::read_to_string(&state_file).ok();
    if current.as_deref().map(str::trim) != Some(resolved.id.as_str()) {
        fs::create_dir_all(state_dir).map_err(io_err("creating", state_dir))?;
        write_atomic(&state_file, format!("{}\n", resolved.id).as_bytes(), 0o644)?;
    }
    Ok(resolved)
}

// ---------------------------------------------------------------------------
// Key and CSR
// ---------------------------------------------------------------------------

/// A freshly generated device key.
pub struct DeviceKey {
    key: rcgen::KeyPair,
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceKey(P-256)")
    }
}

impl DeviceKey {
    /// ECDSA P-256, the algorithm of the default Flotta CA and of the keys
    /// the official agent generates (§3.4).
    pub fn generate() -> Result<Self, IdentityError> {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map(|key| DeviceKey { key })
            .map_err(|e| IdentityError::KeyGeneration(e.to_string()))
    }

    /// Load a PKCS#8 PEM key written by [`DeviceKey::to_pem`].
    pub fn from_pem(pem: &str) -> Result<Self, IdentityError> {
        rcgen::KeyPair::from_pem(pem)
            .map(|key| DeviceKey { key })
            .map_err(|e| IdentityError::KeyGeneration(format!("cannot load key: {e}")))
    }

    /// PKCS#8 `PRIVATE KEY` PEM (rustls reads it; the key never leaves the device).
    pub fn to_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// DER SubjectPublicKeyInfo, to check that a certificate belongs to this key.
    pub fn public_key_der(&self) -> Vec<u8> {
        use rcgen::PublicKeyData;
        self.key.subject_public_key_info()
    }

    /// PEM `CERTIFICATE REQUEST` with `CN = device_id` and nothing else, like
    /// the official agent (§3.4). The server overwrites CN/O/OU anyway.
    pub fn csr_pem(&self, device_id: &str) -> Result<String, IdentityError> {
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, device_id);
        params.distinguished_name = dn;
        params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(|e| IdentityError::Csr(e.to_string()))
    }
}

// ---------------------------------------------------------------------------
// Certificate inspection (a minimal DER reader)
// ---------------------------------------------------------------------------

/// What the agent needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    pub common_name: Option<String>,
    pub organization: Vec<String>,
    /// The server puts the device namespace here (§3.4, §8 item 7).
    pub organizational_units: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// DER SubjectPublicKeyInfo.
    pub public_key_der: Vec<u8>,
    /// X.509 version (1 or 3): TLS stacks refuse v1, which plain `openssl x509 -req` makes.
    pub version: u8,
}

impl CertificateInfo {
    /// Parse the first `CERTIFICATE` block of a PEM string.
    pub fn from_pem(pem: &[u8]) -> Result<Self, IdentityError> {
        let der = CertificateDer::from_pem_slice(pem).map_err(|e| IdentityError::Certificate {
            what: "PEM".into(),
            reason: e.to_string(),
        })?;
        Self::from_der(der.as_ref())
    }

    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        super::der::parse_certificate(der).map_err(|reason| IdentityError::Certificate {
            what: "DER".into(),
            reason,
        })
    }

    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now >= self.not_before && now < self.not_after
    }

    /// When to renew: `not_before + fraction × lifetime` (clamped to 0..=1).
    /// The official agent never renews on time (§3.5, §8 item 2).
    pub fn renewal_due_at(&self, fraction: f64) -> SystemTime {
        let f = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            1.0
        };
        self.not_before + self.lifetime().mul_f64(f)
    }

    pub fn needs_renewal(&self, now: SystemTime, fraction: f64) -> bool {
        now >= self.renewal_due_at(fraction)
    }

    /// The bootstrap certificate has `CN=register` (§3.1).
    pub fn is_registration_cert(&self) -> bool {
        self.common_name.as_deref() == Some(REGISTRATION_CN)
    }

    /// Whether `key` is the private half of this certificate.
    pub fn matches_key(&self, key_spki_der: &[u8]) -> bool {
        self.public_key_der == key_spki_der
    }
}

/// CN of the bootstrap certificate (§3.1).
pub const REGISTRATION_CN: &str = "register";

// ---------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------

/// Write `bytes` to `path` atomically: temp file in the same directory, fsync,
/// rename, fsync the directory. A crash leaves the old or the new file, never
/// a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    crate::store::write_atomic(path, bytes, mode).map_err(|e| match e {
        crate::store::StoreError::Io { path, source } => IdentityError::Io {
            what: "writing",
            path,
            source,
        },
        other => IdentityError::Io {
            what: "writing",
            path: path.to_path_buf(),
            source: io::Error::other(other.to_string()),
        },
    })
}

fn sync_dir(dir: &Path) -> Result<(), IdentityError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

/// A certificate and its key, as PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredIdentity {
    pub cert_pem: String,
    pub key_pem: String,
    pub info: CertificateInfo,
}

impl std::fmt::Debug for StoredIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredIdentity")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Which pair [`IdentityStore::load`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadedIdentity {
    /// No device certificate: the agent must enrol and register.
    None,
    /// `device.crt`/`device.key`, with no older pair pending.
    Current(StoredIdentity),
    /// A new pair was installed but not yet proven; the previous one is kept
    /// for [`IdentityStore::rollback`].
    Unproven {
        current: StoredIdentity,
        previous: StoredIdentity,
    },
}

/// The device certificate and key in STATE_DIR:
/// `device.crt` + `device.key` (0600), and `device.crt.prev` + `device.key.prev`
/// while a freshly installed pair has not been proven by a successful request.
#[derive(Debug, Clone)]
pub struct IdentityStore {
    dir: PathBuf,
}

pub const CERT_FILE: &str = "device.crt";
pub const KEY_FILE: &str = "device.key";
const PREV_SUFFIX: &str = ".prev";

impl IdentityStore {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        IdentityStore {
            dir: state_dir.into(),
        }
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CERT_FILE)
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    fn prev_cert_path(&self) -> PathBuf {
        self.dir.join(format!("{CERT_FILE}{PREV_SUFFIX}"))
    }

    fn prev_key_path(&self) -> PathBuf {
        self.dir.join(format!("{KEY_FILE}{PREV_SUFFIX}"))
    }

    fn read_pair(&self, cert: &Path, key: &Path) -> Result<Option<StoredIdentity>, IdentityError> {
        let read = |p: &Path| match fs::read_to_string(p) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", p)(e)),
        };
        let (Some(cert_pem), Some(key_pem)) = (read(cert)?, read(key)?) else {
            return Ok(None);
        };
        let Ok(info) = CertificateInfo::from_pem(cert_pem.as_bytes()) else {
            return Ok(None);
        };
        // A pair is only usable if the key is the certificate's: a crash in
        // the middle of a swap must not leave a mismatched pair in use.
        let Ok(key) = DeviceKey::from_pem(&key_pem) else {
            return Ok(None);
        };
        if !info.matches_key(&key.public_key_der()) {
            return Ok(None);
        }
        Ok(Some(StoredIdentity {
            cert_pem,
            key_pem,
            info,
        }))
    }

    /// Load the usable pair(s), recovering from an interrupted swap.
    pub fn load(&self) -> Result<LoadedIdentity, IdentityError> {
        let current = self.read_pair(&self.cert_path(), &self.key_path())?;
        let previous = self.read_pair(&self.prev_cert_path(), &self.prev_key_path())?;
        Ok(match (current, previous) {
            (Some(current), Some(previous)) => LoadedIdentity::Unproven { current, previous },
            (Some(current), None) => LoadedIdentity::Current(current),
            // Interrupted swap or broken new pair: fall back to the old one.
            (None, Some(previous)) => {
                self.rollback()?;
                LoadedIdentity::Current(previous)
            }
            (None, None) => LoadedIdentity::None,
        })
    }

    /// Install a new pair; the current one (if any) becomes `.prev` until
    /// [`commit`](Self::commit) or [`rollback`](Self::rollback).
    pub fn install(
        &self,
        cert_pem: &str,
        key: &DeviceKey,
    ) -> Result<StoredIdentity, IdentityError> {
        let info = CertificateInfo::from_pem(cert_pem.as_bytes())?;
        if !info.matches_key(&key.public_key_der()) {
            return Err(IdentityError::Certificate {
                what: "from registration".into(),
                reason: "does not belong to the generated key".into(),
            });
        }
        fs::create_dir_all(&self.dir).map_err(io_err("creating", &self.dir))?;
        let key_pem = key.to_pem();
        // Keep an already pending `.prev` (the last *proven* pair) if the
        // current pair was never proven.
        let prev_exists = self.prev_cert_path().exists() && self.prev_key_path().exists();
        if !prev_exists && self.cert_path().exists() && self.key_path().exists() {
            copy_atomic(&self.cert_path(), &self.prev_cert_path(), 0o644)?;
            copy_atomic(&self.key_path(), &self.prev_key_path(), 0o600)?;
        }
        // Key first: a crash after it leaves a mismatched pair, which `load`
        // detects and rolls back from.
        write_atomic(&self.key_path(), key_pem.as_bytes(), 0o600)?;
        write_atomic(&self.cert_path(), cert_pem.as_bytes(), 0o644)?;
        Ok(StoredIdentity {
            cert_pem: cert_pem.to_owned(),
            key_pem,
            info,
        })
    }

    /// The current pair has worked against the server: forget the old one.
    pub fn commit(&self) -> Result<(), IdentityError> {
        for p in [self.prev_cert_path(), self.prev_key_path()] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &p)(e)),
            }
        }
        sync_dir(&self.dir)
    }

    /// The current pair does not work: put the previous one back.
    pub fn rollback(&self) -> Result<(), IdentityError> {
        if !(self.prev_cert_path().exists() && self.prev_key_path().exists()) {
            return Ok(());
        }
        fs::rename(self.prev_key_path(), self.key_path())
            .map_err(io_err("restoring", &self.key_path()))?;
        fs::rename(self.prev_cert_path(), self.cert_path())
            .map_err(io_err("restoring", &self.cert_path()))?;
        sync_dir(&self.dir)
    }

    /// Remove every stored pair (deregistration).
    pub fn wipe(&self) -> Result<(), IdentityError> {
        for p in [
            self.cert_path(),
            self.key_path(),
            self.prev_cert_path(),
            self.prev_key_path(),
        ] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &p)(e)),
            }
        }
        Ok(())
    }
}

fn copy_atomic(from: &Path, to: &Path, mode: u32) -> Result<(), IdentityError> {
    let bytes = fs::read(from).map_err(io_err("reading", from))?;
    write_atomic(to, &bytes, mode)
}

/// Seconds since the epoch, for logs and status.
pub fn unix_seconds(t: SystemTime) -> i64 {
    crate::clock::unix_seconds(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A self-signed cert for `key` with the given validity (the test stands
    /// in for the server here; the real signing path is covered in tests/).
    fn self_signed(key: &DeviceKey, cn: &str, days_before: i64, days_after: i64) -> String {
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "flotta-operator");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationalUnitName, "ns1");
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(days_before);
        params.not_after = now + time::Duration::days(days_after);
        params.self_signed(&key.key).unwrap().pem()
    }

    #[test]
    fn device_id_rules() {
        for ok in ["4c4c4544004e3810804cb5c04f564433", "edge-1", "a.b-c.d", "0"] {
            validate_device_id(ok, "t").unwrap();
        }
        for bad in [
            "",
            "Edge1",
            "edge_1",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a b",
            &"x".repeat(254),
        ] {
            let e = validate_device_id(bad, "DEVICE_ID").unwrap_err();
            assert!(e.to_string().contains("RFC 1123"), "{e}");
        }
    }

    #[test]
    fn device_id_resolution_order_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mid = dir.path().join("machine-id");
        fs::write(&mid, "4c4c4544004e3810804cb5c04f564433\n").unwrap();

        let r = resolve_device_id(None, &state, &mid).unwrap();
        assert_eq!(r.source, DeviceIdSource::MachineId);
        assert_eq!(r.id, "4c4c4544004e3810804cb5c04f564433");

        // The persisted id wins over a changed machine-id.
        fs::write(&mid, "ffffffffffffffffffffffffffffffff\n").unwrap();
        let r = resolve_device_id(None, &state, &mid).unwrap();
        assert_eq!(r.source, DeviceIdSource::Persisted);
        assert_eq!(r.id, "4c4c4544004e3810804cb5c04f564433");

        // Explicit wins and is persisted.
        let r = resolve_device_id(Some("edge-7"), &state, &mid).unwrap();
        assert_eq!(r.source, DeviceIdSource::Explicit);
        let r = resolve_device_id(None, &state, &mid).unwrap();
        assert_eq!(
            (r.id.as_str(), r.source),
            ("edge-7", DeviceIdSource::Persisted)
        );

        assert!(matches!(
            resolve_device_id(Some("Edge_7"), &state, &mid),
            Err(IdentityError::InvalidDeviceId { .. })
        ));
        let e =
            resolve_device_id(None, &dir.path().join("s2"), &dir.path().join("nope")).unwrap_err();
        assert!(matches!(e, IdentityError::NoDeviceId { .. }), "{e}");
    }

    #[test]
    fn csr_and_certificate_info() {
        let key = DeviceKey::generate().unwrap();
        let csr = key.csr_pem("edge-1").unwrap();
        assert!(
            csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{csr}"
        );

        let pem = self_signed(&key, "edge-1", 1, 30);
        let info = CertificateInfo::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("edge-1"));
        assert_eq!(info.organization, vec!["flotta-operator"]);
        assert_eq!(info.organizational_units, vec!["ns1"]);
        assert!(info.matches_key(&key.public_key_der()));
        let life = info.lifetime().as_secs();
        assert!(
            (31 * 86_400 - 5..=31 * 86_400 + 5).contains(&life),
            "{life}"
        );
        let now = SystemTime::now();
        assert!(info.is_valid_at(now));
        assert!(!info.needs_renewal(now, 0.75));
        assert!(info.needs_renewal(now + Duration::from_secs(23 * 86_400), 0.75));
        assert!(!info.is_registration_cert());
        assert_eq!(info.version, 3);
        assert!(CertificateInfo::from_pem(b"junk").is_err());
    }

    #[test]
    fn store_install_commit_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let store = IdentityStore::new(dir.path());
        assert_eq!(store.load().unwrap(), LoadedIdentity::None);

        let k1 = DeviceKey::generate().unwrap();
        let c1 = self_signed(&k1, "edge-1", 1, 30);
        store.install(&c1, &k1).unwrap();
        let mode = fs::metadata(store.key_path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(store.load().unwrap(), LoadedIdentity::Current(c) if c.cert_pem == c1));

        // Renewal: new pair is unproven, old kept.
        let k2 = DeviceKey::generate().unwrap();
        let c2 = self_signed(&k2, "edge-1", 0, 30);
        store.install(&c2, &k2).unwrap();
        match store.load().unwrap() {
            LoadedIdentity::Unproven { current, previous } => {
                assert_eq!(current.cert_pem, c2);
                assert_eq!(previous.cert_pem, c1);
            }
            other => panic!("{other:?}"),
        }
        store.rollback().unwrap();
        assert!(matches!(store.load().unwrap(), LoadedIdentity::Current(c) if c.cert_pem == c1));

        store.install(&c2, &k2).unwrap();
        store.commit().unwrap();
        assert!(matches!(store.load().unwrap(), LoadedIdentity::Current(c) if c.cert_pem == c2));

        // A cert that is not the key's is refused.
        assert!(store.install(&c1, &k2).is_err());

        // Interrupted swap: new key written, cert still old → mismatch → old pair.
        let k3 = DeviceKey::generate().unwrap();
        let c3 = self_signed(&k3, "edge-1", 0, 30);
        store.install(&c3, &k3).unwrap();
        write_atomic(
            &store.key_path(),
            DeviceKey::generate().unwrap().to_pem().as_bytes(),
            0o600,
        )
        .unwrap();
        assert!(matches!(store.load().unwrap(), LoadedIdentity::Current(c) if c.cert_pem == c2));

        store.wipe().unwrap();
        assert_eq!(store.load().unwrap(), LoadedIdentity::None);
    }
}
