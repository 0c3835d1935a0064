//! The MicroShift driver: a `k8s` (alias `microshift`) workload (PROTOCOL §7) runs as a
//! Deployment on the local Kubernetes API named by KUBECONFIG, not in a cgroup of the agent.
//!
//! **Objects.** One Deployment per workload (1 replica, `Recreate`, the workload's PodSpec),
//! the workload's ConfigMaps, the Secrets of the desired state it references and, with an
//! auth file, a pull secret; all in the workload's namespace (`default` when none), all
//! labelled `app.kubernetes.io/managed-by: device-worker-ng` (the Deployment and its pods
//! also `device-worker-ng/workload: <name>`). Applied with server-side apply under the field
//! manager `device-worker-ng` and `force=true`. An object of the same name that exists
//! without our label is never taken over: the start fails with that reason.
//!
//! **Removal.** Only objects that carry our label are changed or deleted. ConfigMaps and
//! Secrets may be shared by several workloads, so they are garbage collected by reference:
//! after each apply and each removal, every one of ours that no Deployment of ours in its
//! namespace refers to is deleted.
//!
//! **Runs.** There is no local process (`Started.pid` is `None`): the run is the Deployment's
//! pod. `start` applies and returns at once; the run is then watched by polling (every
//! `poll_interval`, on the reactor, its blocking look on the blocking pool): while the pod is
//! not available the workload stays `starting` (or becomes `unavailable`) with the
//! scheduler's, the kubelet's or the API's reason; the run ends when the pod crashes (or the
//! kubelet restarts a container) or the Deployment is scaled to 0 or gone. `stop` scales the
//! Deployment to 0 (the pods get their own termination grace period, then are deleted with
//! grace 0 after `grace`); `cleanup` deletes it.
//!
//! Tested against a fake API server (tests/support/fake_kube.rs), not a live MicroShift.

pub mod api;
pub mod kubeconfig;
pub mod objects;
pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

pub use api::{ApiTimeouts, KubeClient, Resource, FIELD_MANAGER};
pub use status::{assess, Health};

use super::{Driver, DriverError, Placement, Poll, Run, RunEnd, Started, Watch};
use crate::store::WorkloadRecord;
use crate::workload::{DesiredSecret, WorkloadSpec, WORKLOAD_LABEL};
use objects::{
    owned_selector, workload_selector, Object, WorkloadObjects, MANAGED_BY, MANAGED_BY_LABEL,
};

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("KUBECONFIG is not set: k8s workloads need the kubeconfig of the local MicroShift")]
    NotConfigured,
    #[error("kubeconfig {path}: {why}")]
    Kubeconfig { path: String, why: String },
    #[error("kubeconfig credentials: {0}")]
    Credentials(String),
    #[error("Kubernetes API {server} unreachable ({op}): {why}")]
    Unreachable {
        server: String,
        op: String,
        why: String,
    },
    #[error("{op}: 401 Unauthorized: the Kubernetes API rejected the kubeconfig's credentials")]
    Unauthorized { op: String },
    #[error("{op}: 403 Forbidden: {message}")]
    Forbidden { op: String, message: String },
    #[error("{op}: 409 Conflict: {message}")]
    Conflict { op: String, message: String },
    #[error("{op}: 422 Invalid: {message}")]
    Invalid { op: String, message: String },
    #[error("{op}: {status} {reason}: {message}")]
    Api {
        op: String,
        status: u16,
        reason: String,
        message: String,
    },
    #[error("{op}: malformed response: {why}")]
    Malformed { op: String, why: String },
    #[error("{kind} {namespace}/{name} exists and is not managed by device-worker-ng: not taking it over")]
    NotOurs {
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error("secret {name}: {why}")]
    Secret { name: String, why: String },
    #[error("not a k8s workload: {0}")]
    Manifest(String),
    /// The pod failed while the agent waited for it to run.
    #[error("{0}")]
    Crashed(String),
    /// The Deployment went away (or to 0 replicas) while the agent waited for it.
    #[error("{0}")]
    Stopped(String),
}

impl K8sError {
    /// Failures that may pass without a change on the device: the API is down or busy, or an
    /// object changed under us. Credentials, permissions and invalid objects need a fix.
    pub fn is_retryable(&self) -> bool {
        match self {
            K8sError::Unreachable { .. } | K8sError::Conflict { .. } => true,
            K8sError::Api { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// Driver settings (from the agent's configuration).
#[derive(Debug, Clone)]
pub struct K8sSettings {
    /// KUBECONFIG: one file, read again when it changes (rotated credentials).
    pub kubeconfig: Option<PathBuf>,
    /// Between two looks at a Deployment and its pods.
    pub poll_interval: Duration,
    /// How long a waiter tolerates an unanswering API before it ends the run (the restart
    /// then reports the API's error as the reason).
    pub api_patience: Duration,
    pub timeouts: ApiTimeouts,
}

impl Default for K8sSettings {
    fn default() -> Self {
        K8sSettings {
            kubeconfig: None,
            poll_interval: Duration::from_secs(2),
            api_patience: Duration::from_secs(300),
            timeouts: ApiTimeouts::default(),
        }
    }
}

/// The driver for one cluster. Blocking; each call runs on the workload's lane.
pub struct K8sDriver {
    settings: K8sSettings,
    client: Mutex<Option<CachedClient>>,
    /// Apply and garbage collection of shared ConfigMaps/Secrets run one at a time, so a
    /// collection never sees a ConfigMap applied for a Deployment not applied yet.
    apply_lock: Mutex<()>,
    /// Namespaces the driver has used: where to look when listing in all namespaces is
    /// forbidden.
    namespaces: Mutex<BTreeSet<String>>,
}

struct CachedClient {
    modified: Option<SystemTime>,
    built: Instant,
    client: Arc<KubeClient>,
}

/// A client is rebuilt at least this often (certificate files named by the kubeconfig may
/// rotate without the kubeconfig changing).
const CLIENT_MAX_AGE: Duration = Duration::from_secs(60);

impl K8sDriver {
    pub fn new(settings: K8sSettings) -> K8sDriver {
        K8sDriver {
            settings,
            client: Mutex::new(None),
            apply_lock: Mutex::new(()),
            namespaces: Mutex::new(BTreeSet::from(["default".to_string()])),
        }
    }

    pub fn settings(&self) -> &K8sSettings {
        &self.settings
    }

    /// The API client, from the kubeconfig as it is now.
    pub fn client(&self) -> Result<Arc<KubeClient>, K8sError> {
        let path = self
            .settings
            .kubeconfig
            .as_ref()
            .ok_or(K8sError::NotConfigured)?;
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut cache = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.as_ref() {
            if c.modified == modified && c.built.elapsed() < CLIENT_MAX_AGE {
                return Ok(c.client.clone());
            }
        }
        let access = kubeconfig::load(path)?;
        let client = Arc::new(KubeClient::new(&access, self.settings.timeouts)?);
        *cache = Some(CachedClient {
            modified,
            built: Instant::now(),
            client: client.clone(),
        });
        Ok(client)
    }

    fn remember(&self, ns: &str) {
        self.namespaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ns.to_string());
    }

    /// Lists in all namespaces; where that is forbidden, in the namespaces the driver used.
    fn list_everywhere(
        &self,
        client: &KubeClient,
        res: Resource,
        selector: &str,
    ) -> Result<Vec<Value>, K8sError> {
        match client.list(res, None, selector) {
            Err(K8sError::Forbidden { .. }) => {
                let nss = self
                    .namespaces
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let mut all = Vec::new();
                for ns in nss {
                    all.extend(client.list(res, Some(&ns), selector)?);
                }
                Ok(all)
            }
            other => other,
        }
    }

    /// Applies the workload's objects; the run is then watched by polling.
    pub fn start_workload(
        &self,
        spec: &WorkloadSpec,
        secrets: &[DesiredSecret],
    ) -> Result<Started, K8sError> {
        let pod = spec
            .pod
            .as_ref()
            .ok_or_else(|| K8sError::Manifest("no rendered objects".into()))?;
        let objs = WorkloadObjects::parse(&pod.manifest).map_err(K8sError::Manifest)?;
        let (ns, name) = (objs.namespace.clone(), spec.name.to_string());
        let client = self.client()?;
        self.remember(&ns);
        self.apply(&client, &objs, secrets)?;
        // Container restarts the run starts from (a rise is a crash the kubelet restarted).
        let (_, pods) = look(&client, &ns, &name)?;
        let restarts = status::restarts_by_pod(&pods);
        let notice = format!(
            "runs as Deployment {ns}/{name} on {}: no local process, Kubernetes enforces its limits",
            client.server()
        );
        Ok(Started {
            pid: None,
            start_ticks: 0,
            oom_kills_at_start: 0,
            watch: self.watch(client, ns, name, Some(restarts)),
            notice: Some(notice),
        })
    }

    /// Polls the Deployment of a run until the run ends.
    fn watch(
        &self,
        client: Arc<KubeClient>,
        namespace: String,
        name: String,
        restarts: Option<BTreeMap<String, u64>>,
    ) -> Watch {
        let mut w = Watcher {
            settings: self.settings.clone(),
            client,
            namespace,
            name,
            restarts,
            failing_since: None,
        };
        Watch::Poll {
            every: self.settings.poll_interval,
            look: Box::new(move || w.look()),
        }
    }

    fn apply(
        &self,
        client: &KubeClient,
        objs: &WorkloadObjects,
        secrets: &[DesiredSecret],
    ) -> Result<(), K8sError> {
        let ns = objs.namespace.as_str();
        let refs = objects::references(&objs.deployment.body["spec"]["template"]["spec"]);
        let mut todo: Vec<Object> = objs.dependencies.clone();
        for s in secrets.iter().filter(|s| refs.secrets.contains(&s.name)) {
            if todo
                .iter()
                .any(|o| o.resource == Resource::Secret && o.name == s.name)
            {
                continue;
            }
            let o = objects::secret_object(s, ns).map_err(|why| K8sError::Secret {
                name: s.name.clone(),
                why,
            })?;
            todo.push(o);
        }
        todo.push(objs.deployment.clone());
        let _one_at_a_time = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        for o in &todo {
            self.ensure_ours(client, o.resource, ns, &o.name)?;
        }
        for o in &todo {
            client.apply(o.resource, ns, &o.name, &o.body)?;
        }
        // The workload moved to another namespace: its Deployment there goes.
        let name = objs.deployment.name.as_str();
        for d in self.list_everywhere(client, Resource::Deployment, &workload_selector(name))? {
            let other = d["metadata"]["namespace"].as_str().unwrap_or_default();
            if other != ns {
                tracing::info!(workload = %name, "deleting its Deployment in {other}: it moved to {ns}");
                client.delete(Resource::Deployment, other, name, None)?;
            }
        }
        self.collect_garbage(client)
    }

    /// Refuses to take over an object of that name that we do not own.
    fn ensure_ours(
        &self,
        client: &KubeClient,
        res: Resource,
        ns: &str,
        name: &str,
    ) -> Result<(), K8sError> {
        match client.get(res, ns, name)? {
            Some(o) if o["metadata"]["labels"][MANAGED_BY_LABEL] != MANAGED_BY => {
                Err(K8sError::NotOurs {
                    kind: res.kind(),
                    namespace: ns.into(),
                    name: name.into(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Deletes every ConfigMap and Secret of ours that no Deployment of ours in its namespace
    /// refers to.
    fn collect_garbage(&self, client: &KubeClient) -> Result<(), K8sError> {
        let sel = owned_selector();
        let deployments = self.list_everywhere(client, Resource::Deployment, &sel)?;
        let mut used: BTreeMap<(String, Resource), BTreeSet<String>> = BTreeMap::new();
        for d in &deployments {
            if !d["metadata"]["deletionTimestamp"].is_null() {
                continue;
            }
            let ns = d["metadata"]["namespace"].as_str().unwrap_or_default();
            let r = objects::references(&d["spec"]["template"]["spec"]);
            used.entry((ns.into(), Resource::ConfigMap))
                .or_default()
                .extend(r.configmaps);
            used.entry((ns.into(), Resource::Secret))
                .or_default()
                .extend(r.secrets);
        }
        for res in [Resource::ConfigMap, Resource::Secret] {
            for o in self.list_everywhere(client, res, &sel)? {
                let ns = o["metadata"]["namespace"].as_str().unwrap_or_default();
                let name = o["metadata"]["name"].as_str().unwrap_or_default();
                let in_use = used
                    .get(&(ns.to_string(), res))
                    .is_some_and(|s| s.contains(name));
                if !in_use && !name.is_empty() {
                    tracing::info!("deleting {} {ns}/{name}: no workload uses it", res.kind());
                    client.delete(res, ns, name, None)?;
                }
            }
        }
        Ok(())
    }

    /// The workload's Deployments (normally one; two while it moves namespace).
    fn deployments_of(
        &self,
        client: &KubeClient,
        name: &str,
    ) -> Result<Vec<(String, Value)>, K8sError> {
        Ok(self
            .list_everywhere(client, Resource::Deployment, &workload_selector(name))?
            .into_iter()
            .map(|d| {
                (
                    d["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    d,
                )
            })
            .collect())
    }

    /// Scales the workload's Deployment to 0 and waits for its pods to go; after `grace`
    /// what is left is deleted with grace 0 (the kubelet's SIGKILL).
    pub fn stop_workload(&self, name: &str, grace: Duration) -> Result<(), K8sError> {
        let client = self.client()?;
        for (ns, _) in self.deployments_of(&client, name)? {
            client.merge_patch(
                Resource::Deployment,
                &ns,
                name,
                &json!({"spec": {"replicas": 0}}),
            )?;
            let deadline = Instant::now() + grace;
            loop {
                let pods = client.list(Resource::Pod, Some(&ns), &workload_selector(name))?;
                if pods.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    for p in pods {
                        if let Some(pn) = p["metadata"]["name"].as_str() {
                            client.delete(Resource::Pod, &ns, pn, Some(Duration::ZERO))?;
                        }
                    }
                    break;
                }
                std::thread::sleep(self.settings.poll_interval.min(Duration::from_millis(500)));
            }
        }
        Ok(())
    }

    /// Deletes the workload's Deployment (its pods follow) and what only it used.
    pub fn cleanup_workload(&self, name: &str) -> Result<(), K8sError> {
        let client = self.client()?;
        let _one_at_a_time = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        for (ns, _) in self.deployments_of(&client, name)? {
            client.delete(Resource::Deployment, &ns, name, None)?;
        }
        self.collect_garbage(&client)
    }

    /// Deletes every Deployment of ours whose workload is not in `desired` (e.g. left by an
    /// agent that lost its state), then what only those used.
    pub fn prune(&self, desired: &BTreeSet<String>) -> Result<Vec<String>, K8sError> {
        let client = self.client()?;
        let _one_at_a_time = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = Vec::new();
        for d in self.list_everywhere(&client, Resource::Deployment, &owned_selector())? {
            let Some(w) = d["metadata"]["labels"][WORKLOAD_LABEL].as_str() else {
                continue;
            };
            if desired.contains(w) {
                continue;
            }
            let ns = d["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = d["metadata"]["name"].as_str().unwrap_or_default();
            client.delete(Resource::Deployment, ns, name, None)?;
            removed.push(format!("{ns}/{name}"));
        }
        self.collect_garbage(&client)?;
        Ok(removed)
    }

    /// The workload's state as the API reports it now (`Stopped` when it has no Deployment).
    pub fn health(&self, name: &str) -> Result<Health, K8sError> {
        let client = self.client()?;
        let deps = self.deployments_of(&client, name)?;
        match deps.first() {
            None => Ok(Health::Stopped("its Deployment does not exist".into())),
            Some((ns, _)) => look(&client, ns, name).map(|(h, _)| h),
        }
    }

    /// Whether the workload still runs (or is still being deployed) on the cluster.
    pub fn still_running(&self, name: &str) -> bool {
        match self.health(name) {
            Ok(h) => matches!(h, Health::Running | Health::Deploying(_)),
            Err(e) => {
                tracing::warn!(workload = %name, "cannot ask the Kubernetes API: {e}");
                false
            }
        }
    }

    /// The watch of a run the agent did not start (adoption after an agent restart).
    pub fn adopted_watch(&self, name: &str) -> Result<Watch, K8sError> {
        let client = self.client()?;
        let deps = self.deployments_of(&client, name)?;
        let ns = deps
            .first()
            .map(|(ns, _)| ns.clone())
            .ok_or_else(|| K8sError::Stopped("its Deployment does not exist".into()))?;
        self.remember(&ns);
        Ok(self.watch(client, ns, name.to_string(), None))
    }
}

impl Driver for K8sDriver {
    fn start(&self, run: &Run) -> Result<Started, DriverError> {
        Ok(self.start_workload(run.spec, run.secrets)?)
    }

    fn stop(&self, at: &Placement, grace: Duration) -> Result<(), DriverError> {
        Ok(self.stop_workload(at.name.as_str(), grace)?)
    }

    fn cleanup(&self, at: &Placement) -> Result<(), DriverError> {
        self.cleanup_workload(at.name.as_str())?;
        Ok(at.cgroup.remove()?)
    }

    fn adopt(&self, at: &Placement, _record: &WorkloadRecord) -> Option<Started> {
        if !self.still_running(at.name.as_str()) {
            return None;
        }
        let watch = self
            .adopted_watch(at.name.as_str())
            .map_err(|e| tracing::warn!(workload = %at.name, "cannot watch its Deployment: {e}"))
            .ok()?;
        Some(Started {
            pid: None,
            start_ticks: 0,
            oom_kills_at_start: 0,
            watch,
            notice: None,
        })
    }
}

fn look(client: &KubeClient, ns: &str, name: &str) -> Result<(Health, Vec<Value>), K8sError> {
    let d = client.get(Resource::Deployment, ns, name)?;
    let d = d.filter(|d| d["metadata"]["labels"][MANAGED_BY_LABEL] == MANAGED_BY);
    let pods = match &d {
        Some(_) => client.list(Resource::Pod, Some(ns), &workload_selector(name))?,
        None => Vec::new(),
    };
    Ok((assess(d.as_ref(), &pods), pods))
}

/// Watches one run: its end is a crash, a container restart, or the Deployment leaving;
/// until then each look says whether the pod is available, and why not.
struct Watcher {
    settings: K8sSettings,
    client: Arc<KubeClient>,
    namespace: String,
    name: String,
    /// Container restarts of each pod when last seen (a rise is a crash the kubelet
    /// restarted by itself; a pod seen for the first time starts from its count).
    restarts: Option<BTreeMap<String, u64>>,
    failing_since: Option<Instant>,
}

impl Watcher {
    fn look(&mut self) -> Poll {
        let (ns, name) = (self.namespace.as_str(), self.name.as_str());
        let (health, pods) = match look(&self.client, ns, name) {
            Ok(x) => x,
            Err(e) => {
                let since = *self.failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.settings.api_patience {
                    tracing::warn!(workload = %name, "giving up watching its Deployment: {e}");
                    return Poll::Ended(RunEnd::default());
                }
                return Poll::Up {
                    ready: false,
                    reason: format!("cannot see it: {e}"),
                };
            }
        };
        self.failing_since = None;
        let now = status::restarts_by_pod(&pods);
        let restarted = match &self.restarts {
            Some(before) => now
                .iter()
                .any(|(pod, n)| before.get(pod).is_some_and(|b| n > b)),
            None => false,
        };
        self.restarts = Some(now);
        let crash = match health {
            Health::Running | Health::Deploying(_) if restarted => Some(status::last_crash(&pods)),
            Health::Running => {
                return Poll::Up {
                    ready: true,
                    reason: "available".into(),
                }
            }
            Health::Deploying(why) => {
                return Poll::Up {
                    ready: false,
                    reason: why,
                }
            }
            Health::Crashed(c) => Some(c),
            Health::Stopped(why) => {
                tracing::info!(workload = %name, "run ended: {why}");
                return Poll::Ended(RunEnd::default());
            }
        };
        match crash {
            Some(c) => {
                tracing::warn!(workload = %name, "crashed: {}", c.reason);
                Poll::Ended(RunEnd {
                    code: Some(c.exit_code.unwrap_or(1)),
                    signal: None,
                    oom_killed: c.oom_killed,
                })
            }
            None => Poll::Ended(RunEnd::default()),
        }
    }
}
