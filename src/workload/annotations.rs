//! The device-worker-ng extensions as annotations: the way they reach a device through a stock
//! Flotta operator.
//!
//! The official operator builds the configuration from its CRDs (PROTOCOL §4.3, §4.7, §6): it
//! drops `kind`, `cron`, `rootless`, `retry`, the workload `profiles` and
//! `configuration.profiles`; it passes only the labels and annotations whose key starts with
//! `podman/`, with that prefix stripped; and its admission webhook refuses container
//! `resources`. An EdgeWorkload annotation `podman/device-worker-ng.<x>` therefore arrives as
//! `device-worker-ng.<x>` and stands in for the field `<x>`:
//!
//! | annotation | value | stands in for |
//! |---|---|---|
//! | `device-worker-ng.kind` | `shell`, `pod`, `k8s` | `kind` |
//! | `device-worker-ng.cron` | a cron schedule | `cron` |
//! | `device-worker-ng.rootless` | `true`, `false` | `rootless` |
//! | `device-worker-ng.retry` | JSON/YAML of `retry` | `retry` |
//! | `device-worker-ng.priority` (also a label) | an integer | `device-worker-ng/priority` |
//! | `device-worker-ng.profiles` | JSON/YAML of `profiles`, conditions may carry an `expression` | `profiles` (+ `configuration.profiles`) |
//! | `device-worker-ng.resources` | JSON/YAML `{limits, requests}` | a shell workload's `resources`, or a one-container pod's |
//! | `device-worker-ng.resources.<container>` | JSON/YAML `{limits, requests}` | that container's `resources` |
//!
//! Values go through the fields' own parsers, so they are exactly as strict. A `shell` (or
//! `k8s`) workload over a stock operator is an EdgeWorkload of `type: pod`: a shell workload's
//! PodSpec has one container whose `command`, `args`, `env`, `workingDir` and
//! `securityContext.runAsUser` define the process (the image is ignored).
//!
//! A profile of the profiles annotation whose conditions carry an `expression` defines its
//! device profile itself (the operator drops `configuration.profiles`): it is named
//! `<workload>:<profile>` on the device, so workloads never redefine each other's.
//!
//! Where both a field and its annotation are given, the field wins, and when they differ the
//! workload carries a notice (status, log, a heartbeat event) instead of being refused: the
//! outcome is the documented one, the field is what the typed API (the k4e operator, the
//! desired-state file) validated, and refusing would stop a running workload over a redundancy.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

use super::desired::{apply_retry, parse_kind, DesiredWorkload, Retry};
use super::name::{shown, WorkloadName};
use super::shell::{parse_resources, RawResources};
use super::{BackoffPolicy, WorkloadKind, PRIORITY_KEY};
use crate::cgroup::Limits;
use crate::flotta::messages::{
    DeviceProfile, ProfileCondition, ResourceQuota, WorkloadProfile, WorkloadProfileCondition,
};

/// What every device-worker-ng annotation key starts with (after the operator stripped
/// `podman/`). Kubernetes allows one `/` in a key, the one `podman/` takes: hence the dots.
pub const PREFIX: &str = "device-worker-ng.";
pub const KIND: &str = "device-worker-ng.kind";
pub const CRON: &str = "device-worker-ng.cron";
pub const ROOTLESS: &str = "device-worker-ng.rootless";
pub const RETRY: &str = "device-worker-ng.retry";
pub const PRIORITY: &str = "device-worker-ng.priority";
pub const PROFILES: &str = "device-worker-ng.profiles";
pub const RESOURCES: &str = "device-worker-ng.resources";
/// `device-worker-ng.resources.<container>`.
pub const RESOURCES_OF: &str = "device-worker-ng.resources.";

const KNOWN: [&str; 7] = [KIND, CRON, ROOTLESS, RETRY, PRIORITY, PROFILES, RESOURCES];

/// The workload as its annotations complete it.
#[derive(Debug)]
pub(super) struct Resolved {
    /// The fields, filled from the annotations where the field is absent.
    pub workload: DesiredWorkload,
    /// Annotations the fields override.
    pub notices: Vec<String>,
    /// Device profiles the profiles annotation defines.
    pub inline_profiles: Vec<DeviceProfile>,
}

/// (field, why), as the spec parsers report.
type Error = (String, String);

fn field(key: &str) -> String {
    format!("annotation {key}")
}

fn overridden(key: &str, annotation: &str, field: &str, value: &str) -> String {
    format!(
        "annotation {key} ('{}') differs from the field {field} ('{}'): the field is used",
        shown(annotation.trim()),
        shown(value.trim())
    )
}

/// The profiles annotation: the field's shape, plus an optional `expression` per condition.
#[derive(Debug, Deserialize)]
struct AnnotatedProfile {
    #[serde(default)]
    name: String,
    #[serde(default)]
    conditions: Vec<AnnotatedCondition>,
}

#[derive(Debug, Deserialize)]
struct AnnotatedCondition {
    #[serde(default)]
    name: String,
    #[serde(default)]
    expression: Option<String>,
    #[serde(default)]
    cpu: Option<ResourceQuota>,
}

/// Reads the device-worker-ng annotations of `w` into the fields they stand in for.
pub(super) fn resolve(w: &DesiredWorkload, name: &WorkloadName) -> Result<Resolved, Error> {
    let ann = &w.annotations;
    if let Some(k) = ann
        .keys()
        .filter(|k| k.starts_with(PREFIX))
        .find(|k| !KNOWN.contains(&k.as_str()) && !k.starts_with(RESOURCES_OF))
    {
        return Err((
            field(k),
            format!(
                "unknown device-worker-ng annotation (known: {}, {RESOURCES_OF}<container>)",
                KNOWN.join(", ")
            ),
        ));
    }
    let mut out = w.clone();
    let mut notices = Vec::new();

    if let Some(v) = ann.get(KIND) {
        let kind = parse_kind(v.trim()).map_err(|why| (field(KIND), why))?;
        match w.kind.as_deref() {
            None => out.kind = Some(v.trim().to_string()),
            Some(f) if parse_kind(f).ok() != Some(kind) => {
                notices.push(overridden(KIND, v, "kind", f))
            }
            Some(_) => {}
        }
    }
    if let Some(v) = ann.get(CRON) {
        crate::cron::Schedule::parse(v).map_err(|e| (field(CRON), e.to_string()))?;
        match w.cron.as_deref().filter(|c| !c.trim().is_empty()) {
            None => out.cron = Some(v.clone()),
            Some(f) if f.trim() != v.trim() => notices.push(overridden(CRON, v, "cron", f)),
            Some(_) => {}
        }
    }
    if let Some(v) = ann.get(ROOTLESS) {
        let rootless = match v.trim() {
            "true" => true,
            "false" => false,
            _ => {
                return Err((
                    field(ROOTLESS),
                    format!("'{}' is not true or false", shown(v)),
                ))
            }
        };
        match w.rootless {
            None => out.rootless = Some(rootless),
            Some(f) if f != rootless => {
                notices.push(overridden(ROOTLESS, v, "rootless", &f.to_string()))
            }
            Some(_) => {}
        }
    }
    if let Some(v) = ann.get(RETRY) {
        let retry: Retry = crate::yaml::from_str(v).map_err(|e| (field(RETRY), e.to_string()))?;
        apply_retry(&mut BackoffPolicy::default(), &retry).map_err(|why| (field(RETRY), why))?;
        match &w.retry {
            None => out.retry = Some(retry),
            Some(f) if *f != retry => notices.push(format!(
                "annotation {RETRY} differs from the field retry: the field is used"
            )),
            Some(_) => {}
        }
    }
    priority(w, &mut out, &mut notices)?;
    let inline_profiles = profiles(w, name, &mut out, &mut notices)?;

    let kind = out
        .kind
        .as_deref()
        .map_or(Ok(WorkloadKind::Pod), parse_kind);
    let specification = match kind {
        Ok(WorkloadKind::Shell) => shell_specification(w, &mut notices)?,
        Ok(WorkloadKind::Pod | WorkloadKind::K8s) => pod_specification(w, &mut notices)?,
        // The unknown kind is the field's error, reported with it.
        Err(_) => None,
    };
    if let Some(s) = specification {
        out.specification = s;
    }
    // Read here, they are no concern of podman's (whose `kube play` refuses annotation values
    // over 63 characters, which a resources annotation easily is) or of Kubernetes'.
    out.annotations.retain(|k, _| !k.starts_with(PREFIX));
    Ok(Resolved {
        workload: out,
        notices,
        inline_profiles,
    })
}

fn parse_priority(v: &str) -> Result<i32, String> {
    v.trim()
        .parse::<i32>()
        .map_err(|_| format!("'{}' is not a whole number", shown(v)))
}

/// `device-worker-ng/priority` holds two `/` with the operator's `podman/`: its twin
/// `device-worker-ng.priority` (a label or an annotation) stands in for it.
fn priority(
    w: &DesiredWorkload,
    out: &mut DesiredWorkload,
    notices: &mut Vec<String>,
) -> Result<(), Error> {
    let Some(v) = w
        .labels
        .get(PRIORITY)
        .or_else(|| w.annotations.get(PRIORITY))
    else {
        return Ok(());
    };
    let p = parse_priority(v).map_err(|why| (field(PRIORITY), why))?;
    match w
        .labels
        .get(PRIORITY_KEY)
        .or_else(|| w.annotations.get(PRIORITY_KEY))
    {
        None => {
            out.annotations.insert(PRIORITY_KEY.into(), p.to_string());
        }
        Some(f) if parse_priority(f).ok() != Some(p) => {
            notices.push(overridden(PRIORITY, v, PRIORITY_KEY, f))
        }
        Some(_) => {}
    }
    Ok(())
}

/// The profiles annotation: references to device profiles, or (conditions with expressions)
/// profiles of the workload's own.
fn profiles(
    w: &DesiredWorkload,
    name: &WorkloadName,
    out: &mut DesiredWorkload,
    notices: &mut Vec<String>,
) -> Result<Vec<DeviceProfile>, Error> {
    let Some(v) = w.annotations.get(PROFILES) else {
        return Ok(Vec::new());
    };
    let e = |why: String| (field(PROFILES), why);
    let annotated: Vec<AnnotatedProfile> =
        crate::yaml::from_str(v).map_err(|err| e(err.to_string()))?;
    let mut references = Vec::new();
    let mut defined = Vec::new();
    for (i, p) in annotated.into_iter().enumerate() {
        if p.name.trim().is_empty() {
            return Err(e(format!("profile #{i}: a profile without a name")));
        }
        let inline = p
            .conditions
            .iter()
            .filter(|c| c.expression.is_some())
            .count();
        if inline != 0 && inline != p.conditions.len() {
            return Err(e(format!(
                "profile '{}': either every condition has an expression (the workload defines the profile) or none has (a device profile)",
                shown(&p.name)
            )));
        }
        let scoped = if inline > 0 {
            format!("{name}:{}", p.name)
        } else {
            p.name.clone()
        };
        let mut seen = std::collections::BTreeSet::new();
        let mut conditions = Vec::new();
        for c in &p.conditions {
            if inline > 0 {
                if c.name.trim().is_empty() || !seen.insert(c.name.as_str()) {
                    return Err(e(format!(
                        "profile '{}': each condition needs a name of its own",
                        shown(&p.name)
                    )));
                }
                let expression = c.expression.clone().unwrap_or_default();
                crate::profiles::Expr::parse(&expression).map_err(|err| {
                    e(format!(
                        "profile '{}' condition '{}': '{}' {err}",
                        shown(&p.name),
                        shown(&c.name),
                        shown(&expression)
                    ))
                })?;
                conditions.push(ProfileCondition {
                    name: c.name.clone(),
                    expression,
                });
            }
        }
        if inline > 0 {
            defined.push(DeviceProfile {
                name: scoped.clone(),
                conditions,
            });
        }
        references.push(WorkloadProfile {
            name: scoped,
            conditions: p
                .conditions
                .into_iter()
                .map(|c| WorkloadProfileCondition {
                    name: c.name,
                    cpu: c.cpu,
                })
                .collect(),
        });
    }
    if w.profiles.is_empty() {
        out.profiles = references;
        Ok(defined)
    } else {
        if w.profiles != references {
            notices.push(format!(
                "annotation {PROFILES} differs from the field profiles: the field is used"
            ));
        }
        Ok(Vec::new())
    }
}

/// The resources an annotation gives, as the field's maps.
struct AnnotatedResources {
    key: String,
    raw: RawResources,
}

fn annotated_resources(key: &str, v: &str) -> Result<AnnotatedResources, Error> {
    let raw: RawResources = crate::yaml::from_str(v).map_err(|e| (field(key), e.to_string()))?;
    for (section, map) in [("limits", &raw.limits), ("requests", &raw.requests)] {
        parse_resources(section, map).map_err(|(f, why)| (field(key), format!("{f}: {why}")))?;
    }
    Ok(AnnotatedResources {
        key: key.to_string(),
        raw,
    })
}

/// One resource as the agent reads it (to compare a field with its annotation by value:
/// `64Mi` is `67108864`).
fn quantity(section: &str, k: &str, v: &Value) -> Option<Limits> {
    parse_resources(section, &BTreeMap::from([(k.to_string(), v.clone())])).ok()
}

/// Completes a `resources` mapping with what the annotation gives; the field's values win.
fn merge_resources(
    resources: &mut Value,
    a: &AnnotatedResources,
    of: &str,
    notices: &mut Vec<String>,
) {
    if matches!(resources, Value::Null) {
        *resources = Value::Mapping(Mapping::new());
    }
    // A malformed field is the field's error, reported by its parser.
    let Value::Mapping(res) = resources else {
        return;
    };
    for (section, given) in [("limits", &a.raw.limits), ("requests", &a.raw.requests)] {
        if given.is_empty() {
            continue;
        }
        let entry = res
            .entry(Value::from(section))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if matches!(entry, Value::Null) {
            *entry = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(map) = entry else {
            continue;
        };
        for (k, v) in given {
            match map.get(k.as_str()) {
                None => {
                    map.insert(Value::from(k.as_str()), v.clone());
                }
                Some(f) if quantity(section, k, f) != quantity(section, k, v) => {
                    notices.push(format!(
                        "annotation {} gives {of}{section}.{k} '{}', the field '{}': the field is used",
                        a.key,
                        shown(&scalar(v)),
                        shown(&scalar(f))
                    ));
                }
                Some(_) => {}
            }
        }
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => serde_yaml_ng::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// A shell workload's specification: the PodSpec of a stock operator's EdgeWorkload made the
/// shell's own shape, and the resources annotation merged in. `None`: unchanged.
fn shell_specification(
    w: &DesiredWorkload,
    notices: &mut Vec<String>,
) -> Result<Option<String>, Error> {
    if let Some(k) = w.annotations.keys().find(|k| k.starts_with(RESOURCES_OF)) {
        return Err((
            field(k),
            format!("a shell workload has no containers: its resources are {RESOURCES}"),
        ));
    }
    let annotated = match w.annotations.get(RESOURCES) {
        Some(v) => Some(annotated_resources(RESOURCES, v)?),
        None => None,
    };
    // Unparseable: the shell parser reports it.
    let Ok(Value::Mapping(spec)) = crate::yaml::from_str::<Value>(&w.specification) else {
        return Ok(None);
    };
    let pod_shaped = spec.contains_key("containers");
    if !pod_shaped && annotated.is_none() {
        return Ok(None);
    }
    let mut shell = if pod_shaped {
        shell_from_pod_spec(&spec)?
    } else {
        spec
    };
    if let Some(a) = &annotated {
        let res = shell.entry(Value::from("resources")).or_insert(Value::Null);
        merge_resources(res, a, "", notices);
    }
    serde_yaml_ng::to_string(&Value::Mapping(shell))
        .map(Some)
        .map_err(|e| ("specification".into(), e.to_string()))
}

/// The process a one-container PodSpec describes, in the shell spec's words.
fn shell_from_pod_spec(spec: &Mapping) -> Result<Mapping, Error> {
    const SUPPORTED: &str = "a shell workload takes containers[0].command, args, env, workingDir, securityContext.runAsUser, resources (the image is ignored) and restartPolicy";
    let e = |f: String| (format!("specification.{f}"), SUPPORTED.to_string());
    let key = |k: &Value| k.as_str().map(str::to_string).unwrap_or_else(|| scalar(k));
    for k in spec.keys() {
        let k = key(k);
        if k != "containers" && k != "restartPolicy" {
            return Err(e(k));
        }
    }
    let containers = match spec.get("containers") {
        Some(Value::Sequence(s)) if s.len() == 1 => s,
        _ => {
            return Err((
                "specification.containers".into(),
                "a shell workload runs one process: exactly one container".into(),
            ))
        }
    };
    let Value::Mapping(c) = &containers[0] else {
        return Err((
            "specification.containers[0]".into(),
            "expected a container mapping".into(),
        ));
    };
    let mut out = Mapping::new();
    for (k, v) in c {
        let k = key(k);
        match k.as_str() {
            // The process is the command: no image is pulled or run.
            "name" | "image" | "imagePullPolicy" => {}
            "command" | "args" | "env" | "workingDir" | "resources" => {
                out.insert(Value::from(k.as_str()), v.clone());
            }
            "securityContext" => {
                let Value::Mapping(sc) = v else {
                    return Err(e(format!("containers[0].{k}")));
                };
                for (sk, sv) in sc {
                    let sk = key(sk);
                    let uid = match (sk.as_str(), sv) {
                        ("runAsUser", Value::Number(n)) => {
                            n.as_u64().and_then(|u| u32::try_from(u).ok())
                        }
                        _ => None,
                    };
                    let Some(uid) = uid else {
                        return Err(e(format!("containers[0].securityContext.{sk}")));
                    };
                    // The shell driver runs `root` as the agent does, any other uid as itself.
                    let user = if uid == 0 {
                        "root".to_string()
                    } else {
                        uid.to_string()
                    };
                    out.insert(Value::from("user"), Value::from(user));
                }
            }
            _ => return Err(e(format!("containers[0].{k}"))),
        }
    }
    if let Some(p) = spec.get("restartPolicy") {
        out.insert(Value::from("restartPolicy"), p.clone());
    }
    Ok(out)
}

/// A pod's (or k8s workload's) specification with the resources annotations merged into its
/// containers. `None`: unchanged.
fn pod_specification(
    w: &DesiredWorkload,
    notices: &mut Vec<String>,
) -> Result<Option<String>, Error> {
    let mut given = Vec::new();
    for (k, v) in &w.annotations {
        let container = if k == RESOURCES {
            None
        } else if let Some(c) = k.strip_prefix(RESOURCES_OF) {
            Some(c)
        } else {
            continue;
        };
        given.push((container, annotated_resources(k, v)?));
    }
    if given.is_empty() {
        return Ok(None);
    }
    // A malformed PodSpec is the pod parser's to report.
    let Ok(Value::Mapping(mut spec)) = crate::yaml::from_str::<Value>(&w.specification) else {
        return Ok(None);
    };
    let Some(Value::Sequence(containers)) = spec.get_mut("containers") else {
        return Ok(None);
    };
    let names: Vec<Option<String>> = containers
        .iter()
        .map(|c| c.get("name").and_then(Value::as_str).map(str::to_string))
        .collect();
    let mut targeted = std::collections::BTreeSet::new();
    for (container, a) in &given {
        let i = match container {
            None if containers.len() == 1 => 0,
            None => {
                return Err((
                    field(RESOURCES),
                    format!(
                        "the pod has {} containers: give each its own {RESOURCES_OF}<container>",
                        containers.len()
                    ),
                ))
            }
            Some(c) => names
                .iter()
                .position(|n| n.as_deref() == Some(*c))
                .ok_or_else(|| {
                    (
                        field(&a.key),
                        format!("the pod has no container '{}'", shown(c)),
                    )
                })?,
        };
        if !targeted.insert(i) {
            return Err((
                field(&a.key),
                format!("{RESOURCES} and {RESOURCES_OF}<container> name the same container"),
            ));
        }
        let Some(Value::Mapping(c)) = containers.get_mut(i) else {
            return Ok(None);
        };
        let of = format!(
            "container {}: ",
            names[i].as_deref().map(shown).unwrap_or_default()
        );
        let res = c.entry(Value::from("resources")).or_insert(Value::Null);
        merge_resources(res, a, &of, notices);
    }
    serde_yaml_ng::to_string(&Value::Mapping(spec))
        .map(Some)
        .map_err(|e| ("specification".into(), e.to_string()))
}

#[cfg(test)]
mod tests;
