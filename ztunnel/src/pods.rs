//! Enrolled pods on this node: for each, its namespace handle, its listeners, and its capture.
//!
//! Enrolling a pod is ordered so that traffic is never captured before something listens: wait
//! for the workload in xDS, obtain its certificate, open the three listeners inside the pod's
//! namespace, and only then install the capture rules.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use trellis_proto::istio::workload::{TunnelProtocol, Workload};

use crate::capture;
use crate::identity::CertManager;
use crate::netns::Netns;
use crate::proxy::{route, Proxy};
use crate::state::State;

/// How long an enrollment waits for the pod to appear in xDS.
const WORKLOAD_WAIT: Duration = Duration::from_secs(10);

struct Enrolled {
    netns: PathBuf,
    ns: Arc<Netns>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Enrolled {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub struct Pods {
    proxy: Arc<Proxy>,
    state: Arc<RwLock<State>>,
    certs: Arc<CertManager>,
    data: tokio::runtime::Handle,
    cluster_id: String,
    mark: u32,
    enrolled: Mutex<HashMap<String, Enrolled>>,
    in_progress: AtomicUsize,
}

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
pub struct PodInfo {
    pub uid: String,
    pub netns: String,
}

struct InProgress<'a>(&'a AtomicUsize);

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pods {
    pub fn new(
        proxy: Arc<Proxy>,
        state: Arc<RwLock<State>>,
        certs: Arc<CertManager>,
        data: tokio::runtime::Handle,
        cluster_id: String,
        mark: u32,
    ) -> Pods {
        Pods {
            proxy,
            state,
            certs,
            data,
            cluster_id,
            mark,
            enrolled: Mutex::default(),
            in_progress: AtomicUsize::new(0),
        }
    }

    pub fn uid(&self, namespace: &str, name: &str) -> String {
        format!("{}//v1/Pod/{namespace}/{name}", self.cluster_id)
    }

    /// Enrollments still being set up; readiness waits for them.
    pub fn in_progress(&self) -> usize {
        self.in_progress.load(Ordering::Acquire)
    }

    pub fn list(&self) -> Vec<PodInfo> {
        let enrolled = self.enrolled.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<PodInfo> = enrolled
            .iter()
            .map(|(uid, e)| PodInfo { uid: uid.clone(), netns: e.netns.display().to_string() })
            .collect();
        out.sort_by(|a, b| a.uid.cmp(&b.uid));
        out
    }

    async fn workload(&self, uid: &str) -> Option<Workload> {
        let deadline = Instant::now() + WORKLOAD_WAIT;
        loop {
            if let Some(w) = self.state.read().unwrap_or_else(|e| e.into_inner()).workload_by_uid(uid) {
                return Some(w.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Enrolls pod `namespace/name` whose network namespace is at `netns`. Idempotent for the
    /// same namespace path; a new path (the pod was recreated) replaces the old enrollment.
    pub async fn add(&self, namespace: &str, name: &str, netns: &Path) -> Result<(), String> {
        self.in_progress.fetch_add(1, Ordering::AcqRel);
        let _guard = InProgress(&self.in_progress);
        let uid = self.uid(namespace, name);
        if self.enrolled.lock().unwrap_or_else(|e| e.into_inner()).get(&uid).is_some_and(|e| e.netns == netns) {
            return Ok(());
        }
        let w = self.workload(&uid).await.ok_or_else(|| {
            format!("pod {namespace}/{name}: not known to the control plane after {WORKLOAD_WAIT:?} (uid {uid})")
        })?;
        if w.tunnel_protocol != TunnelProtocol::Hbone as i32 {
            return Err(format!(
                "pod {namespace}/{name} is not enrolled in the mesh: label its namespace istio.io/dataplane-mode=ambient"
            ));
        }
        let id = route::identity(&w).ok_or_else(|| format!("pod {namespace}/{name} has no service account"))?;
        let cert = self.certs.get(&id).await.map_err(|e| format!("pod {namespace}/{name}: certificate: {e}"))?;
        let path = netns.to_path_buf();
        let ns = Arc::new(
            tokio::task::spawn_blocking(move || Netns::open(&path))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("pod {namespace}/{name}: {e}"))?,
        );
        let pod = self.proxy.pod(uid.clone(), ns.clone(), &cert)?;
        let proxy = self.proxy.clone();
        let tasks = self
            .data
            .spawn(async move { proxy.serve_pod(pod).await })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("pod {namespace}/{name}: {e}"))?;
        let enrolled = Enrolled { netns: netns.to_path_buf(), ns: ns.clone(), tasks };
        let mark = self.mark;
        tokio::task::spawn_blocking(move || capture::install(&ns, mark))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("pod {namespace}/{name}: capture: {e}"))?;
        tracing::info!(pod = uid, netns = %netns.display(), identity = %id, "pod enrolled");
        self.enrolled.lock().unwrap_or_else(|e| e.into_inner()).insert(uid, enrolled);
        Ok(())
    }

    /// Removes capture and listeners. Removing an unknown pod is not an error (DEL is
    /// idempotent), and a namespace that is already gone needs no rule removal.
    pub async fn remove(&self, namespace: &str, name: &str) -> Result<bool, String> {
        let uid = self.uid(namespace, name);
        let Some(enrolled) = self.enrolled.lock().unwrap_or_else(|e| e.into_inner()).remove(&uid) else {
            return Ok(false);
        };
        let ns = enrolled.ns.clone();
        drop(enrolled);
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || capture::remove(&ns)).await {
            tracing::warn!(pod = uid, error = %e, "removing capture rules failed");
        }
        tracing::info!(pod = uid, "pod removed");
        Ok(true)
    }
}
