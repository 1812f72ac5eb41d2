//! 15008: HBONE from other ztunnels. Mutual TLS (chain and trust domain checked by the TLS
//! config), then per CONNECT: the authority must be this pod (400), L4 policy (401), then the
//! connection to the pod (503 if it fails).

use std::net::SocketAddr;
use std::sync::Arc;

use hbone::server::{Inbound, Limits};
use http::StatusCode;
use tokio::net::TcpStream;

use super::conn::{Record, Tracked};
use super::route::Peer;
use super::{is_listener_loop, peer_of, Pod, Proxy, TLS_HANDSHAKE_TIMEOUT};
use crate::metrics::Reporter;
use crate::state::policy::Decision;

const DIRECTION: &str = "inbound";

impl Proxy {
    pub(super) async fn inbound(self: Arc<Self>, pod: Arc<Pod>, tcp: TcpStream) {
        let src = peer_of(&tcp);
        let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, pod.acceptor.accept(tcp)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::warn!(%src, pod = pod.uid, error = %e, "HBONE TLS handshake rejected");
                self.metrics.reject(DIRECTION, "tls");
                return;
            }
            Err(_) => {
                tracing::warn!(%src, pod = pod.uid, "HBONE TLS handshake timed out");
                self.metrics.reject(DIRECTION, "tls");
                return;
            }
        };
        let peer = hbone::tls::peer_identity(tls.get_ref().1);
        let me = self.clone();
        let drained = self.drained();
        let handler = move |req: Inbound| {
            let (me, pod) = (me.clone(), pod.clone());
            async move { me.tunnel(&pod, src, req).await }
        };
        if let Err(e) = hbone::server::serve(tls, peer, Limits::default(), drained, handler).await {
            tracing::debug!(%src, error = %e, "HBONE connection ended with an error");
        }
    }

    async fn tunnel(&self, pod: &Pod, src: SocketAddr, req: Inbound) -> Result<Tracked<TcpStream>, StatusCode> {
        let dst = req.authority;
        let (dst_peer, decision) = match self.authorize(pod, req.peer.clone(), src, dst) {
            Some(d) if !is_listener_loop(dst) => d,
            _ => {
                tracing::warn!(%src, authority = %dst, pod = pod.uid, "CONNECT authority is not this workload");
                self.metrics.reject(DIRECTION, "bad_request");
                return Err(StatusCode::BAD_REQUEST);
            }
        };
        let src_peer = self.source_peer(req.peer.clone(), src);
        if let Decision::Deny(policy) = decision {
            tracing::warn!(
                policy,
                source = src_peer.identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                destination = dst_peer.identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                %src,
                %dst,
                "connection denied by authorization policy"
            );
            self.metrics.reject(DIRECTION, "policy");
            return Err(StatusCode::UNAUTHORIZED);
        }
        let record = Record {
            direction: DIRECTION,
            reporter: Reporter::destination,
            src,
            dst,
            src_peer,
            dst_peer,
            service: String::new(),
            mtls: true,
        };
        // Each tunnel takes a slot of its own, counted against the calling pod's share too: one
        // HBONE connection carries up to 100 of them, and each is an upstream socket on this node.
        let slot = self.admit(DIRECTION, src.ip()).ok_or(StatusCode::SERVICE_UNAVAILABLE)?;
        let upstream = self.connect_tracked(pod, record).await.ok_or(StatusCode::SERVICE_UNAVAILABLE)?;
        Ok(upstream.holding(slot))
    }

    /// The source for telemetry: the workload at the caller's address when it carries the
    /// verified identity, else just that identity. The peer's `baggage` is not used: any holder of
    /// a mesh certificate could put a fresh name in every tunnel, and each would become metric
    /// series that are never removed.
    fn source_peer(&self, identity: Option<hbone::Identity>, src: SocketAddr) -> Peer {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        match state.workload_by_ip(src.ip()).map(Peer::of) {
            Some(p) if p.identity.is_some() && p.identity == identity => p,
            _ => Peer {
                namespace: identity.as_ref().map(|i| i.namespace.clone()).unwrap_or_default(),
                identity,
                ..Peer::default()
            },
        }
    }
}
