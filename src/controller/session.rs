//! The controller's server side: the Flotta session machine ([`crate::machines::session`])
//! and what it needs to act: the device identity, the mTLS client, the applied
//! configuration, the timers. Every request runs on the session lane
//! ([`Request::execute`]), one at a time; its result is classified once
//! ([`classify`]) into a session event. A configuration is parsed, compared with the applied
//! one and validated on the lane too: the controller only applies what changed.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tracing::{error, info, warn};

use super::effects::{Effect, Write};
use super::generation::Generation;
use super::reports::Reports;
use super::workloads::Workloads;
use super::{unix_now, Ctx, Event, Internal};
use crate::config::Settings;
use crate::flotta::client::{
    ClientError, ClientOptions, EnrolmentStatus, FlottaClient, TlsMaterial, TlsPaths,
};
use crate::flotta::hardware;
use crate::flotta::identity::{
    CertificateInfo, DeviceKey, IdentityError, IdentityStore, LoadedIdentity, StoredIdentity,
};
use crate::flotta::messages::{
    ControlKind, DateTime, DeviceConfigurationMessage, EnrolmentFeatures, EnrolmentInfo, EventInfo,
    EventType, HardwareInfo, HardwareProfileConfiguration, Heartbeat, WorkloadStatus,
};
use crate::machines::device::{DeviceEvent, ProblemKey};
use crate::machines::session::{
    self, Failure, RequestError, SessionCommand, SessionEvent, SessionMachine, Timer,
};
use crate::status::ServerInfo;
use crate::store::{Applied, Loaded, Store};
use crate::workload::{DesiredState, SpecDefaults, ValidatedDesired};

/// Errors that stop the agent at start-up as configuration errors (exit 78).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Identity(#[from] IdentityError),
    #[error("{0}")]
    Client(#[from] ClientError),
}

/// A request result, classified once: the session machine sees only [`Failure`]s.
pub fn classify(e: &ClientError) -> RequestError {
    let failure = match e {
        ClientError::Unauthorized { .. } => Failure::Unauthorized,
        ClientError::Forbidden { .. } => Failure::Forbidden,
        ClientError::NotFound { .. } => Failure::NotFound,
        ClientError::Server { status, .. } => Failure::ServerError(*status),
        ClientError::Malformed { .. } | ClientError::TooLarge { .. } => Failure::Refused,
        ClientError::Unexpected { status, .. } if *status >= 500 => Failure::ServerError(*status),
        ClientError::Unexpected { .. } => Failure::Refused,
        ClientError::Config { .. }
        | ClientError::Network { .. }
        | ClientError::Tls { .. }
        | ClientError::Timeout { .. } => Failure::Unreachable,
    };
    RequestError {
        failure,
        message: e.to_string(),
    }
}

/// A request to the server, with everything it needs (it runs on the session lane).
#[derive(Debug)]
pub enum Request {
    Enrol {
        server: String,
        paths: TlsPaths,
        opts: ClientOptions,
        device_id: String,
        namespace: String,
    },
    Register {
        renewal: bool,
        server: String,
        paths: TlsPaths,
        opts: ClientOptions,
        device_id: String,
        /// The current device client, for a renewal.
        client: Option<Arc<FlottaClient>>,
        identity: IdentityStore,
    },
    Poll {
        gen: Generation,
        client: Arc<FlottaClient>,
        device_id: String,
        /// Fingerprint of the applied configuration: an equal one is not validated again.
        applied: String,
        defaults: SpecDefaults,
        max_workloads: usize,
    },
    Heartbeat {
        gen: Generation,
        client: Arc<FlottaClient>,
        device_id: String,
        heartbeat: Box<Heartbeat>,
        profile: HardwareProfileConfiguration,
        last_hardware: Option<Box<HardwareInfo>>,
        acknowledged_up_to: u64,
    },
}

/// A configuration fetched from `data/in`.
#[derive(Debug)]
pub struct Fetched {
    pub version: String,
    pub fingerprint: String,
    pub heartbeat_period: Duration,
    pub hardware_profile: HardwareProfileConfiguration,
    /// Set when the configuration differs from the applied one (PROTOCOL §4.5).
    pub change: Option<Box<(DesiredState, ValidatedDesired)>>,
    /// Workloads the wire message itself could not even decode.
    pub undecodable: Vec<String>,
}

#[derive(Debug)]
pub enum SessionResult {
    Enrolled(Result<EnrolmentStatus, ClientError>),
    Registered {
        renewal: bool,
        result: Result<StoredIdentity, RegisterError>,
    },
    Polled {
        gen: Generation,
        result: Result<Polled, ClientError>,
    },
    HeartbeatSent {
        gen: Generation,
        result: Result<(), ClientError>,
        acknowledged_up_to: u64,
        hardware: Option<Box<HardwareInfo>>,
    },
}

/// Why a registration failed: the server's answer, or the agent's own key/storage work.
#[derive(Debug)]
pub enum RegisterError {
    Client(ClientError),
    Local(String),
}

#[derive(Debug)]
pub struct Polled {
    /// The control channel said `disconnect` (the configuration was not fetched).
    pub disconnect: bool,
    pub config: Option<Fetched>,
}

impl Request {
    /// Runs the request (blocking).
    pub fn execute(self) -> SessionResult {
        match self {
            Request::Enrol {
                server,
                paths,
                opts,
                device_id,
                namespace,
            } => SessionResult::Enrolled(
                FlottaClient::from_paths(&server, &paths, &opts).and_then(|c| {
                    let info = EnrolmentInfo {
                        features: Some(EnrolmentFeatures {
                            model_name: String::new(),
                            hardware: Some(hardware::gather()),
                        }),
                        target_namespace: Some(namespace),
                    };
                    c.enrol(&device_id, &info)
                }),
            ),
            Request::Register {
                renewal,
                server,
                paths,
                opts,
                device_id,
                client,
                identity,
            } => {
                let result = (|| {
                    let client = match client {
                        Some(c) => c,
                        None => Arc::new(
                            FlottaClient::from_paths(&server, &paths, &opts)
                                .map_err(RegisterError::Client)?,
                        ),
                    };
                    let local = |e: IdentityError| RegisterError::Local(e.to_string());
                    let key = DeviceKey::generate().map_err(local)?;
                    let csr = key.csr_pem(&device_id).map_err(local)?;
                    let cert = client
                        .register(&device_id, &csr, Some(hardware::gather()))
                        .map_err(RegisterError::Client)?;
                    identity.install(&cert, &key).map_err(local)
                })();
                SessionResult::Registered { renewal, result }
            }
            Request::Poll {
                gen,
                client,
                device_id,
                applied,
                defaults,
                max_workloads,
            } => SessionResult::Polled {
                gen,
                result: poll(&client, &device_id, &applied, &defaults, max_workloads),
            },
            Request::Heartbeat {
                gen,
                client,
                device_id,
                mut heartbeat,
                profile,
                last_hardware,
                acknowledged_up_to,
            } => {
                let current = hardware::gather();
                heartbeat.hardware =
                    hardware::heartbeat_hardware(&profile, &current, last_hardware.as_deref());
                let result = client.post_heartbeat(&device_id, &heartbeat);
                SessionResult::HeartbeatSent {
                    gen,
                    result,
                    acknowledged_up_to,
                    hardware: profile.include.then(|| Box::new(current)),
                }
            }
        }
    }
}

/// control/in first (a `disconnect` must not be preceded by deploying what data/in says),
/// then data/in; a configuration that differs from the applied one is validated here.
fn poll(
    client: &FlottaClient,
    device_id: &str,
    applied: &str,
    defaults: &SpecDefaults,
    max_workloads: usize,
) -> Result<Polled, ClientError> {
    if let Some(cmd) = client.get_control(device_id)? {
        if cmd.kind() == ControlKind::Disconnect {
            return Ok(Polled {
                disconnect: true,
                config: None,
            });
        }
        tracing::debug!(command = %cmd.command, "ignoring control command");
    }
    let Some(msg) = client.get_configuration(device_id)? else {
        return Ok(Polled {
            disconnect: false,
            config: None,
        });
    };
    Ok(Polled {
        disconnect: false,
        config: Some(fetched(msg.content, applied, defaults, max_workloads)),
    })
}

fn fetched(
    msg: DeviceConfigurationMessage,
    applied: &str,
    defaults: &SpecDefaults,
    max_workloads: usize,
) -> Fetched {
    let undecodable = msg
        .rejected_workloads
        .iter()
        .map(|r| {
            format!(
                "workload #{} {}: {}",
                r.index,
                r.name
                    .as_deref()
                    .map(crate::workload::name::shown)
                    .unwrap_or_else(|| "(no name)".into()),
                r.error
            )
        })
        .collect();
    let version = msg.version.clone();
    let heartbeat_period = msg.configuration.heartbeat_period();
    let hardware_profile = msg.configuration.hardware_profile();
    let mut value = serde_json::to_value(&msg).unwrap_or_default();
    if let Some(obj) = value.as_object_mut() {
        obj.remove("version");
    }
    let fingerprint = crate::workload::fingerprint(&serde_json::to_vec(&value).unwrap_or_default());
    let change = (fingerprint != applied)
        .then(|| serde_json::from_value::<DesiredState>(value).ok())
        .flatten()
        .map(|d| {
            let v = d.validated(defaults, max_workloads);
            Box::new((d, v))
        });
    Fetched {
        version,
        fingerprint,
        heartbeat_period,
        hardware_profile,
        change,
        undecodable,
    }
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

pub struct SessionPart {
    machine: session::Machine,
    pub server: String,
    pub device_id: String,
    identity: IdentityStore,
    bootstrap: TlsPaths,
    opts: ClientOptions,
    namespace: String,
    client: Option<Arc<FlottaClient>>,
    /// Bumped on every certificate swap: a result for an older certificate says nothing.
    cert_gen: Generation,
    cert: Option<CertificateInfo>,
    unproven_at_boot: bool,
    disconnected_at_boot: bool,
    renew_at: f64,
    applied: Applied,
    hardware_profile: HardwareProfileConfiguration,
    last_hardware: Option<Box<HardwareInfo>>,
    /// The armed generation of each timer (a newer schedule replaces an older one).
    timers: [Generation; 3],
    next_attempt: Option<(Timer, u64)>,
    jitter: Jitter,
    defaults: SpecDefaults,
    max_workloads: usize,
    /// Renewals that failed in a row, and when the certificate's age may ask for the next
    /// one: until then polls go on with the current certificate, which is still good (a 401
    /// renews at once regardless).
    renewal_failures: u32,
    renew_not_before: Option<Instant>,
}

/// First wait after a failed renewal that the certificate's age asked for, and its cap: the
/// certificate has a quarter of its lifetime left (days), the server is not to be pressed.
const RENEWAL_RETRY: Duration = Duration::from_secs(60);
const RENEWAL_RETRY_CAP: Duration = Duration::from_secs(3600);

fn timer_index(t: Timer) -> usize {
    match t {
        Timer::Enrol => 0,
        Timer::Poll => 1,
        Timer::Heartbeat => 2,
    }
}

impl SessionPart {
    /// Resolves the device identity (blocking: called once at start-up).
    pub fn open(
        settings: &Settings,
        server: &str,
        store: &Store,
    ) -> Result<SessionPart, SessionError> {
        let id = crate::flotta::identity::resolve_device_id(
            settings.device_id.as_deref(),
            &settings.state_dir,
            std::path::Path::new("/etc/machine-id"),
        )?;
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
            proxy: settings.https_proxy.clone(),
            no_proxy: settings.no_proxy.clone(),
            ..ClientOptions::default()
        };
        let machine = session::new_machine(SessionMachine {
            poll_interval: settings.poll_interval,
            outage_threshold: settings.server_outage_threshold,
            ..SessionMachine::default()
        });
        let applied = match store.load_applied() {
            Loaded::Ok(a) => a,
            _ => Applied::default(),
        };
        let disconnected_at_boot = matches!(store.load_disconnected(), Loaded::Ok(_));
        let mut s = SessionPart {
            machine,
            server: server.to_string(),
            device_id: id.id,
            identity: IdentityStore::new(settings.state_dir.clone()),
            bootstrap,
            opts,
            namespace: settings.namespace.clone(),
            client: None,
            cert_gen: Generation::default(),
            cert: None,
            unproven_at_boot: false,
            disconnected_at_boot,
            renew_at: settings.cert_renew_at,
            applied,
            hardware_profile: HardwareProfileConfiguration::default(),
            last_hardware: None,
            timers: Default::default(),
            next_attempt: None,
            jitter: Jitter::new(),
            // Set by the controller, which knows the budget (Controller::new, reload).
            defaults: SpecDefaults::default(),
            max_workloads: settings.max_workloads,
            renewal_failures: 0,
            renew_not_before: None,
        };
        match s.identity.load()? {
            LoadedIdentity::None => {
                // Enrolment needs the bootstrap pair: what can never work stops the agent
                // now with its reason, instead of failing every enrolment with a TLS error.
                for w in crate::flotta::client::check_bootstrap(&s.bootstrap)? {
                    warn!("{w}");
                }
            }
            LoadedIdentity::Current(pair) => s.use_identity(pair)?,
            LoadedIdentity::Unproven { current, .. } => {
                s.use_identity(current)?;
                s.unproven_at_boot = true;
            }
        }
        Ok(s)
    }

    fn use_identity(&mut self, pair: StoredIdentity) -> Result<(), ClientError> {
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
        self.cert_gen.bump();
        self.cert = Some(pair.info);
        Ok(())
    }

    /// The defaults specs are validated with (at start).
    pub fn set_defaults(&mut self, defaults: SpecDefaults) {
        self.defaults = defaults;
    }

    /// New defaults for specs (a reload): a configuration validated with other defaults is
    /// validated again at the next poll, even if the server's is unchanged.
    pub fn reconfigure(&mut self, defaults: SpecDefaults) {
        let changed = self.defaults.default_limits != defaults.default_limits
            || self.defaults.backoff != defaults.backoff
            || self.defaults.workload_user != defaults.workload_user;
        self.defaults = defaults;
        if changed {
            self.applied.fingerprint.clear();
        }
    }

    /// Holds a device certificate the server may still accept (an expired one can renew).
    pub fn has_certificate(&self) -> bool {
        self.client.is_some()
    }

    pub fn disconnected_at_boot(&self) -> bool {
        self.disconnected_at_boot
    }

    pub fn boot(&mut self, cx: &mut Ctx) {
        let event = SessionEvent::Boot {
            has_certificate: self.client.is_some(),
            unproven: self.unproven_at_boot,
            disconnected: self.disconnected_at_boot,
        };
        self.feed_bare(&event, cx);
    }

    /// An operator's reset: forget identity, disconnect, configuration and outbox.
    pub fn reset(&mut self, reports: &mut Reports, cx: &mut Ctx) {
        if let Err(e) = self.identity.wipe() {
            error!("forgetting the device certificate: {e}");
        }
        self.client = None;
        self.cert = None;
        self.cert_gen.bump();
        self.applied = Applied::default();
        self.disconnected_at_boot = false;
        self.renewal_failures = 0;
        self.renew_not_before = None;
        reports.clear_outbox();
        cx.push(Internal::Persist(Write::ForgetServerState));
        self.feed_bare(&SessionEvent::Reset, cx);
    }

    pub fn info(&self, outbox_length: usize) -> ServerInfo {
        let m = self.machine.inner();
        ServerInfo {
            url: self.server.clone(),
            device_id: self.device_id.clone(),
            registration: self.machine.state().reason(),
            session_state: self.machine.state().name().to_string(),
            last_contact_unix: m.last_contact.as_ref().map(|(at, _)| instant_to_unix(*at)),
            last_answer: m.last_contact.as_ref().map(|(_, what)| what.clone()),
            failures: m.failures,
            last_failure: m.last_failure.as_ref().map(|(_, what)| what.clone()),
            last_failure_unix: m.last_failure.as_ref().map(|(at, _)| instant_to_unix(*at)),
            next_attempt: self
                .next_attempt
                .map(|(t, at)| (format!("{t:?}").to_lowercase(), at)),
            certificate_expires_unix: self
                .cert
                .as_ref()
                .map(|c| crate::flotta::identity::unix_seconds(c.not_after)),
            certificate_unproven: matches!(
                self.machine.state(),
                session::State::Registered { proven: false }
            ),
            applied_version: self.applied.version.clone(),
            outbox_length,
            heartbeat_period_seconds: m.heartbeat_period.as_secs(),
        }
    }

    /// A timer went off.
    pub fn on_timer(
        &mut self,
        timer: Timer,
        gen: Generation,
        workloads: &Workloads,
        device: &super::device::DevicePart,
        reports: &mut Reports,
        cx: &mut Ctx,
    ) {
        if !self.timers[timer_index(timer)].is(gen) {
            return;
        }
        self.next_attempt = None;
        let event = match timer {
            Timer::Enrol => SessionEvent::EnrolDue,
            Timer::Poll => SessionEvent::PollDue {
                renewal_due: self.cert.as_ref().is_some_and(|c| {
                    let due = c.needs_renewal(SystemTime::now(), self.renew_at)
                        && self.renew_not_before.map_or(true, |t| Instant::now() >= t);
                    if due {
                        info!("the device certificate is due for renewal");
                    }
                    due
                }),
            },
            Timer::Heartbeat => SessionEvent::HeartbeatDue,
        };
        self.feed(&event, workloads, device, reports, cx);
    }

    /// A request finished.
    pub fn on_result(
        &mut self,
        result: SessionResult,
        workloads: &Workloads,
        device: &super::device::DevicePart,
        reports: &mut Reports,
        cx: &mut Ctx,
    ) {
        let at = Instant::now();
        let event = match result {
            SessionResult::Enrolled(r) => {
                if let Err(e) = &r {
                    warn!("enrolment: {e}");
                }
                SessionEvent::Enrolled {
                    result: r
                        .map(|s| s == EnrolmentStatus::Approved)
                        .map_err(|e| classify(&e)),
                    at,
                }
            }
            SessionResult::Registered { renewal, result } => SessionEvent::Registered {
                result: self.registered(renewal, result, reports, cx),
                at,
            },
            SessionResult::Polled { gen, result } => {
                if !self.cert_gen.is(gen) {
                    return;
                }
                match result {
                    Ok(p) if p.disconnect => {
                        warn!("the server sent disconnect: removing every workload");
                        SessionEvent::Disconnect
                    }
                    Ok(p) => {
                        if let Some(f) = p.config {
                            self.take_configuration(f, workloads, device, reports, cx);
                        }
                        SessionEvent::Polled { result: Ok(()), at }
                    }
                    Err(e) => {
                        let class = classify(&e);
                        if class.failure == Failure::Refused {
                            // Bad input from the server: keep running the last good state.
                            error!("poll: {e}; keeping the last good configuration");
                            reports.report(true, "ConfigurationRejected".into(), e.to_string(), cx);
                        } else {
                            warn!("poll: {e}");
                        }
                        SessionEvent::Polled {
                            result: Err(class),
                            at,
                        }
                    }
                }
            }
            SessionResult::HeartbeatSent {
                gen,
                result,
                acknowledged_up_to,
                hardware,
            } => {
                // Delivered is delivered, whatever happened since (a disconnect included).
                if result.is_ok() {
                    reports.acknowledge(acknowledged_up_to, cx);
                    if hardware.is_some() {
                        self.last_hardware = hardware;
                    }
                }
                if !self.cert_gen.is(gen) {
                    return;
                }
                if let Err(e) = &result {
                    warn!("heartbeat: {e}");
                }
                SessionEvent::HeartbeatSent {
                    result: result.map_err(|e| classify(&e)),
                    at,
                }
            }
        };
        self.feed(&event, workloads, device, reports, cx);
    }

    /// Installs a registration's new pair (unproven until the server accepts it).
    fn registered(
        &mut self,
        renewal: bool,
        result: Result<StoredIdentity, RegisterError>,
        reports: &mut Reports,
        cx: &mut Ctx,
    ) -> Result<(), RequestError> {
        let outcome = self.install(renewal, result, reports, cx);
        if renewal {
            self.renewal_outcome(outcome.is_ok());
        }
        outcome
    }

    /// After a renewal: a failed one holds back the next one the certificate's age asks for
    /// (exponentially), so polls go on meanwhile; it used to renew again at every poll,
    /// fetching no configuration and no disconnect for as long as the server refused.
    fn renewal_outcome(&mut self, ok: bool) {
        if ok {
            self.renewal_failures = 0;
            self.renew_not_before = None;
            return;
        }
        self.renewal_failures = self.renewal_failures.saturating_add(1);
        let wait = session::exponential(RENEWAL_RETRY, self.renewal_failures, RENEWAL_RETRY_CAP);
        info!(next_in = ?wait, "polling on with the current certificate; renewing again after");
        self.renew_not_before = Some(Instant::now() + wait);
    }

    /// Installs the pair a registration returned.
    fn install(
        &mut self,
        renewal: bool,
        result: Result<StoredIdentity, RegisterError>,
        reports: &mut Reports,
        cx: &mut Ctx,
    ) -> Result<(), RequestError> {
        let pair = match result {
            Ok(pair) => pair,
            Err(RegisterError::Client(e)) => {
                warn!(renewal, "registration: {e}");
                return Err(classify(&e));
            }
            Err(RegisterError::Local(e)) => {
                error!(renewal, "registration: {e}");
                return Err(RequestError {
                    failure: Failure::Refused,
                    message: e,
                });
            }
        };
        let expires = crate::clock::rfc3339(pair.info.not_after);
        if let Err(e) = self.use_identity(pair) {
            error!("the new certificate cannot be used: {e}");
            let _ = self.identity.rollback();
            return Err(RequestError {
                failure: Failure::Refused,
                message: e.to_string(),
            });
        }
        info!(renewal, expires = %expires, "device certificate installed");
        let msg = if renewal {
            "device certificate renewed"
        } else {
            "device registered"
        };
        reports.report(false, "Registered".into(), msg.into(), cx);
        if !renewal {
            cx.push(Internal::Device(DeviceEvent::Registered));
        }
        Ok(())
    }

    /// Applies a fetched configuration if it changed (PROTOCOL §4.5).
    fn take_configuration(
        &mut self,
        f: Fetched,
        _workloads: &Workloads,
        _device: &super::device::DevicePart,
        reports: &mut Reports,
        cx: &mut Ctx,
    ) {
        self.hardware_profile = f.hardware_profile;
        let period = f.heartbeat_period;
        if let Some(change) = f.change {
            for w in &f.undecodable {
                warn!("configuration: refused {w}");
                reports.report(true, "InvalidWorkload".into(), w.clone(), cx);
            }
            let (raw, validated) = *change;
            info!(version = %f.version, workloads = raw.workloads.len(), "applying a new configuration");
            self.applied = Applied {
                version: f.version,
                fingerprint: f.fingerprint,
            };
            cx.push(Internal::Persist(Write::Applied(self.applied.clone())));
            cx.push(Internal::ApplyDesired(Box::new((raw, validated))));
        } else if f.fingerprint == self.applied.fingerprint && f.version != self.applied.version {
            // Only the version moved (heartbeats change it): echo it, nothing to apply.
            self.applied.version = f.version;
            cx.push(Internal::Persist(Write::Applied(self.applied.clone())));
        }
        self.feed_bare(
            &SessionEvent::Configured {
                heartbeat_period: period,
            },
            cx,
        );
    }

    fn feed(
        &mut self,
        event: &SessionEvent,
        workloads: &Workloads,
        device: &super::device::DevicePart,
        reports: &Reports,
        cx: &mut Ctx,
    ) {
        let mut out = session::Context::default();
        self.machine.handle_with_context(event, &mut out);
        self.execute(out, Some((workloads, device, reports)), cx);
    }

    /// Feeds an event whose commands need no heartbeat content.
    fn feed_bare(&mut self, event: &SessionEvent, cx: &mut Ctx) {
        let mut out = session::Context::default();
        self.machine.handle_with_context(event, &mut out);
        self.execute(out, None, cx);
    }

    fn execute(
        &mut self,
        out: session::Context,
        view: Option<(&Workloads, &super::device::DevicePart, &Reports)>,
        cx: &mut Ctx,
    ) {
        for t in &out.transitions {
            cx.history.record("session", t);
        }
        for c in out.commands {
            match c {
                SessionCommand::Enrol => cx.fx.run(Effect::Request(Request::Enrol {
                    server: self.server.clone(),
                    paths: self.bootstrap.clone(),
                    opts: self.opts.clone(),
                    device_id: self.device_id.clone(),
                    namespace: self.namespace.clone(),
                })),
                SessionCommand::Register { renewal } => {
                    if renewal {
                        info!("renewing the device certificate");
                    }
                    cx.fx.run(Effect::Request(Request::Register {
                        renewal,
                        server: self.server.clone(),
                        paths: self.bootstrap.clone(),
                        opts: self.opts.clone(),
                        device_id: self.device_id.clone(),
                        client: if renewal { self.client.clone() } else { None },
                        identity: self.identity.clone(),
                    }))
                }
                SessionCommand::Poll => {
                    if let Some(client) = self.client.clone() {
                        cx.fx.run(Effect::Request(Request::Poll {
                            gen: self.cert_gen,
                            client,
                            device_id: self.device_id.clone(),
                            applied: self.applied.fingerprint.clone(),
                            defaults: self.defaults.clone(),
                            max_workloads: self.max_workloads,
                        }))
                    }
                }
                SessionCommand::Heartbeat => match view {
                    Some((w, d, r)) => self.heartbeat(w, d, r, cx),
                    None => {
                        // No content at hand: send it right after.
                        self.schedule(Timer::Heartbeat, Duration::ZERO, cx)
                    }
                },
                SessionCommand::Schedule { timer, after } => self.schedule(timer, after, cx),
                SessionCommand::CommitCertificate => {
                    if let Err(e) = self.identity.commit() {
                        warn!("forgetting the previous certificate: {e}");
                    }
                }
                SessionCommand::RollbackCertificate => {
                    warn!("the new certificate is refused: back to the previous one");
                    match self.identity.rollback().and_then(|_| self.identity.load()) {
                        Ok(LoadedIdentity::Current(p)) => {
                            if let Err(e) = self.use_identity(p) {
                                error!("the previous certificate cannot be used: {e}");
                            }
                        }
                        Ok(_) => warn!("no previous certificate to go back to"),
                        Err(e) => error!("rolling the certificate back: {e}"),
                    }
                }
                SessionCommand::IdentityLost { reason } => {
                    warn!("{reason}");
                    cx.report(true, "DeviceNotFound", reason.clone());
                    self.client = None;
                    self.cert = None;
                    self.cert_gen.bump();
                    cx.push(Internal::Device(DeviceEvent::IdentityLost { reason }));
                }
                SessionCommand::ServerProblem(p) => cx.problem(ProblemKey::Server, p),
                SessionCommand::CertificateProblem(p) => cx.problem(ProblemKey::Certificate, p),
                SessionCommand::Disconnected => {
                    // Not put into the outbox: with the old identity nothing is sent again.
                    warn!("disconnected by the server: removing every workload; nothing is sent until `device-worker-ng reset`");
                    self.next_attempt = None;
                    for g in self.timers.iter_mut() {
                        g.bump();
                    }
                    cx.push(Internal::Device(DeviceEvent::Disconnect));
                }
                SessionCommand::Wipe => {}
            }
        }
    }

    fn schedule(&mut self, timer: Timer, after: Duration, cx: &mut Ctx) {
        let after = if after.is_zero() {
            after
        } else {
            self.jitter.apply(after)
        };
        let gen = self.timers[timer_index(timer)].bump();
        if timer == Timer::Enrol {
            info!(attempt = self.machine.inner().enrol_attempts, next_in = ?after, "enrolment pending or failing: asking again later");
        }
        if timer != Timer::Heartbeat {
            self.next_attempt = Some((timer, unix_now() + after.as_secs()));
        }
        cx.fx.run(Effect::Timer {
            after,
            event: Event::SessionTimer { timer, gen },
        });
    }

    fn heartbeat(
        &mut self,
        workloads: &Workloads,
        device: &super::device::DevicePart,
        reports: &Reports,
        cx: &mut Ctx,
    ) {
        let (Some(status), Some(client)) = (device.heartbeat_status(), self.client.clone()) else {
            return;
        };
        let mut list: Vec<WorkloadStatus> = workloads
            .entries()
            .iter()
            .map(|(name, e)| WorkloadStatus {
                name: name.to_string(),
                status: e.machine.state().heartbeat_status(),
                last_data_upload: DateTime::zero(),
            })
            .collect();
        for r in workloads.rejected() {
            if !list.iter().any(|w| w.name == r.shown_name) {
                list.push(WorkloadStatus {
                    name: r.shown_name.clone(),
                    status: crate::flotta::messages::WorkloadState::Crashed,
                    last_data_upload: DateTime::zero(),
                });
            }
        }
        // At most 100 events a heartbeat; the rest go with the next ones.
        let batch: Vec<_> = reports.outbox.events.iter().take(100).cloned().collect();
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
        cx.fx.run(Effect::Request(Request::Heartbeat {
            gen: self.cert_gen,
            client,
            device_id: self.device_id.clone(),
            heartbeat: Box::new(Heartbeat {
                status,
                version: self.applied.version.clone(),
                workloads: list,
                playbook_executions: None,
                upgrade: None,
                hardware: None,
                events,
            }),
            profile: self.hardware_profile.clone(),
            last_hardware: self.last_hardware.clone(),
            acknowledged_up_to,
        }));
    }
}

fn instant_to_unix(at: Instant) -> u64 {
    unix_now().saturating_sub(at.elapsed().as_secs())
}
