use super::*;
use crate::workload::desired::SpecDefaults;

fn defaults() -> SpecDefaults {
    SpecDefaults {
        workload_user: Some("nobody".into()),
        backoff: BackoffPolicy::default(),
        ..Default::default()
    }
}

const GOOD: &str = r#"
workloads:
  - name: collector
    kind: shell
    labels: {device-worker-ng/priority: "10"}
    specification: |
      command: ["/usr/bin/collector", "--fast"]
      args: ["-v"]
      env: [{name: MODE, value: edge}]
      workingDir: /tmp
      restartPolicy: OnFailure
      resources:
        limits: {memory: 64Mi, cpu: 250m, pids: 32}
        requests: {memory: 32Mi}
  - name: web
    specification: "containers: []"
    configmaps: ["apiVersion: v1"]
"#;

#[test]
fn parses_a_shell_workload_and_keeps_wire_fields() {
    let d = parse_desired(GOOD).unwrap();
    assert_eq!(d.workloads.len(), 2);
    assert_eq!(
        d.workloads[1].configmaps,
        vec!["apiVersion: v1".to_string()]
    );
    let specs = d.validate(&defaults());
    let s = specs[0].as_ref().unwrap();
    assert_eq!(s.kind, WorkloadKind::Shell);
    let sh = s.shell.as_ref().unwrap();
    assert_eq!(sh.command, vec!["/usr/bin/collector", "--fast", "-v"]);
    assert_eq!(sh.env, vec![("MODE".to_string(), "edge".to_string())]);
    assert_eq!(sh.user.as_deref(), Some("nobody"));
    assert_eq!(s.restart, RestartPolicy::OnFailure);
    assert_eq!(s.priority, 10);
    assert_eq!(
        s.limits,
        Limits {
            memory_bytes: Some(64 << 20),
            cpu_millicores: Some(250),
            pids: Some(32)
        }
    );
    assert_eq!(s.requests.memory_bytes, Some(32 << 20));
    let e = specs[1].as_ref().unwrap_err();
    assert_eq!(e.field, "specification.containers", "{e}");
}

fn one(spec: &str, kind: &str, name: &str) -> Result<WorkloadSpec, SpecError> {
    let w = DesiredWorkload {
        name: name.into(),
        kind: Some(kind.into()),
        specification: spec.into(),
        ..Default::default()
    };
    w.to_spec(&defaults())
}

#[test]
fn invalid_workloads_name_the_field() {
    let cases = [
        ("command: [/bin/true]", "shell", "Bad_Name", "name"),
        ("command: [/bin/true]", "vm", "w", "kind"),
        ("command: []", "shell", "w", "specification.command"),
        ("command: [true]", "shell", "w", "specification.command"),
        (
            "command: [/bin/true]\nfoo: 1",
            "shell",
            "w",
            "specification",
        ),
        (
            "command: [/bin/true]\nresources: {limits: {memory: lots}}",
            "shell",
            "w",
            "specification.resources.limits.memory",
        ),
        (
            "command: [/bin/true]\nresources: {limits: {gpu: 1}}",
            "shell",
            "w",
            "specification.resources.limits.gpu",
        ),
        (
            "command: [/bin/true]\nresources: {limits: {pids: 0}}",
            "shell",
            "w",
            "specification.resources.limits.pids",
        ),
        (
            "command: [/bin/true]\nrestartPolicy: Sometimes",
            "shell",
            "w",
            "specification",
        ),
        (
            "command: [/bin/true]\nworkingDir: rel",
            "shell",
            "w",
            "specification.workingDir",
        ),
    ];
    for (spec, kind, name, field) in cases {
        let e = one(spec, kind, name).unwrap_err();
        assert_eq!(e.field, field, "{spec}: {e}");
        assert_eq!(e.workload, name);
    }
}

#[test]
fn duplicates_are_rejected_but_the_first_is_kept() {
    let d = parse_desired(
        "workloads:\n- {name: a, kind: shell, specification: 'command: [/bin/true]'}\n- {name: a, kind: shell, specification: 'command: [/bin/false]'}\n",
    )
    .unwrap();
    let v = d.validate(&defaults());
    assert!(v[0].is_ok());
    assert!(v[1].as_ref().unwrap_err().why.contains("duplicate"));
}

#[test]
fn malformed_and_empty_documents() {
    assert!(parse_desired("workloads: {not: a list}").is_err());
    assert!(parse_desired("workloads: [").is_err());
    // A file caught empty or half-written is no "nothing desired": only an explicit list is.
    for unsaid in ["", "{}", "# nothing\n", "secrets: []"] {
        assert!(parse_desired(unsaid).is_err(), "{unsaid:?}");
    }
    assert_eq!(parse_desired("workloads: []").unwrap().workloads.len(), 0);
    let json =
        r#"{"workloads":[{"name":"a","kind":"shell","specification":"command: [/bin/true]"}]}"#;
    assert_eq!(parse_desired(json).unwrap().workloads.len(), 1);
}

#[test]
fn fingerprint_changes_with_the_spec_only() {
    let a = one("command: [/bin/true]", "shell", "w").unwrap();
    let b = one("command: [/bin/true]", "shell", "w").unwrap();
    let c = one("command: [/bin/false]", "shell", "w").unwrap();
    assert_eq!(a.fingerprint, b.fingerprint);
    assert_ne!(a.fingerprint, c.fingerprint);
    assert_eq!(
        fingerprint(b"abc"),
        "e71fa2190541574b",
        "stable across releases"
    );
}

#[test]
fn retry_extension_sets_the_backoff() {
    let w = DesiredWorkload {
        name: "w".into(),
        kind: Some("shell".into()),
        specification: "command: [/bin/true]".into(),
        retry: Some(desired::Retry {
            backoff: Some("constantBackoff".into()),
            period_seconds: Some(5.0),
            ..Default::default()
        }),
        ..Default::default()
    };
    let s = w.to_spec(&defaults()).unwrap();
    assert_eq!(s.backoff.delay(1), std::time::Duration::from_secs(5));
    assert_eq!(s.backoff.delay(4), std::time::Duration::from_secs(5));
}

#[test]
fn backoff_is_exponential_and_capped() {
    let b = BackoffPolicy::default();
    let secs: Vec<u64> = (1..=8).map(|n| b.delay(n).as_secs()).collect();
    assert_eq!(secs, vec![1, 2, 4, 8, 16, 32, 60, 60]);
}
