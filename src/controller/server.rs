//! The controller's server side: the Flotta session (PROTOCOL.md). Every request runs on the
//! session's own blocking lane, one at a time; results come back as [`ServerEvent`]s, and the
//! controller decides what follows (apply a configuration, renew, re-enrol, back off).
//!
//! Status codes (PROTOCOL §1.4, recommendations for a Rust agent): 401 on a GET → renew with the
//! current device cert (accepted even expired, §8 item 1); 403 → configuration error, degraded,
//! back off; 404 on data/in or heartbeat → deleted or not approved: re-enrol; 5xx, network
//! errors, time-outs → exponential backoff with jitter, degraded after SERVER_OUTAGE_THRESHOLD.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_channel::Sender;
use tracing::{debug, error, info, warn};

use super::workloads::{spawn_lane, LaneOp};
use super::{unix_now, Controller, Event};
use crate::config::Settings;
use crate::flotta::client::{
    ClientError, ClientOptions, EnrolmentStatus, FlottaClient, TlsMaterial, TlsPaths,
};
use crate::flotta::hardware;
use crate::flotta::identity::{
    CertificateInfo, DeviceKey, IdentityError, IdentityStore, LoadedIdentity, StoredIdentity,
};
use crate::flotta::messages::{
    ControlCommand, ControlKind, DateTime, DeviceConfigurationMessage, DeviceStatus,
    EnrolmentFeatures, EnrolmentInfo, EventInfo, EventType, HardwareInfo,
    HardwareProfileConfiguration, Heartbeat, Message, WorkloadState, WorkloadStatus,
};
use crate::machines::device::DeviceEvent;
use crate::status::ServerInfo;
use crate::workload::DesiredState;

/// What the server lane reports back.
#[derive(Debug)]
pub enum ServerEvent {
    PollDue,
    HeartbeatDue,
    EnrolDue,
    Enrolment(Result<EnrolmentStatus, ClientError>),
    /// A registration (first, or a renewal) finished: the new pair is installed, unproven.
    Registered {
        renewal: bool,
        result: Result<StoredIdentity, String>,
    },
    /// Results of requests made with the device certificate of generation `gen`.
    Configuration(
        u64,
        Box<Result<Option<Message<DeviceConfigurationMessage>>, ClientError>>,
    ),
    Control(u64, Result<Option<ControlCommand>, ClientError>),
    HeartbeatDone {
        gen: u64,
        result: Result<(), ClientError>,
        acknowledged_up_to: u64,
        hardware: Option<Box<HardwareInfo>>,
    },
}

/// Errors that stop the agent at start-up as configuration errors (exit 78).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Identity(#[from] IdentityError),
    #[error("{0}")]
    Client(#[from] ClientError),
}

/// Where the device stands with the server, for `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Enrolling,
    Registered,
    /// Told to disconnect: no more requests until a restart (PROTOCOL §2.6).
    Disconnected,
}

/// A small xorshift generator for jitter (no need for a cryptographic source here).
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ ((std::process::id() as u64) << 32);
        Jitter(seed | 1)
    }

    /// `d` scaled by a factor in [0.8, 1.2).
    fn apply(&mut self, d: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let f = 0.8 + (self.0 % 10_000) as f64 / 25_000.0;
        d.mul_f64(f)
    }
}

pub struct ServerSession {
    pub server: String,
    pub device_id: String,
    identity: IdentityStore,
    bootstrap: TlsPaths,
    opts: ClientOptions,
    client: Option<Arc<FlottaClient>>,
    /// Bumped on every certificate swap: a 401 for an older certificate says nothing new.
    gen: u64,
    cert: Option<CertificateInfo>,
    /// A freshly installed certificate not yet accepted by the server.
    unproven: bool,
    lane: Sender<LaneOp>,
    phase: Phase,
    pub applied_version: String,
    /// Fingerprint of the applied configuration minus `version` (PROTOCOL §4.5: a new
    /// version alone is no change); a fingerprint instead of the document keeps memory low.
    applied: Option<String>,
    heartbeat_period: Duration,
    hardware_profile: HardwareProfileConfiguration,
    last_hardware: Option<HardwareInfo>,
    pub last_contact_unix: Option<u64>,
    outage_since: Option<Instant>,
    failures: u32,
    enrol_attempts: u32,
    renewing: bool,
    heartbeat_in_flight: bool,
    jitter: Jitter,
    renew_at: f64,
    outage_threshold: Duration,
    poll_interval: Duration,
}

impl ServerSession {
    /// Resolves the device identity (blocking: called once at start-up).
    pub fn open(settings: &Settings, server: &str) -> Result<ServerSession, SessionError> {
        let id = crate::flotta::identity::resolve_device_id(
            settings.device_id.as_deref(),
            &settings.state_dir,
            std::path::Path::new("/etc/machine-id"),
        )?;
        let identity = IdentityStore::new(settings.state_dir.clone());
        let bootstrap = TlsPaths {
            ca_root: settings.ca_root.clone(),
            cert: settings.cert.clone(),
            key: settings.key.clone(),
        };
        std::fs::read(&settings.ca_root).map_err(|e| ClientError::Config {
            what: "CA_ROOT",
            reason: format!("cannot read {}: {e}", settings.ca_root.display()),
        })?;
        let opts = ClientOptions {
            connect_timeout: settings.server_timeout,
            request_timeout: settings.server_timeout,
            max_body_bytes: settings.max_message_size,
            ..ClientOptions::default()
        };
        let mut s = ServerSession {
            server: server.to_string(),
            device_id: id.id,
            identity,
            bootstrap,
            opts,
            client: None,
            gen: 0,
            cert: None,
            unproven: false,
            lane: spawn_lane(),
            phase: Phase::Enrolling,
            applied_version: String::new(),
            applied: None,
            heartbeat_period: Duration::from_secs(60),
            hardware_profile: HardwareProfileConfiguration::default(),
            last_hardware: None,
            last_contact_unix: None,
            outage_since: None,
            failures: 0,
            enrol_attempts: 0,
            renewing: false,
            heartbeat_in_flight: false,
            jitter: Jitter::new(),
            renew_at: settings.cert_renew_at,
            outage_threshold: settings.server_outage_threshold,
            poll_interval: settings.poll_interval,
        };
        match s.identity.load()? {
            LoadedIdentity::None => {
                // Enrolment needs the bootstrap pair: check it now, with a clear error.
                TlsMaterial::from_paths(&s.bootstrap)?;
            }
            LoadedIdentity::Current(pair) => s.use_identity(pair, false)?,
            LoadedIdentity::Unproven { current, .. } => s.use_identity(current, true)?,
        }
        Ok(s)
    }

    fn use_identity(&mut self, pair: StoredIdentity, unproven: bool) -> Result<(), ClientError> {
        let tls = TlsMaterial {
            ca_root_pem: std::fs::read(&self.bootstrap.ca_root).map_err(|e| {
                ClientError::Config {
                    what: "CA_ROOT",
                    reason: format!("cannot read {}: {e}", self.bootstrap.ca_root.display()),
                }
            })?,
            cert_pem: pair.cert_pem.into_bytes(),
            key_pem: pair.key_pem.into_bytes(),
        };
        self.client = Some(Arc::new(FlottaClient::new(&self.server, &tls, &self.opts)?));
        self.gen += 1;
        self.cert = Some(pair.info);
        self.unproven = unproven;
        self.phase = Phase::Registered;
        Ok(())
    }

    /// Holds a device certificate the server may still accept (an expired one can renew).
    pub fn has_certificate(&self) -> bool {
        self.client.is_some()
    }

    pub fn info(&self, outbox_length: usize) -> ServerInfo {
        ServerInfo {
            url: self.server.clone(),
            device_id: self.device_id.clone(),
            registration: match self.phase {
                Phase::Enrolling => format!("enrolling (attempt {})", self.enrol_attempts),
                Phase::Registered if self.renewing => "registered, renewing the certificate".into(),
                Phase::Registered => "registered".into(),
                Phase::Disconnected => "disconnected by the server".into(),
            },
            last_contact_unix: self.last_contact_unix,
            certificate_expires_unix: self
                .cert
                .as_ref()
                .map(|c| crate::flotta::identity::unix_seconds(c.not_after)),
            certificate_unproven: self.unproven,
            applied_version: self.applied_version.clone(),
            outbox_length,
            heartbeat_period_seconds: self.heartbeat_period.as_secs(),
        }
    }

    fn backoff(&mut self) -> Duration {
        let base = Duration::from_secs(1) * 2u32.saturating_pow(self.failures.min(6));
        self.jitter.apply(base.min(Duration::from_secs(60)))
    }

    fn next_poll(&mut self) -> Duration {
        self.jitter.apply(self.poll_interval)
    }

    fn run(&self, op: impl FnOnce() + Send + 'static) {
        let _ = self.lane.try_send(Box::new(op));
    }
}

fn send(tx: &Sender<Event>, ev: ServerEvent) {
    let _ = tx.send_blocking(Event::Server(ev));
}

impl Controller {
    fn session(&mut self) -> Option<&mut ServerSession> {
        self.server.as_mut()
    }

    /// Starts talking to the server once the machines are booted.
    pub(crate) fn start_server(&mut self) {
        let Some(s) = self.server.as_ref() else {
            return;
        };
        if s.has_certificate() {
            let _ = self.tx.try_send(Event::Server(ServerEvent::PollDue));
        }
    }

    /// The device machine asked for enrolment (no certificate, or the server lost us).
    pub(crate) fn enrol(&mut self) {
        let tx = self.tx.clone();
        let Some(s) = self.session() else {
            warn!("enrolment requested in serverless mode: nothing to do");
            return;
        };
        if s.phase == Phase::Disconnected {
            return;
        }
        s.phase = Phase::Enrolling;
        s.client = None;
        let _ = tx.try_send(Event::Server(ServerEvent::EnrolDue));
    }

    pub(crate) fn on_server_event(&mut self, ev: ServerEvent) {
        let tx = self.tx.clone();
        let Some(s) = self.server.as_mut() else {
            return;
        };
        if s.phase == Phase::Disconnected {
            return;
        }
        match ev {
            ServerEvent::EnrolDue => {
                let (server, id, paths, opts) = (
                    s.server.clone(),
                    s.device_id.clone(),
                    s.bootstrap.clone(),
                    s.opts.clone(),
                );
                let namespace = self.settings.namespace.clone();
                s.enrol_attempts += 1;
                s.run(move || {
                    let result = FlottaClient::from_paths(&server, &paths, &opts).and_then(|c| {
                        let hw = hardware::gather();
                        let info = EnrolmentInfo {
                            features: Some(EnrolmentFeatures {
                                model_name: String::new(),
                                hardware: Some(hw),
                            }),
                            target_namespace: Some(namespace),
                        };
                        c.enrol(&id, &info)
                    });
                    send(&tx, ServerEvent::Enrolment(result));
                });
            }
            ServerEvent::Enrolment(Ok(EnrolmentStatus::Approved)) => {
                info!(device = %s.device_id, "enrolment approved: registering");
                s.failures = 0;
                self.server_contact_ok();
                self.register(false);
            }
            ServerEvent::Enrolment(Ok(EnrolmentStatus::Pending)) => {
                self.server_contact_ok();
                let s = self.server.as_mut().expect("checked above");
                s.failures = (s.failures + 1).min(6);
                let delay = s.backoff();
                info!(delay = ?delay, "enrolment pending approval; asking again");
                super::sources::after(tx, delay, Event::Server(ServerEvent::EnrolDue));
            }
            ServerEvent::Enrolment(Err(e)) => {
                self.server_failure(&e);
                let s = self.server.as_mut().expect("checked above");
                let delay = s.backoff();
                warn!(delay = ?delay, "enrolment failed: {e}");
                super::sources::after(tx, delay, Event::Server(ServerEvent::EnrolDue));
            }
            ServerEvent::Registered { renewal, result } => self.on_registered(renewal, result),
            ServerEvent::PollDue => {
                let Some(client) = s.client.clone() else {
                    return;
                };
                if s.renewing {
                    return;
                }
                if s.cert
                    .as_ref()
                    .is_some_and(|c| c.needs_renewal(SystemTime::now(), s.renew_at))
                {
                    // Polling resumes once the renewal is done (with the new certificate).
                    info!("the device certificate is due for renewal");
                    self.register(true);
                    return;
                }
                let (id, gen) = (s.device_id.clone(), s.gen);
                s.run(move || {
                    let config = client.get_configuration(&id);
                    let failed = config.is_err();
                    send(&tx, ServerEvent::Configuration(gen, Box::new(config)));
                    if !failed {
                        send(&tx, ServerEvent::Control(gen, client.get_control(&id)));
                    }
                });
            }
            ServerEvent::Configuration(gen, result) => {
                let ok = result.is_ok();
                match *result {
                    Ok(Some(msg)) => {
                        self.server_contact_ok();
                        self.apply_configuration(msg.content);
                    }
                    Ok(None) => self.server_contact_ok(),
                    Err(e) => self.on_request_error(gen, e, "fetching the configuration"),
                }
                if let Some(s) = self.server.as_mut() {
                    if s.phase == Phase::Registered && !s.renewing {
                        let delay = if ok { s.next_poll() } else { s.backoff() };
                        super::sources::after(tx, delay, Event::Server(ServerEvent::PollDue));
                    }
                }
            }
            ServerEvent::Control(_, Ok(Some(cmd))) if cmd.kind() == ControlKind::Disconnect => {
                warn!("the server sent disconnect: removing every workload and the desired state");
                self.report(
                    true,
                    "Disconnected".into(),
                    "disconnect received from the server".into(),
                );
                if let Some(s) = self.server.as_mut() {
                    s.phase = Phase::Disconnected;
                }
                self.device_event(DeviceEvent::Disconnect);
                let store = self.store.clone();
                let _ = self.persist.try_send(Box::new(move || {
                    if let Err(e) = store.save_desired(&DesiredState::default()) {
                        error!("wiping the desired state: {e}");
                    }
                }));
            }
            ServerEvent::Control(_, Ok(other)) => {
                if let Some(cmd) = other {
                    debug!(command = %cmd.command, "ignoring control command");
                }
            }
            ServerEvent::Control(gen, Err(e)) => {
                self.on_request_error(gen, e, "fetching control messages")
            }
            ServerEvent::HeartbeatDue => self.send_heartbeat(),
            ServerEvent::HeartbeatDone {
                gen,
                result,
                acknowledged_up_to,
                hardware,
            } => {
                s.heartbeat_in_flight = false;
                match result {
                    Ok(()) => {
                        if hardware.is_some() || s.last_hardware.is_none() {
                            s.last_hardware = hardware.map(|h| *h).or(s.last_hardware.take());
                        }
                        self.server_contact_ok();
                        self.outbox.acknowledge(acknowledged_up_to);
                        self.persist_outbox();
                    }
                    Err(e) => self.on_request_error(gen, e, "sending a heartbeat"),
                }
                if let Some(s) = self.server.as_mut() {
                    if s.phase == Phase::Registered {
                        let period = s.heartbeat_period;
                        super::sources::after(tx, period, Event::Server(ServerEvent::HeartbeatDue));
                    }
                }
            }
        }
    }

    /// Generates a key and a CSR, registers (with the bootstrap cert the first time, with the
    /// current device cert for a renewal) and installs the returned certificate.
    fn register(&mut self, renewal: bool) {
        let tx = self.tx.clone();
        let Some(s) = self.server.as_mut() else {
            return;
        };
        s.renewing = renewal;
        let (server, id, paths, opts) = (
            s.server.clone(),
            s.device_id.clone(),
            s.bootstrap.clone(),
            s.opts.clone(),
        );
        let device_client = if renewal { s.client.clone() } else { None };
        let identity = s.identity.clone();
        s.run(move || {
            let result = (|| {
                let client = match device_client {
                    Some(c) => c,
                    None => Arc::new(
                        FlottaClient::from_paths(&server, &paths, &opts)
                            .map_err(|e| e.to_string())?,
                    ),
                };
                let key = DeviceKey::generate().map_err(|e| e.to_string())?;
                let csr = key.csr_pem(&id).map_err(|e| e.to_string())?;
                let cert = client
                    .register(&id, &csr, Some(hardware::gather()))
                    .map_err(|e| e.to_string())?;
                identity.install(&cert, &key).map_err(|e| e.to_string())
            })();
            send(&tx, ServerEvent::Registered { renewal, result });
        });
    }

    fn on_registered(&mut self, renewal: bool, result: Result<StoredIdentity, String>) {
        let tx = self.tx.clone();
        let Some(s) = self.server.as_mut() else {
            return;
        };
        s.renewing = false;
        match result {
            Ok(pair) => {
                let expires = pair.info.not_after;
                if let Err(e) = s.use_identity(pair, true) {
                    error!("the new certificate cannot be used: {e}");
                    let _ = s.identity.rollback();
                    return;
                }
                info!(renewal, expires = ?expires, "device certificate installed");
                let msg = if renewal {
                    "device certificate renewed"
                } else {
                    "device registered"
                };
                self.report(false, "Registered".into(), msg.into());
                if !renewal {
                    self.device_event(DeviceEvent::Registered);
                }
                let _ = tx.try_send(Event::Server(ServerEvent::PollDue));
            }
            Err(e) => {
                warn!(renewal, "registration failed: {e}");
                let delay = s.backoff();
                s.failures = (s.failures + 1).min(6);
                if renewal {
                    // The current certificate keeps working until it does not; polling goes on
                    // and the next poll tries the renewal again.
                    self.device_event(DeviceEvent::ProblemRaised {
                        key: "certificate".into(),
                        reason: format!("certificate renewal failing: {e}"),
                    });
                    super::sources::after(tx, delay, Event::Server(ServerEvent::PollDue));
                } else {
                    super::sources::after(tx, delay, Event::Server(ServerEvent::EnrolDue));
                }
            }
        }
    }

    /// A request succeeded: the server is reachable and the certificate proven.
    fn server_contact_ok(&mut self) {
        let Some(s) = self.server.as_mut() else {
            return;
        };
        s.last_contact_unix = Some(unix_now());
        s.failures = 0;
        let recovered = s.outage_since.take().is_some();
        if s.unproven && s.client.is_some() {
            s.unproven = false;
            if let Err(e) = s.identity.commit() {
                warn!("forgetting the previous certificate: {e}");
            }
        }
        if recovered {
            info!("the server is reachable again");
        }
        self.device_event(DeviceEvent::ProblemCleared {
            key: "server".into(),
        });
        if !self.server.as_ref().is_some_and(|s| s.renewing) {
            self.device_event(DeviceEvent::ProblemCleared {
                key: "certificate".into(),
            });
        }
    }

    fn server_failure(&mut self, e: &ClientError) {
        let Some(s) = self.server.as_mut() else {
            return;
        };
        s.failures = (s.failures + 1).min(6);
        let since = *s.outage_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= s.outage_threshold {
            let reason = format!("server unreachable for {}s: {e}", since.elapsed().as_secs());
            self.device_event(DeviceEvent::ProblemRaised {
                key: "server".into(),
                reason,
            });
        }
    }

    fn on_request_error(&mut self, gen: u64, e: ClientError, doing: &str) {
        match &e {
            ClientError::Unauthorized { .. } => {
                let Some(s) = self.server.as_mut() else {
                    return;
                };
                if gen != s.gen {
                    debug!("{doing}: {e} for a replaced certificate: ignored");
                    return;
                }
                warn!("{doing}: {e}: renewing the device certificate");
                if s.unproven {
                    // The new certificate is refused: go back to the proven one.
                    warn!("the new certificate is refused: rolling back to the previous one");
                    if let Ok(LoadedIdentity::Current(p)) =
                        s.identity.rollback().and_then(|_| s.identity.load())
                    {
                        let _ = s.use_identity(p, false);
                        return;
                    }
                }
                if !s.renewing {
                    self.register(true);
                }
            }
            ClientError::Forbidden { .. } => {
                error!("{doing}: {e}");
                self.server_failure(&e);
                self.device_event(DeviceEvent::ProblemRaised {
                    key: "server".into(),
                    reason: format!(
                        "the server refuses this device (403): DEVICE_ID does not match the certificate: {e}"
                    ),
                });
            }
            ClientError::NotFound { .. } => {
                warn!("{doing}: {e}: the device is unknown to the server; enrolling again");
                self.report(true, "DeviceNotFound".into(), format!("{doing}: {e}"));
                self.device_event(DeviceEvent::IdentityLost {
                    reason: "the server does not know this device (404): enrolling again".into(),
                });
            }
            ClientError::Malformed { .. } | ClientError::TooLarge { .. } => {
                // Bad input from the server: keep running the last good state.
                error!("{doing}: {e}; keeping the last good configuration");
                self.report(true, "ConfigurationRejected".into(), e.to_string());
                self.server_contact_ok();
            }
            _ => {
                warn!("{doing}: {e}");
                self.server_failure(&e);
            }
        }
    }

    /// Applies a configuration message if it changed (PROTOCOL §4.5).
    fn apply_configuration(&mut self, msg: DeviceConfigurationMessage) {
        let Some(s) = self.server.as_mut() else {
            return;
        };
        let period = msg.configuration.heartbeat_period();
        let profile = msg.configuration.hardware_profile();
        let first = s.applied.is_none();
        s.heartbeat_period = period;
        s.hardware_profile = profile;
        for r in &msg.rejected_workloads {
            let what = format!(
                "workload #{} {}: {}",
                r.index,
                r.name.as_deref().unwrap_or("(no name)"),
                r.error
            );
            warn!("configuration: rejected {what}");
            self.report(true, "InvalidWorkload".into(), what);
        }
        let mut value = match serde_json::to_value(&msg) {
            Ok(v) => v,
            Err(e) => {
                error!("configuration cannot be re-encoded: {e}");
                return;
            }
        };
        let version = msg.version.clone();
        if let Some(obj) = value.as_object_mut() {
            obj.remove("version");
        }
        let fingerprint =
            crate::workload::fingerprint(&serde_json::to_vec(&value).unwrap_or_default());
        let s = self.server.as_mut().expect("checked above");
        if s.applied.as_ref() == Some(&fingerprint) {
            s.applied_version = version;
            return;
        }
        let desired: DesiredState = match serde_json::from_value(value) {
            Ok(d) => d,
            Err(e) => {
                error!("configuration: workloads cannot be read: {e}");
                self.report(true, "ConfigurationRejected".into(), e.to_string());
                return;
            }
        };
        info!(version = %version, workloads = desired.workloads.len(), "applying a new configuration");
        s.applied = Some(fingerprint);
        s.applied_version = version;
        self.reconcile(&desired);
        if first {
            let _ = self.tx.try_send(Event::Server(ServerEvent::HeartbeatDue));
        }
    }

    fn send_heartbeat(&mut self) {
        let tx = self.tx.clone();
        let status = match self.device_heartbeat_status() {
            Some(s) => s,
            None => return,
        };
        let workloads: Vec<WorkloadStatus> = self
            .workloads
            .iter()
            .map(|(name, e)| WorkloadStatus {
                name: name.clone(),
                status: match e.machine.state().heartbeat_status() {
                    "running" => WorkloadState::Running,
                    "crashed" => WorkloadState::Crashed,
                    "stopped" => WorkloadState::Stopped,
                    _ => WorkloadState::Deploying,
                },
                last_data_upload: DateTime::zero(),
            })
            .collect();
        // At most 100 events a heartbeat; the rest go with the next ones.
        let batch: Vec<_> = self.outbox.events.iter().take(100).cloned().collect();
        let acknowledged_up_to = batch.last().map_or(0, |e| e.id);
        let events = batch
            .into_iter()
            .map(|e| EventInfo {
                reason: e.reason,
                message: e.message,
                event_type: if e.warn {
                    EventType::Warn
                } else {
                    EventType::Info
                },
            })
            .collect();
        let Some(s) = self.server.as_mut() else {
            return;
        };
        let Some(client) = s.client.clone() else {
            return;
        };
        if s.heartbeat_in_flight {
            return;
        }
        s.heartbeat_in_flight = true;
        let (id, version, gen) = (s.device_id.clone(), s.applied_version.clone(), s.gen);
        let (profile, last) = (s.hardware_profile.clone(), s.last_hardware.clone());
        s.run(move || {
            let current = hardware::gather();
            let hw = hardware::heartbeat_hardware(&profile, &current, last.as_ref());
            let hb = Heartbeat {
                status,
                version,
                workloads,
                playbook_executions: None,
                upgrade: None,
                hardware: hw,
                events,
            };
            let result = client.post_heartbeat(&id, &hb);
            send(
                &tx,
                ServerEvent::HeartbeatDone {
                    gen,
                    result,
                    acknowledged_up_to,
                    hardware: profile.include.then(|| Box::new(current)),
                },
            );
        });
    }

    fn device_heartbeat_status(&self) -> Option<DeviceStatus> {
        match self.device_heartbeat() {
            Some("up") => Some(DeviceStatus::Up),
            Some(_) => Some(DeviceStatus::Degraded),
            None => None,
        }
    }

    pub(crate) fn persist_outbox(&mut self) {
        let (store, copy) = (self.store.clone(), self.outbox.clone());
        let _ = self.persist.try_send(Box::new(move || {
            if let Err(e) = store.save_outbox(&copy) {
                error!("cannot persist the outbox: {e}");
            }
        }));
    }
}
