//! Serde types for every message of the Flotta edge API (PROTOCOL.md §2, §4, §5).
//!
//! Field names follow `flotta-swagger.yaml` to the byte, including its mix of
//! snake_case, hyphens and camelCase (PROTOCOL.md §8 item 12). Decoding is
//! tolerant where the server is sloppy: unknown fields are ignored, Go's `null`
//! for an empty array or map is read as empty, the `workloads` list that
//! `omitempty` drops when empty is read as empty (§4.1), and the zero date-time
//! `0001-01-01T00:00:00.000Z` is a valid date (§8 item 13). Encoding mirrors the
//! server's Go models: `omitempty` fields are skipped when empty, and the few
//! arrays that have no `omitempty` are written as `null` when unset (§5.3).

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::de::{DeserializeOwned, Deserializer};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, PrimitiveDateTime};

/// Base path of every endpoint (PROTOCOL.md §1.1, swagger `basePath`).
pub const API_BASE_PATH: &str = "/api/flotta-management/v1";

/// Envelope `version` that yggd and the server send (§2.1).
pub const MESSAGE_VERSION: i64 = 1;

/// Errors decoding a message or one of its payloads, with the JSON path of the
/// offending element so an event can say *where* a message was wrong.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("malformed {what} at `{path}`: {reason}")]
    Malformed {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("secret `{name}`: {reason}")]
    Secret { name: String, reason: String },
    #[error("invalid base64 in {what}: {reason}")]
    Base64 { what: String, reason: String },
}

/// Decode JSON bytes into `T`, reporting the JSON path of the first error.
pub fn from_json_slice<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, MessageError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| malformed(what, e))?;
    // Trailing garbage after the JSON document is as malformed as a broken one.
    de.end().map_err(|e| MessageError::Malformed {
        what,
        path: ".".into(),
        reason: e.to_string(),
    })?;
    Ok(value)
}

/// Decode an already parsed JSON value into `T`, reporting the JSON path.
pub fn from_json_value<T: DeserializeOwned>(
    what: &'static str,
    value: Value,
) -> Result<T, MessageError> {
    serde_path_to_error::deserialize(value).map_err(|e| malformed(what, e))
}

fn malformed<E: fmt::Display>(
    what: &'static str,
    e: serde_path_to_error::Error<E>,
) -> MessageError {
    MessageError::Malformed {
        what,
        path: e.path().to_string(),
        reason: e.inner().to_string(),
    }
}

/// Read `null` as the type's default: Go marshals an unset slice or map as
/// `null`, and the agent should not care whether a list is null or empty.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn is_false(b: &bool) -> bool {
    !*b
}

// ---------------------------------------------------------------------------
// Date-time
// ---------------------------------------------------------------------------

/// A swagger `date-time` (go-openapi `strfmt.DateTime`).
///
/// Written like the server does (`2006-01-02T15:04:05.000Z07:00`, always UTC
/// here). Read leniently: RFC 3339 with or without fraction, and the offset-less
/// layouts go-openapi also accepts (§1.3), which are taken as UTC. The zero
/// value is year 1 (§8 item 13), which is what Go sends for "never".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DateTime(OffsetDateTime);

impl DateTime {
    /// Go's zero `time.Time`: `0001-01-01T00:00:00.000Z`.
    pub fn zero() -> Self {
        // Year 1 is inside `time`'s range; the fallback only guards the API.
        let date =
            time::Date::from_calendar_date(1, time::Month::January, 1).unwrap_or(time::Date::MIN);
        DateTime(date.midnight().assume_utc())
    }

    pub fn now() -> Self {
        DateTime(OffsetDateTime::now_utc())
    }

    pub fn from_offset(t: OffsetDateTime) -> Self {
        DateTime(t)
    }

    pub fn as_offset(&self) -> OffsetDateTime {
        self.0
    }

    pub fn is_zero(&self) -> bool {
        *self == Self::zero()
    }

    pub fn parse(s: &str) -> Option<Self> {
        if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
            return Some(DateTime(t));
        }
        // Offset-less layouts go-openapi's strfmt also accepts (§1.3): UTC.
        const LAYOUTS: [&str; 4] = [
            "[year]-[month]-[day]T[hour]:[minute]:[second]",
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond]",
            "[year]-[month]-[day] [hour]:[minute]:[second]",
            "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond]",
        ];
        LAYOUTS.iter().find_map(|layout| {
            let fd = time::format_description::parse_borrowed::<2>(layout).ok()?;
            PrimitiveDateTime::parse(s, &fd)
                .ok()
                .map(|p| DateTime(p.assume_utc()))
        })
    }
}

impl Default for DateTime {
    fn default() -> Self {
        Self::zero()
    }
}

impl fmt::Display for DateTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0.to_offset(time::UtcOffset::UTC);
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        )
    }
}

impl Serialize for DateTime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DateTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid date-time `{s}`")))
    }
}

// ---------------------------------------------------------------------------
// Envelope
// ---------------------------------------------------------------------------

/// `message.type` (§2.1). The server validates it case-sensitively on input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageType {
    #[serde(rename = "connection-status")]
    ConnectionStatus,
    #[serde(rename = "command")]
    Command,
    #[serde(rename = "event")]
    Event,
    #[serde(rename = "data")]
    Data,
}

/// `message.directive` values the agent produces or consumes (§2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    Enrolment,
    Registration,
    Heartbeat,
    Ansible,
    /// server→device configuration on `data/in`
    Device,
}

impl Directive {
    pub fn as_str(self) -> &'static str {
        match self {
            Directive::Enrolment => "enrolment",
            Directive::Registration => "registration",
            Directive::Heartbeat => "heartbeat",
            Directive::Ansible => "ansible",
            Directive::Device => "device",
        }
    }
}

impl fmt::Display for Directive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `message` (swagger `message`, §2.1): the envelope of every request body and
/// GET response body. `C` is the `content` type; `Value` when not yet known.
///
/// No field is required by the schema, so all of them default. `sent` is kept
/// as the raw string: the agent never interprets a received `sent`, and one odd
/// timestamp must not make a configuration unreadable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(deserialize = "C: Deserialize<'de> + Default"))]
pub struct Message<C = Value> {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub message_type: Option<MessageType>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub response_to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub directive: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(default = "default_content")]
    pub content: C,
}

fn default_content<C: Default>() -> C {
    C::default()
}

impl<C> Message<C> {
    /// A device→server data message the way yggd sends it (§2.1, §2.3): type
    /// `data`, version 1, `sent` now.
    pub fn data(directive: Directive, message_id: String, content: C) -> Self {
        Message {
            message_type: Some(MessageType::Data),
            message_id,
            response_to: String::new(),
            version: Some(MESSAGE_VERSION),
            sent: Some(DateTime::now().to_string()),
            directive: directive.as_str().to_owned(),
            metadata: None,
            content,
        }
    }
}

impl Message<Value> {
    /// Decode `content` into its typed payload.
    pub fn content_as<T: DeserializeOwned>(&self, what: &'static str) -> Result<T, MessageError> {
        from_json_value(what, self.content.clone())
    }
}

/// `message-response` (§2.2): the 200 body of `registration` and `ansible`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(deserialize = "C: Deserialize<'de> + Default"))]
pub struct MessageResponse<C = Value> {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub directive: String,
    #[serde(default = "default_content")]
    pub content: C,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

// ---------------------------------------------------------------------------
// Enrolment and registration (§2.4)
// ---------------------------------------------------------------------------

/// `enrolment-info` (§2.4.1).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EnrolmentInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<EnrolmentFeatures>,
    /// Absent means `default` on the server (§2.4.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_namespace: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EnrolmentFeatures {
    #[serde(
        rename = "modelName",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub model_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<HardwareInfo>,
}

/// `registration-info` (§2.4.2).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegistrationInfo {
    /// PEM `CERTIFICATE REQUEST`.
    #[serde(default)]
    pub certificate_request: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<HardwareInfo>,
}

/// `registration-response` (§2.4.2): `content` of the registration answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegistrationResponse {
    /// One PEM `CERTIFICATE` block, no chain.
    #[serde(default)]
    pub certificate: String,
}

// ---------------------------------------------------------------------------
// Control channel (§2.6)
// ---------------------------------------------------------------------------

/// `content` of a `command` message on `control/in`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlCommand {
    #[serde(default)]
    pub command: String,
    /// The server always sends `null`; yggd's `reconnect` has `{delay}`.
    #[serde(default)]
    pub arguments: Value,
}

/// What a control command asks for; the Flotta server only emits `disconnect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlKind {
    Disconnect,
    Ping,
    Reconnect,
    Other(String),
}

impl ControlCommand {
    pub fn disconnect() -> Self {
        ControlCommand {
            command: "disconnect".into(),
            arguments: Value::Null,
        }
    }

    pub fn kind(&self) -> ControlKind {
        match self.command.as_str() {
            "disconnect" => ControlKind::Disconnect,
            "ping" => ControlKind::Ping,
            "reconnect" => ControlKind::Reconnect,
            other => ControlKind::Other(other.to_owned()),
        }
    }
}

// ---------------------------------------------------------------------------
// Device configuration (§4)
// ---------------------------------------------------------------------------

/// `device-configuration-message` (§4.1): the full desired state.
///
/// Workloads that fail to decode do not fail the whole message: they are moved
/// to [`rejected_workloads`](Self::rejected_workloads) with the path of the
/// error, so the agent can report them and leave the others alone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "RawDeviceConfigurationMessage")]
pub struct DeviceConfigurationMessage {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device_id: String,
    /// EdgeDevice `resourceVersion`: opaque, changes on any write (§4.1, §8.6).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    #[serde(default)]
    pub configuration: DeviceConfiguration,
    /// `omitempty` on the server: absent means "no workloads" (§4.5).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<Workload>,
    /// Never set by the server (§4.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workloads_monitoring_interval: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<Secret>,
    /// `[k4e]` only (§7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ansible_playbook: Option<String>,
    /// Workloads present on the wire that could not be decoded.
    #[serde(skip)]
    pub rejected_workloads: Vec<RejectedWorkload>,
}

/// A workload entry that did not decode; `name` is best effort.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedWorkload {
    pub index: usize,
    pub name: Option<String>,
    pub error: String,
}

impl fmt::Display for RejectedWorkload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(n) => write!(f, "workloads[{}] ({n}): {}", self.index, self.error),
            None => write!(f, "workloads[{}]: {}", self.index, self.error),
        }
    }
}

#[derive(Deserialize)]
struct RawDeviceConfigurationMessage {
    #[serde(default)]
    device_id: String,
    #[serde(default)]
    version: String,
    #[serde(default, deserialize_with = "null_as_default")]
    configuration: DeviceConfiguration,
    #[serde(default, deserialize_with = "null_as_default")]
    workloads: Vec<Value>,
    #[serde(default)]
    workloads_monitoring_interval: Option<i64>,
    #[serde(default, deserialize_with = "null_as_default")]
    secrets: Vec<Secret>,
    #[serde(default)]
    ansible_playbook: Option<String>,
}

impl From<RawDeviceConfigurationMessage> for DeviceConfigurationMessage {
    fn from(raw: RawDeviceConfigurationMessage) -> Self {
        let mut workloads = Vec::with_capacity(raw.workloads.len());
        let mut rejected_workloads = Vec::new();
        for (index, value) in raw.workloads.into_iter().enumerate() {
            let name = value.get("name").and_then(Value::as_str).map(str::to_owned);
            match serde_path_to_error::deserialize::<_, Workload>(value) {
                Ok(w) => workloads.push(w),
                Err(e) => rejected_workloads.push(RejectedWorkload {
                    index,
                    name,
                    error: format!("at `{}`: {}", e.path(), e.inner()),
                }),
            }
        }
        DeviceConfigurationMessage {
            device_id: raw.device_id,
            version: raw.version,
            configuration: raw.configuration,
            workloads,
            workloads_monitoring_interval: raw.workloads_monitoring_interval,
            secrets: raw.secrets,
            ansible_playbook: raw.ansible_playbook,
            rejected_workloads,
        }
    }
}

/// `device-configuration` (§4.2).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceConfiguration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<HeartbeatConfiguration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfiguration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageConfiguration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<OsInformation>,
    #[serde(
        rename = "log-collection",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub log_collection: BTreeMap<String, LogsCollectionInformation>,
    /// No `omitempty` on the server: always present, `[]` when none (§4.2).
    #[serde(default, deserialize_with = "null_as_default")]
    pub mounts: Vec<Mount>,
    /// In the schema but never set by the server (§4.2, §8.17).
    #[serde(
        rename = "ansible-manager",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ansible_manager: Option<AnsibleManagerConfiguration>,
    /// device-worker-ng extension (§7).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub profiles: Vec<DeviceProfile>,
}

/// Default heartbeat period, also used for values ≤ 0 (§1.5).
pub const DEFAULT_HEARTBEAT_PERIOD_SECONDS: u64 = 60;

impl DeviceConfiguration {
    /// Heartbeat period with the official agent's fallback (§1.5).
    pub fn heartbeat_period(&self) -> std::time::Duration {
        let secs = self
            .heartbeat
            .as_ref()
            .and_then(|h| h.period_seconds)
            .filter(|s| *s > 0)
            .map(|s| s.unsigned_abs())
            .unwrap_or(DEFAULT_HEARTBEAT_PERIOD_SECONDS);
        std::time::Duration::from_secs(secs)
    }

    /// The hardware profile, `{}` (no hardware) when unset.
    pub fn hardware_profile(&self) -> HardwareProfileConfiguration {
        self.heartbeat
            .as_ref()
            .and_then(|h| h.hardware_profile.clone())
            .unwrap_or_default()
    }
}

/// `heartbeat-configuration`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatConfiguration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_seconds: Option<i64>,
    /// Always present from the server, possibly `{}` (§4.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_profile: Option<HardwareProfileConfiguration>,
}

/// `hardware-profile-configuration`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HardwareProfileConfiguration {
    #[serde(default, skip_serializing_if = "is_false")]
    pub include: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<HardwareProfileScope>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HardwareProfileScope {
    Full,
    Delta,
}

/// `metrics-configuration`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsConfiguration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<MetricsRetention>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<ComponentMetricsConfiguration>,
    #[serde(
        rename = "data-transfer",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub data_transfer: Option<ComponentMetricsConfiguration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiver: Option<MetricsReceiverConfiguration>,
}

/// `metrics-retention`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsRetention {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_mib: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_hours: Option<i32>,
}

/// `component-metrics-configuration`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ComponentMetricsConfiguration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_list: Option<MetricsAllowList>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
}

/// `metrics-allow-list`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsAllowList {
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub names: Vec<String>,
}

/// `metrics-receiver-configuration`. `caCert` is plain PEM (§8 item 14).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsReceiverConfiguration {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_num_samples: Option<i64>,
    #[serde(rename = "caCert", default, skip_serializing_if = "String::is_empty")]
    pub ca_cert: String,
}

/// `storage-configuration`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StorageConfiguration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3StorageConfiguration>,
}

/// `s3-storage-configuration`. The three `aws_*` values are base64 (§4.2).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct S3StorageConfiguration {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bucket_host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket_port: Option<i32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bucket_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bucket_region: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub aws_access_key_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub aws_secret_access_key: String,
    // The server sends `""` here rather than omitting it (§4.6 example).
    #[serde(default)]
    pub aws_ca_bundle: String,
}

impl S3StorageConfiguration {
    pub fn access_key_id(&self) -> Result<Vec<u8>, MessageError> {
        decode_base64("storage.s3.aws_access_key_id", &self.aws_access_key_id)
    }
    pub fn secret_access_key(&self) -> Result<Vec<u8>, MessageError> {
        decode_base64(
            "storage.s3.aws_secret_access_key",
            &self.aws_secret_access_key,
        )
    }
    pub fn ca_bundle(&self) -> Result<Vec<u8>, MessageError> {
        decode_base64("storage.s3.aws_ca_bundle", &self.aws_ca_bundle)
    }
}

fn decode_base64(what: &str, s: &str) -> Result<Vec<u8>, MessageError> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| MessageError::Base64 {
            what: what.to_owned(),
            reason: e.to_string(),
        })
}

/// `os-information`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OsInformation {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub commit_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hosted_objects_url: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub automatically_upgrade: bool,
}

/// `logs-collection-information`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogsCollectionInformation {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer_size: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syslog_config: Option<SyslogConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyslogConfig {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
}

/// `mount` (configuration mounts and `hardware-info.mounts`). The CRD calls
/// `directory` `folder`; the wire says `directory` (§6).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub directory: String,
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub mount_type: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub options: String,
}

/// `ansible-manager-configuration`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AnsibleManagerConfiguration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_seconds: Option<i64>,
}

/// Device profile (device-worker-ng extension, §7): named conditions whose
/// expressions (e.g. `cpu>25%`) the agent evaluates.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceProfile {
    #[serde(default)]
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub conditions: Vec<ProfileCondition>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileCondition {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub expression: String,
}

// ---------------------------------------------------------------------------
// Workloads (§4.3) and secrets (§4.4)
// ---------------------------------------------------------------------------

/// `workload` (§4.3) plus the device-worker-ng extensions (§7).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Only the EdgeWorkload's `podman/` labels, prefix stripped (§4.3).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
    /// YAML of a Kubernetes `PodSpec` (§4.3).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub specification: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataConfiguration>,
    #[serde(
        rename = "imageRegistries",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub image_registries: Option<ImageRegistries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<WorkloadMetrics>,
    /// Each item is the YAML of a whole ConfigMap (§4.3).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub configmaps: Vec<String>,
    /// Key into `configuration.log-collection`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub log_collection: String,
    /// `pod` or `k8s` (device-worker-ng, §7). Absent means `pod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub profiles: Vec<WorkloadProfile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootless: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
}

/// `data-configuration`. Neither list has `omitempty`, so both may be `null`
/// (§4.3); `None` keeps that distinction for round trips.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataConfiguration {
    #[serde(default)]
    pub ingress: Option<Vec<DataPath>>,
    #[serde(default)]
    pub egress: Option<Vec<DataPath>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPath {
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub target: String,
}

/// `image-registries`. `authFile` is the raw `.dockerconfigjson`, not base64.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageRegistries {
    #[serde(rename = "authFile", default, skip_serializing_if = "String::is_empty")]
    pub auth_file: String,
}

/// `metrics` (per workload).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadMetrics {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_list: Option<MetricsAllowList>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub containers: BTreeMap<String, ContainerMetrics>,
}

/// `container-metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerMetrics {
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

/// Workload profile (device-worker-ng, §7): run only while the named device
/// profile condition holds, with a CPU quota.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadProfile {
    #[serde(default)]
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub conditions: Vec<WorkloadProfileCondition>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadProfileCondition {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<ResourceQuota>,
}

/// `resource` (§7): `cpu` is a cgroup v2 `cpu.max` quota in µs per 100 000 µs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceQuota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<i64>,
}

/// `retry` (device-worker-ng, §7). The official server never maps it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// `constantBackoff` or `exponentialBackoff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
    #[serde(
        rename = "periodSeconds",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub period_seconds: Option<i64>,
    #[serde(
        rename = "initialIntervalSeconds",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub initial_interval_seconds: Option<i64>,
    #[serde(
        rename = "randomizationFactor",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub randomization_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
}

/// `secret` (§4.4). `data` is a JSON *string* holding an object of base64
/// values: decode it with [`Secret::decode`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub data: String,
}

impl Secret {
    /// Key → decoded bytes.
    pub fn decode(&self) -> Result<BTreeMap<String, Vec<u8>>, MessageError> {
        let map: BTreeMap<String, String> =
            serde_json::from_str(&self.data).map_err(|e| MessageError::Secret {
                name: self.name.clone(),
                reason: format!("data is not a JSON object of strings: {e}"),
            })?;
        map.into_iter()
            .map(|(k, v)| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v.as_bytes())
                    .map_err(|e| MessageError::Secret {
                        name: self.name.clone(),
                        reason: format!("key `{k}` is not base64: {e}"),
                    })?;
                Ok((k, bytes))
            })
            .collect()
    }

    /// Build the wire form from decoded values (used by tests and servers).
    pub fn encode(name: &str, values: &BTreeMap<String, Vec<u8>>) -> Secret {
        let map: BTreeMap<&str, String> = values
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    base64::engine::general_purpose::STANDARD.encode(v),
                )
            })
            .collect();
        Secret {
            name: name.to_owned(),
            // A map of strings always serialises.
            data: serde_json::to_string(&map).unwrap_or_default(),
        }
    }
}

// ---------------------------------------------------------------------------
// Heartbeat (§5)
// ---------------------------------------------------------------------------

/// `heartbeat` (§5.1).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    #[serde(default)]
    pub status: DeviceStatus,
    /// Echo of the applied configuration's `version`.
    #[serde(default)]
    pub version: String,
    /// No `omitempty` (§5.1): always written.
    #[serde(default, deserialize_with = "null_as_default")]
    pub workloads: Vec<WorkloadStatus>,
    /// Official agent only; `[ng]` dropped it (§7).
    #[serde(
        rename = "playbook-executions",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub playbook_executions: Option<Vec<PlaybookExecutionStatus>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<UpgradeStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<HardwareInfo>,
    /// No `omitempty` (§5.1): always written.
    #[serde(default, deserialize_with = "null_as_default")]
    pub events: Vec<EventInfo>,
}

/// `heartbeat.status`. The server stores it unvalidated (§5.1); anything else
/// read from the wire is kept verbatim.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DeviceStatus {
    #[default]
    Up,
    Degraded,
    Other(String),
}

impl DeviceStatus {
    pub fn as_str(&self) -> &str {
        match self {
            DeviceStatus::Up => "up",
            DeviceStatus::Degraded => "degraded",
            DeviceStatus::Other(s) => s,
        }
    }
}

/// `workload-status.status`. The swagger enum is lowercase; the official agent
/// sends podman states like `Running` (§8 item 3), kept as `Other`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadState {
    Deploying,
    Running,
    Crashed,
    Stopped,
    Other(String),
}

impl WorkloadState {
    pub fn as_str(&self) -> &str {
        match self {
            WorkloadState::Deploying => "deploying",
            WorkloadState::Running => "running",
            WorkloadState::Crashed => "crashed",
            WorkloadState::Stopped => "stopped",
            WorkloadState::Other(s) => s,
        }
    }
}

macro_rules! string_enum_serde {
    ($ty:ident { $($s:literal => $v:ident),* $(,)? }) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Ok(match s.as_str() {
                    $($s => $ty::$v,)*
                    _ => $ty::Other(s),
                })
            }
        }
    };
}

string_enum_serde!(DeviceStatus { "up" => Up, "degraded" => Degraded });
string_enum_serde!(WorkloadState {
    "deploying" => Deploying,
    "running" => Running,
    "crashed" => Crashed,
    "stopped" => Stopped,
});

/// `workload-status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadStatus {
    #[serde(default)]
    pub name: String,
    pub status: WorkloadState,
    /// Last successful S3 sync, else the zero time (§5.1).
    #[serde(default)]
    pub last_data_upload: DateTime,
}

/// `playbook-execution-status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlaybookExecutionStatus {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub last_data_upload: DateTime,
}

/// `upgrade-status`. Note the capital `ID` in `current_commit_ID` (§5.1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeStatus {
    #[serde(
        rename = "current_commit_ID",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub current_commit_id: String,
    /// `succeeded` or `failed`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_upgrade_status: String,
    /// Go `Time.String()` format, kept verbatim (§5.1).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_upgrade_time: String,
}

/// `event-info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventInfo {
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(rename = "type")]
    pub event_type: EventType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Info,
    Warn,
}

/// `playbook-execution` (§2.7): items of the JSON-string `content` of an
/// `ansible` response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PlaybookExecution {
    #[serde(default)]
    pub name: String,
    #[serde(default, alias = "ansible-playbook-string")]
    pub ansible_playbook_string: String,
    #[serde(default)]
    pub last_data_upload: Option<DateTime>,
}

/// Decode the `ansible` response content: a JSON string holding a JSON array.
pub fn decode_playbook_executions(content: &Value) -> Result<Vec<PlaybookExecution>, MessageError> {
    match content {
        Value::String(s) => from_json_slice("playbook executions", s.as_bytes()),
        other => from_json_value("playbook executions", other.clone()),
    }
}

// ---------------------------------------------------------------------------
// Hardware (§5.3)
// ---------------------------------------------------------------------------

/// `hardware-info` (§5.3). The arrays have no `omitempty` on the server and are
/// written as `null` when unset; `None` is "unset", `Some(vec![])` is `[]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HardwareInfo {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    #[serde(default)]
    pub interfaces: Option<Vec<Interface>>,
    #[serde(default)]
    pub disks: Option<Vec<Disk>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_vendor: Option<SystemVendor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    #[serde(default)]
    pub gpus: Option<Vec<Gpu>>,
    #[serde(default)]
    pub host_devices: Option<Vec<HostDevice>>,
    #[serde(default)]
    pub mounts: Option<Vec<Mount>>,
}

/// `interface`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    #[serde(default)]
    pub ipv4_addresses: Option<Vec<String>>,
    #[serde(default)]
    pub ipv6_addresses: Option<Vec<String>>,
    #[serde(default)]
    pub flags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac_address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed_mbps: Option<i64>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub has_carrier: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vendor: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub product: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub biosdevname: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_id: String,
}

/// `disk`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub by_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub by_path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub drive_type: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vendor: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub serial: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub wwn: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hctl: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub bootable: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub is_installation_media: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub smart: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_perf: Option<IoPerf>,
}

/// `io_perf`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoPerf {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_duration: Option<i64>,
}

/// `boot`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Boot {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub current_boot_mode: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pxe_interface: String,
}

/// `system_vendor`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemVendor {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub manufacturer: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub product_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub serial_number: String,
    #[serde(rename = "virtual", default, skip_serializing_if = "is_false")]
    pub is_virtual: bool,
}

/// `memory`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usable_bytes: Option<i64>,
}

/// `cpu`. `flags` has no `omitempty` (§5.3).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cpu {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency: Option<f64>,
    #[serde(default)]
    pub flags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub architecture: String,
}

/// `gpu`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vendor: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vendor_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
}

/// `host_device`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostDevice {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// `c` or `b`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/protocol/",
                $name
            ))
        };
    }

    fn parse<T: DeserializeOwned>(s: &str) -> T {
        from_json_slice("fixture", s.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Encode and decode again: nothing known may be lost.
    fn round_trip<T>(t: &T)
    where
        T: Serialize + DeserializeOwned + PartialEq + fmt::Debug,
    {
        let json = serde_json::to_string(t).unwrap();
        let back: T = parse(&json);
        assert_eq!(&back, t, "round trip through {json}");
    }

    #[test]
    fn yggd_envelope() {
        let m: Message = parse(fixture!("s2_1_yggd_envelope.json"));
        assert_eq!(m.message_type, Some(MessageType::Data));
        assert_eq!(m.version, Some(1));
        assert_eq!(m.directive, "heartbeat");
        assert_eq!(m.metadata, None, "null metadata reads as absent");
        assert_eq!(
            m.sent
                .as_deref()
                .and_then(DateTime::parse)
                .map(|d| d.to_string())
                .as_deref(),
            Some("2022-10-16T08:16:03.123Z")
        );
        round_trip(&m);
    }

    #[test]
    fn enrolment_request() {
        let m: Message<EnrolmentInfo> = parse(fixture!("s2_4_1_enrolment_request.json"));
        assert_eq!(m.directive, "enrolment");
        assert_eq!(m.content.target_namespace.as_deref(), Some("default"));
        let hw = m
            .content
            .features
            .as_ref()
            .unwrap()
            .hardware
            .as_ref()
            .unwrap();
        assert_eq!(hw.hostname, "edge1");
        assert_eq!(hw.disks, None);
        assert_eq!(hw.host_devices.as_ref().unwrap()[0].major, Some(1));
        assert!(hw.system_vendor.as_ref().unwrap().is_virtual);
        assert_eq!(
            hw.interfaces.as_ref().unwrap()[0].ipv4_addresses,
            Some(vec!["192.168.122.10/24".to_owned()])
        );
        round_trip(&m);
        // Go writes the non-omitempty arrays as null (§5.3).
        let v = serde_json::to_value(hw).unwrap();
        assert!(v["disks"].is_null() && v["gpus"].is_null());
    }

    #[test]
    fn registration_request_and_response() {
        let m: Message<RegistrationInfo> = parse(fixture!("s2_4_2_registration_request.json"));
        assert!(m
            .content
            .certificate_request
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert_eq!(m.content.hardware.as_ref().unwrap().interfaces, None);
        round_trip(&m);
        let r: MessageResponse<RegistrationResponse> =
            parse(fixture!("s2_4_2_registration_response.json"));
        assert_eq!(r.directive, "registration");
        assert!(r
            .content
            .certificate
            .starts_with("-----BEGIN CERTIFICATE-----"));
        round_trip(&r);
    }

    #[test]
    fn data_in_envelope_and_minimal_configuration() {
        let m: Message<DeviceConfigurationMessage> = parse(fixture!("s2_5_data_in_device.json"));
        assert_eq!(m.directive, "device");
        assert!(m.content.workloads.is_empty());
        let m: Message<DeviceConfigurationMessage> =
            parse(fixture!("s4_6_device_configuration_minimal.json"));
        let c = &m.content;
        assert_eq!(c.version, "123");
        assert!(c.workloads.is_empty(), "absent workloads = none (§4.5)");
        assert_eq!(
            c.configuration.heartbeat_period(),
            std::time::Duration::from_secs(60)
        );
        assert!(!c.configuration.hardware_profile().include);
        assert_eq!(c.configuration.mounts, vec![]);
        round_trip(&m);
        // `mounts` has no omitempty: it is written even when empty.
        let v = serde_json::to_value(c).unwrap();
        assert_eq!(v["configuration"]["mounts"], json!([]));
        assert!(v.get("workloads").is_none());
    }

    #[test]
    fn full_configuration() {
        let m: Message<DeviceConfigurationMessage> =
            parse(fixture!("s4_6_device_configuration_full.json"));
        let c = &m.content;
        assert_eq!(c.version, "13040498");
        assert!(c.rejected_workloads.is_empty());
        let cfg = &c.configuration;
        assert_eq!(cfg.heartbeat_period(), std::time::Duration::from_secs(15));
        assert_eq!(
            cfg.hardware_profile().scope,
            Some(HardwareProfileScope::Delta)
        );
        assert_eq!(cfg.log_collection["syslog"].buffer_size, Some(12));
        let s3 = cfg.storage.as_ref().unwrap().s3.as_ref().unwrap();
        assert_eq!(s3.secret_access_key().unwrap(), b"secret");
        assert_eq!(s3.access_key_id().unwrap(), b"AKIAXXX");
        assert_eq!(s3.ca_bundle().unwrap(), b"");
        assert_eq!(cfg.os.as_ref().unwrap().commit_id.len(), 40);
        let w = &c.workloads[0];
        assert_eq!(w.name, "nginx");
        assert_eq!(w.labels["app"], "nginx");
        assert_eq!(w.data.as_ref().unwrap().ingress, None);
        assert_eq!(
            w.data.as_ref().unwrap().egress.as_ref().unwrap()[0].target,
            "nginx-logs"
        );
        assert!(w
            .image_registries
            .as_ref()
            .unwrap()
            .auth_file
            .contains("quay.io"));
        assert_eq!(w.metrics.as_ref().unwrap().port, Some(9113));
        assert!(w.configmaps[0].contains("kind: ConfigMap"));
        assert!(w.specification.contains("secretKeyRef"));
        let secret = c.secrets[0].decode().unwrap();
        assert_eq!(secret["password"], b"secret");
        round_trip(&m);
    }

    #[test]
    fn ng_extensions_and_nulls() {
        let m: Message<DeviceConfigurationMessage> =
            parse(fixture!("ng_extensions_device_configuration.json"));
        let c = &m.content;
        assert_eq!(
            m.sent.as_deref().and_then(DateTime::parse),
            Some(DateTime::zero())
        );
        assert_eq!(
            c.configuration.profiles[0].conditions[1].expression,
            "cpu<3% || cpu == nil"
        );
        let w = &c.workloads[0];
        assert_eq!(w.kind.as_deref(), Some("pod"));
        assert_eq!(w.cron.as_deref(), Some("*/5 * * * *"));
        assert_eq!(w.rootless, Some(true));
        assert_eq!(
            w.profiles[0].conditions[0].cpu.as_ref().unwrap().cpu,
            Some(50000)
        );
        assert_eq!(w.profiles[0].conditions[1].cpu, None);
        let r = w.retry.as_ref().unwrap();
        assert_eq!(r.backoff.as_deref(), Some("exponentialBackoff"));
        assert_eq!(
            (r.period_seconds, r.initial_interval_seconds),
            (Some(10), Some(2))
        );
        assert_eq!(
            (r.randomization_factor, r.multiplier),
            (Some(0.5), Some(1.5))
        );
        assert_eq!(c.workloads[1].kind.as_deref(), Some("k8s"));
        assert!(c.workloads[1].profiles.is_empty() && c.workloads[1].labels.is_empty());
        assert!(c.secrets.is_empty());
        round_trip(&m);
    }

    #[test]
    fn a_bad_workload_is_rejected_alone_with_its_path() {
        let raw = json!({"version":"1","workloads":[
            {"name":"good","specification":"x"},
            {"name":"bad","rootless":"yes"},
            {"name":"bad2","retry":{"periodSeconds":1.5}},
            17
        ]});
        let c: DeviceConfigurationMessage = from_json_value("cfg", raw).unwrap();
        assert_eq!(c.workloads.len(), 1);
        assert_eq!(c.workloads[0].name, "good");
        let r = &c.rejected_workloads;
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].index, r[0].name.as_deref()), (1, Some("bad")));
        assert!(r[0].to_string().contains("rootless"), "{}", r[0]);
        assert!(r[1].to_string().contains("retry.periodSeconds"), "{}", r[1]);
        assert_eq!(r[2].name, None);
    }

    #[test]
    fn malformed_messages_say_where() {
        let e = from_json_slice::<Message<DeviceConfigurationMessage>>(
            "device configuration",
            br#"{"content":{"configuration":{"heartbeat":{"period_seconds":"x"}}}}"#,
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("content.configuration.heartbeat.period_seconds"),
            "{s}"
        );
        assert!(from_json_slice::<Message>("m", b"{} trailing").is_err());
        assert!(from_json_slice::<Message>("m", br#"{"version":"1"}"#).is_err());
        // Unknown fields are tolerated everywhere.
        let m: Message<DeviceConfigurationMessage> =
            parse(r#"{"new":1,"content":{"x":[1],"configuration":{"y":{}}}}"#);
        assert_eq!(m.content, DeviceConfigurationMessage::default());
    }

    #[test]
    fn control_disconnect() {
        let m: Message<ControlCommand> = parse(fixture!("s2_6_control_disconnect.json"));
        assert_eq!(m.message_type, Some(MessageType::Command));
        assert_eq!(m.directive, "");
        assert_eq!(m.content.kind(), ControlKind::Disconnect);
        assert_eq!(m.content, ControlCommand::disconnect());
        round_trip(&m);
    }

    #[test]
    fn ansible_response_content_is_a_json_string() {
        let m: MessageResponse = parse(fixture!("s2_7_ansible_response.json"));
        let p = decode_playbook_executions(&m.content).unwrap();
        assert_eq!(p[0].name, "dev1-myconfig");
        assert!(p[0].ansible_playbook_string.starts_with("- hosts: all"));
        assert_eq!(p[0].last_data_upload, Some(DateTime::zero()));
        assert_eq!(m.metadata.as_ref().unwrap()["return_url"], "return_url");
        round_trip(&m);
    }

    #[test]
    fn connection_status_and_error_bodies() {
        let m: Message = parse(fixture!("s2_8_connection_status.json"));
        assert_eq!(m.message_type, Some(MessageType::ConnectionStatus));
        assert_eq!(m.content["state"], "online");
        round_trip(&m);
        for f in [
            fixture!("s1_3_error_not_found.json"),
            fixture!("s1_3_error_body_required.json"),
        ] {
            let v: Value = parse(f);
            assert!(v["code"].is_u64() && v["message"].is_string());
        }
    }

    #[test]
    fn heartbeats() {
        let m: Message<Heartbeat> = parse(fixture!("s5_2_heartbeat_official.json"));
        let h = &m.content;
        assert_eq!(h.status, DeviceStatus::Up);
        // The official agent sends podman states (§8 item 3): kept verbatim.
        assert_eq!(
            h.workloads[0].status,
            WorkloadState::Other("Running".into())
        );
        assert!(h.workloads[0].last_data_upload.is_zero());
        assert_eq!(
            h.upgrade.as_ref().unwrap().last_upgrade_time,
            "2022-10-10 09:00:00 +0000 UTC"
        );
        assert_eq!(h.playbook_executions, None);
        assert!(h.hardware.is_some());
        round_trip(&m);

        let minimal: Heartbeat = parse(fixture!("s5_2_heartbeat_minimal_content.json"));
        assert_eq!(minimal.version, "123");
        assert_eq!(
            serde_json::to_value(&minimal).unwrap(),
            json!({"status":"up","version":"123","workloads":[],"events":[]})
        );

        let ours = Heartbeat {
            status: DeviceStatus::Degraded,
            version: "7".into(),
            workloads: vec![WorkloadStatus {
                name: "w".into(),
                status: WorkloadState::Crashed,
                last_data_upload: DateTime::zero(),
            }],
            upgrade: Some(UpgradeStatus {
                current_commit_id: "abc".into(),
                ..UpgradeStatus::default()
            }),
            events: vec![EventInfo {
                reason: "Failed".into(),
                message: "podman: boom".into(),
                event_type: EventType::Warn,
            }],
            ..Heartbeat::default()
        };
        assert_eq!(
            serde_json::to_value(&ours).unwrap(),
            json!({"status":"degraded","version":"7",
                   "workloads":[{"name":"w","status":"crashed","last_data_upload":"0001-01-01T00:00:00.000Z"}],
                   "upgrade":{"current_commit_ID":"abc"},
                   "events":[{"reason":"Failed","message":"podman: boom","type":"warn"}]})
        );
        round_trip(&ours);
    }

    #[test]
    fn date_times() {
        for (input, want) in [
            ("0001-01-01T00:00:00.000Z", "0001-01-01T00:00:00.000Z"),
            ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000Z"),
            (
                "2022-10-16T10:16:03.123456789+02:00",
                "2022-10-16T08:16:03.123Z",
            ),
            ("2022-10-16T10:16:03", "2022-10-16T10:16:03.000Z"),
            ("2022-10-16 10:16:03", "2022-10-16T10:16:03.000Z"),
            ("2022-10-16T10:16:03.5", "2022-10-16T10:16:03.500Z"),
        ] {
            let d = DateTime::parse(input).unwrap_or_else(|| panic!("{input}"));
            assert_eq!(d.to_string(), want, "{input}");
        }
        assert!(DateTime::parse("yesterday").is_none());
        assert!(DateTime::zero().is_zero());
        let e = from_json_value::<WorkloadStatus>(
            "ws",
            json!({"name":"a","status":"running","last_data_upload":"nope"}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("last_data_upload"), "{e}");
    }

    #[test]
    fn secrets_encode_decode() {
        let mut m = BTreeMap::new();
        m.insert("k".to_owned(), b"\x00bin".to_vec());
        let s = Secret::encode("s", &m);
        assert_eq!(s.data, r#"{"k":"AGJpbg=="}"#);
        assert_eq!(s.decode().unwrap(), m);
        let bad = Secret {
            name: "s".into(),
            data: "{\"k\":\"***\"}".into(),
        };
        assert!(bad.decode().unwrap_err().to_string().contains("key `k`"));
        let bad = Secret {
            name: "s".into(),
            data: "[]".into(),
        };
        assert!(bad.decode().is_err());
    }

    // -- swagger conformance ------------------------------------------------

    /// A value for `schema` with every property set to a non-empty value, so
    /// that no `omitempty` rule can hide a misnamed or missing field.
    fn sample(defs: &Value, schema: &Value) -> Value {
        if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
            let name = r.trim_start_matches("#/definitions/");
            return sample(defs, &defs[name]);
        }
        match schema.get("type").and_then(Value::as_str) {
            Some("object") | None if schema.get("properties").is_some() => {
                let props = schema["properties"].as_object().unwrap();
                Value::Object(
                    props
                        .iter()
                        .map(|(k, s)| (k.clone(), sample(defs, s)))
                        .collect(),
                )
            }
            Some("object") => match schema.get("additionalProperties") {
                Some(ap) => json!({ "k": sample(defs, ap) }),
                None => json!({ "k": "v" }),
            },
            Some("array") => json!([sample(defs, &schema["items"])]),
            Some("string") => {
                if let Some(e) = schema.get("enum") {
                    e[0].clone()
                } else if schema.get("format").and_then(Value::as_str) == Some("date-time") {
                    json!("2022-10-16T08:16:03.123Z")
                } else {
                    json!("x")
                }
            }
            Some("integer") => json!(7),
            Some("number") => json!(1.5),
            Some("boolean") => json!(true),
            // `content`: any JSON.
            None => json!({ "k": "v" }),
            Some(other) => panic!("unhandled swagger type {other}"),
        }
    }

    fn check<T>(defs: &Value, name: &str)
    where
        T: Serialize + DeserializeOwned,
    {
        assert!(defs.get(name).is_some(), "no definition {name}");
        let want = sample(defs, &defs[name]);
        let t: T = from_json_value("swagger sample", want.clone())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = serde_json::to_value(&t).unwrap();
        assert_eq!(
            got, want,
            "{name}: every swagger field must survive a round trip"
        );
    }

    #[test]
    fn field_names_match_the_swagger() {
        let swagger: Value =
            serde_yaml_ng::from_str(fixture!("flotta-swagger.yaml")).expect("swagger parses");
        let defs = &swagger["definitions"];
        check::<Message>(defs, "message");
        check::<MessageResponse>(defs, "message-response");
        check::<DeviceConfigurationMessage>(defs, "device-configuration-message");
        check::<EnrolmentInfo>(defs, "enrolment-info");
        check::<RegistrationInfo>(defs, "registration-info");
        check::<RegistrationResponse>(defs, "registration-response");
        check::<Heartbeat>(defs, "heartbeat");
        check::<HardwareInfo>(defs, "hardware-info");
        check::<PlaybookExecution>(defs, "playbook-execution");
        // And the message directives of §2.3 name themselves as on the wire.
        assert_eq!(
            [
                Directive::Enrolment,
                Directive::Registration,
                Directive::Heartbeat,
                Directive::Ansible,
                Directive::Device
            ]
            .map(Directive::as_str),
            [
                "enrolment",
                "registration",
                "heartbeat",
                "ansible",
                "device"
            ]
        );
    }
}
