use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::workload::{RestartPolicy, SpecDefaults, SpecError, WorkloadSpec};

fn defaults() -> SpecDefaults {
    SpecDefaults {
        workload_user: Some("nobody".into()),
        backoff: BackoffPolicy::default(),
        default_limits: Limits::default(),
    }
}

fn workload(name: &str, spec: &str, annotations: &[(&str, &str)]) -> DesiredWorkload {
    DesiredWorkload {
        name: name.into(),
        specification: spec.into(),
        annotations: annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn spec_of(w: &DesiredWorkload) -> WorkloadSpec {
    w.to_spec(&defaults()).unwrap_or_else(|e| panic!("{e}"))
}

fn refused(w: &DesiredWorkload) -> SpecError {
    match w.to_spec(&defaults()) {
        Ok(_) => panic!("accepted: {w:?}"),
        Err(e) => e,
    }
}

/// A shell workload as a stock operator delivers it: an EdgeWorkload of `type: pod` (its
/// PodSpec as ghodss/yaml writes it: keys sorted, `resources: {}`), the extensions in
/// annotations with `podman/` stripped.
const SHELL_POD_SPEC: &str = "containers:\n- args:\n  - -c\n  - echo $MODE\n  command:\n  - /bin/sh\n  env:\n  - name: MODE\n    value: edge\n  image: ignored\n  name: main\n  resources: {}\n  securityContext:\n    runAsUser: 1000\n  workingDir: /tmp\nrestartPolicy: OnFailure\n";

#[test]
fn every_annotation_stands_in_for_its_field() {
    let w = workload(
        "job",
        SHELL_POD_SPEC,
        &[
            (KIND, "shell"),
            (CRON, "@every 30s"),
            (
                RETRY,
                r#"{"backoff": "constantBackoff", "periodSeconds": 7}"#,
            ),
            (PRIORITY, "-5"),
            (
                PROFILES,
                "[{name: thermal, conditions: [{name: hot, expression: 'temperature >= 60', cpu: {cpu: 20000}}, {name: cool, expression: 'temperature < 60'}]}, {name: device-wide, conditions: [{name: on}]}]",
            ),
            (
                RESOURCES,
                "limits: {memory: 64Mi, cpu: 250m, pids: 32}\nrequests: {memory: 32Mi}",
            ),
        ],
    );
    let s = spec_of(&w);
    assert_eq!(s.kind, WorkloadKind::Shell);
    let sh = s.shell.as_ref().unwrap();
    assert_eq!(sh.command, ["/bin/sh", "-c", "echo $MODE"]);
    assert_eq!(sh.env, [("MODE".to_string(), "edge".to_string())]);
    assert_eq!(
        sh.working_dir.as_deref(),
        Some(std::path::Path::new("/tmp"))
    );
    assert_eq!(sh.user.as_deref(), Some("1000"), "runAsUser");
    assert_eq!(s.scheduling.cron.as_ref().unwrap().source(), "@every 30s");
    assert_eq!(s.restart, RestartPolicy::OnFailure);
    assert_eq!(s.backoff.delay(3), Duration::from_secs(7));
    assert_eq!(s.priority, -5);
    assert_eq!(
        s.limits,
        Limits {
            memory_bytes: Some(64 << 20),
            cpu_millicores: Some(250),
            pids: Some(32)
        }
    );
    assert_eq!(s.requests.memory_bytes, Some(32 << 20));
    // The workload's own profile is named after it; the other one is the device's.
    let names: Vec<&str> = s
        .scheduling
        .profiles
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["job:thermal", "device-wide"]);
    let hot = &s.scheduling.profiles[0].conditions[0];
    assert_eq!(hot.cpu.as_ref().and_then(|c| c.cpu), Some(20000));
    assert_eq!(s.scheduling.inline_profiles.len(), 1);
    let p = &s.scheduling.inline_profiles[0];
    assert_eq!(p.name, "job:thermal");
    assert_eq!(p.conditions[0].expression, "temperature >= 60");
    assert!(s.notices.is_empty(), "{:?}", s.notices);
}

#[test]
fn pod_annotations_reach_podman() {
    let spec = "containers:\n- image: x\n  name: app\n  resources: {}\n- image: y\n  name: side\n  resources: {}\n";
    let w = workload(
        "web",
        spec,
        &[
            (ROOTLESS, "true"),
            (
                "device-worker-ng.resources.app",
                "{limits: {memory: 64Mi, cpu: 500m}, requests: {memory: 48Mi, cpu: 100m}}",
            ),
            (
                "device-worker-ng.resources.side",
                "{limits: {memory: 16Mi, cpu: 100m, pids: 20}}",
            ),
        ],
    );
    let s = spec_of(&w);
    assert_eq!(s.kind, WorkloadKind::Pod);
    let pod = s.pod.as_ref().unwrap();
    assert!(pod.rootless);
    assert_eq!(
        s.limits,
        Limits {
            memory_bytes: Some((80 << 20) + crate::workload::POD_MEMORY_OVERHEAD),
            cpu_millicores: Some(600),
            pids: Some(20)
        }
    );
    assert_eq!(s.requests.memory_bytes, Some(48 << 20));
    // podman sets each container's own limits from the manifest.
    let doc: Value = serde_yaml_ng::from_str(pod.manifest.split("---").next().unwrap()).unwrap();
    // podman 4.3 refuses annotation values over 63 characters: the agent's own stay home.
    assert!(doc["metadata"].get("annotations").is_none(), "{doc:?}");
    let app = &doc["spec"]["containers"][0]["resources"];
    assert_eq!(app["limits"]["memory"], Value::from("64Mi"));
    assert_eq!(app["requests"]["cpu"], Value::from("100m"));
    // One container: the plain annotation is its.
    let one = workload(
        "one",
        "containers: [{name: app, image: x}]",
        &[(RESOURCES, "limits: {memory: 32Mi}")],
    );
    assert_eq!(
        spec_of(&one).limits.memory_bytes,
        Some((32 << 20) + crate::workload::POD_MEMORY_OVERHEAD)
    );
    // k8s by annotation: a Deployment of the PodSpec, its resources from the annotation.
    let k = workload(
        "kube",
        "containers: [{name: app, image: x}]",
        &[(KIND, "k8s"), (RESOURCES, "limits: {memory: 32Mi}")],
    );
    let s = spec_of(&k);
    assert_eq!(s.kind, WorkloadKind::K8s);
    assert!(s.pod.unwrap().manifest.contains("memory: 32Mi"));
}

#[test]
fn the_field_wins_and_a_difference_is_a_notice() {
    let mut w = workload(
        "both",
        "command: [/bin/true]\nresources: {limits: {memory: 64Mi, cpu: 1}}",
        &[
            (KIND, "pod"),
            (CRON, "@hourly"),
            (PRIORITY, "3"),
            // memory differs; cpu is the same quantity written otherwise; pids is only here.
            (RESOURCES, "limits: {memory: 32Mi, cpu: 1000m, pids: 10}"),
        ],
    );
    w.kind = Some("shell".into());
    w.cron = Some("@daily".into());
    w.labels
        .insert(crate::workload::PRIORITY_KEY.into(), "7".into());
    let s = spec_of(&w);
    assert_eq!(s.kind, WorkloadKind::Shell);
    assert_eq!(s.scheduling.cron.as_ref().unwrap().source(), "@daily");
    assert_eq!(s.priority, 7);
    assert_eq!(
        s.limits,
        Limits {
            memory_bytes: Some(64 << 20),
            cpu_millicores: Some(1000),
            pids: Some(10)
        }
    );
    let n = s.notices.join("\n");
    assert_eq!(s.notices.len(), 4, "{n}");
    for part in [
        "annotation device-worker-ng.kind ('pod') differs from the field kind ('shell'): the field is used",
        "device-worker-ng.cron",
        "device-worker-ng/priority",
        "limits.memory '32Mi', the field '64Mi'",
    ] {
        assert!(n.contains(part), "{part}: {n}");
    }
    // The same values both ways are no conflict.
    let mut same = workload(
        "same",
        "command: [/bin/true]",
        &[(KIND, "shell"), (ROOTLESS, "false")],
    );
    same.kind = Some("shell".into());
    same.rootless = Some(false);
    assert!(spec_of(&same).notices.is_empty());
}

#[test]
fn bad_annotations_are_refused_naming_the_annotation() {
    let shell = |extra: &[(&str, &str)]| {
        let mut a = vec![(KIND, "shell")];
        a.extend_from_slice(extra);
        workload("w", "command: [/bin/true]", &a)
    };
    let pod = |spec: &str, extra: &[(&'static str, &'static str)]| workload("w", spec, extra);
    let two = "containers: [{name: a, image: x}, {name: b, image: x}]";
    let cases: Vec<(DesiredWorkload, &str, &str)> = vec![
        (shell(&[(KIND, "vm")]), "annotation device-worker-ng.kind", "unknown kind"),
        (shell(&[(CRON, "every day")]), "annotation device-worker-ng.cron", ""),
        (shell(&[(ROOTLESS, "yes")]), "annotation device-worker-ng.rootless", "true or false"),
        (
            shell(&[(RETRY, "{multiplier: 0}")]),
            "annotation device-worker-ng.retry",
            "multiplier",
        ),
        (shell(&[(RETRY, "[1, 2")]), "annotation device-worker-ng.retry", ""),
        (shell(&[(PRIORITY, "high")]), "annotation device-worker-ng.priority", "whole number"),
        (
            shell(&[(PROFILES, "[{name: p, conditions: [{name: c, expression: 'cpu >'}]}]")]),
            "annotation device-worker-ng.profiles",
            "profile 'p' condition 'c'",
        ),
        (
            shell(&[(
                PROFILES,
                "[{name: p, conditions: [{name: c, expression: 'cpu > 1%'}, {name: d}]}]",
            )]),
            "annotation device-worker-ng.profiles",
            "every condition",
        ),
        (
            shell(&[(PROFILES, "[{conditions: []}]")]),
            "annotation device-worker-ng.profiles",
            "without a name",
        ),
        (
            shell(&[(RESOURCES, "limits: {memory: lots}")]),
            "annotation device-worker-ng.resources",
            "resources.limits.memory",
        ),
        (
            shell(&[(RESOURCES, "limits: {gpu: 1}")]),
            "annotation device-worker-ng.resources",
            "unknown resource",
        ),
        (
            shell(&[(RESOURCES, "limit: {memory: 1Mi}")]),
            "annotation device-worker-ng.resources",
            "unknown field",
        ),
        (
            shell(&[("device-worker-ng.resources.main", "limits: {memory: 1Mi}")]),
            "annotation device-worker-ng.resources.main",
            "no containers",
        ),
        (
            shell(&[("device-worker-ng.corn", "@hourly")]),
            "annotation device-worker-ng.corn",
            "unknown device-worker-ng annotation",
        ),
        (
            pod(two, &[(RESOURCES, "limits: {memory: 1Mi}")]),
            "annotation device-worker-ng.resources",
            "2 containers",
        ),
        (
            pod(two, &[("device-worker-ng.resources.c", "limits: {memory: 1Mi}")]),
            "annotation device-worker-ng.resources.c",
            "no container 'c'",
        ),
        (
            pod(
                "containers: [{name: a, image: x}]",
                &[
                    (RESOURCES, "limits: {memory: 1Mi}"),
                    ("device-worker-ng.resources.a", "limits: {memory: 1Mi}"),
                ],
            ),
            "annotation device-worker-ng.resources.a",
            "same container",
        ),
        // A shell PodSpec describes one process.
        (
            workload("w", two, &[(KIND, "shell")]),
            "specification.containers",
            "exactly one container",
        ),
        (
            workload(
                "w",
                "containers: [{name: a, image: x, command: [/bin/true], ports: [{containerPort: 80}]}]",
                &[(KIND, "shell")],
            ),
            "specification.containers[0].ports",
            "a shell workload takes",
        ),
        (
            workload(
                "w",
                "containers: [{name: a, image: x, command: [/bin/true], securityContext: {privileged: true}}]",
                &[(KIND, "shell")],
            ),
            "specification.containers[0].securityContext.privileged",
            "",
        ),
        (
            workload(
                "w",
                "containers: [{name: a, image: x, command: [/bin/true], securityContext: {runAsUser: -1}}]",
                &[(KIND, "shell")],
            ),
            "specification.containers[0].securityContext.runAsUser",
            "",
        ),
        (
            workload("w", "containers: [{name: a, image: x}]\nvolumes: []", &[(KIND, "shell")]),
            "specification.volumes",
            "",
        ),
        // The converted spec goes through the shell's own checks.
        (
            workload("w", "containers: [{name: a, image: x, command: [true]}]", &[(KIND, "shell")]),
            "specification.command",
            "absolute path",
        ),
        (
            workload(
                "w",
                "containers: [{name: a, image: x, command: [/bin/true], env: [{name: A, valueFrom: {secretKeyRef: {name: s, key: k}}}]}]",
                &[(KIND, "shell")],
            ),
            "specification",
            "valueFrom",
        ),
    ];
    for (w, field, why) in cases {
        let e = refused(&w);
        assert_eq!(e.field, field, "{:?}: {e}", w.annotations);
        assert!(e.why.contains(why), "{:?}: {e}", w.annotations);
    }
}

#[test]
fn a_workload_without_annotations_is_read_as_before() {
    // The same spec text, so the same fingerprint: no restart after an upgrade.
    for (kind, spec) in [
        (
            Some("shell"),
            "command: [/bin/true]\nresources: {limits: {memory: 1Mi}}",
        ),
        (None, "containers: [{name: a, image: x}]"),
    ] {
        let mut w = workload("plain", spec, &[("other", "x")]);
        w.kind = kind.map(str::to_string);
        w.labels = BTreeMap::from([("app".to_string(), "x".to_string())]);
        let name = WorkloadName::parse("plain").unwrap();
        let r = resolve(&w, &name).unwrap();
        assert_eq!(r.workload, w);
        assert!(r.notices.is_empty() && r.inline_profiles.is_empty());
    }
}

#[test]
fn default_limits_fill_what_a_workload_does_not_declare() {
    let d = SpecDefaults {
        default_limits: Limits {
            memory_bytes: Some(256 << 20),
            cpu_millicores: Some(500),
            pids: Some(100),
        },
        ..defaults()
    };
    let shell = workload(
        "s",
        "command: [/bin/true]\nresources: {limits: {memory: 64Mi}}",
        &[(KIND, "shell")],
    );
    let s = shell.to_spec(&d).unwrap();
    assert_eq!(
        s.limits,
        Limits {
            memory_bytes: Some(64 << 20),
            cpu_millicores: Some(500),
            pids: Some(100)
        }
    );
    assert_eq!(
        s.default_limits,
        Limits {
            memory_bytes: None,
            cpu_millicores: Some(500),
            pids: Some(100)
        }
    );
    // A pod with an unlimited container: the default holds the whole pod (no overhead added).
    let pod = workload(
        "p",
        "containers: [{name: a, image: x, resources: {limits: {memory: 64Mi}}}, {name: b, image: x}]",
        &[],
    );
    let s = pod.to_spec(&d).unwrap();
    assert_eq!(s.limits.memory_bytes, Some(256 << 20));
    assert_eq!(s.default_limits.memory_bytes, Some(256 << 20));
    assert_eq!(s.limits.pids, Some(100));
    // Without DEFAULT_LIMITS a pod still gets its pids limit.
    assert_eq!(
        pod.to_spec(&defaults()).unwrap().limits.pids,
        Some(crate::workload::DEFAULT_POD_PIDS)
    );
    // Kubernetes enforces a k8s workload's limits: the agent defaults none.
    let k = workload("k", "containers: [{name: a, image: x}]", &[(KIND, "k8s")]);
    let s = k.to_spec(&d).unwrap();
    assert_eq!(s.limits, Limits::default());
    assert_eq!(s.default_limits, Limits::default());
}
