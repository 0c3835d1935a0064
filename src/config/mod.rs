//! Settings: one place that reads the YAML file, `EDGE_DEVICE_*` variables and `--set` flags,
//! validates every key, and says exactly which key (and from where) is wrong.
//!
//! Precedence: flag > environment > drop-ins > file > default. The file is `--config`, else
//! [`DEFAULT_CONFIG_FILE`] when it exists; the drop-ins are `config.d/*.yaml` beside it, in
//! lexical order (image builders add settings without editing the packaged conffile).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::units;

/// Exit code for a configuration error (sysexits `EX_CONFIG`); the systemd unit lists it in
/// `RestartPreventExitStatus=` so a broken configuration does not restart-loop.
pub const EXIT_CONFIG: i32 = 78;

pub const ENV_PREFIX: &str = "EDGE_DEVICE_";

/// The packaged configuration file: read when `--config` is not given and it exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/device-worker-ng/config.yaml";

/// The directory of drop-ins, beside the configuration file.
pub const DROPIN_DIR: &str = "config.d";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Path,
    Url,
    Level,
    Duration,
    /// A duration that may be zero (a window that can be closed).
    Window,
    Memory,
    Cpu,
    Count,
    DeviceId,
    Fraction,
    IdRange,
    CgroupDriver,
    Slice,
    ProxyUrl,
    DefaultLimits,
}

impl Kind {
    fn expected(self) -> &'static str {
        match self {
            Kind::Text => "a string",
            Kind::Path => "an absolute path",
            Kind::Url => "an https:// URL",
            Kind::Level => "one of error, warn, info, debug, trace",
            Kind::Duration => "a duration like 500ms, 1s, 2m",
            Kind::Window => "a duration like 0s, 500ms, 1s",
            Kind::Memory => "a memory quantity like 256Mi",
            Kind::Cpu => "a cpu quantity like 250m or 0.5",
            Kind::Count => "a whole number",
            Kind::DeviceId => "a lowercase RFC 1123 name",
            Kind::Fraction => "a fraction between 0 and 1 like 0.75 or 75%",
            Kind::IdRange => {
                "a range of ids like 524288-589823 (at least 1000 ids, none below 1000)"
            }
            Kind::CgroupDriver => "one of auto, systemd, cgroupfs",
            Kind::Slice => "a systemd slice name like device-worker-ng.slice",
            Kind::ProxyUrl => "an http:// proxy URL like http://proxy.example:3128",
            Kind::DefaultLimits => {
                "limits like memory=50%,cpu=1,pids=1024 (a quantity or a percentage of the budget; none: no defaults)"
            }
        }
    }
}

/// Every key the agent understands, its type, default and meaning (the README's reference
/// table is checked against this list by a test).
pub struct KeySpec {
    pub name: &'static str,
    kind: Kind,
    pub default: Option<&'static str>,
    pub doc: &'static str,
}

macro_rules! key {
    ($name:literal, $kind:ident, $default:expr, $doc:literal) => {
        KeySpec {
            name: $name,
            kind: Kind::$kind,
            default: $default,
            doc: $doc,
        }
    };
}

pub const KEYS: &[KeySpec] = &[
    key!(
        "LOG_LEVEL",
        Level,
        Some("info"),
        "error, warn, info, debug or trace"
    ),
    key!(
        "CA_ROOT",
        Path,
        Some("/etc/pki/consumer/ca.pem"),
        "CA that signs the Flotta server (the only trusted root)"
    ),
    key!(
        "CERT",
        Path,
        Some("/etc/pki/consumer/cert.pem"),
        "bootstrap (registration) client certificate"
    ),
    key!(
        "KEY",
        Path,
        Some("/etc/pki/consumer/key.pem"),
        "key of the bootstrap certificate"
    ),
    key!(
        "SERVER",
        Url,
        None,
        "Flotta edge API, e.g. https://project-flotta.io:8043; unset = serverless"
    ),
    key!(
        "XDG_RUNTIME_DIR",
        Path,
        None,
        "runtime dir for rootless podman workloads"
    ),
    key!(
        "ROOTLESS_USER",
        Text,
        None,
        "unprivileged user that `rootless: true` pod workloads run as"
    ),
    key!(
        "KUBECONFIG",
        Path,
        None,
        "kubeconfig of the local MicroShift (or any Kubernetes API) for k8s workloads; read again when it changes"
    ),
    key!(
        "DEVICE_ID",
        DeviceId,
        None,
        "device identity; default /etc/machine-id"
    ),
    key!(
        "NAMESPACE",
        Text,
        Some("default"),
        "target namespace sent at enrolment"
    ),
    key!(
        "STATE_DIR",
        Path,
        Some("/var/lib/device-worker-ng"),
        "identity, records, desired state, outbox, workload logs"
    ),
    key!(
        "DESIRED_STATE",
        Path,
        None,
        "local desired-state file (serverless mode); watched for changes"
    ),
    key!(
        "CONTROL_SOCKET",
        Path,
        Some("/run/device-worker-ng/control.sock"),
        "Unix socket serving `status` (mode 0600)"
    ),
    key!(
        "SAMPLE_INTERVAL",
        Duration,
        Some("1s"),
        "resource sampler period"
    ),
    key!(
        "CGROUP_DRIVER",
        CgroupDriver,
        Some("auto"),
        "who creates the workloads' cgroups: systemd (units in SYSTEMD_SLICE), cgroupfs (the agent, under CGROUP_ROOT), or auto: systemd when it is PID 1 and answers on D-Bus"
    ),
    key!(
        "SYSTEMD_SLICE",
        Slice,
        Some("device-worker-ng.slice"),
        "systemd driver: the slice holding the workloads' units, limited to the device budget"
    ),
    key!(
        "CGROUP_ROOT",
        Text,
        Some("device-worker-ng"),
        "cgroupfs driver: name of the agent's cgroup subtree"
    ),
    key!(
        "RESERVED_MEMORY",
        Memory,
        Some("256Mi"),
        "memory kept back for the OS and the agent"
    ),
    key!(
        "RESERVED_CPU",
        Cpu,
        Some("250m"),
        "cpu kept back for the OS and the agent"
    ),
    key!(
        "WORKLOAD_USER",
        Text,
        None,
        "user every shell workload without `user:` runs as; unset: each gets a uid of its own from WORKLOAD_UIDS"
    ),
    key!(
        "WORKLOAD_UIDS",
        IdRange,
        Some("524288-589823"),
        "uids (and gids) given to shell workloads, one each, when neither their spec nor WORKLOAD_USER names a user"
    ),
    key!(
        "MAX_WORKLOADS",
        Count,
        Some("256"),
        "most workloads a desired state may hold; the rest are refused unread"
    ),
    key!(
        "WORKLOAD_LOG_MAX",
        Memory,
        Some("10Mi"),
        "most output of one shell workload kept in STATE_DIR/logs (its log and the one rotated file together; read at start)"
    ),
    key!(
        "RESTART_BACKOFF_INITIAL",
        Duration,
        Some("1s"),
        "first restart delay after a failure"
    ),
    key!(
        "RESTART_BACKOFF_MAX",
        Duration,
        Some("1m"),
        "cap of the exponential restart delay"
    ),
    key!(
        "RESTART_MAX_FAILURES",
        Count,
        Some("5"),
        "consecutive failures before a workload is marked broken"
    ),
    key!(
        "STOP_TIMEOUT",
        Duration,
        Some("10s"),
        "grace between SIGTERM and SIGKILL when stopping a workload (k8s: added to the pod's own grace period)"
    ),
    key!(
        "POLL_INTERVAL",
        Duration,
        Some("5s"),
        "how often the configuration and control messages are fetched (plus jitter)"
    ),
    key!(
        "SERVER_TIMEOUT",
        Duration,
        Some("10s"),
        "timeout of one request to the server"
    ),
    key!(
        "SERVER_OUTAGE_THRESHOLD",
        Duration,
        Some("2m"),
        "how long the server may be unreachable before the device reports degraded"
    ),
    key!(
        "CERT_RENEW_AT",
        Fraction,
        Some("0.75"),
        "renew the device certificate after this fraction of its lifetime"
    ),
    key!(
        "MAX_MESSAGE_SIZE",
        Memory,
        Some("1Mi"),
        "largest message accepted from the server"
    ),
    key!(
        "VARIABLES_FILE",
        Path,
        Some("/run/device-worker-ng/variables.yaml"),
        "root-only file of extra profile variables (NAME: value), read each sample"
    ),
    key!(
        "VARIABLES_TTL",
        Duration,
        Some("1m"),
        "variables from VARIABLES_FILE count as missing once the file is older than this"
    ),
    key!(
        "BUDGET_WINDOW",
        Window,
        Some("500ms"),
        "once over budget, memory must stay over this long before another workload is evicted (the first goes at once; cpu: at least 1s)"
    ),
    key!(
        "BUDGET_HOLD",
        Duration,
        Some("30s"),
        "usage must stay under the low watermark this long before evicted workloads return"
    ),
    key!(
        "BUDGET_LOW_WATERMARK",
        Fraction,
        Some("0.9"),
        "fraction of the budget usage must fall under before evicted workloads may return"
    ),
    key!(
        "HTTPS_PROXY",
        ProxyUrl,
        None,
        "HTTP proxy (CONNECT) to reach SERVER through, e.g. http://proxy.example:3128; the process environment's proxy variables are never used"
    ),
    key!(
        "NO_PROXY",
        Text,
        None,
        "comma-separated hosts and domains (.example.com) reached without HTTPS_PROXY"
    ),
    key!(
        "METRICS_TEXTFILE",
        Path,
        None,
        "file the agent rewrites each sample with its metrics in Prometheus text format (for node_exporter's textfile collector); unset = none"
    ),
    key!(
        "DEFAULT_LIMITS",
        DefaultLimits,
        Some("memory=50%,pids=1024"),
        "limits of shell and pod workloads that declare none (memory, cpu: a quantity or a % of the budget; pids); none: no defaults"
    ),
];

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Env(String),
    Flag,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::File(p) => write!(f, "file {}", p.display()),
            Source::Env(v) => write!(f, "environment variable {v}"),
            Source::Flag => write!(f, "--set flag"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("configuration file {path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("unknown configuration key {key} in {origin} (known keys: {known})")]
    UnknownKey {
        key: String,
        origin: Source,
        known: String,
    },
    #[error("configuration key {key} from {origin}: expected {expected}, got {got}")]
    WrongType {
        key: &'static str,
        origin: Source,
        expected: &'static str,
        got: String,
    },
    #[error("--set {0}: expected KEY=VALUE")]
    BadFlag(String),
    #[error("configuration key {key}: {why}")]
    Invalid { key: &'static str, why: String },
    #[error("configuration key {key} ({path}): {why}")]
    Path {
        key: &'static str,
        path: PathBuf,
        why: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_tracing(self) -> tracing::Level {
        match self {
            LogLevel::Error => tracing::Level::ERROR,
            LogLevel::Warn => tracing::Level::WARN,
            LogLevel::Info => tracing::Level::INFO,
            LogLevel::Debug => tracing::Level::DEBUG,
            LogLevel::Trace => tracing::Level::TRACE,
        }
    }
}

/// `CGROUP_DRIVER`: who creates the workloads' cgroups (like the kubelet's `cgroupDriver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriverChoice {
    /// systemd when it is PID 1 and answers on D-Bus, cgroupfs otherwise.
    Auto,
    Systemd,
    Cgroupfs,
}

/// The validated settings of one agent run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub log_level: LogLevel,
    pub ca_root: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub server: Option<String>,
    pub xdg_runtime_dir: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub device_id: Option<String>,
    pub namespace: String,
    pub state_dir: PathBuf,
    pub desired_state: Option<PathBuf>,
    pub control_socket: PathBuf,
    pub sample_interval: Duration,
    pub cgroup_driver: CgroupDriverChoice,
    pub systemd_slice: String,
    pub cgroup_root: String,
    pub reserved_memory: u64,
    pub reserved_cpu_millis: u64,
    pub workload_user: Option<String>,
    pub workload_uids: Option<(u32, u32)>,
    pub max_workloads: usize,
    pub workload_log_max: u64,
    pub restart_backoff_initial: Duration,
    pub restart_backoff_max: Duration,
    pub restart_max_failures: u32,
    pub stop_timeout: Duration,
    pub poll_interval: Duration,
    pub server_timeout: Duration,
    pub server_outage_threshold: Duration,
    pub cert_renew_at: f64,
    pub max_message_size: u64,
    pub rootless_user: Option<String>,
    pub variables_file: PathBuf,
    pub variables_ttl: Duration,
    pub budget_window: Duration,
    pub budget_hold: Duration,
    pub budget_low_watermark: f64,
    pub https_proxy: Option<String>,
    pub no_proxy: Vec<String>,
    pub metrics_textfile: Option<PathBuf>,
    /// The configuration files read, in the order applied (the file, then its drop-ins).
    pub files: Vec<PathBuf>,
    pub default_limits: DefaultLimits,
    /// Where each key's value came from (shown by `status`, useful when debugging precedence).
    pub sources: BTreeMap<&'static str, Source>,
}

/// The raw inputs to [`Settings::load`], so tests can pass an environment of their own.
#[derive(Debug, Default, Clone)]
pub struct Inputs {
    /// The configuration file (its drop-ins are read beside it).
    pub file: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub flags: Vec<String>,
}

impl Inputs {
    /// The process environment's `EDGE_DEVICE_*` variables; without `--config`, the packaged
    /// file if it exists.
    pub fn from_process(file: Option<PathBuf>, flags: Vec<String>) -> Self {
        let file = file.or_else(|| {
            let default = Path::new(DEFAULT_CONFIG_FILE);
            default.exists().then(|| default.to_path_buf())
        });
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        Inputs { file, env, flags }
    }
}

fn spec(name: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|k| k.name == name)
}

fn known_keys() -> String {
    KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

fn read_file(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let file_err = |why: String| ConfigError::File {
        path: path.to_path_buf(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_err(io_why(&e)))?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let doc: serde_yaml_ng::Value =
        crate::yaml::from_str(&text).map_err(|e| file_err(format!("not valid YAML: {e}")))?;
    let map = match doc {
        serde_yaml_ng::Value::Mapping(m) => m,
        serde_yaml_ng::Value::Null => return Ok(Vec::new()),
        _ => return Err(file_err("expected a mapping of KEY: value".into())),
    };
    let mut out = Vec::new();
    for (k, v) in map {
        let key = match k {
            serde_yaml_ng::Value::String(s) => s,
            other => return Err(file_err(format!("key {other:?} is not a string"))),
        };
        let source = Source::File(path.to_path_buf());
        let value = match v {
            serde_yaml_ng::Value::String(s) => s,
            serde_yaml_ng::Value::Number(n) => n.to_string(),
            serde_yaml_ng::Value::Bool(b) => b.to_string(),
            serde_yaml_ng::Value::Null => continue,
            other => {
                let Some(spec) = spec(&key) else {
                    return Err(ConfigError::UnknownKey {
                        key,
                        origin: source,
                        known: known_keys(),
                    });
                };
                return Err(ConfigError::WrongType {
                    key: spec.name,
                    origin: source,
                    expected: spec.kind.expected(),
                    got: describe_yaml(&other).into(),
                });
            }
        };
        out.push((key, value));
    }
    Ok(out)
}

/// Largest number of drop-ins read: a runaway directory is an error, not minutes of parsing.
const MAX_DROPINS: usize = 256;

/// `config.d/*.yaml` beside `file`, in lexical order of their names; none when the directory
/// does not exist.
pub fn dropins(file: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let dir = file
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(DROPIN_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(ConfigError::File {
                path: dir,
                why: io_why(&e),
            })
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ConfigError::File {
            path: dir.clone(),
            why: io_why(&e),
        })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Editors' and dpkg's leftovers (.swp, .dpkg-old) do not end in .yaml; hidden files
        // are nobody's drop-in.
        if name.ends_with(".yaml") && !name.starts_with('.') {
            files.push(entry.path());
        }
    }
    if files.len() > MAX_DROPINS {
        return Err(ConfigError::File {
            path: dir,
            why: format!("more than {MAX_DROPINS} drop-ins"),
        });
    }
    files.sort();
    Ok(files)
}

fn describe_yaml(v: &serde_yaml_ng::Value) -> &'static str {
    match v {
        serde_yaml_ng::Value::Sequence(_) => "a list",
        serde_yaml_ng::Value::Mapping(_) => "a mapping",
        _ => "a tagged value",
    }
}

pub(crate) fn io_why(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// A parsed value of one key.
enum Value {
    CgroupDriver(CgroupDriverChoice),
    Text(String),
    Path(PathBuf),
    Level(LogLevel),
    Duration(Duration),
    Quantity(u64),
    Fraction(f64),
    Range(u32, u32),
    DefaultLimits(DefaultLimits),
}

fn parse_value(spec: &'static KeySpec, raw: &str, source: &Source) -> Result<Value, ConfigError> {
    let wrong = || ConfigError::WrongType {
        key: spec.name,
        origin: source.clone(),
        expected: spec.kind.expected(),
        got: format!("'{raw}'"),
    };
    Ok(match spec.kind {
        Kind::Text => {
            if raw.trim().is_empty() {
                return Err(wrong());
            }
            Value::Text(raw.to_string())
        }
        Kind::Path => {
            let p = PathBuf::from(raw);
            if !p.is_absolute() {
                return Err(wrong());
            }
            Value::Path(p)
        }
        Kind::Url => {
            let lower = raw.to_ascii_lowercase();
            let rest = lower.strip_prefix("https://").ok_or_else(wrong)?;
            if rest.trim_end_matches('/').is_empty() {
                return Err(wrong());
            }
            Value::Text(raw.trim_end_matches('/').to_string())
        }
        Kind::Level => Value::Level(match raw.to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warn" | "warning" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => return Err(wrong()),
        }),
        Kind::Duration => {
            let d = units::parse_duration(raw).map_err(|_| wrong())?;
            if d.is_zero() {
                return Err(wrong());
            }
            Value::Duration(d)
        }
        Kind::Window => Value::Duration(units::parse_duration(raw).map_err(|_| wrong())?),
        Kind::Memory => Value::Quantity(units::parse_memory(raw).map_err(|_| wrong())?),
        Kind::Cpu => Value::Quantity(units::parse_cpu(raw).map_err(|_| wrong())?),
        Kind::Count => Value::Quantity(raw.trim().parse::<u32>().map_err(|_| wrong())? as u64),
        Kind::DeviceId => {
            if !is_rfc1123_name(raw) {
                return Err(wrong());
            }
            Value::Text(raw.to_string())
        }
        Kind::IdRange => {
            let (lo, hi) = id_range(raw).ok_or_else(wrong)?;
            Value::Range(lo, hi)
        }
        Kind::CgroupDriver => Value::CgroupDriver(match raw.trim() {
            "auto" => CgroupDriverChoice::Auto,
            "systemd" => CgroupDriverChoice::Systemd,
            "cgroupfs" => CgroupDriverChoice::Cgroupfs,
            _ => return Err(wrong()),
        }),
        Kind::Slice => {
            if !crate::cgroup::systemd::valid_slice_name(raw.trim()) {
                return Err(wrong());
            }
            Value::Text(raw.trim().to_string())
        }
        Kind::ProxyUrl => Value::Text(proxy_url(raw).ok_or_else(wrong)?),
        Kind::Fraction => Value::Fraction(fraction(raw).ok_or_else(wrong)?),
        Kind::DefaultLimits => Value::DefaultLimits(DefaultLimits::parse(raw).ok_or_else(wrong)?),
    })
}

/// `lo-hi`, at least 1000 ids, none of the system's.
fn id_range(raw: &str) -> Option<(u32, u32)> {
    let (lo, hi) = raw.trim().split_once('-')?;
    let lo: u32 = lo.trim().parse().ok()?;
    let hi: u32 = hi.trim().parse().ok()?;
    // Low ids belong to the system; the top one is (uid_t)-1.
    (lo >= 1000 && hi >= lo.saturating_add(999) && hi != u32::MAX).then_some((lo, hi))
}

/// `http://[user:password@]host[:port][/]`, as `http://authority`.
fn proxy_url(raw: &str) -> Option<String> {
    let t = raw.trim();
    let rest = t
        .get(..7)
        .filter(|p| p.eq_ignore_ascii_case("http://"))
        .map(|_| &t[7..])?;
    let authority = rest.trim_end_matches('/');
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let bad = host_port.is_empty()
        || authority.contains(['/', '?', '#'])
        || host_port.chars().any(char::is_whitespace);
    (!bad).then(|| format!("http://{authority}"))
}

/// A share strictly between 0 and 1, as `0.9` or `90%`.
fn fraction(raw: &str) -> Option<f64> {
    let t = raw.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().ok()? / 100.0,
        None => t.parse::<f64>().ok()?,
    };
    (v > 0.0 && v < 1.0).then_some(v)
}

/// A default memory or cpu limit: a quantity, or a share of the device budget (which differs
/// from device to device, so one setting fits a fleet).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Share {
    Quantity(u64),
    OfBudget(f64),
}

impl Share {
    fn resolve(self, budget: u64) -> u64 {
        match self {
            Share::Quantity(q) => q,
            Share::OfBudget(f) => (budget as f64 * f) as u64,
        }
    }
}

/// DEFAULT_LIMITS: the limits a workload gets for what it does not declare itself.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DefaultLimits {
    pub memory: Option<Share>,
    pub cpu: Option<Share>,
    pub pids: Option<u64>,
}

impl DefaultLimits {
    /// `memory=50%,cpu=1,pids=1024` (any of them, in any order), or `none`.
    fn parse(raw: &str) -> Option<DefaultLimits> {
        let raw = raw.trim();
        let mut out = DefaultLimits::default();
        if raw.eq_ignore_ascii_case("none") {
            return Some(out);
        }
        let share = |v: &str, parse: fn(&str) -> Result<u64, units::UnitError>| {
            let share = match v.strip_suffix('%') {
                Some(p) => {
                    let p: f64 = p.trim().parse().ok()?;
                    (p > 0.0 && p <= 100.0).then_some(Share::OfBudget(p / 100.0))?
                }
                None => Share::Quantity(parse(v).ok().filter(|q| *q > 0)?),
            };
            Some(share)
        };
        for part in raw.split(',') {
            let (k, v) = part.split_once('=')?;
            let v = v.trim();
            match k.trim() {
                "memory" if out.memory.is_none() => {
                    out.memory = Some(share(v, units::parse_memory)?)
                }
                "cpu" if out.cpu.is_none() => out.cpu = Some(share(v, units::parse_cpu)?),
                "pids" if out.pids.is_none() => {
                    out.pids = Some(v.parse::<u64>().ok().filter(|p| *p > 0)?)
                }
                _ => return None,
            }
        }
        Some(out)
    }

    /// The limits for a device whose workload budget is `memory_budget` bytes and
    /// `cpu_budget` millicores.
    pub fn resolve(&self, memory_budget: u64, cpu_budget: u64) -> crate::cgroup::Limits {
        crate::cgroup::Limits {
            memory_bytes: self.memory.map(|s| s.resolve(memory_budget)),
            cpu_millicores: self.cpu.map(|s| s.resolve(cpu_budget).max(1)),
            pids: self.pids,
        }
    }
}

/// A lowercase RFC 1123 DNS label sequence, as Kubernetes object names require (PROTOCOL §1.3).
pub fn is_rfc1123_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl Settings {
    /// Loads and validates the settings (no file-system side effects besides reading the file).
    pub fn load(inputs: &Inputs) -> Result<Settings, ConfigError> {
        let (raw, files) = layers(inputs)?;
        let mut values: BTreeMap<&'static str, Value> = BTreeMap::new();
        let mut sources = BTreeMap::new();
        for (name, (text, source)) in &raw {
            let spec = spec(name).expect("keys in raw come from KEYS");
            values.insert(spec.name, parse_value(spec, text, source)?);
            sources.insert(spec.name, source.clone());
        }
        let mut take = Taker(values);
        Ok(Settings {
            log_level: take.level("LOG_LEVEL"),
            ca_root: take.path("CA_ROOT").unwrap_or_default(),
            cert: take.path("CERT").unwrap_or_default(),
            key: take.path("KEY").unwrap_or_default(),
            server: take.text("SERVER"),
            xdg_runtime_dir: take.path("XDG_RUNTIME_DIR"),
            kubeconfig: take.path("KUBECONFIG"),
            device_id: take.text("DEVICE_ID"),
            namespace: take.text("NAMESPACE").unwrap_or_default(),
            state_dir: take.path("STATE_DIR").unwrap_or_default(),
            desired_state: take.path("DESIRED_STATE"),
            control_socket: take.path("CONTROL_SOCKET").unwrap_or_default(),
            sample_interval: take.duration("SAMPLE_INTERVAL"),
            cgroup_driver: take.cgroup_driver("CGROUP_DRIVER"),
            systemd_slice: take.text("SYSTEMD_SLICE").unwrap_or_default(),
            cgroup_root: take.text("CGROUP_ROOT").unwrap_or_default(),
            reserved_memory: take.quantity("RESERVED_MEMORY"),
            reserved_cpu_millis: take.quantity("RESERVED_CPU"),
            workload_user: take.text("WORKLOAD_USER"),
            workload_uids: take.range("WORKLOAD_UIDS"),
            max_workloads: take.quantity("MAX_WORKLOADS") as usize,
            workload_log_max: take.quantity("WORKLOAD_LOG_MAX"),
            restart_backoff_initial: take.duration("RESTART_BACKOFF_INITIAL"),
            restart_backoff_max: take.duration("RESTART_BACKOFF_MAX"),
            restart_max_failures: take.quantity("RESTART_MAX_FAILURES") as u32,
            stop_timeout: take.duration("STOP_TIMEOUT"),
            poll_interval: take.duration("POLL_INTERVAL"),
            server_timeout: take.duration("SERVER_TIMEOUT"),
            server_outage_threshold: take.duration("SERVER_OUTAGE_THRESHOLD"),
            cert_renew_at: take.fraction("CERT_RENEW_AT"),
            max_message_size: take.quantity("MAX_MESSAGE_SIZE"),
            rootless_user: take.text("ROOTLESS_USER"),
            variables_file: take.path("VARIABLES_FILE").unwrap_or_default(),
            variables_ttl: take.duration("VARIABLES_TTL"),
            budget_window: take.duration("BUDGET_WINDOW"),
            budget_hold: take.duration("BUDGET_HOLD"),
            budget_low_watermark: take.fraction("BUDGET_LOW_WATERMARK"),
            https_proxy: take.text("HTTPS_PROXY"),
            no_proxy: take
                .text("NO_PROXY")
                .map(|list| {
                    list.split(',')
                        .map(|h| h.trim().to_ascii_lowercase())
                        .filter(|h| !h.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            metrics_textfile: take.path("METRICS_TEXTFILE"),
            files,
            default_limits: take.default_limits("DEFAULT_LIMITS"),
            sources,
        })
    }

    /// Checks the paths the run needs: the desired-state file is readable, the state directory
    /// can be created and written. Creates STATE_DIR and the control socket's directory.
    pub fn prepare_paths(&self) -> Result<(), ConfigError> {
        let path_err = |key: &'static str, path: &Path, why: String| ConfigError::Path {
            key,
            path: path.to_path_buf(),
            why,
        };
        if self.workload_log_max < crate::drivers::output::MIN_LOG_MAX {
            return Err(ConfigError::Invalid {
                key: "WORKLOAD_LOG_MAX",
                why: format!(
                    "must be at least {}",
                    units::Bytes(crate::drivers::output::MIN_LOG_MAX)
                ),
            });
        }
        if let Some(p) = &self.desired_state {
            std::fs::File::open(p).map_err(|e| path_err("DESIRED_STATE", p, io_why(&e)))?;
        }
        std::fs::create_dir_all(&self.state_dir).map_err(|e| {
            path_err(
                "STATE_DIR",
                &self.state_dir,
                format!("cannot create: {}", io_why(&e)),
            )
        })?;
        let probe = self.state_dir.join(".write-probe");
        std::fs::write(&probe, b"").map_err(|e| {
            path_err(
                "STATE_DIR",
                &self.state_dir,
                format!("not writable: {}", io_why(&e)),
            )
        })?;
        let _ = std::fs::remove_file(&probe);
        if let Some(dir) = self.control_socket.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                path_err(
                    "CONTROL_SOCKET",
                    &self.control_socket,
                    format!("cannot create its directory: {}", io_why(&e)),
                )
            })?;
        }
        if let Some(p) = &self.metrics_textfile {
            let dir = p.parent().unwrap_or_else(|| Path::new("/"));
            if !dir.is_dir() {
                return Err(path_err(
                    "METRICS_TEXTFILE",
                    p,
                    "its directory does not exist".into(),
                ));
            }
        }
        if self.restart_backoff_max < self.restart_backoff_initial {
            return Err(ConfigError::Invalid {
                key: "RESTART_BACKOFF_MAX",
                why: "must not be smaller than RESTART_BACKOFF_INITIAL".into(),
            });
        }
        Ok(())
    }
}

/// Every key's text and where it came from, each layer over the one before: defaults, the file
/// and its drop-ins in order, `EDGE_DEVICE_*` variables, then `--set` flags. Also the files read.
type Layers = (BTreeMap<&'static str, (String, Source)>, Vec<PathBuf>);

fn layers(inputs: &Inputs) -> Result<Layers, ConfigError> {
    let mut raw = BTreeMap::new();
    for spec in KEYS {
        if let Some(d) = spec.default {
            raw.insert(spec.name, (d.to_string(), Source::Default));
        }
    }
    let mut files = Vec::new();
    if let Some(path) = &inputs.file {
        files.push(path.clone());
        files.extend(dropins(path)?);
    }
    for path in &files {
        for (key, value) in read_file(path)? {
            set(
                &mut raw,
                &key,
                key.clone(),
                value,
                Source::File(path.clone()),
            )?;
        }
    }
    let mut env = inputs.env.clone();
    env.sort();
    for (var, value) in env {
        if let Some(key) = var.strip_prefix(ENV_PREFIX) {
            set(&mut raw, key, var.clone(), value, Source::Env(var.clone()))?;
        }
    }
    for flag in &inputs.flags {
        let (key, value) = flag
            .split_once('=')
            .ok_or_else(|| ConfigError::BadFlag(flag.clone()))?;
        set(
            &mut raw,
            key.trim(),
            key.to_string(),
            value.to_string(),
            Source::Flag,
        )?;
    }
    Ok((raw, files))
}

/// Sets `key` (named `shown` in an error: the variable's or the file's spelling) from `source`.
fn set(
    raw: &mut BTreeMap<&'static str, (String, Source)>,
    key: &str,
    shown: String,
    value: String,
    source: Source,
) -> Result<(), ConfigError> {
    let Some(spec) = spec(key) else {
        return Err(ConfigError::UnknownKey {
            key: shown,
            origin: source,
            known: known_keys(),
        });
    };
    raw.insert(spec.name, (value, source));
    Ok(())
}

struct Taker(BTreeMap<&'static str, Value>);

impl Taker {
    fn text(&mut self, k: &str) -> Option<String> {
        match self.0.remove(k) {
            Some(Value::Text(s)) => Some(s),
            _ => None,
        }
    }
    fn path(&mut self, k: &str) -> Option<PathBuf> {
        match self.0.remove(k) {
            Some(Value::Path(p)) => Some(p),
            _ => None,
        }
    }
    fn level(&mut self, k: &str) -> LogLevel {
        match self.0.remove(k) {
            Some(Value::Level(l)) => l,
            _ => LogLevel::Info,
        }
    }
    fn duration(&mut self, k: &str) -> Duration {
        match self.0.remove(k) {
            Some(Value::Duration(d)) => d,
            _ => Duration::from_secs(1),
        }
    }
    fn fraction(&mut self, k: &str) -> f64 {
        match self.0.remove(k) {
            Some(Value::Fraction(f)) => f,
            _ => 0.75,
        }
    }
    fn range(&mut self, k: &str) -> Option<(u32, u32)> {
        match self.0.remove(k) {
            Some(Value::Range(a, b)) => Some((a, b)),
            _ => None,
        }
    }
    fn default_limits(&mut self, k: &str) -> DefaultLimits {
        match self.0.remove(k) {
            Some(Value::DefaultLimits(l)) => l,
            _ => DefaultLimits::default(),
        }
    }
    fn quantity(&mut self, k: &str) -> u64 {
        match self.0.remove(k) {
            Some(Value::Quantity(q)) => q,
            _ => 0,
        }
    }
    fn cgroup_driver(&mut self, k: &str) -> CgroupDriverChoice {
        match self.0.remove(k) {
            Some(Value::CgroupDriver(d)) => d,
            _ => CgroupDriverChoice::Auto,
        }
    }
}

#[cfg(test)]
mod tests;
