//! The Flotta session machine (PROTOCOL.md): enrolling → registering → registered (with a
//! proven or an unproven certificate) ⇄ renewing, under an `operational` superstate that
//! handles `disconnect`; disconnected until an operator resets the device.
//!
//! Pure handlers: request results arrive already classified ([`Failure`]) with the time they
//! were seen; the handlers decide what follows (the status-code policy of PROTOCOL §1.4 lives
//! here and only here) and push [`SessionCommand`]s. Timers carry no jitter: the controller
//! adds it when it schedules them, so the table stays deterministic.
//!
//! Policy (PROTOCOL §1.4, §3.5, §8): 401 → renew with the current certificate (the server
//! accepts an expired one for registration); a 401 for a certificate not yet proven → back to
//! the previous one; 403 → the device id does not match the certificate: a configuration
//! problem, back off; 404 → the server does not know the device: enrol again; 5xx, network
//! errors and time-outs → exponential backoff, a problem once they last longer than the
//! outage threshold; any answer at all is contact, and any success resets the backoff and
//! the poll schedule.

use std::time::{Duration, Instant};

use serde::Serialize;
use statig::prelude::*;

use super::{Output, Row};

pub type Context = Output<SessionCommand>;

/// A request result, classified once at the boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Failure {
    /// 401: the certificate is expired or not accepted.
    Unauthorized,
    /// 403: the path id does not match the certificate.
    Forbidden,
    /// 404: the server does not know the device (deleted, not approved).
    NotFound,
    /// 5xx (the real server answers 500 for a deleted device with a remote backend).
    ServerError(u16),
    /// No answer: connection refused, TLS failure, time-out.
    Unreachable,
    /// An answer the agent refuses (malformed, too large): the server is there.
    Refused,
}

impl Failure {
    /// The server answered (with an error): it is reachable.
    pub fn answered(self) -> bool {
        !matches!(self, Failure::Unreachable)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub failure: Failure,
    pub message: String,
}

/// Which timer a [`SessionCommand::Schedule`] sets (a newer one replaces an older one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Timer {
    Enrol,
    Poll,
    Heartbeat,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// Start: a device certificate is held (and whether the server has accepted it yet), or
    /// the device was disconnected earlier (persisted).
    Boot {
        has_certificate: bool,
        unproven: bool,
        disconnected: bool,
    },
    EnrolDue,
    /// Enrolment answered: `true` = approved (208), `false` = pending (200).
    Enrolled {
        result: Result<bool, RequestError>,
        at: Instant,
    },
    /// A registration (first, or renewal) finished: the new pair is installed, unproven.
    Registered {
        result: Result<(), RequestError>,
        at: Instant,
    },
    /// Time to fetch control and configuration messages; `renewal_due` when the certificate
    /// reached CERT_RENEW_AT of its lifetime.
    PollDue {
        renewal_due: bool,
    },
    Polled {
        result: Result<(), RequestError>,
        at: Instant,
    },
    HeartbeatDue,
    HeartbeatSent {
        result: Result<(), RequestError>,
        at: Instant,
    },
    /// A configuration was applied: heartbeats every `heartbeat_period` from now on.
    Configured {
        heartbeat_period: Duration,
    },
    /// The control channel said `disconnect` (PROTOCOL §2.6).
    Disconnect,
    /// An operator rejoins the device (`device-worker-ng reset`).
    Reset,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCommand {
    /// Enrol with the bootstrap certificate.
    Enrol,
    /// Register a new key: with the bootstrap certificate, or the current one to renew.
    Register {
        renewal: bool,
    },
    /// Fetch control/in, then data/in.
    Poll,
    Heartbeat,
    /// Send the timer's `*Due` event after `after` (plus jitter).
    Schedule {
        timer: Timer,
        after: Duration,
    },
    /// The server accepted the new certificate: forget the previous one.
    CommitCertificate,
    /// The server refuses the new certificate: go back to the previous one.
    RollbackCertificate,
    /// The server no longer knows the device: forget the device certificate, enrol again.
    IdentityLost {
        reason: String,
    },
    /// Raise (`Some`) or clear (`None`) the device problem about the server.
    ServerProblem(Option<String>),
    /// Raise or clear the device problem about the certificate.
    CertificateProblem(Option<String>),
    /// The server disconnected the device: remove everything, remember it, stop talking.
    Disconnected,
    /// An operator reset the device: forget identity, configuration and outbox.
    Wipe,
}

/// The session's settings and counters (the machine's shared storage).
#[derive(Debug, Clone)]
pub struct SessionMachine {
    pub poll_interval: Duration,
    pub outage_threshold: Duration,
    pub heartbeat_period: Duration,
    /// First enrolment retry delay and the cap of its exponential backoff.
    pub enrol_initial: Duration,
    pub enrol_cap: Duration,
    /// Cap of the request backoff after failures.
    pub backoff_cap: Duration,
    /// Consecutive failed requests (any kind).
    pub failures: u32,
    /// Enrolment answers "pending" (or failures) in a row.
    pub enrol_attempts: u32,
    /// Since when requests fail without an answer or with server errors.
    pub outage_since: Option<Instant>,
    pub heartbeat_in_flight: bool,
    pub configured: bool,
    /// The last answer and when: shown by `status`.
    pub last_contact: Option<(Instant, String)>,
    /// The last failed request and why (no answer at all included): shown by `status` from
    /// the first failure on, not only once the outage threshold makes it a problem.
    pub last_failure: Option<(Instant, String)>,
}

impl Default for SessionMachine {
    fn default() -> Self {
        SessionMachine {
            poll_interval: Duration::from_secs(5),
            outage_threshold: Duration::from_secs(120),
            heartbeat_period: Duration::from_secs(60),
            enrol_initial: Duration::from_secs(2),
            enrol_cap: Duration::from_secs(300),
            backoff_cap: Duration::from_secs(60),
            failures: 0,
            enrol_attempts: 0,
            outage_since: None,
            heartbeat_in_flight: false,
            configured: false,
            last_contact: None,
            last_failure: None,
        }
    }
}

/// `initial * 2^(n-1)`, capped.
pub fn exponential(initial: Duration, n: u32, cap: Duration) -> Duration {
    initial
        .saturating_mul(2u32.saturating_pow(n.saturating_sub(1).min(20)))
        .min(cap)
}

impl SessionMachine {
    fn backoff(&self) -> Duration {
        exponential(
            Duration::from_secs(1),
            self.failures.max(1),
            self.backoff_cap,
        )
    }

    /// A request was answered with success; true when that ends a run of failures (the
    /// caller then polls at once instead of a backed-off interval later).
    fn succeeded(&mut self, what: &str, at: Instant, out: &mut Context) -> bool {
        let recovered = self.failures > 0 || self.outage_since.is_some();
        self.failures = 0;
        self.outage_since = None;
        self.last_contact = Some((at, format!("{what}: ok")));
        if recovered {
            out.push(SessionCommand::ServerProblem(None));
        }
        recovered
    }

    /// A request failed for a reason that says nothing about the device (server errors, no
    /// answer, a refused answer): back off, and raise a problem once it lasts.
    fn failed(&mut self, what: &str, e: &RequestError, at: Instant, out: &mut Context) {
        self.failures = self.failures.saturating_add(1);
        self.last_failure = Some((at, format!("{what}: {}", e.message)));
        if e.failure.answered() {
            self.last_contact = Some((at, format!("{what}: {}", e.message)));
        }
        if e.failure == Failure::Refused {
            // The server is there and answers; the answer is bad: keep the last good state.
            return;
        }
        let since = *self.outage_since.get_or_insert(at);
        let lasted = at.saturating_duration_since(since);
        if lasted >= self.outage_threshold {
            let what_kind = match e.failure {
                Failure::Unreachable => "unreachable",
                _ => "answering with errors",
            };
            out.push(SessionCommand::ServerProblem(Some(format!(
                "server {what_kind} for {}s ({} failed requests in a row), last: {what}: {}",
                lasted.as_secs(),
                self.failures,
                e.message
            ))));
        }
    }

    fn schedule_enrolment(&self, context: &mut Context) {
        context.push(SessionCommand::Schedule {
            timer: Timer::Enrol,
            after: exponential(self.enrol_initial, self.enrol_attempts, self.enrol_cap),
        });
    }

    fn after_transition(&mut self, source: &State, target: &State, context: &mut Context) {
        super::note_transition(context, source, target);
    }
}

#[state_machine(
    initial = "State::starting()",
    state(derive(Debug, Clone, PartialEq, Eq, Serialize)),
    superstate(derive(Debug)),
    after_transition = "Self::after_transition",
    visibility = "pub"
)]
impl SessionMachine {
    /// Before `Boot`.
    #[state]
    fn starting(event: &SessionEvent, context: &mut Context) -> Outcome<State> {
        match event {
            SessionEvent::Boot {
                disconnected: true, ..
            } => Transition(State::disconnected()),
            SessionEvent::Boot {
                has_certificate: true,
                unproven,
                ..
            } => {
                context.push(SessionCommand::Poll);
                Transition(State::registered(!unproven))
            }
            SessionEvent::Boot { .. } => {
                context.push(SessionCommand::Enrol);
                Transition(State::enrolling())
            }
            _ => Handled,
        }
    }

    /// Asking the server, with the bootstrap certificate, to accept the device; repeated
    /// with exponential backoff while approval is pending.
    #[state]
    fn enrolling(&mut self, event: &SessionEvent, context: &mut Context) -> Outcome<State> {
        match event {
            SessionEvent::EnrolDue => {
                context.push(SessionCommand::Enrol);
                Handled
            }
            SessionEvent::Enrolled {
                result: Ok(true),
                at,
            } => {
                self.enrol_attempts = 0;
                self.succeeded("enrolment", *at, context);
                Transition(State::registering())
            }
            SessionEvent::Enrolled { result, at } => {
                self.enrol_attempts = self.enrol_attempts.saturating_add(1);
                match result {
                    Ok(_) => {
                        self.succeeded("enrolment (pending approval)", *at, context);
                    }
                    Err(e) => self.failed("enrolment", e, *at, context),
                }
                self.schedule_enrolment(context);
                Handled
            }
            _ => Handled,
        }
    }

    /// Sending the CSR with the bootstrap certificate.
    #[state(entry_action = "enter_registering")]
    fn registering(&mut self, event: &SessionEvent, context: &mut Context) -> Outcome<State> {
        match event {
            SessionEvent::Registered { result: Ok(()), at } => {
                self.succeeded("registration", *at, context);
                context.push(SessionCommand::Poll);
                Transition(State::registered(false))
            }
            SessionEvent::Registered { result: Err(e), at } => {
                // Not approved after all (404), or a failure: enrolment decides again, after
                // the enrolment backoff.
                self.failed("registration", e, *at, context);
                self.enrol_attempts = self.enrol_attempts.saturating_add(1);
                self.schedule_enrolment(context);
                Transition(State::enrolling())
            }
            _ => Handled,
        }
    }

    #[action]
    fn enter_registering(context: &mut Context) {
        context.push(SessionCommand::Register { renewal: false });
    }

    /// Talking to the server with a device certificate; `proven` once the server accepted it.
    #[state(superstate = "operational")]
    fn registered(
        &mut self,
        proven: &mut bool,
        event: &SessionEvent,
        context: &mut Context,
    ) -> Outcome<State> {
        match event {
            SessionEvent::PollDue { renewal_due: true } => Transition(State::renewing()),
            SessionEvent::PollDue { .. } => {
                context.push(SessionCommand::Poll);
                Handled
            }
            SessionEvent::Polled { result: Ok(()), at } => {
                self.succeeded("poll", *at, context);
                if !*proven {
                    *proven = true;
                    context.push(SessionCommand::CommitCertificate);
                }
                context.push(SessionCommand::Schedule {
                    timer: Timer::Poll,
                    after: self.poll_interval,
                });
                Handled
            }
            SessionEvent::Polled { result: Err(e), at } if e.failure == Failure::Unauthorized => {
                self.last_contact = Some((*at, format!("poll: {}", e.message)));
                if *proven {
                    Transition(State::renewing())
                } else {
                    // The new certificate is refused: the previous one is still good.
                    *proven = true;
                    context.push(SessionCommand::RollbackCertificate);
                    context.push(SessionCommand::Schedule {
                        timer: Timer::Poll,
                        after: Duration::ZERO,
                    });
                    Handled
                }
            }
            SessionEvent::Polled { result: Err(e), at }
                if !matches!(e.failure, Failure::Forbidden | Failure::NotFound) =>
            {
                self.failed("poll", e, *at, context);
                let after = if e.failure == Failure::Refused {
                    self.poll_interval
                } else {
                    self.backoff()
                };
                context.push(SessionCommand::Schedule {
                    timer: Timer::Poll,
                    after,
                });
                Handled
            }
            _ => Super,
        }
    }

    /// Registering a new key with the current certificate (expired or not: PROTOCOL §3.5);
    /// heartbeats go on meanwhile.
    #[state(superstate = "operational", entry_action = "enter_renewing")]
    fn renewing(&mut self, event: &SessionEvent, context: &mut Context) -> Outcome<State> {
        match event {
            SessionEvent::Registered { result: Ok(()), at } => {
                self.succeeded("renewal", *at, context);
                context.push(SessionCommand::CertificateProblem(None));
                context.push(SessionCommand::Poll);
                Transition(State::registered(false))
            }
            SessionEvent::Registered { result: Err(e), at } => {
                self.failed("renewal", e, *at, context);
                context.push(SessionCommand::CertificateProblem(Some(format!(
                    "certificate renewal failing: {}",
                    e.message
                ))));
                // Polls resume with the current certificate; the next poll tries again.
                context.push(SessionCommand::Schedule {
                    timer: Timer::Poll,
                    after: self.backoff(),
                });
                Transition(State::registered(true))
            }
            SessionEvent::PollDue { .. } => Handled,
            _ => Super,
        }
    }

    #[action]
    fn enter_renewing(context: &mut Context) {
        context.push(SessionCommand::Register { renewal: true });
    }

    /// What every state with a device certificate handles alike: heartbeats, the 403/404
    /// policy of any request, and `disconnect`.
    #[superstate]
    fn operational(&mut self, event: &SessionEvent, context: &mut Context) -> Outcome<State> {
        match event {
            SessionEvent::Configured { heartbeat_period } => {
                self.heartbeat_period = *heartbeat_period;
                if !self.configured {
                    self.configured = true;
                    context.push(SessionCommand::Schedule {
                        timer: Timer::Heartbeat,
                        after: Duration::ZERO,
                    });
                }
                Handled
            }
            SessionEvent::HeartbeatDue => {
                if !self.heartbeat_in_flight {
                    self.heartbeat_in_flight = true;
                    context.push(SessionCommand::Heartbeat);
                }
                Handled
            }
            SessionEvent::HeartbeatSent { result, at } => {
                self.heartbeat_in_flight = false;
                match result {
                    Err(e) if e.failure == Failure::NotFound => {
                        self.last_contact = Some((*at, format!("heartbeat: {}", e.message)));
                        return lost(e, context);
                    }
                    Ok(()) => {
                        if self.succeeded("heartbeat", *at, context) {
                            // Back after an outage: poll now, not a backed-off interval later.
                            context.push(SessionCommand::Schedule {
                                timer: Timer::Poll,
                                after: Duration::ZERO,
                            });
                        }
                    }
                    // Heartbeats are accepted with an expired certificate (PROTOCOL §8 item
                    // 1): a 401 here says nothing the polls do not say better.
                    Err(e) => self.failed("heartbeat", e, *at, context),
                }
                context.push(SessionCommand::Schedule {
                    timer: Timer::Heartbeat,
                    after: self.heartbeat_period,
                });
                match result {
                    Err(e) if e.failure == Failure::Forbidden => forbidden(e, context),
                    _ => Handled,
                }
            }
            SessionEvent::Polled { result: Err(e), at } if e.failure == Failure::NotFound => {
                self.last_contact = Some((*at, format!("poll: {}", e.message)));
                lost(e, context)
            }
            SessionEvent::Polled { result: Err(e), at } if e.failure == Failure::Forbidden => {
                // The server answered: no outage, a configuration problem.
                self.failures = self.failures.saturating_add(1);
                self.last_contact = Some((*at, format!("poll: {}", e.message)));
                context.push(SessionCommand::Schedule {
                    timer: Timer::Poll,
                    after: self.backoff(),
                });
                forbidden(e, context)
            }
            SessionEvent::Disconnect => {
                context.push(SessionCommand::Disconnected);
                Transition(State::disconnected())
            }
            _ => Handled,
        }
    }

    /// Disconnected by the server: no request at all, across restarts, until a reset.
    #[state]
    fn disconnected(&mut self, event: &SessionEvent, context: &mut Context) -> Outcome<State> {
        match event {
            SessionEvent::Reset => {
                *self = SessionMachine {
                    poll_interval: self.poll_interval,
                    outage_threshold: self.outage_threshold,
                    enrol_initial: self.enrol_initial,
                    enrol_cap: self.enrol_cap,
                    backoff_cap: self.backoff_cap,
                    ..SessionMachine::default()
                };
                context.push(SessionCommand::Wipe);
                context.push(SessionCommand::Enrol);
                Transition(State::enrolling())
            }
            // The answer to the heartbeat that was under way when the disconnect came: its
            // events were delivered and must not be sent again.
            SessionEvent::HeartbeatSent { .. } => {
                self.heartbeat_in_flight = false;
                Handled
            }
            _ => Handled,
        }
    }
}

/// 404: the server does not know this device (deleted or never approved): enrol again.
fn lost(e: &RequestError, context: &mut Context) -> Outcome<State> {
    context.push(SessionCommand::IdentityLost {
        reason: format!(
            "the server does not know this device ({}): enrolling again",
            e.message
        ),
    });
    context.push(SessionCommand::Enrol);
    Transition(State::enrolling())
}

/// 403: DEVICE_ID and the certificate disagree: the operator must fix it.
fn forbidden(e: &RequestError, context: &mut Context) -> Outcome<State> {
    context.push(SessionCommand::ServerProblem(Some(format!(
        "the server refuses this device (403): DEVICE_ID does not match the certificate: {}",
        e.message
    ))));
    Handled
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Starting {} => "starting",
            State::Enrolling {} => "enrolling",
            State::Registering {} => "registering",
            State::Registered { .. } => "registered",
            State::Renewing {} => "renewing",
            State::Disconnected {} => "disconnected",
        }
    }

    pub fn reason(&self) -> String {
        match self {
            State::Starting {} => "starting".into(),
            State::Enrolling {} => "enrolling with the bootstrap certificate".into(),
            State::Registering {} => "enrolment approved: registering".into(),
            State::Registered { proven: true } => "registered".into(),
            State::Registered { proven: false } => {
                "registered with a new certificate the server has not accepted yet".into()
            }
            State::Renewing {} => "renewing the device certificate".into(),
            State::Disconnected {} => "disconnected by the server".into(),
        }
    }
}

impl State {
    /// Does the session hold a device certificate to talk with?
    pub fn has_device_certificate(&self) -> bool {
        matches!(self, State::Registered { .. } | State::Renewing {})
    }
}

pub type Machine = statig::blocking::InitializedStateMachine<SessionMachine>;

pub fn new_machine(shared: SessionMachine) -> Machine {
    shared
        .uninitialized_state_machine()
        .init_with_context(&mut Context::default())
}

/// Sample states, one per state (and per variant that changes behaviour).
pub fn sample_states() -> Vec<(String, (SessionMachine, State))> {
    let calm = SessionMachine::default();
    let in_flight = SessionMachine {
        heartbeat_in_flight: true,
        configured: true,
        ..SessionMachine::default()
    };
    // Sample results are seen 10 minutes after "now" (see `sample_events`): an outage
    // that began now has outlasted the threshold by then.
    let outage = SessionMachine {
        failures: 3,
        outage_since: Some(sample_now()),
        configured: true,
        ..SessionMachine::default()
    };
    let rows = vec![
        ("starting", calm.clone(), State::starting()),
        ("registered[outage]", outage, State::registered(true)),
        ("enrolling", calm.clone(), State::enrolling()),
        ("registering", calm.clone(), State::registering()),
        ("registered", calm.clone(), State::registered(true)),
        (
            "registered[unproven]",
            calm.clone(),
            State::registered(false),
        ),
        ("registered[in-flight]", in_flight, State::registered(true)),
        ("renewing", calm.clone(), State::renewing()),
        ("disconnected", calm, State::disconnected()),
    ];
    rows.into_iter()
        .map(|(n, m, s)| (n.to_string(), (m, s)))
        .collect()
}

/// The instant samples count from (one per process, so states and events agree).
fn sample_now() -> Instant {
    static NOW: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *NOW.get_or_init(Instant::now)
}

/// Sample events; results are seen 10 minutes after [`sample_now`], so outages show. (A long
/// function because it is a table: one row per event and guard.)
pub fn sample_events() -> Vec<(String, (Option<SessionMachine>, SessionEvent))> {
    let at = sample_now() + Duration::from_secs(600);
    let err = |failure| RequestError {
        failure,
        message: "boom".into(),
    };
    let rows = vec![
        (
            "Boot[no-certificate]",
            SessionEvent::Boot {
                has_certificate: false,
                unproven: false,
                disconnected: false,
            },
        ),
        (
            "Boot[certificate]",
            SessionEvent::Boot {
                has_certificate: true,
                unproven: false,
                disconnected: false,
            },
        ),
        (
            "Boot[disconnected]",
            SessionEvent::Boot {
                has_certificate: true,
                unproven: false,
                disconnected: true,
            },
        ),
        ("EnrolDue", SessionEvent::EnrolDue),
        (
            "Enrolled[approved]",
            SessionEvent::Enrolled {
                result: Ok(true),
                at,
            },
        ),
        (
            "Enrolled[pending]",
            SessionEvent::Enrolled {
                result: Ok(false),
                at,
            },
        ),
        (
            "Enrolled[failed]",
            SessionEvent::Enrolled {
                result: Err(err(Failure::Unreachable)),
                at,
            },
        ),
        (
            "Registered[ok]",
            SessionEvent::Registered { result: Ok(()), at },
        ),
        (
            "Registered[failed]",
            SessionEvent::Registered {
                result: Err(err(Failure::ServerError(500))),
                at,
            },
        ),
        ("PollDue", SessionEvent::PollDue { renewal_due: false }),
        (
            "PollDue[renewal]",
            SessionEvent::PollDue { renewal_due: true },
        ),
        ("Polled[ok]", SessionEvent::Polled { result: Ok(()), at }),
        (
            "Polled[401]",
            SessionEvent::Polled {
                result: Err(err(Failure::Unauthorized)),
                at,
            },
        ),
        (
            "Polled[403]",
            SessionEvent::Polled {
                result: Err(err(Failure::Forbidden)),
                at,
            },
        ),
        (
            "Polled[404]",
            SessionEvent::Polled {
                result: Err(err(Failure::NotFound)),
                at,
            },
        ),
        (
            "Polled[5xx]",
            SessionEvent::Polled {
                result: Err(err(Failure::ServerError(500))),
                at,
            },
        ),
        (
            "Polled[refused]",
            SessionEvent::Polled {
                result: Err(err(Failure::Refused)),
                at,
            },
        ),
        ("HeartbeatDue", SessionEvent::HeartbeatDue),
        (
            "HeartbeatSent[ok]",
            SessionEvent::HeartbeatSent { result: Ok(()), at },
        ),
        (
            "HeartbeatSent[404]",
            SessionEvent::HeartbeatSent {
                result: Err(err(Failure::NotFound)),
                at,
            },
        ),
        (
            "Configured",
            SessionEvent::Configured {
                heartbeat_period: Duration::from_secs(60),
            },
        ),
        ("Disconnect", SessionEvent::Disconnect),
        ("Reset", SessionEvent::Reset),
    ];
    rows.into_iter()
        .map(|(n, e)| (n.to_string(), (None, e)))
        .collect()
}

pub fn transition_table() -> Vec<Row> {
    super::transition_table(&sample_states(), &sample_events(), command_name)
}

pub fn command_name(c: &SessionCommand) -> String {
    match c {
        SessionCommand::Enrol => "Enrol".into(),
        SessionCommand::Register { renewal: false } => "Register".into(),
        SessionCommand::Register { renewal: true } => "Renew".into(),
        SessionCommand::Poll => "Poll".into(),
        SessionCommand::Heartbeat => "Heartbeat".into(),
        SessionCommand::Schedule { timer, .. } => format!("Schedule({timer:?})"),
        SessionCommand::CommitCertificate => "CommitCertificate".into(),
        SessionCommand::RollbackCertificate => "RollbackCertificate".into(),
        SessionCommand::IdentityLost { .. } => "IdentityLost".into(),
        SessionCommand::ServerProblem(Some(_)) => "ServerProblem".into(),
        SessionCommand::ServerProblem(None) => "ServerProblemCleared".into(),
        SessionCommand::CertificateProblem(Some(_)) => "CertificateProblem".into(),
        SessionCommand::CertificateProblem(None) => "CertificateProblemCleared".into(),
        SessionCommand::Disconnected => "Disconnected".into(),
        SessionCommand::Wipe => "Wipe".into(),
    }
}

#[cfg(test)]
mod tests;

impl super::Named for State {
    fn name(&self) -> &'static str {
        State::name(self)
    }

    fn reason(&self) -> String {
        State::reason(self)
    }
}
