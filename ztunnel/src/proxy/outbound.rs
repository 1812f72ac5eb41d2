//! 15001: connections the pod opens, captured with their original destination.

use std::net::SocketAddr;
use std::sync::Arc;

use hbone::client::{Baggage, Connection, HboneError, Keepalive, Tunnel};
use hbone::pool::PoolKey;
use hbone::Identity;
use http::StatusCode;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::conn::{Record, Tracked, Tracker};
use super::route::{self, Peer, Route};
use super::{is_listener_loop, peer_of, splice, Pod, Proxy};
use crate::identity::Issued;
use crate::log_budget::warn_limited;
use crate::metrics::Reporter;
use crate::netns::Netns;
use crate::sockets;

const DIRECTION: &str = "outbound";

impl Proxy {
    pub(super) async fn outbound(self: Arc<Self>, pod: Arc<Pod>, client: TcpStream) {
        let src = peer_of(&client);
        let dst = match sockets::original_destination(&client) {
            Ok(d) if !is_listener_loop(d) => d,
            other => {
                tracing::debug!(%src, dst = ?other.ok(), "outbound connection to a ztunnel port; refused");
                self.metrics.reject(DIRECTION, "bad_request");
                return sockets::reset(client);
            }
        };
        let (source, workload_baggage, route) = {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            let w = state.workload_by_uid(&pod.uid);
            // Until its IP reaches the control plane a new pod has no workload, but its
            // membership already names the identity it is enrolled as.
            let membership = || state.membership(&pod.uid).filter(|m| m.meshed).map(Peer::of_membership);
            (w.map(Peer::of).or_else(membership), w.map(baggage), route::outbound(&state, dst, self.next_pick()))
        };
        // Fail closed: a pod whose workload vanished from config has no identity to send as.
        let Some(source) = source else {
            warn_limited!(per src.ip(); "source workload unknown; connection refused", pod = pod.uid, %dst);
            self.metrics.reject(DIRECTION, "unknown_source");
            return sockets::reset(client);
        };
        let record = |dst: SocketAddr, dst_peer: Peer, service: Option<String>, mtls: bool| Record {
            direction: DIRECTION,
            reporter: Reporter::source,
            src,
            dst,
            src_peer: source.clone(),
            dst_peer,
            service: service.unwrap_or_default(),
            mtls,
        };
        match route {
            Route::NoEndpoint { service } => {
                warn_limited!(per src.ip(); "no healthy endpoint", %src, %dst, service);
                self.metrics.reject(DIRECTION, "no_endpoint");
                sockets::reset(client);
            }
            Route::Passthrough(addr) => self.plain(pod, client, record(addr, Peer::default(), None, false)).await,
            Route::Direct { addr, peer, service } => self.plain(pod, client, record(addr, peer, service, false)).await,
            Route::Hbone { addr, authority, identities, peer, service } => {
                let Some(src_id) = source.identity.clone() else {
                    warn_limited!(per src.ip(); "source workload has no service account; cannot use mTLS", pod = pod.uid);
                    self.metrics.reject(DIRECTION, "unknown_source");
                    return sockets::reset(client);
                };
                let cert = match self.cert(&src_id).await {
                    Ok(c) => c,
                    Err(e) => {
                        warn_limited!(per src.ip(); "no certificate; connection refused", identity = %src_id, error = %e);
                        self.metrics.reject(DIRECTION, "tls");
                        return sockets::reset(client);
                    }
                };
                let key = PoolKey {
                    source_identity: src_id,
                    destination_identities: identities.clone(),
                    source_ip: src.ip(),
                    destination: addr,
                };
                let tunnel = Tunnel { authority, source: src, baggage: workload_baggage.unwrap_or_default() };
                let ns = pod.ns.clone();
                let dial = || self.dial(ns, addr, cert, identities);
                match self.pool.open(&key, &tunnel, dial).await {
                    Ok(stream) => {
                        let tracker = Tracker::open(record(authority, peer, service, true), self.metrics.clone());
                        if let Err(e) = hbone::splice(Tracked::client_side(client, tracker), stream).await {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    }
                    Err(e) => {
                        warn_limited!(per src.ip(); "HBONE tunnel failed", %src, %dst, via = %addr, error = %e);
                        self.metrics.reject(DIRECTION, rejection_reason(&e));
                        sockets::reset(client);
                    }
                }
            }
        }
    }

    async fn plain(&self, pod: Arc<Pod>, client: TcpStream, record: Record) {
        match self.connect_tracked(&pod, record, None).await {
            Some(up) => splice(client, up).await,
            None => sockets::reset(client),
        }
    }

    /// A new HBONE connection from the pod's namespace: TCP, mutual TLS that accepts only
    /// `identities`, then HTTP/2.
    async fn dial(
        &self,
        ns: Arc<Netns>,
        addr: SocketAddr,
        cert: Issued,
        identities: Vec<Identity>,
    ) -> Result<Connection, HboneError> {
        let tcp = sockets::connect(&ns, None, addr, self.settings.mark).await?;
        let cfg = hbone::tls::client_config(cert.slot, self.roots.clone(), identities)
            .map_err(|e| HboneError::Tls(e.to_string()))?;
        let tls = tokio::time::timeout(
            super::TLS_HANDSHAKE_TIMEOUT,
            TlsConnector::from(Arc::new(cfg))
                .connect_with(ServerName::IpAddress(addr.ip().into()), tcp, |c| hbone::tls::size_send_buffer(c)),
        )
        .await
        .map_err(|_| HboneError::Tls(format!("handshake with {addr} timed out")))?
        .map_err(|e| HboneError::Tls(e.to_string()))?;
        Connection::handshake_with(tls, Keepalive::default(), Some(self.outbound_windows.grant())).await
    }
}

fn baggage(w: &trellis_proto::istio::workload::Workload) -> Baggage {
    use trellis_proto::istio::workload::WorkloadType;
    Baggage {
        cluster: w.cluster_id.clone(),
        namespace: w.namespace.clone(),
        workload_type: match w.workload_type() {
            WorkloadType::Deployment => "deployment",
            WorkloadType::Cronjob => "cronjob",
            WorkloadType::Job => "job",
            WorkloadType::Pod => "pod",
        }
        .into(),
        workload_name: super::route::workload_name(w).to_string(),
        service_name: w.canonical_name.clone(),
        service_version: w.canonical_revision.clone(),
    }
}

/// The `reason` label for a tunnel that did not open: a peer that failed mutual TLS (possibly an
/// impostor), else from the peer's status code (PROTOCOLS.md): only 401 is a policy decision;
/// 503 means the peer could not reach the pod.
fn rejection_reason(e: &HboneError) -> &'static str {
    match e {
        e if e.is_tls() => "tls",
        HboneError::Status(StatusCode::UNAUTHORIZED) => "policy",
        HboneError::Status(StatusCode::BAD_REQUEST) => "bad_request",
        _ => "upstream",
    }
}
