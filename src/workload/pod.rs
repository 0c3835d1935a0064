//! The `specification` of a `kind: pod` workload: a Kubernetes `PodSpec` as YAML (PROTOCOL §4.3),
//! run by podman. The agent parses it only as far as it must: to validate the shape podman
//! needs, to take `resources` into the workload's limits, and to render the `Pod` manifest
//! (plus the workload's ConfigMaps) that `podman kube play` reads.

use std::collections::BTreeMap;

use serde_yaml_ng::{Mapping, Value};

use super::shell::parse_resources;
use super::RestartPolicy;
use crate::cgroup::Limits;
use crate::config::is_rfc1123_name;

/// Label on every container the agent creates; finds a workload's pod after an agent restart.
pub const WORKLOAD_LABEL: &str = "device-worker-ng/workload";

/// Pids limit of a pod's cgroup when neither its spec nor DEFAULT_LIMITS names one (the
/// containers plus podman's infra container and one conmon per container live in it).
pub const DEFAULT_POD_PIDS: u64 = 1024;

/// Added to the sum of the containers' memory limits for the pod's own cgroup: the infra
/// (pause) container and the conmon monitors are charged there too. The containers' own
/// limits stay exact (podman sets them on each container's cgroup).
pub const POD_MEMORY_OVERHEAD: u64 = 32 << 20;

/// What the podman driver needs to run a pod workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpecData {
    /// The `Pod` document (name, labels, annotations, spec) followed by the ConfigMaps, as
    /// `podman kube play` reads it.
    pub manifest: String,
    /// Raw `.dockerconfigjson` for pulls (PROTOCOL §4.3 `imageRegistries.authFile`).
    pub auth_file: Option<String>,
    /// The device-worker-ng `rootless` extension (PROTOCOL §7).
    pub rootless: bool,
    /// App container names in spec order (podman names them `<pod>-<container>`).
    pub containers: Vec<String>,
}

/// The parts of a pod workload the agent derives from its PodSpec.
#[derive(Debug)]
pub(super) struct ParsedPod {
    pub data: PodSpecData,
    pub limits: Limits,
    pub requests: Limits,
    pub restart: RestartPolicy,
}

/// Inputs from the wire workload.
pub(super) struct PodInput<'a> {
    pub name: &'a str,
    pub specification: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub annotations: &'a BTreeMap<String, String>,
    pub configmaps: &'a [String],
    pub auth_file: Option<&'a str>,
    pub rootless: bool,
}

/// Validates the PodSpec and renders the manifest. The error is (field, why).
pub(super) fn parse_pod(input: &PodInput) -> Result<ParsedPod, (String, String)> {
    let spec: Value = crate::yaml::from_str(input.specification)
        .map_err(|err| fail("specification", err.to_string()))?;
    let Value::Mapping(mut spec) = spec else {
        return Err(fail("specification", "expected a PodSpec mapping".into()));
    };
    let containers = match spec.get("containers") {
        Some(Value::Sequence(s)) if !s.is_empty() => s,
        Some(Value::Sequence(_)) | None => {
            return Err(fail(
                "specification.containers",
                "must list at least one container".into(),
            ))
        }
        Some(_) => return Err(fail("specification.containers", "expected a list".into())),
    };
    let mut totals = PodTotals::default();
    for (i, c) in containers.iter().enumerate() {
        totals.add(&format!("specification.containers[{i}]"), c)?;
    }
    let restart = restart_policy(spec.get("restartPolicy"))?;
    // The workload machine restarts the pod (with backoff, counting failures and OOM kills);
    // podman restarting containers by itself would hide every exit from it.
    spec.insert("restartPolicy".into(), "Never".into());
    strip_pids(&mut spec);
    check_configmaps_and_auth(input)?;
    let limits = totals.limits();
    Ok(ParsedPod {
        data: PodSpecData {
            manifest: manifest(input, spec)?,
            auth_file: input.auth_file.map(str::to_string),
            rootless: input.rootless,
            containers: totals.names,
        },
        limits,
        requests: totals.requests,
        restart,
    })
}

fn fail(field: &str, why: String) -> (String, String) {
    (field.to_string(), why)
}

/// What the containers add up to, one container at a time.
struct PodTotals {
    names: Vec<String>,
    requests: Limits,
    /// A pod-level limit exists only if every container has one: `None` once one lacks it.
    memory: Option<u64>,
    cpu: Option<u64>,
    pids: Option<u64>,
}

impl Default for PodTotals {
    fn default() -> Self {
        PodTotals {
            names: Vec::new(),
            requests: Limits::default(),
            memory: Some(0),
            cpu: Some(0),
            pids: None,
        }
    }
}

impl PodTotals {
    /// Checks container `c` (at `field`) and adds its name, limits and requests.
    fn add(&mut self, field: &str, c: &Value) -> Result<(), (String, String)> {
        let Value::Mapping(c) = c else {
            return Err(fail(field, "expected a container mapping".into()));
        };
        let name = match c.get("name") {
            Some(Value::String(n)) if is_rfc1123_name(n) && !n.contains('.') => n.clone(),
            _ => {
                return Err(fail(
                    &format!("{field}.name"),
                    "must be a lowercase RFC 1123 label".into(),
                ))
            }
        };
        if self.names.contains(&name) {
            return Err(fail(
                &format!("{field}.name"),
                format!("duplicate container name '{name}'"),
            ));
        }
        match c.get("image") {
            Some(Value::String(img)) if !img.trim().is_empty() => {}
            _ => return Err(fail(&format!("{field}.image"), "must name an image".into())),
        }
        let empty = Mapping::new();
        let res = match c.get("resources") {
            None | Some(Value::Null) => &empty,
            Some(Value::Mapping(m)) => m,
            Some(_) => {
                return Err(fail(
                    &format!("{field}.resources"),
                    "expected a mapping".into(),
                ))
            }
        };
        let limits = resource_section(field, res, "limits")?;
        let requests = resource_section(field, res, "requests")?;
        self.memory = self.memory.zip(limits.memory_bytes).map(|(a, b)| a + b);
        self.cpu = self.cpu.zip(limits.cpu_millicores).map(|(a, b)| a + b);
        // `pids` is not a Kubernetes resource: the pod takes it (podman never sees it).
        if let Some(p) = limits.pids {
            self.pids = Some(self.pids.unwrap_or(0) + p);
        }
        self.requests.memory_bytes = sum(self.requests.memory_bytes, requests.memory_bytes);
        self.requests.cpu_millicores = sum(self.requests.cpu_millicores, requests.cpu_millicores);
        self.names.push(name);
        Ok(())
    }

    fn limits(&self) -> Limits {
        Limits {
            memory_bytes: self.memory.map(|m| m + POD_MEMORY_OVERHEAD),
            cpu_millicores: self.cpu,
            pids: self.pids,
        }
    }
}

/// The `limits` or `requests` (`key`) of one container's `resources`, as the agent's limits.
fn resource_section(field: &str, res: &Mapping, key: &str) -> Result<Limits, (String, String)> {
    let mut map = BTreeMap::new();
    match res.get(key) {
        None | Some(Value::Null) => {}
        Some(Value::Mapping(m)) => {
            for (k, v) in m {
                let Value::String(k) = k else {
                    return Err(fail(
                        &format!("{field}.resources.{key}"),
                        "keys must be strings".into(),
                    ));
                };
                // Kubernetes resources the agent does not limit are passed through.
                if k == "memory" || k == "cpu" || k == "pids" {
                    map.insert(k.clone(), v.clone());
                }
            }
        }
        Some(_) => {
            return Err(fail(
                &format!("{field}.resources.{key}"),
                "expected a mapping".into(),
            ))
        }
    }
    parse_resources(key, &map).map_err(|(f, why)| (format!("{field}.{f}"), why))
}

fn restart_policy(value: Option<&Value>) -> Result<RestartPolicy, (String, String)> {
    match value {
        None | Some(Value::Null) => Ok(RestartPolicy::Always),
        Some(Value::String(s)) if s == "Always" => Ok(RestartPolicy::Always),
        Some(Value::String(s)) if s == "OnFailure" => Ok(RestartPolicy::OnFailure),
        Some(Value::String(s)) if s == "Never" => Ok(RestartPolicy::Never),
        Some(other) => Err(fail(
            "specification.restartPolicy",
            format!("'{}' is not Always, OnFailure or Never", show(other)),
        )),
    }
}

/// ConfigMaps go to podman as they are, so only their kind is checked; the auth file must be JSON.
fn check_configmaps_and_auth(input: &PodInput) -> Result<(), (String, String)> {
    for (i, cm) in input.configmaps.iter().enumerate() {
        let field = format!("configmaps[{i}]");
        let v: Value = crate::yaml::from_str(cm).map_err(|err| fail(&field, err.to_string()))?;
        if v.get("kind").and_then(Value::as_str) != Some("ConfigMap") {
            return Err(fail(&field, "expected a document of kind ConfigMap".into()));
        }
    }
    if let Some(a) = input.auth_file {
        serde_json::from_str::<serde_json::Value>(a)
            .map_err(|err| fail("imageRegistries.authFile", format!("not JSON: {err}")))?;
    }
    Ok(())
}

/// The `Pod` document (with the agent's label) followed by the ConfigMaps.
fn manifest(input: &PodInput, spec: Mapping) -> Result<String, (String, String)> {
    let mut labels: BTreeMap<String, String> = input.labels.clone();
    labels.insert(WORKLOAD_LABEL.into(), input.name.into());
    let mut metadata = Mapping::new();
    metadata.insert("name".into(), input.name.into());
    metadata.insert("labels".into(), to_mapping(&labels));
    if !input.annotations.is_empty() {
        metadata.insert("annotations".into(), to_mapping(input.annotations));
    }
    let mut pod = Mapping::new();
    pod.insert("apiVersion".into(), "v1".into());
    pod.insert("kind".into(), "Pod".into());
    pod.insert("metadata".into(), Value::Mapping(metadata));
    pod.insert("spec".into(), Value::Mapping(spec));
    let mut manifest = serde_yaml_ng::to_string(&Value::Mapping(pod))
        .map_err(|err| fail("specification", err.to_string()))?;
    for cm in input.configmaps {
        manifest.push_str("---\n");
        manifest.push_str(cm.trim_end());
        manifest.push('\n');
    }
    Ok(manifest)
}

fn sum(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
    }
}

fn show(v: &Value) -> String {
    serde_yaml_ng::to_string(v)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn to_mapping(m: &BTreeMap<String, String>) -> Value {
    Value::Mapping(
        m.iter()
            .map(|(k, v)| (Value::from(k.as_str()), Value::from(v.as_str())))
            .collect(),
    )
}

/// Removes the agent's `pids` resource from every container (podman rejects unknown ones).
fn strip_pids(spec: &mut Mapping) {
    for key in ["containers", "initContainers"] {
        let Some(Value::Sequence(cs)) = spec.get_mut(key) else {
            continue;
        };
        for c in cs.iter_mut() {
            let Some(Value::Mapping(res)) = c.get_mut("resources") else {
                continue;
            };
            for section in ["limits", "requests"] {
                if let Some(Value::Mapping(m)) = res.get_mut(section) {
                    m.remove("pids");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(
        spec: &'a str,
        cms: &'a [String],
        empty: &'a BTreeMap<String, String>,
    ) -> PodInput<'a> {
        PodInput {
            name: "web",
            specification: spec,
            labels: empty,
            annotations: empty,
            configmaps: cms,
            auth_file: None,
            rootless: false,
        }
    }

    #[test]
    fn limits_are_summed_over_containers_and_manifest_is_rendered() {
        let spec = "containers:\n- name: a\n  image: x\n  resources:\n    limits: {memory: 64Mi, cpu: 250m}\n    requests: {memory: 32Mi}\n- name: b\n  image: y\n  resources:\n    limits: {memory: 16Mi, cpu: 100m, pids: 10}\nrestartPolicy: OnFailure\n";
        let cms = vec![
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {A: b}\n".to_string(),
        ];
        let empty = BTreeMap::new();
        let p = parse_pod(&input(spec, &cms, &empty)).unwrap();
        assert_eq!(
            p.limits.memory_bytes,
            Some((80 << 20) + POD_MEMORY_OVERHEAD)
        );
        assert_eq!(p.limits.cpu_millicores, Some(350));
        assert_eq!(p.limits.pids, Some(10));
        assert_eq!(p.requests.memory_bytes, Some(32 << 20));
        assert_eq!(p.restart, RestartPolicy::OnFailure);
        assert_eq!(p.data.containers, vec!["a", "b"]);
        let docs: Vec<&str> = p.data.manifest.split("---\n").collect();
        assert_eq!(docs.len(), 2);
        let pod: Value = serde_yaml_ng::from_str(docs[0]).unwrap();
        assert_eq!(pod["metadata"]["name"], Value::from("web"));
        assert_eq!(
            pod["metadata"]["labels"][WORKLOAD_LABEL],
            Value::from("web")
        );
        assert_eq!(pod["spec"]["restartPolicy"], Value::from("Never"));
        assert!(pod["spec"]["containers"][1]["resources"]["limits"]
            .get("pids")
            .is_none());
        assert!(docs[1].contains("kind: ConfigMap"));
    }

    #[test]
    fn a_container_without_a_limit_leaves_the_pod_unlimited() {
        let spec = "containers:\n- name: a\n  image: x\n  resources: {limits: {memory: 64Mi}}\n- name: b\n  image: y\n  resources: {}\n";
        let empty = BTreeMap::new();
        let p = parse_pod(&input(spec, &[], &empty)).unwrap();
        assert_eq!(p.limits.memory_bytes, None);
        assert_eq!(p.limits.cpu_millicores, None);
        assert_eq!(p.limits.pids, None, "left to DEFAULT_LIMITS");
        assert_eq!(p.restart, RestartPolicy::Always);
    }

    #[test]
    fn bad_pod_specs_name_the_field() {
        let empty = BTreeMap::new();
        let cases = [
            ("containers: [", "specification"),
            ("- a", "specification"),
            ("containers: []", "specification.containers"),
            (
                "containers: [{name: a}]",
                "specification.containers[0].image",
            ),
            (
                "containers: [{name: A_b, image: x}]",
                "specification.containers[0].name",
            ),
            (
                "containers: [{name: a, image: x}, {name: a, image: y}]",
                "specification.containers[1].name",
            ),
            (
                "containers: [{name: a, image: x, resources: {limits: {memory: lots}}}]",
                "specification.containers[0].resources.limits.memory",
            ),
            (
                "containers: [{name: a, image: x}]\nrestartPolicy: Sometimes",
                "specification.restartPolicy",
            ),
        ];
        for (spec, field) in cases {
            let err = parse_pod(&input(spec, &[], &empty)).unwrap_err();
            assert_eq!(err.0, field, "{spec}: {err:?}");
        }
        let cms = vec!["kind: Secret".to_string()];
        let err = parse_pod(&input("containers: [{name: a, image: x}]", &cms, &empty)).unwrap_err();
        assert_eq!(err.0, "configmaps[0]");
    }
}
