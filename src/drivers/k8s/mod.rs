//! The MicroShift driver: a `k8s` (alias `microshift`) workload (PROTOCOL §7) runs as a
//! Deployment on the local Kubernetes API named by KUBECONFIG, not in a cgroup of the agent.
//!
//! **Objects.** One Deployment per workload (1 replica, `Recreate`, the workload's PodSpec),
//! the workload's ConfigMaps, the Secrets of the desired state it references and, with an
//! auth file, a pull secret; all in the workload's namespace (`default` when none), all
//! labelled `app.kubernetes.io/managed-by: device-worker-ng` (the Deployment and its pods
//! also `device-worker-ng/workload: <name>`). Applied with server-side apply under the field
//! manager `device-worker-ng` and `force=true` (fields other managers set and the agent does
//! not survive). Every object of a start is first applied with `dryRun=All`, so a workload
//! the API server refuses leaves nothing behind. An object of the same name that exists
//! without our label is never taken over: the start fails with that reason. Namespaces are
//! never created (that needs cluster-wide rights): a missing one is the start's reason.
//!
//! **Where it looks.** Listing in all namespaces needs a ClusterRole; with only a Role in the
//! workloads' namespaces (least privilege) that list is forbidden, and the driver then lists
//! in the namespaces of the desired workloads and those it applied to, nowhere else.
//!
//! **Removal and pruning.** Only objects that carry our label are changed or deleted.
//! ConfigMaps and Secrets may be shared by several workloads, so they are garbage collected
//! by reference: after each apply and each removal, every one of ours that no Deployment of
//! ours in its namespace refers to is deleted. At the first desired state and whenever its
//! k8s workloads change, the controller asks for [`K8sDriver::prune`]: Deployments of ours
//! that no desired workload explains (left by an agent that lost its state) are deleted.
//!
//! **Runs.** There is no local process (`Started.pid` is `None`): the run is the Deployment's
//! pod. `start` applies and returns at once; the run is then watched by polling (every
//! `poll_interval`, on the reactor, its blocking look on the blocking pool), each look with
//! the client of the kubeconfig as it is then (rotated credentials are picked up). While the
//! pod is not available the workload stays `starting` (or becomes `unavailable`) with the
//! scheduler's, the kubelet's or the API's reason, an unreachable API included; the run ends
//! only when a container crashes (or the kubelet restarts one) or the Deployment is scaled to
//! 0 or gone. Conditions the cluster retries by itself (unschedulable, a quota, a rollout past
//! its progress deadline) are reasons, not crashes. `stop` scales the Deployment to 0 and
//! waits for the pods to go with their own termination grace period; a pod still there
//! `grace` (STOP_TIMEOUT) after its own grace ended (no kubelet confirms) is deleted with
//! grace 0. `cleanup` deletes the Deployment.
//!
//! Tested against a fake API server (tests/support/fake_kube.rs) that follows a real one's
//! observed behaviour, not against a live MicroShift.

pub mod api;
pub mod kubeconfig;
pub mod objects;
pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
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
    #[error("namespace \"{namespace}\" does not exist: the agent never creates namespaces (create it, with a Role for the agent's credentials)")]
    NamespaceMissing { namespace: String },
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
    pub timeouts: ApiTimeouts,
}

impl Default for K8sSettings {
    fn default() -> Self {
        K8sSettings {
            kubeconfig: None,
            poll_interval: Duration::from_secs(2),
            timeouts: ApiTimeouts::default(),
        }
    }
}

/// The driver for one cluster. Blocking; each call runs on the workload's lane.
pub struct K8sDriver {
    settings: K8sSettings,
    shared: Arc<Shared>,
}

/// What the driver and the watches of its runs share.
struct Shared {
    clients: Clients,
    /// Apply, pruning and garbage collection of shared ConfigMaps/Secrets run one at a time,
    /// so a collection never sees a ConfigMap applied for a Deployment not applied yet.
    apply_lock: Mutex<()>,
    scope: Mutex<Scope>,
}

/// Where the driver may look.
#[derive(Default)]
struct Scope {
    /// The desired k8s workloads (name → manifest), as the controller last said.
    desired: BTreeMap<String, Arc<str>>,
    /// Their namespaces, read from the manifests when first needed (by manifest).
    namespace_of: BTreeMap<Arc<str>, String>,
    /// Namespaces the driver applied to since it started (a workload that moved or was
    /// removed still has objects there).
    used: BTreeSet<String>,
    /// The client (by address) whose cluster-wide lists were forbidden: asked no more.
    cluster_forbidden: Option<usize>,
}

/// The API client, rebuilt when the kubeconfig changes.
struct Clients {
    kubeconfig: Option<PathBuf>,
    timeouts: ApiTimeouts,
    cache: Mutex<Option<CachedClient>>,
}

struct CachedClient {
    file: Option<FileIdentity>,
    built: Instant,
    client: Arc<KubeClient>,
}

/// What changes when a kubeconfig is rewritten or replaced (a rename keeps no mtime).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileIdentity {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// A client is rebuilt at least this often (certificate files named by the kubeconfig may
/// rotate without the kubeconfig changing).
const CLIENT_MAX_AGE: Duration = Duration::from_secs(60);

/// When a pod's termination grace period is not known.
const DEFAULT_POD_GRACE: Duration = Duration::from_secs(30);

impl Clients {
    fn client(&self) -> Result<Arc<KubeClient>, K8sError> {
        let path = self.kubeconfig.as_ref().ok_or(K8sError::NotConfigured)?;
        let file = std::fs::metadata(path).ok().map(|m| FileIdentity {
            modified: m.modified().ok(),
            len: m.len(),
            inode: m.ino(),
        });
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.as_ref() {
            if c.file == file && c.built.elapsed() < CLIENT_MAX_AGE {
                return Ok(c.client.clone());
            }
        }
        let access = kubeconfig::load(path)?;
        let client = Arc::new(KubeClient::new(&access, self.timeouts)?);
        *cache = Some(CachedClient {
            file,
            built: Instant::now(),
            client: client.clone(),
        });
        Ok(client)
    }
}

fn client_id(c: &Arc<KubeClient>) -> usize {
    Arc::as_ptr(c) as usize
}

impl Shared {
    fn scope(&self) -> MutexGuard<'_, Scope> {
        self.scope.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The namespaces of the desired workloads and those applied to.
    fn namespaces(&self) -> BTreeSet<String> {
        let mut scope = self.scope();
        let mut out = scope.used.clone();
        let manifests: Vec<Arc<str>> = scope.desired.values().cloned().collect();
        for m in manifests {
            out.insert(scope.namespace(&m));
        }
        out
    }

    /// The namespace a desired workload's manifest names (`None`: not desired).
    fn desired_namespace(&self, name: &str) -> Option<String> {
        let mut scope = self.scope();
        let m = scope.desired.get(name)?.clone();
        Some(scope.namespace(&m))
    }

    /// Lists in all namespaces; where that is forbidden, in the namespaces of the workloads
    /// (a namespace where even that is forbidden is skipped with a warning).
    fn list_everywhere(
        &self,
        client: &Arc<KubeClient>,
        res: Resource,
        selector: &str,
    ) -> Result<Listed, K8sError> {
        if self.scope().cluster_forbidden != Some(client_id(client)) {
            match client.list(res, None, selector) {
                Ok(items) => {
                    return Ok(Listed {
                        items,
                        everywhere: true,
                    })
                }
                Err(K8sError::Forbidden { .. }) => {
                    tracing::info!(
                        "the kubeconfig may not list {} in all namespaces: listing in the workloads' namespaces",
                        res.plural()
                    );
                    self.scope().cluster_forbidden = Some(client_id(client));
                }
                Err(e) => return Err(e),
            }
        }
        let mut items = Vec::new();
        for ns in self.namespaces() {
            match client.list(res, Some(&ns), selector) {
                Ok(found) => items.extend(found),
                Err(e @ K8sError::Forbidden { .. }) => tracing::warn!("{e}"),
                Err(e) => return Err(e),
            }
        }
        Ok(Listed {
            items,
            everywhere: false,
        })
    }

    /// The workload's Deployments (normally one; two while it moves namespace).
    fn deployments_of(
        &self,
        client: &Arc<KubeClient>,
        name: &str,
    ) -> Result<(Vec<(String, Value)>, bool), K8sError> {
        let listed =
            self.list_everywhere(client, Resource::Deployment, &workload_selector(name))?;
        let found = listed
            .items
            .into_iter()
            .map(|d| {
                let ns = d["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                (ns, d)
            })
            .collect();
        // Not finding it proves it is gone only where its namespace was searched.
        let searched = listed.everywhere || self.desired_namespace(name).is_some();
        Ok((found, searched))
    }
}

impl Scope {
    fn namespace(&mut self, manifest: &Arc<str>) -> String {
        if let Some(ns) = self.namespace_of.get(manifest) {
            return ns.clone();
        }
        let ns = WorkloadObjects::parse(manifest)
            .map(|o| o.namespace)
            .unwrap_or_else(|_| "default".into());
        self.namespace_of.insert(manifest.clone(), ns.clone());
        ns
    }
}

/// A list's items, and whether it covered all namespaces.
struct Listed {
    items: Vec<Value>,
    everywhere: bool,
}

impl K8sDriver {
    pub fn new(settings: K8sSettings) -> K8sDriver {
        K8sDriver {
            shared: Arc::new(Shared {
                clients: Clients {
                    kubeconfig: settings.kubeconfig.clone(),
                    timeouts: settings.timeouts,
                    cache: Mutex::new(None),
                },
                apply_lock: Mutex::new(()),
                scope: Mutex::new(Scope::default()),
            }),
            settings,
        }
    }

    pub fn settings(&self) -> &K8sSettings {
        &self.settings
    }

    /// The API client, from the kubeconfig as it is now.
    pub fn client(&self) -> Result<Arc<KubeClient>, K8sError> {
        self.shared.clients.client()
    }

    /// The k8s workloads of the desired state (name, rendered manifest): what
    /// [`prune`](Self::prune) keeps, and whose namespaces are searched when the kubeconfig
    /// may not list all of them. Cheap (no parsing): the controller calls it when it applies
    /// a desired state, before anything of it starts.
    pub fn desire(&self, workloads: Vec<(String, String)>) {
        let mut scope = self.shared.scope();
        scope.desired = workloads
            .into_iter()
            .map(|(n, m)| (n, Arc::from(m)))
            .collect();
        let live: BTreeSet<Arc<str>> = scope.desired.values().cloned().collect();
        scope.namespace_of.retain(|m, _| live.contains(m));
    }

    fn remember(&self, ns: &str) {
        self.shared.scope().used.insert(ns.to_string());
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
            watch: self.watch(Some(ns), name, Some(restarts)),
            notice: Some(notice),
        })
    }

    /// Polls the Deployment of a run until the run ends.
    fn watch(
        &self,
        namespace: Option<String>,
        name: String,
        restarts: Option<BTreeMap<String, u64>>,
    ) -> Watch {
        let mut w = Watcher {
            shared: self.shared.clone(),
            namespace,
            name,
            restarts,
        };
        Watch::Poll {
            every: self.settings.poll_interval,
            look: Box::new(move || w.look()),
        }
    }

    fn apply(
        &self,
        client: &Arc<KubeClient>,
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
        let _one_at_a_time = self
            .shared
            .apply_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for o in &todo {
            self.ensure_ours(client, o.resource, ns, &o.name)?;
        }
        // The server validates (and admits) everything first: a workload it refuses leaves
        // nothing behind, not its ConfigMaps and Secrets.
        for o in &todo {
            client.apply(o.resource, ns, &o.name, &o.body, true)?;
        }
        self.remember(ns);
        for o in &todo {
            client.apply(o.resource, ns, &o.name, &o.body, false)?;
        }
        // The workload moved to another namespace: its Deployment there goes.
        let name = objs.deployment.name.as_str();
        let (deployments, _) = self.shared.deployments_of(client, name)?;
        for (other, _) in deployments {
            if other != ns {
                tracing::info!(workload = %name, "deleting its Deployment in {other}: it moved to {ns}");
                client.delete(Resource::Deployment, &other, name, None)?;
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
    fn collect_garbage(&self, client: &Arc<KubeClient>) -> Result<(), K8sError> {
        let sel = owned_selector();
        let deployments = self
            .shared
            .list_everywhere(client, Resource::Deployment, &sel)?;
        let mut used: BTreeMap<(String, Resource), BTreeSet<String>> = BTreeMap::new();
        for d in &deployments.items {
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
            for o in self.shared.list_everywhere(client, res, &sel)?.items {
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

    /// Scales the workload's Deployment to 0 and waits for its pods to go: each with its own
    /// termination grace period (the kubelet's SIGTERM, then SIGKILL), plus `grace` for the
    /// kubelet to confirm; a pod still there then (its node is gone) is deleted with grace 0.
    pub fn stop_workload(&self, name: &str, grace: Duration) -> Result<(), K8sError> {
        let client = self.client()?;
        let (deployments, _) = self.shared.deployments_of(&client, name)?;
        for (ns, _) in deployments {
            client.merge_patch(
                Resource::Deployment,
                &ns,
                name,
                &json!({"spec": {"replicas": 0}}),
            )?;
            let started = Instant::now();
            let mut pod_grace = Duration::ZERO;
            loop {
                let pods = client.list(Resource::Pod, Some(&ns), &workload_selector(name))?;
                if pods.is_empty() {
                    break;
                }
                pod_grace = pods
                    .iter()
                    .map(termination_grace)
                    .fold(pod_grace, Duration::max);
                // Both come from outside (the pod's spec, the API's answer): no overflow.
                if started.elapsed() >= pod_grace.saturating_add(grace) {
                    for p in pods {
                        if let Some(pn) = p["metadata"]["name"].as_str() {
                            tracing::warn!(workload = %name, "pod {ns}/{pn} is still there {:?} after its grace period: deleting it with grace 0 (its node does not confirm)", grace);
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
        let _one_at_a_time = self
            .shared
            .apply_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (deployments, _) = self.shared.deployments_of(&client, name)?;
        for (ns, _) in deployments {
            client.delete(Resource::Deployment, &ns, name, None)?;
        }
        self.collect_garbage(&client)
    }

    /// Deletes every Deployment of ours that no desired workload explains (by name and
    /// namespace, as last given to [`desire`](Self::desire); e.g. left by an agent that lost
    /// its state), then what only those used. Returns `namespace/name` of each.
    pub fn prune(&self) -> Result<Vec<String>, K8sError> {
        let client = self.client()?;
        let _one_at_a_time = self
            .shared
            .apply_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut removed = Vec::new();
        let listed =
            self.shared
                .list_everywhere(&client, Resource::Deployment, &owned_selector())?;
        for d in listed.items {
            let ns = d["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = d["metadata"]["name"].as_str().unwrap_or_default();
            let workload = d["metadata"]["labels"][WORKLOAD_LABEL].as_str();
            // Read after the list, under the apply lock: a workload desired meanwhile has
            // been given to `desire` before its start could apply anything.
            let wanted = workload
                .and_then(|w| self.shared.desired_namespace(w))
                .is_some_and(|want| want == ns && workload == Some(name));
            if wanted || name.is_empty() {
                continue;
            }
            tracing::info!("pruning Deployment {ns}/{name}: no desired workload explains it");
            client.delete(Resource::Deployment, ns, name, None)?;
            removed.push(format!("{ns}/{name}"));
        }
        self.collect_garbage(&client)?;
        Ok(removed)
    }

    /// The workload's state as the API reports it now (`Stopped` when it has no Deployment).
    pub fn health(&self, name: &str) -> Result<Health, K8sError> {
        let client = self.client()?;
        let (deps, _) = self.shared.deployments_of(&client, name)?;
        match deps.first() {
            None => Ok(Health::Stopped("its Deployment does not exist".into())),
            Some((ns, _)) => look(&client, ns, name).map(|(h, _)| h),
        }
    }

    /// After an agent restart: the watch of the workload's Deployment, unless it is provably
    /// gone (or scaled to 0, or being deleted). An API that does not answer, or a Deployment
    /// the driver cannot locate yet (no cluster-wide list, desired state not known yet),
    /// is adopted all the same: the watch shows why it cannot see it until it can.
    pub fn adopt_workload(&self, name: &str) -> Option<Watch> {
        let located = self.client().and_then(|client| {
            let (deps, searched) = self.shared.deployments_of(&client, name)?;
            match deps.first() {
                None => Ok((None, searched)),
                Some((ns, _)) => {
                    let (health, _) = look(&client, ns, name)?;
                    Ok((Some((ns.clone(), health)), true))
                }
            }
        });
        match located {
            Ok((Some((_, Health::Stopped(why))), _)) => {
                tracing::info!(workload = %name, "not adopted: {why}");
                None
            }
            Ok((Some((ns, _)), _)) => {
                self.remember(&ns);
                Some(self.watch(Some(ns), name.to_string(), None))
            }
            Ok((None, true)) => None,
            Ok((None, false)) => Some(self.watch(None, name.to_string(), None)),
            Err(K8sError::NotConfigured) => None,
            Err(e) => {
                tracing::warn!(workload = %name, "adopting its Deployment without seeing it: {e}");
                Some(self.watch(None, name.to_string(), None))
            }
        }
    }
}

/// A pod's termination grace period: what its deletion set, else its spec's.
fn termination_grace(pod: &Value) -> Duration {
    pod["metadata"]["deletionGracePeriodSeconds"]
        .as_u64()
        .or_else(|| pod["spec"]["terminationGracePeriodSeconds"].as_u64())
        .map_or(DEFAULT_POD_GRACE, Duration::from_secs)
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
        let watch = self.adopt_workload(at.name.as_str())?;
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
    shared: Arc<Shared>,
    /// `None` until located (a run adopted where the driver could not list yet).
    namespace: Option<String>,
    name: String,
    /// Container restarts of each pod when last seen (a rise is a crash the kubelet
    /// restarted by itself; a pod seen for the first time starts from its count).
    restarts: Option<BTreeMap<String, u64>>,
}

impl Watcher {
    fn look(&mut self) -> Poll {
        let name = self.name.clone();
        // The kubeconfig as it is now: a rotated credential is used at the next look.
        let client = match self.shared.clients.client() {
            Ok(c) => c,
            Err(e) => return not_ready(format!("cannot see it: {e}")),
        };
        let ns = match &self.namespace {
            Some(ns) => ns.clone(),
            None => match self.shared.deployments_of(&client, &name) {
                Ok((deps, searched)) => match deps.into_iter().next() {
                    Some((ns, _)) => {
                        self.namespace = Some(ns.clone());
                        ns
                    }
                    None if searched => {
                        tracing::info!(workload = %name, "run ended: its Deployment does not exist");
                        return Poll::Ended(RunEnd::default());
                    }
                    None => {
                        return not_ready(
                            "looking for its Deployment: the kubeconfig may not list all namespaces and the desired state does not name its namespace yet".into(),
                        )
                    }
                },
                Err(e) => return not_ready(format!("cannot see it: {e}")),
            },
        };
        let (health, pods) = match look(&client, &ns, &name) {
            Ok(x) => x,
            // The cluster keeps the workload running without the agent: an API that does
            // not answer is the reason it is not known to be available, not an end.
            Err(e) => return not_ready(format!("cannot see it: {e}")),
        };
        let now = status::restarts_by_pod(&pods);
        let restarted = match &self.restarts {
            Some(before) => now
                .iter()
                .any(|(pod, n)| before.get(pod).is_some_and(|b| n > b)),
            None => false,
        };
        self.restarts = Some(now);
        let crash = match health {
            Health::Running | Health::Deploying(_) if restarted => status::last_crash(&pods),
            Health::Running => {
                return Poll::Up {
                    ready: true,
                    reason: "available".into(),
                }
            }
            Health::Deploying(why) => return not_ready(why),
            Health::Crashed(c) => c,
            Health::Stopped(why) => {
                tracing::info!(workload = %name, "run ended: {why}");
                return Poll::Ended(RunEnd::default());
            }
        };
        tracing::warn!(workload = %name, "crashed: {}", crash.reason);
        Poll::Ended(RunEnd {
            code: Some(crash.exit_code.unwrap_or(1)),
            signal: None,
            oom_killed: crash.oom_killed,
        })
    }
}

fn not_ready(reason: String) -> Poll {
    Poll::Up {
        ready: false,
        reason,
    }
}
