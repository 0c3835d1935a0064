use super::*;
use crate::machines::check_machine;

/// The workload machine's transitions that do something; every other pair is ignored.
const EXPECTED: &str = "
pending                Admit                            starting     Start
pending                Remove                           removed      Cleanup
starting               Started                          running
starting               Progress[ready]                  running
starting               StartFailed[retries-left]        backoff      Report(Failed),ScheduleRetry
starting               StartFailed[limit-reached]       failed       Report(Broken)
starting               Exited[success,Always]           backoff      ScheduleRetry
starting               Exited[success,OnFailure|Never]  stopped
starting               Exited[failure,retries-left]     backoff      Report(Failed),ScheduleRetry
starting               Exited[oom,retries-left]         backoff      Report(Failed),ScheduleRetry
starting               Exited[failure,limit-reached]    failed       Report(Broken)
starting               Exited[failure,Never]            failed       Report(Failed)
starting               Update                           stopping     Stop
starting               Evict                            stopping     Report(Evicted),Stop
starting               Remove                           stopping     Stop
running                Progress[not-ready]              unavailable
running                Exited[success,Always]           backoff      ScheduleRetry
running                Exited[success,OnFailure|Never]  stopped
running                Exited[failure,retries-left]     backoff      Report(Failed),ScheduleRetry
running                Exited[oom,retries-left]         backoff      Report(Failed),ScheduleRetry
running                Exited[failure,limit-reached]    failed       Report(Broken)
running                Exited[failure,Never]            failed       Report(Failed)
running                Update                           stopping     Stop
running                Evict                            stopping     Report(Evicted),Stop
running                Remove                           stopping     Stop
unavailable            Progress[ready]                  running
unavailable            Exited[success,Always]           backoff      ScheduleRetry
unavailable            Exited[success,OnFailure|Never]  stopped
unavailable            Exited[failure,retries-left]     backoff      Report(Failed),ScheduleRetry
unavailable            Exited[oom,retries-left]         backoff      Report(Failed),ScheduleRetry
unavailable            Exited[failure,limit-reached]    failed       Report(Broken)
unavailable            Exited[failure,Never]            failed       Report(Failed)
unavailable            Update                           stopping     Stop
unavailable            Evict                            stopping     Report(Evicted),Stop
unavailable            Remove                           stopping     Stop
stopping[restart]      StopCompleted                    starting     Start
stopping[remove]       StopCompleted                    removed      Cleanup
stopping[evict]        StopCompleted                    evicted
backoff                Hold                             pending
backoff                RetryDue                         starting     Start
backoff                Update                           starting     Start
backoff                Remove                           removed      Cleanup
stopped                Admit                            starting     Start
stopped                Update                           starting     Start
stopped                Remove                           removed      Cleanup
failed                 Update                           pending
failed                 Remove                           removed      Cleanup
evicted                Admit                            starting     Start
evicted                Remove                           removed      Cleanup
";

#[test]
fn transition_table_covers_every_pair_and_matches_its_diagram() {
    check_machine(
        EXPECTED,
        &transition_table(),
        (sample_states().len(), sample_events().len()),
        ("workload.md", "Workload machine", "pending"),
    );
}

fn run_machine(
    shared: WorkloadMachine,
    events: &[WorkloadEvent],
) -> (Machine, Vec<WorkloadCommand>) {
    let mut out = Context::default();
    let mut m = machine_in(shared, State::pending("new".into()), &mut out);
    for e in events {
        m.handle_with_context(e, &mut out);
    }
    (m, out.commands)
}

fn crash(secs: u64) -> WorkloadEvent {
    WorkloadEvent::Exited(ExitInfo {
        code: Some(137),
        signal: None,
        oom_killed: true,
        ran_for: Duration::from_secs(secs),
    })
}

#[test]
fn oom_loop_backs_off_exponentially_then_breaks() {
    let policy = BackoffPolicy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(4),
        multiplier: 2.0,
        max_failures: 3,
        reset_after: Duration::from_secs(60),
    };
    let mut events = vec![WorkloadEvent::Admit];
    for _ in 0..4 {
        events.push(WorkloadEvent::Started { pid: Some(1) });
        events.push(crash(1));
        events.push(WorkloadEvent::RetryDue);
    }
    let (m, cmds) = run_machine(WorkloadMachine::new(RestartPolicy::Always, policy), &events);
    let delays: Vec<Duration> = cmds
        .iter()
        .filter_map(|c| match c {
            WorkloadCommand::ScheduleRetry(d) => Some(*d),
            _ => None,
        })
        .collect();
    assert_eq!(
        delays,
        vec![
            Duration::from_secs(1),
            Duration::from_secs(2),
            Duration::from_secs(4)
        ]
    );
    assert_eq!(m.state().name(), "failed");
    assert!(
        m.state()
            .reason()
            .starts_with("broken: 4 consecutive failures"),
        "{}",
        m.state().reason()
    );
    assert!(m.state().reason().contains("OOMKilled"));
    assert_eq!(m.inner().oom_kills, 4);
    assert_eq!(m.inner().restarts, 4);
}

#[test]
fn a_long_run_resets_the_failure_count() {
    let policy = BackoffPolicy {
        max_failures: 1,
        ..BackoffPolicy::default()
    };
    let events = [
        WorkloadEvent::Admit,
        WorkloadEvent::Started { pid: Some(1) },
        crash(1),
        WorkloadEvent::RetryDue,
        WorkloadEvent::Started { pid: Some(2) },
        crash(3600),
    ];
    let (m, _) = run_machine(WorkloadMachine::new(RestartPolicy::Always, policy), &events);
    assert_eq!(m.state().name(), "backoff", "{}", m.state().reason());
    assert_eq!(m.inner().failures, 1);
}

#[test]
fn update_of_a_running_workload_restarts_it_after_the_stop() {
    let (m, cmds) = run_machine(
        WorkloadMachine::new(RestartPolicy::Always, BackoffPolicy::default()),
        &[
            WorkloadEvent::Admit,
            WorkloadEvent::Started { pid: Some(5) },
            WorkloadEvent::Update,
            WorkloadEvent::Exited(ExitInfo {
                code: None,
                signal: Some(15),
                oom_killed: false,
                ran_for: Duration::ZERO,
            }),
            WorkloadEvent::StopCompleted,
        ],
    );
    assert_eq!(m.state().name(), "starting");
    assert_eq!(
        cmds,
        vec![
            WorkloadCommand::Start,
            WorkloadCommand::Stop,
            WorkloadCommand::Start
        ]
    );
}

#[test]
fn heartbeat_statuses_use_the_swagger_enum() {
    for (_, (_, s)) in sample_states() {
        assert!(
            ["deploying", "running", "crashed", "stopped"].contains(&s.heartbeat_status().as_str())
        );
    }
    assert_eq!(
        State::running(Some(1)).heartbeat_status().as_str(),
        "running"
    );
    assert_eq!(
        State::backoff("x".into()).heartbeat_status().as_str(),
        "crashed"
    );
}
