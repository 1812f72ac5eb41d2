//! 15008: HBONE from other ztunnels. Mutual TLS (chain and trust domain checked by the TLS
//! config) under a handshake slot, then a connection slot; then per CONNECT: the authority must
//! be this pod (400), L4 policy (401), then the connection to the pod (503 if it fails).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use hbone::server::{Inbound, Limits};
use http::StatusCode;
use tokio::net::TcpStream;
use tokio::time::{error::Elapsed, Instant};

use super::admission::Slot;
use super::conn::{self, Record, Tracked};
use super::{is_listener_loop, peer_of, Authorized, Pod, Proxy, DRAINING_HANDSHAKE_GRACE, TLS_HANDSHAKE_TIMEOUT};
use crate::log_budget::warn_limited;
use crate::metrics::Reporter;
use crate::state::policy::Decision;

const DIRECTION: &str = "inbound";

impl Proxy {
    pub(super) async fn inbound(self: Arc<Self>, pod: Arc<Pod>, tcp: TcpStream, handshake: Slot) {
        let src = peer_of(&tcp);
        let handshake_done = self.handshake(pod.acceptor.accept_with(tcp, |c| hbone::tls::size_send_buffer(c)));
        let tls = match handshake_done.await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                warn_limited!(per src.ip(); "HBONE TLS handshake rejected", %src, pod = pod.uid, error = %e);
                self.metrics.reject(DIRECTION, "tls");
                return;
            }
            Err(_) if *self.draining.borrow() => {
                warn_limited!(per src.ip(); "HBONE TLS handshake cut short: draining", %src, pod = pod.uid);
                self.metrics.reject(DIRECTION, "tls");
                return;
            }
            Err(_) => {
                warn_limited!(per src.ip(); "HBONE TLS handshake timed out", %src, pod = pod.uid);
                self.metrics.reject(DIRECTION, "tls");
                return;
            }
        };
        drop(handshake);
        let Some(_slot) = self.admit(DIRECTION, src.ip()) else {
            hbone::Abort::abort_on_close(tls.get_ref().0);
            return;
        };
        let peer = hbone::tls::peer_identity(tls.get_ref().1);
        let me = self.clone();
        let drained = self.drained();
        let handler = move |req: Inbound| {
            let (me, pod) = (me.clone(), pod.clone());
            async move { me.tunnel(&pod, src, req).await }
        };
        let limits = Limits { windows: Some(self.inbound_windows.clone()), ..Limits::default() };
        if let Err(e) = hbone::server::serve(tls, peer, limits, drained, handler).await {
            tracing::debug!(%src, error = %e, "HBONE connection ended with an error");
        }
    }

    /// The TLS handshake under its timeout, cut to [`DRAINING_HANDSHAKE_GRACE`] once a drain
    /// begins: an unauthenticated peer must not hold up a drain.
    async fn handshake<F: Future>(&self, handshake: F) -> Result<F::Output, Elapsed> {
        let deadline = Instant::now() + TLS_HANDSHAKE_TIMEOUT;
        tokio::pin!(handshake);
        tokio::select! {
            done = tokio::time::timeout_at(deadline, &mut handshake) => return done,
            () = self.drained() => {}
        }
        tokio::time::timeout_at(deadline.min(Instant::now() + DRAINING_HANDSHAKE_GRACE), handshake).await
    }

    async fn tunnel(&self, pod: &Pod, src: SocketAddr, req: Inbound) -> Result<Tracked<TcpStream>, StatusCode> {
        let dst = req.authority;
        let guard = conn::Guard { pod_uid: pod.uid.clone(), source: req.peer.clone() };
        let Authorized { source: src_peer, destination: dst_peer, decision } = match self
            .authorize(pod, req.peer, src, dst)
        {
            Some(a) if !is_listener_loop(dst) => a,
            _ => {
                warn_limited!(per src.ip(); "CONNECT authority is not this workload", %src, authority = %dst, pod = pod.uid);
                self.metrics.reject(DIRECTION, "bad_request");
                return Err(StatusCode::BAD_REQUEST);
            }
        };
        if let Decision::Deny(policy) = decision {
            warn_limited!(per src.ip();
                "connection denied by authorization policy",
                policy,
                source = src_peer.identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                destination = dst_peer.identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                %src,
                %dst
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
        let upstream = self.connect_tracked(pod, record, Some(guard)).await.ok_or(StatusCode::SERVICE_UNAVAILABLE)?;
        Ok(upstream.holding(slot))
    }
}
