//! Field ownership as the API server tracks it for server-side apply (KUBE-API.md 1-3): each
//! manager (name + operation, and `status` for status writers) owns a set of field paths; an
//! apply sets exactly the fields it sends, drops the fields its manager sent last time and
//! sends no more (unless another manager also owns them), and conflicts only where another
//! manager owns a field whose value it would change.
//!
//! Lists follow the Kubernetes schema's list types for the fields a workload uses: containers,
//! env, volumes, imagePullSecrets (by `name`), volumeMounts (by `mountPath`), ports (by
//! `containerPort`) are associative; every other list is atomic (owned and replaced whole).

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    Field(String),
    /// An item of an associative list, by its key fields (field name, JSON value).
    Key(Vec<(String, String)>),
}

pub type Path = Vec<Step>;
pub type FieldSet = BTreeSet<Path>;

/// One entry of `metadata.managedFields`.
#[derive(Debug, Clone)]
pub struct Manager {
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: &'static str,
    pub api_version: String,
    /// `status` for writers of the status subresource.
    pub subresource: Option<&'static str>,
    pub time: String,
    pub fields: FieldSet,
}

impl Manager {
    pub fn is(&self, manager: &str, operation: &str, subresource: Option<&str>) -> bool {
        self.manager == manager && self.operation == operation && self.subresource == subresource
    }

    /// How a conflict names the manager (apimachinery's `printManager`).
    pub fn printed(&self) -> String {
        let mut s = format!("{:?}", self.manager);
        if let Some(sub) = self.subresource {
            s.push_str(&format!(" with subresource {sub:?}"));
        }
        if self.operation == "Update" {
            s.push_str(&format!(" using {}", self.api_version));
        }
        s
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "manager": self.manager,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": fields_v1(&self.fields),
        });
        if let Some(s) = self.subresource {
            v["subresource"] = json!(s);
        }
        v
    }
}

fn list_keys(field: &str) -> Option<&'static [&'static str]> {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets" => Some(&["name"]),
        "volumeMounts" => Some(&["mountPath"]),
        "ports" => Some(&["containerPort"]),
        _ => None,
    }
}

/// The key of an item of the associative list `field`, or `None` when it has no key (the list
/// is then handled as atomic).
fn item_key(field: &str, item: &Value) -> Option<Vec<(String, String)>> {
    let keys = list_keys(field)?;
    keys.iter()
        .map(|k| item.get(*k).map(|v| (k.to_string(), json_text(v))))
        .collect()
}

/// A key field's value as the key holds it (its JSON text).
fn json_text(v: &Value) -> String {
    v.to_string()
}

fn is_associative(field: &str, items: &[Value]) -> bool {
    list_keys(field).is_some() && items.iter().all(|i| item_key(field, i).is_some())
}

/// The fields of an object that apply and update manage: labels and annotations, and
/// everything but `apiVersion`, `kind`, `metadata` and `status` (the status subresource's).
pub fn managed_leaves(obj: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    for (k, v) in obj.as_object().into_iter().flatten() {
        match k.as_str() {
            "apiVersion" | "kind" | "status" => {}
            "metadata" => {
                for m in ["labels", "annotations"] {
                    if let Some(x) = v.get(m) {
                        let p = vec![Step::Field("metadata".into()), Step::Field(m.into())];
                        leaves(x, m, &p, &mut out);
                    }
                }
            }
            _ => leaves(v, k, &[Step::Field(k.clone())], &mut out),
        }
    }
    out
}

/// The leaves of an object's `status`.
pub fn status_leaves(obj: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    if let Some(s) = obj.get("status") {
        leaves(s, "status", &[Step::Field("status".into())], &mut out);
    }
    out
}

fn leaves(v: &Value, field: &str, prefix: &[Step], out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                let mut p = prefix.to_vec();
                p.push(Step::Field(k.clone()));
                leaves(c, k, &p, out);
            }
        }
        Value::Array(items) if !items.is_empty() && is_associative(field, items) => {
            for item in items {
                let Some(key) = item_key(field, item) else {
                    continue;
                };
                let mut p = prefix.to_vec();
                p.push(Step::Key(key));
                out.insert(p.clone());
                leaves(item, "", &p, out);
            }
        }
        _ => {
            out.insert(prefix.to_vec());
        }
    }
}

/// The value at a path.
pub fn get<'a>(v: &'a Value, path: &[Step]) -> Option<&'a Value> {
    let mut cur = v;
    for s in path {
        cur = match s {
            Step::Field(f) => cur.get(f)?,
            Step::Key(k) => cur.as_array()?.iter().find(|i| matches_key(i, k))?,
        };
    }
    Some(cur)
}

fn matches_key(item: &Value, key: &[(String, String)]) -> bool {
    key.iter()
        .all(|(f, v)| item.get(f).map(json_text).as_ref() == Some(v))
}

/// Sets the value at `path` from `source` (the applied object): creates what is missing on the
/// way; an empty mapping or a list item is only made to exist, never overwritten.
fn set_from(target: &mut Value, source: &Value, path: &[Step]) {
    let Some(value) = get(source, path) else {
        return;
    };
    let mut cur = target;
    for (i, s) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        match s {
            Step::Field(f) => {
                if !cur.is_object() {
                    *cur = Value::Object(Map::new());
                }
                let m = cur.as_object_mut().expect("an object");
                if last {
                    let keep = value.as_object().is_some_and(|o| o.is_empty())
                        && m.get(f).is_some_and(Value::is_object);
                    if !keep {
                        m.insert(f.clone(), value.clone());
                    }
                    return;
                }
                cur = m.entry(f.clone()).or_insert(Value::Null);
            }
            Step::Key(k) => {
                if !cur.is_array() {
                    *cur = Value::Array(Vec::new());
                }
                let a = cur.as_array_mut().expect("an array");
                let pos = match a.iter().position(|x| matches_key(x, k)) {
                    Some(p) => p,
                    None => {
                        let mut item = Map::new();
                        for (f, v) in k {
                            item.insert(f.clone(), serde_json::from_str(v).unwrap_or(Value::Null));
                        }
                        a.push(Value::Object(item));
                        a.len() - 1
                    }
                };
                cur = &mut a[pos];
                if last {
                    return;
                }
            }
        }
    }
}

/// Removes the value at `path` (a field or a list item).
fn remove(target: &mut Value, path: &[Step]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = target;
    for s in parents {
        let next = match s {
            Step::Field(f) => cur.get_mut(f),
            Step::Key(k) => cur
                .as_array_mut()
                .and_then(|a| a.iter_mut().find(|i| matches_key(i, k))),
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    match last {
        Step::Field(f) => {
            if let Some(m) = cur.as_object_mut() {
                m.remove(f);
            }
        }
        Step::Key(k) => {
            if let Some(a) = cur.as_array_mut() {
                a.retain(|i| !matches_key(i, k));
            }
        }
    }
}

fn is_prefix(p: &[Step], of: &[Step]) -> bool {
    of.len() >= p.len() && of[..p.len()] == *p
}

/// `.spec.template.spec.containers[name="app"].image`, as conflicts name fields.
pub fn display(path: &[Step]) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::Field(f) => {
                s.push('.');
                s.push_str(f);
            }
            Step::Key(k) => {
                let parts: Vec<String> = k.iter().map(|(f, v)| format!("{f}={v}")).collect();
                s.push_str(&format!("[{}]", parts.join(",")));
            }
        }
    }
    s
}

/// A field set as `fieldsV1` (`{"f:spec": {"f:replicas": {}}}`, list items `k:{"name":"a"}`
/// with `"."` for the item itself).
pub fn fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut cur = &mut root;
        for step in path {
            let k = match step {
                Step::Field(f) => format!("f:{f}"),
                Step::Key(k) => {
                    let m: Map<String, Value> = k
                        .iter()
                        .map(|(f, v)| (f.clone(), serde_json::from_str(v).unwrap_or(Value::Null)))
                        .collect();
                    format!("k:{}", Value::Object(m))
                }
            };
            let e = cur.entry(k).or_insert_with(|| Value::Object(Map::new()));
            cur = e.as_object_mut().expect("an object");
        }
        if matches!(path.last(), Some(Step::Key(_))) {
            cur.insert(".".into(), json!({}));
        }
    }
    Value::Object(root)
}

/// A field another manager owns with a different value than the apply sends.
#[derive(Debug, Clone)]
pub struct Conflict {
    pub manager: String,
    pub path: Path,
}

/// The outcome of an apply: the merged object and the managers after it.
pub struct Applied {
    pub object: Value,
    pub managers: Vec<Manager>,
}

/// Server-side apply of `applied` by `manager` onto `current` (an empty object when the object
/// is created). Without `force`, conflicts are the error; with it, their fields change hands.
pub fn apply(
    current: &Value,
    managers: &[Manager],
    applied: &Value,
    manager: &str,
    api_version: &str,
    force: bool,
    now: &str,
) -> Result<Applied, Vec<Conflict>> {
    let mine = managed_leaves(applied);
    let mut conflicts = Vec::new();
    for p in &mine {
        if matches!(p.last(), Some(Step::Key(_))) {
            continue;
        }
        let theirs = get(current, p);
        let ours = get(applied, p);
        let differs = match (theirs, ours) {
            (Some(Value::Object(_)), Some(Value::Object(o))) if o.is_empty() => false,
            (a, b) => a != b,
        };
        if !differs {
            continue;
        }
        for m in managers {
            if m.is(manager, "Apply", None) || !m.fields.contains(p) {
                continue;
            }
            conflicts.push(Conflict {
                manager: m.printed(),
                path: p.clone(),
            });
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    let mut managers: Vec<Manager> = managers.to_vec();
    for c in &conflicts {
        for m in managers.iter_mut() {
            if !m.is(manager, "Apply", None) {
                m.fields.remove(&c.path);
            }
        }
    }
    let previous: FieldSet = managers
        .iter()
        .find(|m| m.is(manager, "Apply", None))
        .map(|m| m.fields.clone())
        .unwrap_or_default();
    let mut object = current.clone();
    for p in &mine {
        set_from(&mut object, applied, p);
    }
    // What this manager applied before and no longer does goes, unless someone else owns it
    // (or something under it).
    let others: Vec<&Manager> = managers
        .iter()
        .filter(|m| !m.is(manager, "Apply", None))
        .collect();
    for p in previous.iter().rev() {
        if mine.contains(p) || mine.iter().any(|q| is_prefix(p, q)) {
            continue;
        }
        if others
            .iter()
            .any(|m| m.fields.iter().any(|q| is_prefix(p, q)))
        {
            continue;
        }
        remove(&mut object, p);
        prune_empty_parents(&mut object, p, &managers);
    }
    match managers.iter_mut().find(|m| m.is(manager, "Apply", None)) {
        Some(m) => {
            if m.fields != mine {
                m.time = now.to_string();
            }
            m.fields = mine;
            m.api_version = api_version.to_string();
        }
        None => managers.push(Manager {
            manager: manager.to_string(),
            operation: "Apply",
            api_version: api_version.to_string(),
            subresource: None,
            time: now.to_string(),
            fields: mine,
        }),
    }
    managers.retain(|m| !m.fields.is_empty());
    Ok(Applied { object, managers })
}

/// A mapping left empty by a removal goes too, unless someone owns it.
fn prune_empty_parents(object: &mut Value, path: &[Step], managers: &[Manager]) {
    let mut p = path.to_vec();
    while p.len() > 2 {
        p.pop();
        let empty = get(object, &p).is_some_and(|v| v.as_object().is_some_and(|m| m.is_empty()));
        let owned = managers.iter().any(|m| m.fields.contains(&p));
        if !empty || owned {
            return;
        }
        remove(object, &p);
    }
}

/// Ownership after an update (a merge patch, a controller's write) by `manager`: the fields it
/// changed become its own and nobody else's; fields that disappeared are nobody's.
pub fn update(
    before: &Value,
    after: &Value,
    managers: &mut Vec<Manager>,
    manager: &str,
    api_version: &str,
    now: &str,
) {
    let old = managed_leaves(before);
    let new = managed_leaves(after);
    let changed: FieldSet = new
        .iter()
        .filter(|p| !old.contains(*p) || get(before, p) != get(after, p))
        .cloned()
        .collect();
    let gone: FieldSet = old.difference(&new).cloned().collect();
    for m in managers.iter_mut() {
        m.fields.retain(|p| !gone.contains(p));
        if !m.is(manager, "Update", None) {
            m.fields.retain(|p| !changed.contains(p));
        }
    }
    if !changed.is_empty() {
        match managers.iter_mut().find(|m| m.is(manager, "Update", None)) {
            Some(m) => {
                m.fields.extend(changed);
                m.time = now.to_string();
            }
            None => managers.push(Manager {
                manager: manager.to_string(),
                operation: "Update",
                api_version: api_version.to_string(),
                subresource: None,
                time: now.to_string(),
                fields: changed,
            }),
        }
    }
    managers.retain(|m| !m.fields.is_empty());
}

/// A status writer (`kube-controller-manager Update status`, the kubelet) owns the status it
/// wrote.
pub fn status_written(
    obj: &Value,
    managers: &mut Vec<Manager>,
    manager: &str,
    api_version: &str,
    now: &str,
) {
    let fields = status_leaves(obj);
    for m in managers.iter_mut() {
        if m.subresource == Some("status") && m.manager != manager {
            m.fields.retain(|p| !fields.contains(p));
        }
    }
    match managers
        .iter_mut()
        .find(|m| m.is(manager, "Update", Some("status")))
    {
        Some(m) => {
            m.fields = fields;
            m.time = now.to_string();
        }
        None => managers.push(Manager {
            manager: manager.to_string(),
            operation: "Update",
            api_version: api_version.to_string(),
            subresource: Some("status"),
            time: now.to_string(),
            fields,
        }),
    }
    managers.retain(|m| !m.fields.is_empty());
}
