use super::*;
use crate::machines::check_machine;

/// The session machine's transitions that do something; every other pair is ignored.
const EXPECTED: &str = "
starting               Boot[no-certificate] enrolling     Enrol
starting               Boot[certificate]    registered    Poll
starting               Boot[disconnected]   disconnected
registered[outage]     PollDue              registered    Poll
registered[outage]     PollDue[renewal]     renewing      Renew
registered[outage]     Polled[ok]           registered    ServerProblemCleared,Schedule(Poll)
registered[outage]     Polled[401]          renewing      Renew
registered[outage]     Polled[403]          registered    Schedule(Poll),ServerProblem
registered[outage]     Polled[404]          enrolling     IdentityLost,Enrol
registered[outage]     Polled[5xx]          registered    ServerProblem,Schedule(Poll)
registered[outage]     Polled[refused]      registered    Schedule(Poll)
registered[outage]     HeartbeatDue         registered    Heartbeat
registered[outage]     HeartbeatSent[ok]    registered    ServerProblemCleared,Schedule(Poll),Schedule(Heartbeat)
registered[outage]     HeartbeatSent[404]   enrolling     IdentityLost,Enrol
registered[outage]     Disconnect           disconnected  Disconnected
enrolling              EnrolDue             enrolling     Enrol
enrolling              Enrolled[approved]   registering   Register
enrolling              Enrolled[pending]    enrolling     Schedule(Enrol)
enrolling              Enrolled[failed]     enrolling     Schedule(Enrol)
registering            Registered[ok]       registered    Poll
registering            Registered[failed]   enrolling     Schedule(Enrol)
registered             PollDue              registered    Poll
registered             PollDue[renewal]     renewing      Renew
registered             Polled[ok]           registered    Schedule(Poll)
registered             Polled[401]          renewing      Renew
registered             Polled[403]          registered    Schedule(Poll),ServerProblem
registered             Polled[404]          enrolling     IdentityLost,Enrol
registered             Polled[5xx]          registered    Schedule(Poll)
registered             Polled[refused]      registered    Schedule(Poll)
registered             HeartbeatDue         registered    Heartbeat
registered             HeartbeatSent[ok]    registered    Schedule(Heartbeat)
registered             HeartbeatSent[404]   enrolling     IdentityLost,Enrol
registered             Configured           registered    Schedule(Heartbeat)
registered             Disconnect           disconnected  Disconnected
registered[unproven]   PollDue              registered    Poll
registered[unproven]   PollDue[renewal]     renewing      Renew
registered[unproven]   Polled[ok]           registered    CommitCertificate,Schedule(Poll)
registered[unproven]   Polled[401]          registered    RollbackCertificate,Schedule(Poll)
registered[unproven]   Polled[403]          registered    Schedule(Poll),ServerProblem
registered[unproven]   Polled[404]          enrolling     IdentityLost,Enrol
registered[unproven]   Polled[5xx]          registered    Schedule(Poll)
registered[unproven]   Polled[refused]      registered    Schedule(Poll)
registered[unproven]   HeartbeatDue         registered    Heartbeat
registered[unproven]   HeartbeatSent[ok]    registered    Schedule(Heartbeat)
registered[unproven]   HeartbeatSent[404]   enrolling     IdentityLost,Enrol
registered[unproven]   Configured           registered    Schedule(Heartbeat)
registered[unproven]   Disconnect           disconnected  Disconnected
registered[in-flight]  PollDue              registered    Poll
registered[in-flight]  PollDue[renewal]     renewing      Renew
registered[in-flight]  Polled[ok]           registered    Schedule(Poll)
registered[in-flight]  Polled[401]          renewing      Renew
registered[in-flight]  Polled[403]          registered    Schedule(Poll),ServerProblem
registered[in-flight]  Polled[404]          enrolling     IdentityLost,Enrol
registered[in-flight]  Polled[5xx]          registered    Schedule(Poll)
registered[in-flight]  Polled[refused]      registered    Schedule(Poll)
registered[in-flight]  HeartbeatSent[ok]    registered    Schedule(Heartbeat)
registered[in-flight]  HeartbeatSent[404]   enrolling     IdentityLost,Enrol
registered[in-flight]  Disconnect           disconnected  Disconnected
renewing               Registered[ok]       registered    CertificateProblemCleared,Poll
renewing               Registered[failed]   registered    CertificateProblem,Schedule(Poll)
renewing               Polled[403]          renewing      Schedule(Poll),ServerProblem
renewing               Polled[404]          enrolling     IdentityLost,Enrol
renewing               HeartbeatDue         renewing      Heartbeat
renewing               HeartbeatSent[ok]    renewing      Schedule(Heartbeat)
renewing               HeartbeatSent[404]   enrolling     IdentityLost,Enrol
renewing               Configured           renewing      Schedule(Heartbeat)
renewing               Disconnect           disconnected  Disconnected
disconnected           Reset                enrolling     Wipe,Enrol
";

#[test]
fn transition_table_covers_every_pair_and_matches_its_diagram() {
    check_machine(
        EXPECTED,
        &transition_table(),
        (sample_states().len(), sample_events().len()),
        ("session.md", "Session machine", "starting"),
    );
}

fn delays(out: &Context, timer: Timer) -> Vec<Duration> {
    out.commands
        .iter()
        .filter_map(|c| match c {
            SessionCommand::Schedule { timer: t, after } if *t == timer => Some(*after),
            _ => None,
        })
        .collect()
}

#[test]
fn pending_enrolment_backs_off_exponentially_to_a_cap() {
    let mut m = new_machine(SessionMachine {
        enrol_initial: Duration::from_secs(2),
        enrol_cap: Duration::from_secs(60),
        ..SessionMachine::default()
    });
    let mut out = Context::default();
    m.handle_with_context(
        &SessionEvent::Boot {
            has_certificate: false,
            unproven: false,
            disconnected: false,
        },
        &mut out,
    );
    let at = Instant::now();
    for _ in 0..8 {
        m.handle_with_context(
            &SessionEvent::Enrolled {
                result: Ok(false),
                at,
            },
            &mut out,
        );
    }
    let secs: Vec<u64> = delays(&out, Timer::Enrol)
        .iter()
        .map(|d| d.as_secs())
        .collect();
    assert_eq!(secs, vec![2, 4, 8, 16, 32, 60, 60, 60]);
}

#[test]
fn a_disconnect_sticks_and_the_last_heartbeat_is_still_acknowledged() {
    let mut m = new_machine(SessionMachine::default());
    let mut out = Context::default();
    let at = Instant::now();
    for e in [
        SessionEvent::Boot {
            has_certificate: true,
            unproven: false,
            disconnected: false,
        },
        SessionEvent::HeartbeatDue,
        SessionEvent::Disconnect,
    ] {
        m.handle_with_context(&e, &mut out);
    }
    assert_eq!(m.state().name(), "disconnected");
    assert!(out.commands.contains(&SessionCommand::Disconnected));
    out.clear();
    // The heartbeat that was under way comes back; polls and heartbeats are due: nothing.
    for e in [
        SessionEvent::HeartbeatSent { result: Ok(()), at },
        SessionEvent::PollDue { renewal_due: false },
        SessionEvent::HeartbeatDue,
        SessionEvent::EnrolDue,
    ] {
        m.handle_with_context(&e, &mut out);
    }
    assert!(out.commands.is_empty(), "{:?}", out.commands);
    assert!(!m.inner().heartbeat_in_flight);
    // Across a restart too.
    let mut again = new_machine(SessionMachine::default());
    again.handle_with_context(
        &SessionEvent::Boot {
            has_certificate: true,
            unproven: false,
            disconnected: true,
        },
        &mut out,
    );
    assert_eq!(again.state().name(), "disconnected");
    assert!(out.commands.is_empty(), "{:?}", out.commands);
}

#[test]
fn any_success_after_an_outage_polls_at_once() {
    let mut m = new_machine(SessionMachine::default());
    let mut out = Context::default();
    let t0 = Instant::now();
    m.handle_with_context(
        &SessionEvent::Boot {
            has_certificate: true,
            unproven: false,
            disconnected: false,
        },
        &mut out,
    );
    for i in 0..6 {
        m.handle_with_context(
            &SessionEvent::Polled {
                result: Err(RequestError {
                    failure: Failure::Unreachable,
                    message: "connection refused".into(),
                }),
                at: t0 + Duration::from_secs(i * 10),
            },
            &mut out,
        );
    }
    let backoff = delays(&out, Timer::Poll);
    assert_eq!(
        backoff.last(),
        Some(&Duration::from_secs(32)),
        "{backoff:?}"
    );
    out.clear();
    m.handle_with_context(
        &SessionEvent::HeartbeatSent {
            result: Ok(()),
            at: t0 + Duration::from_secs(70),
        },
        &mut out,
    );
    assert_eq!(delays(&out, Timer::Poll), vec![Duration::ZERO]);
    assert!(out.commands.contains(&SessionCommand::ServerProblem(None)));
}

#[test]
fn server_errors_long_enough_are_a_problem_that_says_so() {
    let mut m = new_machine(SessionMachine {
        outage_threshold: Duration::from_secs(60),
        ..SessionMachine::default()
    });
    let mut out = Context::default();
    let t0 = Instant::now();
    m.handle_with_context(
        &SessionEvent::Boot {
            has_certificate: true,
            unproven: false,
            disconnected: false,
        },
        &mut out,
    );
    let err = |at| SessionEvent::Polled {
        result: Err(RequestError {
            failure: Failure::ServerError(500),
            message: "GET data/d/in: server error 500".into(),
        }),
        at,
    };
    m.handle_with_context(&err(t0), &mut out);
    assert!(!out
        .commands
        .iter()
        .any(|c| matches!(c, SessionCommand::ServerProblem(Some(_)))));
    m.handle_with_context(&err(t0 + Duration::from_secs(61)), &mut out);
    let problem = out
        .commands
        .iter()
        .find_map(|c| match c {
            SessionCommand::ServerProblem(Some(p)) => Some(p.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        problem.contains("answering with errors") && problem.contains("server error 500"),
        "{problem}"
    );
    let (_, last) = m.inner().last_contact.clone().unwrap();
    assert!(last.contains("500"), "the server answered: {last}");
}
