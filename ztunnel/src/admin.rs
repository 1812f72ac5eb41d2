//! The operator endpoints: admin (`/config_dump`, localhost only), Prometheus metrics, and
//! readiness. All run on the control runtime, away from the data plane.

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use axum::extract::State as Extract;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_proto::istio::security::{Action, Scope};
use trellis_proto::istio::workload::{TunnelProtocol, Workload, WorkloadStatus};

use crate::identity::CertManager;
use crate::metrics::Metrics;
use crate::node_ports::Stop;
use crate::pods::Pods;
use crate::proxy::{route, Proxy};
use crate::state::{ip, State};

#[derive(Clone)]
pub struct Admin {
    pub node: String,
    pub state: Arc<RwLock<State>>,
    pub certs: Arc<CertManager>,
    pub metrics: Arc<Metrics>,
    pub pods: Arc<Pods>,
    pub proxy: Arc<Proxy>,
    pub synced: watch::Receiver<bool>,
}

fn ips(list: &[Vec<u8>]) -> Vec<String> {
    list.iter().filter_map(|b| ip(b)).map(|a| a.to_string()).collect()
}

fn workload_json(w: &Workload) -> Value {
    let mut services: Vec<&String> = w.services.keys().collect();
    services.sort();
    json!({
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "addresses": ips(&w.addresses),
        "node": w.node,
        "identity": route::identity(w).map(|i| i.to_string()),
        "protocol": if w.tunnel_protocol == TunnelProtocol::Hbone as i32 { "HBONE" } else { "TCP" },
        "status": if w.status == WorkloadStatus::Healthy as i32 { "Healthy" } else { "Unhealthy" },
        "services": services,
        "authorization_policies": w.authorization_policies,
    })
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t).format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

impl Admin {
    pub fn config_dump(&self) -> Value {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let mut workloads: Vec<Value> = state.workloads().map(workload_json).collect();
        workloads.sort_by_key(|w| w["uid"].as_str().map(str::to_string));
        let mut services: Vec<Value> = state
            .services()
            .map(|s| {
                let key = format!("{}/{}", s.namespace, s.hostname);
                json!({
                    "name": s.name,
                    "namespace": s.namespace,
                    "hostname": s.hostname,
                    "vips": s.addresses.iter().filter_map(|a| ip(&a.address)).map(|a| a.to_string()).collect::<Vec<_>>(),
                    "ports": s.ports.iter().map(|p| json!({"port": p.service_port, "target_port": p.target_port})).collect::<Vec<_>>(),
                    "endpoints": state.endpoints(&key).map(|w| w.uid.clone()).collect::<Vec<_>>(),
                    "subject_alt_names": s.subject_alt_names,
                })
            })
            .collect();
        services.sort_by_key(|s| s["hostname"].as_str().map(str::to_string));
        let mut policies: Vec<Value> = state
            .policies()
            .map(|(name, p)| {
                json!({
                    "name": name,
                    "scope": Scope::try_from(p.scope).map(|s| s.as_str_name()).unwrap_or("UNKNOWN"),
                    "action": Action::try_from(p.action).map(|a| a.as_str_name()).unwrap_or("UNKNOWN"),
                    "rules": p.rules.len(),
                })
            })
            .collect();
        policies.sort_by_key(|p| p["name"].as_str().map(str::to_string));
        drop(state);
        let (open, recent) = self.metrics.connections.snapshot();
        let now = SystemTime::now();
        let mut certificates: Vec<Value> = self
            .certs
            .held()
            .into_iter()
            .map(|(id, not_after)| {
                json!({
                    "identity": id.to_string(),
                    "expires": rfc3339(not_after),
                    "expires_in_s": not_after.duration_since(now).map(|d| d.as_secs()).unwrap_or(0),
                })
            })
            .collect();
        certificates.sort_by_key(|c| c["identity"].as_str().map(str::to_string));
        let window_bytes = |(granted, budget): (u64, u64)| json!({ "granted": granted, "budget": budget });
        json!({
            "node": self.node,
            "workloads": workloads,
            "services": services,
            "policies": policies,
            "certificates": certificates,
            "pods": self.pods.list(),
            // Once true, a newer ztunnel manages the pods and this one only serves until it drains.
            "pods_handed_over": self.pods.handed_over(),
            "capture": self.pods.capture_mode(),
            "nodes": self.state.read().unwrap_or_else(|e| e.into_inner()).nodes().cloned().collect::<Vec<_>>(),
            "connections": {
                "active": self.metrics.active.get(),
                "pooled_hbone": self.proxy.pooled_connections(),
                "inbound_window_bytes": window_bytes(self.proxy.inbound_windows()),
                "outbound_window_bytes": window_bytes(self.proxy.outbound_windows()),
                "open": open,
                "recent": recent,
            },
        })
    }

    fn ready(&self) -> Result<(), String> {
        if self.pods.handed_over() {
            return Err("handed the pods over to a newer ztunnel; serving until told to drain".into());
        }
        readiness(*self.synced.borrow(), self.pods.in_progress())?;
        match self.pods.restored_waiting() {
            Some((pod, standing)) => {
                Err(format!("pod {pod}, registered before this start, is not served yet: {standing}"))
            }
            None => Ok(()),
        }
    }
}

/// Ready once ztunnel has its config and no enrollment is under way. (The pods registered before
/// this start must be served too, which also covers the time before the first reconcile pass:
/// see [`crate::pods::Pods::restored_waiting`].)
fn readiness(synced: bool, enrolling: usize) -> Result<(), String> {
    match (synced, enrolling) {
        (false, _) => Err("waiting for the first xDS snapshot".into()),
        (true, 1..) => Err("enrolling pods (fetching certificates)".into()),
        (true, 0) => Ok(()),
    }
}

async fn config_dump(Extract(a): Extract<Admin>) -> Json<Value> {
    Json(a.config_dump())
}

async fn metrics(Extract(a): Extract<Admin>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], a.metrics.encode())
}

async fn ready(Extract(a): Extract<Admin>) -> (StatusCode, String) {
    match a.ready() {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

pub async fn serve_admin(listener: TcpListener, a: Admin, stop: Stop) -> std::io::Result<()> {
    let app = Router::new().route("/config_dump", get(config_dump)).route("/healthz/ready", get(ready)).with_state(a);
    axum::serve(listener, app).with_graceful_shutdown(stop).await
}

pub async fn serve_metrics(listener: TcpListener, a: Admin, stop: Stop) -> std::io::Result<()> {
    let app = Router::new().route("/metrics", get(metrics)).route("/stats/prometheus", get(metrics)).with_state(a);
    axum::serve(listener, app).with_graceful_shutdown(stop).await
}

pub async fn serve_readiness(listener: TcpListener, a: Admin, stop: Stop) -> std::io::Result<()> {
    let app = Router::new().route("/healthz/ready", get(ready)).with_state(a);
    axum::serve(listener, app).with_graceful_shutdown(stop).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn ready_after_the_first_snapshot_with_no_enrollment_under_way() {
        use super::readiness;
        assert!(readiness(false, 0).is_err());
        assert!(readiness(true, 2).is_err());
        assert_eq!(readiness(true, 0), Ok(()));
    }
}
