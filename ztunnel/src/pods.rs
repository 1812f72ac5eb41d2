//! The pods on this node, and which of them are meshed.
//!
//! The CNI plugin registers every pod it wires up (and unregisters it on DEL) through the agent
//! socket. Whether a registered pod is *enrolled* follows the control plane, live: istiod-lite
//! marks a workload HBONE when its namespace is labelled `istio.io/dataplane-mode=ambient` and
//! its own label does not say otherwise. [`Pods::run`] reconciles after every xDS update, so a
//! label change meshes or unmeshes running pods without restarting them.
//!
//! A new pod has no IP, and so no workload, until its CNI ADD is done. istiod-lite therefore also
//! publishes each scheduled pod's membership (`trellis.pod.v1.PodMembership`: meshed or not, and
//! its service account); with it and the IP the CNI plugin passes, a meshed pod is enrolled
//! before ADD returns, so it never runs uncaptured. Once the workload exists it is authoritative.
//! An `add` that ztunnel cannot settle within [`ADD_WAIT`] (the pod is unknown because the control
//! plane is down or behind, or enrolling it failed) is refused and the pod forgotten: ADD fails,
//! and the kubelet retries until the pod can start captured, or known to be outside the mesh.
//!
//! Enrolling is ordered so that traffic is never captured before something listens: obtain the
//! workload certificate, open the three listeners inside the pod's namespace (or take those a
//! handing-over ztunnel passed), and only then install the capture. Unenrolling removes the capture
//! first, then closes the listeners; connections already proxied run to completion. Each enrollment
//! runs as its own task (at most [`MAX_ENROLLING`] at once), so a CA that is slow for one identity
//! delays neither other pods nor the next pass.
//!
//! The registry is persisted (mode 0600) so a restarted ztunnel knows its pods again. While
//! ztunnel is down, the capture it left in each enrolled pod stays in place and has nothing to
//! deliver to, so new connections fail rather than leave the pod unprotected (fail closed); after
//! the first xDS snapshot the pod is enrolled again, or released if it was unlabelled meanwhile.
//!
//! An upgrade need not leave that gap: a new ztunnel started next to the running one asks it to
//! hand its pods over ([`Pods::hand_over`]). The old one writes its registry one last time, stops
//! managing pods (no more passes, capture changes or registry writes; it reports not ready) and
//! passes the new one its pods' listening sockets, which it keeps serving until it drains. The new
//! one loads the registry and enrolls every pod again with those same sockets ([`Pods::inherit`]),
//! so both accept from one queue and nothing waiting in it is lost when the old one closes its
//! copies. If the new ztunnel dies after the hand-over, the old one takes the pods back
//! ([`Pods::take_back`], driven by [`crate::handover::take_back_when_abandoned`]).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use trellis_proto::istio::workload::TunnelProtocol;

use crate::agent::{HandedListener, Inherited};
use crate::capture::{probes, Capture};
use crate::identity::CertManager;
use crate::lock;
use crate::netns::Netns;
use crate::proxy::{route, Proxy, LISTENER_PORTS};
use crate::state::State;

/// Reconcile at least this often, to retry failed enrollments (e.g. the CA was unreachable).
const RETRY: Duration = Duration::from_secs(5);
/// How long an `add` waits for a meshed pod to be enrolled before answering.
const ADD_WAIT: Duration = Duration::from_secs(5);
/// A pod whose enrollment failed is retried after this, doubling per failure up to
/// [`RETRY_MAX`]: a CA that refuses at once (the pod is not on this node, the token expired) must
/// not be asked again in a loop. Short enough that a pod recovers soon after its cause does.
const RETRY_MIN: Duration = crate::identity::BACKOFF_MIN;
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Enrollments in flight at once: each may hold a CA request (up to 15 s if the CA is not
/// answering), and a node starting with many pods must not open that many at the same time.
const MAX_ENROLLING: usize = 16;

struct Enrolled {
    ns: Arc<Netns>,
    identity: hbone::Identity,
    /// The address the CNI plugin gave the pod, for the probe table until its workload has one.
    cni_ip: Option<Ipv4Addr>,
    tasks: Vec<JoinHandle<()>>,
    /// Second descriptors of its listeners, to pass on in a hand-over; closed when it drains.
    listeners: Vec<(u16, OwnedFd)>,
}

impl Drop for Enrolled {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A pod the CNI plugin told us about.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Registered {
    namespace: String,
    name: String,
    netns: PathBuf,
    /// The address the CNI plugin gave the pod, before the control plane knows it.
    #[serde(default)]
    ip: Option<Ipv4Addr>,
    /// Capture may still be installed in its namespace (from this run or a previous one).
    #[serde(default)]
    captured: bool,
    /// The sandbox it was added for (CNI_CONTAINERID), when the plugin said.
    #[serde(default)]
    container: Option<String>,
    /// Where the pod stands after the last reconcile pass.
    #[serde(skip)]
    standing: Standing,
}

/// Where a registered pod stands, as of the last reconcile pass that looked at it.
#[derive(Clone, Debug, Default, PartialEq)]
enum Standing {
    /// No pass has looked at it yet (ztunnel has no snapshot yet, or the pass is still running).
    #[default]
    Pending,
    Enrolling,
    Meshed,
    /// The control plane says the pod is outside the mesh; the namespace is for the hint.
    NotMeshed {
        namespace: String,
    },
    /// Neither a workload nor a membership names the pod.
    Unknown,
    /// It should be meshed but cannot be (yet): no identity, no certificate, no listeners, ...
    Failed(String),
    /// It should leave the mesh, but its capture could not be removed; it keeps its listeners
    /// and the next pass tries again.
    ReleaseFailed(String),
}

impl Standing {
    /// Whether ztunnel knows for sure what to do with the pod: capture it (and has), or leave it.
    fn is_settled(&self) -> bool {
        matches!(self, Standing::Meshed | Standing::NotMeshed { .. })
    }
}

impl std::fmt::Display for Standing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Standing::Pending => f.write_str("waiting for the first reconcile"),
            Standing::Enrolling => f.write_str("enrolling"),
            Standing::Meshed => f.write_str("meshed"),
            Standing::NotMeshed { namespace } => write!(
                f,
                "not meshed: label the namespace {namespace} istio.io/dataplane-mode=ambient (or the pod, to override)"
            ),
            Standing::Unknown => f.write_str("not known to the control plane (no Pod scheduled to this node)"),
            Standing::Failed(e) => write!(f, "enrolling failed: {e}"),
            Standing::ReleaseFailed(e) => write!(f, "leaving the mesh failed (retrying): {e}"),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct PodInfo {
    pub uid: String,
    pub netns: String,
    pub enrolled: bool,
    /// Why the pod is (not) enrolled, for operators.
    pub reason: String,
}

struct InProgress<'a>(&'a AtomicUsize);

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct Pods {
    proxy: Arc<Proxy>,
    state: Arc<RwLock<State>>,
    certs: Arc<CertManager>,
    data: tokio::runtime::Handle,
    cluster_id: String,
    capture: Capture,
    registry_file: Option<PathBuf>,
    registered: Mutex<BTreeMap<String, Registered>>,
    enrolled: Mutex<HashMap<String, Enrolled>>,
    /// Pods with an enrollment task in flight, and the identity it is for (its certificate must
    /// not be released meanwhile). Passes leave these pods to the task.
    enrolling: Mutex<HashMap<String, hbone::Identity>>,
    enroll_slots: tokio::sync::Semaphore,
    /// Pods whose last enrollment failed: when the next may start, and the delay that led there.
    retry_at: Mutex<HashMap<String, (Instant, Duration)>>,
    in_progress: AtomicUsize,
    /// Wakes the reconciler on registry changes; it also wakes on xDS changes.
    kick: Notify,
    /// Bumped after each reconcile pass and each finished enrollment, so `add` can wait for its
    /// outcome.
    passes: watch::Sender<u64>,
    /// Reconciling before the first snapshot would unmesh every pod.
    synced: watch::Receiver<bool>,
    /// The meshed pods' addresses last written to the node's probe table; `None` until the
    /// table is installed, which each pass retries.
    probe_targets: Mutex<Option<Vec<Ipv4Addr>>>,
    probe_table_warned: AtomicBool,
    /// Set once a newer ztunnel on this node has taken the pods over.
    handed_over: AtomicBool,
    /// Which [`Pods::run`] is the reconciler: a take-back starts a new one, and one from before
    /// the hand-over that has not noticed yet (it may still wait for the first snapshot) stops.
    reconciler: AtomicU64,
    /// Listeners passed by the ztunnel this one took over from, by pod namespace, until the pod
    /// is enrolled with them (or dropped, when it will not be).
    inherited: Mutex<HashMap<PathBuf, Vec<(u16, OwnedFd)>>>,
    /// The pods loaded from the registry at start, until all have been served once.
    restored: Mutex<Option<std::collections::HashSet<String>>>,
}

impl Pods {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        proxy: Arc<Proxy>,
        state: Arc<RwLock<State>>,
        certs: Arc<CertManager>,
        data: tokio::runtime::Handle,
        cluster_id: String,
        capture: Capture,
        registry_file: Option<PathBuf>,
        synced: watch::Receiver<bool>,
    ) -> Pods {
        Pods {
            proxy,
            state,
            certs,
            data,
            cluster_id,
            capture,
            registry_file,
            registered: Mutex::default(),
            enrolled: Mutex::default(),
            enrolling: Mutex::default(),
            enroll_slots: tokio::sync::Semaphore::new(MAX_ENROLLING),
            retry_at: Mutex::default(),
            in_progress: AtomicUsize::new(0),
            kick: Notify::new(),
            passes: watch::channel(0).0,
            synced,
            probe_targets: Mutex::default(),
            probe_table_warned: AtomicBool::new(false),
            handed_over: AtomicBool::new(false),
            reconciler: AtomicU64::new(0),
            inherited: Mutex::default(),
            restored: Mutex::default(),
        }
    }

    /// Loads the registry a previous (or the handing-over) ztunnel persisted. Called once, after
    /// any hand-over and before the agent socket accepts requests.
    pub fn restore(&self) {
        let Some(registered) = self.registry_file.as_deref().map(load) else { return };
        if !registered.is_empty() {
            tracing::info!(pods = registered.len(), "pods registered before; re-enrolling after the first snapshot");
        }
        *lock(&self.restored) = Some(registered.keys().cloned().collect());
        *lock(&self.registered) = registered;
    }

    /// Whether this ztunnel has a registry to take pods over into.
    pub fn has_registry(&self) -> bool {
        self.registry_file.is_some()
    }

    /// A pod registered before this ztunnel started that is not yet served (or known to stay
    /// outside the mesh), and where it stands: readiness waits for none to be left, once. A
    /// newer ztunnel is told ready before the one it took over from drains, so ready must mean
    /// that every pod that one served is served here.
    pub fn restored_waiting(&self) -> Option<(String, String)> {
        let mut restored = lock(&self.restored);
        let registered = lock(&self.registered);
        let waiting = restored.as_ref()?.iter().find_map(|uid| match registered.get(uid).map(|r| &r.standing) {
            None | Some(Standing::Meshed | Standing::NotMeshed { .. } | Standing::Unknown) => None,
            Some(s) => Some((uid.clone(), s.to_string())),
        });
        if waiting.is_none() {
            *restored = None;
        }
        waiting
    }

    /// Gives the pods up to a newer ztunnel on this node: the registry is written one last time
    /// for it to load, and from then on this one changes neither capture nor the registry (the
    /// newer one does). Returns a descriptor of every enrolled pod's listeners for the newer one;
    /// this one keeps accepting on them until it drains.
    pub fn hand_over(&self) -> Vec<(HandedListener, OwnedFd)> {
        self.persist();
        if !self.handed_over.swap(true, Ordering::AcqRel) {
            tracing::info!(
                pods = lock(&self.enrolled).len(),
                "handed the pods over to a newer ztunnel; serving their connections until told to drain"
            );
            // Wake the reconciler so it sees the hand-over and stops.
            self.kick.notify_one();
        }
        // The enrolled pods' listeners, and those this one inherited and has not used yet (a
        // hand-over that follows another before every pod was enrolled again).
        let enrolled = lock(&self.enrolled);
        let inherited = lock(&self.inherited);
        let listeners =
            enrolled.values().flat_map(|e| e.listeners.iter().map(move |(port, fd)| (e.ns.path(), *port, fd))).chain(
                inherited.iter().flat_map(|(netns, l)| l.iter().map(move |(port, fd)| (netns.as_path(), *port, fd))),
            );
        let mut handed = Vec::new();
        for (netns, port, fd) in listeners {
            match fd.try_clone() {
                Ok(fd) => handed.push((HandedListener { netns: netns.to_path_buf(), port }, fd)),
                Err(err) => tracing::warn!(netns = %netns.display(), port, error = %err,
                    "cannot pass a listener on; the newer ztunnel opens its own once this one drains"),
            }
        }
        handed
    }

    /// Manages the pods again after a hand-over whose newer ztunnel is gone: the registry it may
    /// have changed is loaded, pods it removed meanwhile are released here too, and the caller
    /// restarts the reconciler. This ztunnel kept serving the pods throughout.
    pub async fn take_back(&self) {
        let reloaded = self.registry_file.as_deref().map(load).unwrap_or_default();
        let before = std::mem::replace(&mut *lock(&self.registered), reloaded);
        // Before the hand-over ends, so that no reconciler from before it runs again.
        self.reconciler.fetch_add(1, Ordering::AcqRel);
        self.handed_over.store(false, Ordering::Release);
        let gone: Vec<(String, Registered)> = {
            let registered = lock(&self.registered);
            let enrolled = lock(&self.enrolled);
            enrolled
                .keys()
                .filter(|uid| registered.get(*uid).is_none_or(|r| before.get(*uid).is_some_and(|b| b.netns != r.netns)))
                .filter_map(|uid| Some((uid.clone(), before.get(uid)?.clone())))
                .collect()
        };
        for (uid, r) in gone {
            let _ = self.unenroll(&uid, &r).await;
        }
        self.persist();
        self.kick.notify_one();
    }

    /// Keeps the listeners a handing-over ztunnel passed, for the pods' enrollments to use.
    pub fn inherit(&self, listeners: Vec<Inherited>) {
        let mut inherited = lock(&self.inherited);
        for i in listeners {
            inherited.entry(i.listener.netns).or_default().push((i.listener.port, i.fd));
        }
    }

    /// Closes this process's copies of the pods' listeners, so that a draining ztunnel no longer
    /// holds them open (a newer one that took them over keeps its own).
    pub fn close_listeners(&self) {
        for e in lock(&self.enrolled).values_mut() {
            e.listeners.clear();
        }
        lock(&self.inherited).clear();
    }

    pub fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Acquire)
    }

    pub fn uid(&self, namespace: &str, name: &str) -> String {
        format!("{}//v1/Pod/{namespace}/{name}", self.cluster_id)
    }

    /// Enrollments still being set up; readiness waits for them.
    pub fn in_progress(&self) -> usize {
        self.in_progress.load(Ordering::Acquire)
    }

    pub fn capture_mode(&self) -> &'static str {
        self.capture.name()
    }

    pub fn list(&self) -> Vec<PodInfo> {
        let registered = lock(&self.registered).clone();
        let enrolled = lock(&self.enrolled);
        registered
            .into_iter()
            .map(|(uid, r)| PodInfo {
                enrolled: enrolled.contains_key(&uid),
                reason: r.standing.to_string(),
                netns: r.netns.display().to_string(),
                uid,
            })
            .collect()
    }

    /// Registers pod `namespace/name` whose network namespace is at `netns`. A new path for a
    /// known pod (it was recreated) replaces the old registration. Waits briefly for the outcome
    /// and returns the pod's state.
    pub async fn add(
        &self,
        namespace: &str,
        name: &str,
        netns: &Path,
        ip: Option<Ipv4Addr>,
        container: Option<String>,
    ) -> Result<PodInfo, String> {
        if let Err(e) = crate::netns::open_namespace_file(netns) {
            return Err(format!("pod {namespace}/{name}: netns {e}"));
        }
        let uid = self.uid(namespace, name);
        let fresh = Registered {
            namespace: namespace.into(),
            name: name.into(),
            netns: netns.into(),
            ip,
            captured: false,
            container,
            standing: Standing::Pending,
        };
        let replaced = {
            let mut reg = lock(&self.registered);
            match reg.get(&uid) {
                // Same pod again (a retried ADD): keep what we know.
                Some(o) if o.netns == netns => None,
                _ => {
                    // A new sandbox starts without the old one's backoff.
                    lock(&self.retry_at).remove(&uid);
                    reg.insert(uid.clone(), fresh)
                }
            }
        };
        if let Some(old) = replaced {
            // The pod was recreated: its old capture (pinned under the same name) must go, or
            // the new enrollment would re-point links of an interface that no longer exists.
            let _ = self.unenroll(&uid, &old).await;
        }
        self.persist();
        let mut passes = self.passes.subscribe();
        self.kick.notify_one();
        let standing = || lock(&self.registered).get(&uid).map(|r| r.standing.clone());
        // Answer once a pass has settled the pod, or after ADD_WAIT.
        let _ = tokio::time::timeout(ADD_WAIT, async {
            let _ = passes.changed().await;
            while standing().is_some_and(|s| !s.is_settled()) {
                if passes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        match standing() {
            Some(s) if s.is_settled() => self
                .list()
                .into_iter()
                .find(|p| p.uid == uid)
                .ok_or_else(|| format!("pod {namespace}/{name} was removed")),
            // Fail closed: a pod that ztunnel cannot yet say is outside the mesh must not start,
            // or it would run uncaptured. The CNI plugin fails ADD and the kubelet retries.
            Some(s) => {
                self.forget(&uid, netns).await;
                Err(format!(
                    "pod {namespace}/{name}: {}; not starting it until ztunnel knows whether to capture it",
                    match s {
                        Standing::Pending => "ztunnel has no configuration from the control plane yet".to_string(),
                        s => s.to_string(),
                    }
                ))
            }
            None => Err(format!("pod {namespace}/{name} was removed while it was being added")),
        }
    }

    /// Unregisters a pod whose ADD failed, unless a newer ADD (another netns) has replaced it.
    async fn forget(&self, uid: &str, netns: &Path) {
        let removed = {
            let mut reg = lock(&self.registered);
            match reg.get(uid) {
                Some(r) if r.netns == netns => reg.remove(uid),
                _ => None,
            }
        };
        if let Some(r) = removed {
            self.persist();
            let _ = self.unenroll(uid, &r).await;
        }
    }

    /// Forgets a pod and removes its capture. Unknown pods are not an error (DEL is idempotent).
    /// A remove for another sandbox than the registered one is a late DEL of a pod since
    /// recreated under the same name: it must not uncapture the new one.
    pub async fn remove(&self, namespace: &str, name: &str, container: Option<&str>) -> bool {
        let uid = self.uid(namespace, name);
        let removed = {
            let mut reg = lock(&self.registered);
            match reg.get(&uid) {
                Some(r) if container.is_some() && r.container.is_some() && r.container.as_deref() != container => {
                    tracing::info!(
                        pod = uid,
                        sandbox = container.unwrap_or_default(),
                        current = r.container.as_deref().unwrap_or_default(),
                        "ignoring remove for an older sandbox of a recreated pod"
                    );
                    None
                }
                _ => reg.remove(&uid),
            }
        };
        let Some(r) = removed else { return false };
        self.persist();
        let _ = self.unenroll(&uid, &r).await;
        tracing::info!(pod = uid, "pod unregistered");
        true
    }

    /// Reconciles registered pods with the control plane until dropped, or until they are handed
    /// over. The reconciler is the one current when this is called (not when the future is first
    /// polled); one from before a take-back stops at its next step.
    pub fn run(self: Arc<Self>, mut changes: watch::Receiver<u64>) -> impl std::future::Future<Output = ()> {
        let me = self.reconciler.load(Ordering::Acquire);
        async move {
            let mut synced = self.synced.clone();
            let _ = synced.wait_for(|s| *s).await;
            while !self.stale(me) {
                self.reconcile(me).await;
                self.passes.send_modify(|n| *n += 1);
                let now = Instant::now();
                // Only retries still ahead: one already due is started by the pass above, or has
                // its enrollment in flight, and waiting on it would spin until that ends.
                let next_retry =
                    lock(&self.retry_at).values().filter(|(at, _)| *at > now).map(|(at, _)| *at - now).min();
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = self.kick.notified() => {}
                    _ = tokio::time::sleep(next_retry.unwrap_or(RETRY).min(RETRY)) => {}
                }
            }
        }
    }

    /// Whether reconciler `me` must stop: the pods are handed over, or a take-back started
    /// another.
    fn stale(&self, me: u64) -> bool {
        self.handed_over() || self.reconciler.load(Ordering::Acquire) != me
    }

    /// One pass: start enrolling pods that should be meshed and are not, release those that should
    /// not be.
    async fn reconcile(self: &Arc<Self>, me: u64) {
        let registered = lock(&self.registered).clone();
        lock(&self.retry_at).retain(|uid, _| registered.contains_key(uid));
        for (uid, r) in registered {
            if self.stale(me) {
                return;
            }
            if lock(&self.enrolling).contains_key(&uid) {
                continue; // its task kicks another pass when done
            }
            let want = {
                let state = self.state.read().unwrap_or_else(|e| e.into_inner());
                let not_meshed = || Err(Standing::NotMeshed { namespace: r.namespace.clone() });
                let no_identity = || Standing::Failed("no service account".into());
                // The workload, once there is one, is authoritative; until the pod has an IP its
                // membership says whether to capture it, so a meshed pod is captured from the start.
                match (state.workload_by_uid(&uid), state.membership(&uid)) {
                    (Some(w), _) if w.tunnel_protocol != TunnelProtocol::Hbone as i32 => not_meshed(),
                    (Some(w), _) => route::identity(w).ok_or_else(no_identity),
                    (None, Some(m)) if !m.meshed => not_meshed(),
                    (None, Some(m)) => {
                        route::identity_of(&m.trust_domain, &m.namespace, &m.service_account).ok_or_else(no_identity)
                    }
                    (None, None) => Err(Standing::Unknown),
                }
            };
            let enrolled = lock(&self.enrolled).contains_key(&uid);
            match want {
                Ok(_) if enrolled => self.set_standing(&uid, Standing::Meshed),
                // Failed recently: it keeps its standing (the reason) until its retry is due.
                Ok(_) if lock(&self.retry_at).get(&uid).is_some_and(|(at, _)| *at > Instant::now()) => {}
                Ok(id) => {
                    self.set_standing(&uid, Standing::Enrolling);
                    lock(&self.enrolling).insert(uid.clone(), id.clone());
                    // Counted from now, so readiness never sees a gap before the task starts.
                    self.in_progress.fetch_add(1, Ordering::AcqRel);
                    let me = self.clone();
                    tokio::spawn(async move { me.enroll_and_settle(uid, r, id).await });
                }
                Err(standing) => {
                    lock(&self.retry_at).remove(&uid);
                    if enrolled || r.captured {
                        if let Err(e) = self.unenroll(&uid, &r).await {
                            // Still captured, so still marked so: the next pass tries again.
                            self.set_standing(&uid, Standing::ReleaseFailed(e));
                            continue;
                        }
                        self.set_captured(&uid, false);
                    }
                    self.set_standing(&uid, standing);
                }
            }
        }
        if self.stale(me) {
            return;
        }
        self.drop_unclaimed_listeners();
        self.sync_probe_table().await;
        let mut in_use: std::collections::HashSet<_> =
            lock(&self.enrolled).values().map(|e| e.identity.clone()).collect();
        in_use.extend(lock(&self.enrolling).values().cloned());
        self.certs.release_unused(&in_use);
    }

    /// Inherited listeners of pods that are gone or stay outside the mesh: kept, they would queue
    /// connections nobody accepts once the old ztunnel is gone, instead of refusing them. Those of
    /// a pod whose enrollment failed are kept for its retry: while the old ztunnel lives, nothing
    /// else can listen on its ports.
    fn drop_unclaimed_listeners(&self) {
        let registered = lock(&self.registered);
        let wanted = |netns: &PathBuf| {
            registered.values().any(|r| &r.netns == netns && !matches!(r.standing, Standing::NotMeshed { .. }))
        };
        lock(&self.inherited).retain(|netns, _| wanted(netns));
    }

    /// One pod's enrollment task, started by a pass (which counted it in `in_progress`).
    async fn enroll_and_settle(self: Arc<Self>, uid: String, r: Registered, id: hbone::Identity) {
        {
            let _in_progress = InProgress(&self.in_progress);
            // Never closed, so this only waits; the permit is held until the enrollment ends.
            let _slot = self.enroll_slots.acquire().await;
            match self.enroll(&uid, &r, &id).await {
                // The pod may have been removed (DEL, or a failed ADD) or recreated meanwhile;
                // its removal could not see an enrollment not yet recorded.
                Ok(()) if lock(&self.registered).get(&uid).is_none_or(|now| now.netns != r.netns) => {
                    let _ = self.unenroll(&uid, &r).await;
                }
                Ok(()) => {
                    lock(&self.retry_at).remove(&uid);
                    self.set_standing(&uid, Standing::Meshed);
                }
                Err(e) => {
                    let delay = {
                        let mut retry_at = lock(&self.retry_at);
                        let delay = retry_at.get(&uid).map_or(RETRY_MIN, |(_, d)| (*d * 2).min(RETRY_MAX));
                        retry_at.insert(uid.clone(), (Instant::now() + delay, delay));
                        delay
                    };
                    tracing::warn!(pod = uid, error = %e, retry_in = ?delay, "enrollment failed");
                    self.set_standing(&uid, Standing::Failed(e));
                }
            }
            lock(&self.enrolling).remove(&uid);
        }
        self.passes.send_modify(|n| *n += 1);
        // The control plane may have changed its mind meanwhile, and the probe table and the
        // certificates held follow the enrolled set.
        self.kick.notify_one();
    }

    /// Points the node's probe SNAT at exactly the enrolled pods, installing the table first if
    /// this run has not yet.
    async fn sync_probe_table(&self) {
        let mut want: Vec<Ipv4Addr> = {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            let workload_ip = |uid: &str| state.workload_by_uid(uid)?.addresses.iter().find_map(|a| ipv4(a));
            lock(&self.enrolled).iter().filter_map(|(uid, e)| workload_ip(uid).or(e.cni_ip)).collect()
        };
        want.sort_unstable();
        let current = lock(&self.probe_targets).clone();
        if current.as_ref() == Some(&want) {
            return;
        }
        let install = current.is_none();
        let list = want.clone();
        let written = tokio::task::spawn_blocking(move || {
            if install {
                probes::install()?;
            }
            probes::sync(&list)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match written {
            Ok(()) => {
                if install {
                    tracing::info!(table = probes::TABLE, source = %probes::PROBE_SOURCE, "node probes to meshed pods bypass capture");
                }
                *lock(&self.probe_targets) = Some(want);
            }
            Err(e) if !self.probe_table_warned.swap(true, Ordering::Relaxed) => tracing::warn!(
                error = %e,
                "node probe table not installed: probes from this node to meshed pods count as plaintext, \
                 so STRICT rejects them; retrying"
            ),
            Err(e) => tracing::debug!(error = %e, "node probe table still not installed"),
        }
    }

    fn set_standing(&self, uid: &str, standing: Standing) {
        if let Some(r) = lock(&self.registered).get_mut(uid) {
            r.standing = standing;
        }
    }

    fn set_captured(&self, uid: &str, captured: bool) {
        let changed = match lock(&self.registered).get_mut(uid) {
            Some(r) if r.captured != captured => {
                r.captured = captured;
                true
            }
            _ => false,
        };
        if changed {
            self.persist();
        }
    }

    async fn enroll(&self, uid: &str, r: &Registered, id: &hbone::Identity) -> Result<(), String> {
        let cert = self.certs.get(id).await.map_err(|e| format!("certificate: {e}"))?;
        let path = r.netns.clone();
        let ns = Arc::new(
            tokio::task::spawn_blocking(move || Netns::open(&path))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?,
        );
        let pod = self.proxy.pod(uid.to_string(), ns.clone(), &cert)?;
        let inherited = self.inherited_for(uid, &r.netns);
        let proxy = self.proxy.clone();
        let (tasks, listeners) = self
            .data
            .spawn(async move { proxy.serve_pod(pod, inherited).await })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("listeners: {e}"))?;
        let enrolled = Enrolled { ns: ns.clone(), identity: id.clone(), cni_ip: r.ip, tasks, listeners };
        if self.handed_over() {
            return Err("handed over to a newer ztunnel".into());
        }
        // Mark before installing: if we crash in between, the next run cleans up.
        self.set_captured(uid, true);
        let capture = self.capture.clone();
        let key = capture_key(r);
        tokio::task::spawn_blocking(move || capture.install(&ns, &key))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("capture ({}): {e}", self.capture.name()))?;
        if self.handed_over() {
            // Handed over during the install, so its listeners were not passed on: closing them
            // lets the newer ztunnel open its own.
            return Err("handed over to a newer ztunnel".into());
        }
        tracing::info!(pod = uid, netns = %r.netns.display(), identity = %id, capture = self.capture.name(), "pod enrolled");
        lock(&self.enrolled).insert(uid.to_string(), enrolled);
        // Its listeners hold the inherited sockets now.
        lock(&self.inherited).remove(&r.netns);
        Ok(())
    }

    /// Copies of the listeners the previous ztunnel passed for this pod, by port, each checked to
    /// be a TCP listener on that port inside the pod's namespace; one that is not is closed, and a
    /// new one opened in its place. The originals stay until the enrollment succeeds, so a failed
    /// one can be retried with them.
    fn inherited_for(&self, uid: &str, netns: &Path) -> HashMap<u16, std::net::TcpListener> {
        let mut inherited = lock(&self.inherited);
        let Some(passed) = inherited.get_mut(netns) else { return HashMap::new() };
        passed.retain(|(port, fd)| match crate::fdpass::check_listener(fd.as_fd(), netns, *port) {
            Ok(_) if LISTENER_PORTS.contains(port) => true,
            Ok(_) => {
                tracing::warn!(pod = uid, port, "ignoring a passed listener for a port ztunnel does not use");
                false
            }
            Err(e) => {
                tracing::warn!(pod = uid, port, error = %e, "ignoring a passed listener");
                false
            }
        });
        let mut usable = HashMap::new();
        for (port, fd) in passed.iter() {
            match fd.try_clone() {
                Ok(fd) => {
                    usable.insert(*port, std::net::TcpListener::from(fd));
                }
                Err(e) => tracing::warn!(pod = uid, port, error = %e, "cannot use a passed listener"),
            }
        }
        usable
    }

    /// Removes a pod's capture, then its listeners. When the capture cannot be removed, a pod
    /// still registered keeps its listeners (its traffic is still steered to them) and the error
    /// is returned for the caller to retry; a pod already forgotten loses them regardless.
    async fn unenroll(&self, uid: &str, r: &Registered) -> Result<(), String> {
        if self.handed_over() {
            // The capture is the newer ztunnel's now; this one's listeners go when it drains.
            return Ok(());
        }
        let enrolled = lock(&self.enrolled).remove(uid);
        let removed = self.remove_capture(enrolled.as_ref().map(|e| e.ns.clone()), r).await;
        if let Err(e) = &removed {
            tracing::warn!(pod = uid, error = %e, "removing capture failed");
            let registered = lock(&self.registered).get(uid).is_some_and(|now| now.netns == r.netns);
            if let (true, Some(e)) = (registered, enrolled) {
                lock(&self.enrolled).insert(uid.to_string(), e);
            }
            return removed;
        }
        drop(enrolled);
        tracing::info!(pod = uid, "pod released from the mesh");
        Ok(())
    }

    /// Capture goes first when a pod leaves, so no new connection reaches a listener that is
    /// about to close. Without an enrollment (after a restart) the namespace is opened by path;
    /// only a namespace that is gone took its capture with it.
    async fn remove_capture(&self, ns: Option<Arc<Netns>>, r: &Registered) -> Result<(), String> {
        let ns = match ns {
            Some(ns) => Some(ns),
            None if r.netns.exists() => {
                let path = r.netns.clone();
                match tokio::task::spawn_blocking(move || Netns::open(&path)).await.map_err(|e| e.to_string())? {
                    Ok(ns) => Some(Arc::new(ns)),
                    Err(_) if !r.netns.exists() => None,
                    Err(e) => return Err(format!("opening {}: {e}", r.netns.display())),
                }
            }
            None => None,
        };
        let capture = self.capture.clone();
        let key = capture_key(r);
        tokio::task::spawn_blocking(move || capture.remove(ns.as_deref(), &key))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("removing capture ({}): {e}", self.capture.name()))
    }

    fn persist(&self) {
        let Some(path) = &self.registry_file else { return };
        if self.handed_over() {
            return;
        }
        let body = match serde_json::to_vec_pretty(&*lock(&self.registered)) {
            Ok(b) => b,
            Err(e) => return tracing::warn!(error = %e, "serializing the pod registry"),
        };
        if let Err(e) = write_private(path, &body) {
            tracing::warn!(path = %path.display(), error = %e, "persisting the pod registry failed");
        }
    }
}

/// A stable name for a pod's capture objects (BPF pins).
fn ipv4(bytes: &[u8]) -> Option<Ipv4Addr> {
    match crate::state::ip(bytes)? {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

fn capture_key(r: &Registered) -> String {
    format!("{}_{}", r.namespace, r.name)
}

/// Writes via a temporary file and rename, mode 0600, so a crash never leaves half a registry.
fn write_private(path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Loads the registry, dropping pods whose namespace is gone (deleted while we were down).
fn load(path: &Path) -> BTreeMap<String, Registered> {
    let body = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "reading the pod registry; starting empty");
            return BTreeMap::new();
        }
    };
    match serde_json::from_slice::<BTreeMap<String, Registered>>(&body) {
        Ok(mut m) => {
            m.retain(|uid, r| {
                let keep = r.netns.exists();
                if !keep {
                    tracing::info!(pod = uid, "pod's netns is gone; forgetting it");
                }
                keep
            });
            m
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "pod registry is corrupt; starting empty");
            BTreeMap::new()
        }
    }
}
