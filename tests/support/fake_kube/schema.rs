//! What the API server fills in and what it refuses (KUBE-API.md 7, 8), for the kinds the
//! fake serves. Defaults are owned by no manager; validation sees the whole merged object, as
//! the real server's does, and answers `422 Invalid` with one cause per field.

use serde_json::{json, Map, Value};

/// Fills in what was not given, as the API server's defaulting does.
pub fn default(kind: &str, o: &mut Value) {
    match kind {
        "Deployment" => {
            let spec = ensure(o, "spec");
            put_absent(spec, "replicas", json!(1));
            put_absent(spec, "revisionHistoryLimit", json!(10));
            put_absent(spec, "progressDeadlineSeconds", json!(600));
            let strategy = ensure(spec, "strategy");
            put_absent(strategy, "type", json!("RollingUpdate"));
            if strategy["type"] == "RollingUpdate" {
                let ru = ensure(strategy, "rollingUpdate");
                put_absent(ru, "maxUnavailable", json!("25%"));
                put_absent(ru, "maxSurge", json!("25%"));
            }
            template(ensure(spec, "template"));
        }
        "ReplicaSet" => {
            let spec = ensure(o, "spec");
            put_absent(spec, "replicas", json!(1));
            template(ensure(spec, "template"));
        }
        "Pod" => {
            let spec = ensure(o, "spec");
            pod_spec(spec);
            put_absent(spec, "enableServiceLinks", json!(true));
            put_absent(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
            put_absent(spec, "priority", json!(0));
        }
        "Secret" => put_absent(o, "type", json!("Opaque")),
        _ => {}
    }
}

fn template(t: &mut Value) {
    let meta = ensure(t, "metadata");
    put_absent(meta, "creationTimestamp", Value::Null);
    pod_spec(ensure(t, "spec"));
}

fn pod_spec(spec: &mut Value) {
    put_absent(spec, "restartPolicy", json!("Always"));
    put_absent(spec, "terminationGracePeriodSeconds", json!(30));
    put_absent(spec, "dnsPolicy", json!("ClusterFirst"));
    put_absent(spec, "securityContext", json!({}));
    put_absent(spec, "schedulerName", json!("default-scheduler"));
    for key in ["initContainers", "containers"] {
        for c in spec
            .get_mut(key)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let image = c["image"].as_str().unwrap_or_default().to_string();
            put_absent(c, "imagePullPolicy", json!(pull_policy(&image)));
            put_absent(c, "terminationMessagePath", json!("/dev/termination-log"));
            put_absent(c, "terminationMessagePolicy", json!("File"));
            put_absent(c, "resources", json!({}));
            for p in c
                .get_mut("ports")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                put_absent(p, "protocol", json!("TCP"));
            }
        }
    }
}

/// `Always` for an untagged image or `:latest`, else `IfNotPresent`.
fn pull_policy(image: &str) -> &'static str {
    let name = image.split('@').next().unwrap_or(image);
    let last = name.rsplit('/').next().unwrap_or(name);
    match last.split_once(':') {
        Some((_, "latest")) | None if !image.contains('@') => "Always",
        _ => "IfNotPresent",
    }
}

fn ensure<'a>(v: &'a mut Value, key: &str) -> &'a mut Value {
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    let m = v.as_object_mut().expect("an object");
    let e = m.entry(key).or_insert_with(|| Value::Object(Map::new()));
    if e.is_null() {
        *e = Value::Object(Map::new());
    }
    e
}

fn put_absent(v: &mut Value, key: &str, value: Value) {
    if let Some(m) = v.as_object_mut() {
        m.entry(key).or_insert(value);
    }
}

/// One refused field: (`spec.x`, `Required value` / `Invalid value: ...`).
pub type Cause = (String, String);

/// What the API server's validation refuses in the whole object (`old`: the object before an
/// update, for immutable fields).
pub fn validate(kind: &str, o: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    let name = o["metadata"]["name"].as_str().unwrap_or_default();
    if !is_subdomain(name) {
        causes.push((
            "metadata.name".into(),
            format!("Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"),
        ));
    }
    match kind {
        "Deployment" | "ReplicaSet" => {
            let spec = &o["spec"];
            if let Some(r) = spec["replicas"].as_i64() {
                if r < 0 {
                    causes.push((
                        "spec.replicas".into(),
                        format!("Invalid value: {r}: must be greater than or equal to 0"),
                    ));
                }
            }
            let sel = &spec["selector"]["matchLabels"];
            let labels = &spec["template"]["metadata"]["labels"];
            match sel.as_object() {
                None => causes.push(("spec.selector".into(), "Required value".into())),
                Some(s) if s.is_empty() => causes.push((
                    "spec.selector".into(),
                    "Invalid value: v1.LabelSelector{MatchLabels:map[string]string(nil), MatchExpressions:[]v1.LabelSelectorRequirement(nil)}: empty selector is invalid for deployment".into(),
                )),
                Some(s) => {
                    if s.iter().any(|(k, v)| labels[k] != *v) {
                        causes.push((
                            "spec.template.metadata.labels".into(),
                            format!("Invalid value: {}: `selector` does not match template `labels`", go_map(labels)),
                        ));
                    }
                }
            }
            if let Some(old) = old {
                if old["spec"]["selector"] != spec["selector"] {
                    causes.push((
                        "spec.selector".into(),
                        format!(
                            "Invalid value: {}: field is immutable",
                            go_selector(&spec["selector"])
                        ),
                    ));
                }
            }
            if kind == "Deployment" {
                let rp = &spec["template"]["spec"]["restartPolicy"];
                if rp.as_str().is_some_and(|p| p != "Always") {
                    causes.push((
                        "spec.template.spec.restartPolicy".into(),
                        format!("Unsupported value: {rp}: supported values: \"Always\""),
                    ));
                }
            }
            pod_spec_causes(&spec["template"]["spec"], "spec.template.spec", &mut causes);
        }
        "Pod" => pod_spec_causes(&o["spec"], "spec", &mut causes),
        "ConfigMap" | "Secret" => {
            for field in ["data", "binaryData", "stringData"] {
                for (k, v) in o[field].as_object().into_iter().flatten() {
                    if !is_config_key(k) {
                        causes.push((format!("{field}[{k}]"), format!("Invalid value: {k:?}: a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')")));
                    }
                    if kind == "Secret" && field == "data" {
                        let ok = v.as_str().is_some_and(|s| {
                            use base64::Engine as _;
                            base64::engine::general_purpose::STANDARD.decode(s).is_ok()
                        });
                        if !ok {
                            causes.push((
                                format!("data[{k}]"),
                                "Invalid value: illegal base64 data".into(),
                            ));
                        }
                    }
                }
            }
        }
        _ => {}
    }
    causes
}

fn pod_spec_causes(spec: &Value, at: &str, causes: &mut Vec<Cause>) {
    let containers = spec["containers"].as_array();
    if containers.map_or(true, |c| c.is_empty()) {
        causes.push((format!("{at}.containers"), "Required value".into()));
    }
    if let Some(g) = spec["terminationGracePeriodSeconds"].as_i64() {
        if g < 0 {
            causes.push((
                format!("{at}.terminationGracePeriodSeconds"),
                format!("Invalid value: {g}: must be greater than or equal to 0"),
            ));
        }
    }
    let mut names = Vec::new();
    for key in ["initContainers", "containers"] {
        for (i, c) in spec[key].as_array().into_iter().flatten().enumerate() {
            let path = format!("{at}.{key}[{i}]");
            match c["name"].as_str() {
                None | Some("") => causes.push((format!("{path}.name"), "Required value".into())),
                Some(n) if names.contains(&n) => {
                    causes.push((format!("{path}.name"), format!("Duplicate value: {n:?}")))
                }
                Some(n) => names.push(n),
            }
            if c["image"].as_str().map_or(true, |s| s.trim().is_empty()) {
                causes.push((format!("{path}.image"), "Required value".into()));
            }
            for (j, p) in c["ports"].as_array().into_iter().flatten().enumerate() {
                let port = p["containerPort"].as_i64().unwrap_or(0);
                if !(1..=65535).contains(&port) {
                    causes.push((
                        format!("{path}.ports[{j}].containerPort"),
                        format!("Invalid value: {port}: must be between 1 and 65535, inclusive"),
                    ));
                }
            }
            resources(&c["resources"], &format!("{path}.resources"), causes);
        }
    }
}

/// Quantities parse, and each request is at most its limit (v1.24 wording).
fn resources(r: &Value, at: &str, causes: &mut Vec<Cause>) {
    let mut parsed = |section: &str| -> Vec<(String, String, f64)> {
        let mut out = Vec::new();
        for (name, q) in r[section].as_object().into_iter().flatten() {
            let text = match q {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            match quantity(&text) {
                Some(v) => out.push((name.clone(), text, v)),
                None => causes.push((
                    format!("{at}.{section}[{name}]"),
                    format!("Invalid value: {text:?}: quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"),
                )),
            }
        }
        out
    };
    let limits = parsed("limits");
    let requests = parsed("requests");
    for (name, text, v) in &requests {
        if let Some((_, _, limit)) = limits.iter().find(|(n, _, _)| n == name) {
            if v > limit {
                causes.push((
                    format!("{at}.requests"),
                    format!("Invalid value: {text:?}: must be less than or equal to {name} limit"),
                ));
            }
        }
    }
}

/// A Kubernetes quantity (`250m`, `64Mi`, `1.5G`, `2e3`) as a number.
pub fn quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(end);
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    Some(n * mult)
}

pub fn is_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn is_config_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 253
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A label map as Go's `%#v` prints it.
fn go_map(v: &Value) -> String {
    let items: Vec<String> = v
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k:?}:{}", v))
        .collect();
    format!("map[string]string{{{}}}", items.join(", "))
}

fn go_selector(v: &Value) -> String {
    format!(
        "v1.LabelSelector{{MatchLabels:{}, MatchExpressions:[]v1.LabelSelectorRequirement(nil)}}",
        go_map(&v["matchLabels"])
    )
}
