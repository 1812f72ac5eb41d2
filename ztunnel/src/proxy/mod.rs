//! The data plane: per-pod listeners and the three proxy paths.
//!
//! ```text
//!   app ──(nft redirect)──► 15001 outbound ──► route ─┬─ HBONE (pool) ──► peer ztunnel 15008
//!                                                     └─ plain TCP (non-mesh / passthrough)
//!   peer ztunnel ──► 15008 inbound: mTLS, CONNECT, L4 policy ──► app
//!   plaintext client ──(nft redirect)──► 15006: PERMISSIVE only, L4 policy ──► app
//! ```
//!
//! Listeners live inside each enrolled pod's network namespace ([`crate::pods`]); this module
//! only needs the namespace handle to create sockets there.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hbone::pool::Pool;
use hbone::window::WindowBudget;
use hbone::Identity;
use rustls::RootCertStore;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use trellis_proto::istio::workload::TunnelProtocol;

use crate::identity::{CertError, CertManager, Issued};
use crate::log_budget::warn_limited;
use crate::metrics::{Metrics, Reporter};
use crate::netns::Netns;
use crate::sockets;
use crate::state::policy::{self, Decision};
use crate::state::State;

pub use hbone::admission;
pub mod conn;
mod inbound;
mod outbound;
mod plaintext;
pub mod route;

pub const OUTBOUND_PORT: u16 = 15001;
pub const PLAINTEXT_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = route::HBONE_PORT;
pub const LISTENER_PORTS: [u16; 3] = [OUTBOUND_PORT, PLAINTEXT_PORT, HBONE_PORT];

/// Bounds a peer that connects and then stalls in the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// What is left of an inbound handshake's time once a drain begins. A real peer's handshake
/// takes milliseconds and its tunnel is still served (HTTP/2 GOAWAY lets a first CONNECT in);
/// a stalled one would otherwise hold the drain for the whole handshake timeout.
const DRAINING_HANDSHAKE_GRACE: Duration = Duration::from_secs(1);
/// HBONE handshakes in flight on the node, and from one source (each at most the matching
/// connection cap). A handshake is a few milliseconds of work for a real peer, so these are far
/// above legitimate use, and they bound what unauthenticated peers can hold: memory for their
/// TLS state, and a share of new handshakes, never the slots of verified connections.
const MAX_HANDSHAKES: usize = 1024;
const MAX_HANDSHAKES_PER_SOURCE: usize = 64;
/// Per-direction copy buffer; with the connection cap this bounds proxy memory.
const COPY_BUFFER: usize = 64 << 10;

pub struct Settings {
    pub mark: u32,
    pub trust_domain: String,
    /// Connections in flight across all listeners; beyond it new ones are reset.
    pub max_connections: usize,
    /// Of those, how many one source address may hold.
    pub max_connections_per_source: usize,
    /// Of those, how many plaintext callers on 15006 may hold together.
    pub max_plaintext_connections: usize,
    /// Bytes of HTTP/2 window all inbound HBONE connections share (see [`hbone::window`]).
    pub max_inbound_buffer: u64,
    /// The same for outbound HBONE connections, whose windows hold replies to local pods.
    pub max_outbound_buffer: u64,
}

/// The handshake budget. Sources that are not HBONE workloads (hosts outside the mesh, unmeshed
/// pods) have no business on 15008 and share half of it, so however many of them flood it, the
/// mesh keeps the other half for its new connections.
fn handshake_budget(settings: &Settings) -> admission::Admission {
    let max = settings.max_connections.min(MAX_HANDSHAKES);
    admission::Admission::new(max, settings.max_connections_per_source.min(MAX_HANDSHAKES_PER_SOURCE))
        .with_unknown_share((max / 2).max(1))
}

/// An inbound connection's two ends and what policy decided for it.
struct Authorized {
    source: route::Peer,
    destination: route::Peer,
    decision: Decision,
}

/// How many open connections a revalidation pass decides before it lets other control work run.
const REVALIDATE_CHUNK: usize = 256;

/// The pause after a revalidation pass: changes arriving meanwhile (pod churn on a large node)
/// are coalesced into the next pass, so passes run at most a few times a second however fast
/// config changes, and a DENY still reaches open connections within a fraction of a second.
const REVALIDATE_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// What every connection handler shares.
pub struct Proxy {
    pub state: Arc<RwLock<State>>,
    pub certs: Arc<CertManager>,
    pub roots: Arc<RootCertStore>,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    pool: Arc<Pool>,
    /// The admin/xDS runtime: certificate fetches and their refresh tasks belong there.
    control: tokio::runtime::Handle,
    round_robin: AtomicUsize,
    admission: admission::Admission,
    /// HBONE connections still in their TLS handshake wait here, not in `admission`.
    handshakes: admission::Admission,
    /// Inbound and outbound HBONE connections' HTTP/2 windows, and so what pods that read slowly
    /// can make ztunnel hold. Separate, so that one direction's connections cannot leave the
    /// other's short.
    inbound_windows: Arc<WindowBudget>,
    outbound_windows: Arc<WindowBudget>,
    draining: watch::Receiver<bool>,
}

/// An enrolled pod as the proxy paths see it.
pub struct Pod {
    pub uid: String,
    pub ns: Arc<Netns>,
    acceptor: TlsAcceptor,
}

impl Proxy {
    /// Must be called inside the data-plane runtime (the pool's reaper task runs there).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        state: Arc<RwLock<State>>,
        certs: Arc<CertManager>,
        roots: Arc<RootCertStore>,
        metrics: Arc<Metrics>,
        settings: Settings,
        control: tokio::runtime::Handle,
        draining: watch::Receiver<bool>,
    ) -> Arc<Proxy> {
        Arc::new(Proxy {
            pool: Pool::new(hbone::settings::MAX_STREAMS as usize, hbone::pool::IDLE_TIMEOUT),
            admission: admission::Admission::new(settings.max_connections, settings.max_connections_per_source)
                .with_unknown_share(settings.max_plaintext_connections),
            handshakes: handshake_budget(&settings),
            inbound_windows: WindowBudget::new(settings.max_inbound_buffer),
            outbound_windows: WindowBudget::new(settings.max_outbound_buffer),
            state,
            certs,
            roots,
            metrics,
            settings,
            control,
            round_robin: AtomicUsize::new(0),
            draining,
        })
    }

    /// Connections accepted and not yet closed, including those still being set up (in their
    /// TLS handshake, or waiting for their upstream): what a drain waits for.
    pub fn in_flight(&self) -> usize {
        self.admission.held() + self.handshakes.held()
    }

    pub fn pooled_connections(&self) -> usize {
        self.pool.connections()
    }

    /// Bytes of HTTP/2 window granted to inbound HBONE connections, and the budget they share.
    pub fn inbound_windows(&self) -> (u64, u64) {
        (self.inbound_windows.granted(), self.inbound_windows.total())
    }

    /// The same for outbound HBONE connections.
    pub fn outbound_windows(&self) -> (u64, u64) {
        (self.outbound_windows.granted(), self.outbound_windows.total())
    }

    /// The certificate for `id`: from the cache, or fetched on the control runtime.
    async fn cert(&self, id: &Identity) -> Result<Issued, CertError> {
        if let Some(i) = self.certs.cached(id) {
            return Ok(i);
        }
        let (certs, id) = (self.certs.clone(), id.clone());
        match self.control.spawn(async move { certs.get(&id).await }).await {
            Ok(r) => r,
            Err(e) => Err(CertError::Local(format!("certificate task failed: {e}"))),
        }
    }

    /// For a connection from `src` (verified as `source`, if at all) to `dst` on `pod`: both ends
    /// as telemetry names them and the L4 policy decision, or `None` when `dst` is not one of the
    /// pod's addresses (or the pod left the config).
    fn authorize(&self, pod: &Pod, source: Option<Identity>, src: SocketAddr, dst: SocketAddr) -> Option<Authorized> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        Self::authorize_in(&state, &pod.uid, source, src, dst)
    }

    fn authorize_in(
        state: &State,
        pod_uid: &str,
        source: Option<Identity>,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Option<Authorized> {
        let w = state.workload_by_uid(pod_uid)?;
        if !w.addresses.iter().any(|a| crate::state::ip(a) == Some(dst.ip())) {
            return None;
        }
        let conn = policy::Connection { source: source.clone(), source_ip: src.ip(), destination: dst };
        Some(Authorized {
            decision: policy::evaluate(state, w, &conn),
            source: route::Peer::at(state, src.ip(), source),
            destination: route::Peer::of(w),
        })
    }

    /// Why an open connection's authorization no longer holds in `state`, if it does not.
    fn denial(state: &State, c: &conn::Tracker) -> Option<String> {
        let (g, r) = (c.guard()?, c.record());
        match Self::authorize_in(state, &g.pod_uid, g.source.clone(), r.src, r.dst) {
            Some(Authorized { decision: Decision::Allow, .. }) => None,
            Some(Authorized { decision: Decision::Deny(policy), .. }) => Some(format!("denied by {policy}")),
            None => Some("its workload left the configuration".to_string()),
        }
    }

    /// [`Proxy::revalidate`] after each config change, pausing [`REVALIDATE_PAUSE`] after each
    /// pass, until the changes end.
    pub async fn revalidate_on_changes(self: Arc<Self>, changes: tokio::sync::watch::Receiver<u64>) {
        let me = &*self;
        paced(changes, REVALIDATE_PAUSE, move || me.revalidate()).await;
    }

    /// Decides again the authorization of every open inbound connection, as config changes
    /// arrive, and cuts off those the policies no longer allow or whose workload left the
    /// configuration: a DENY applied to cut off a caller must reach the connections it already
    /// has, not only its next ones. One line is logged per pass, however many are cut off.
    pub async fn revalidate(&self) {
        let open = self.metrics.connections.guarded();
        if open.is_empty() {
            return;
        }
        // In chunks, yielding between them: the pass runs on the control thread, which also
        // answers the agent socket, readiness and xDS. A chunk may see a newer config than the
        // one before; the change that brought it triggers another pass.
        let mut denied: Vec<(Arc<conn::Tracker>, String)> = Vec::new();
        for chunk in open.chunks(REVALIDATE_CHUNK) {
            {
                let state = self.state.read().unwrap_or_else(|e| e.into_inner());
                denied.extend(
                    chunk
                        .iter()
                        // Only this list holds a connection that has closed meanwhile.
                        .filter(|c| Arc::strong_count(c) > 1 && !c.is_revoked())
                        .filter_map(|c| Self::denial(&state, c).map(|why| (c.clone(), why))),
                );
            }
            tokio::task::yield_now().await;
        }
        let (mut revoked, mut example) = (0, None);
        for (c, why) in denied {
            if self.revoke(&c, why.clone()) {
                revoked += 1;
                let source = c.record().src_peer.identity.as_ref().map(|i| i.to_string()).unwrap_or_default();
                example.get_or_insert((why, source, c.record().src));
            }
        }
        if let Some((why, source, src)) = example {
            tracing::warn!(connections = revoked, example.why = %why, example.source = source, example.src = %src,
                "closing connections the policy no longer allows");
        }
    }

    /// Cuts off one connection: logged at debug (a pass logs one summary), counted as `revoked`.
    fn revoke(&self, c: &conn::Tracker, why: String) -> bool {
        let r = c.record();
        let source = r.src_peer.identity.as_ref().map(|i| i.to_string()).unwrap_or_default();
        tracing::debug!(%why, source, src = %r.src, dst = %r.dst, direction = r.direction,
            "closing a connection the policy no longer allows");
        let first = c.revoke(why);
        if first {
            self.metrics.reject(r.direction, "revoked");
        }
        first
    }

    /// Re-decides a connection just opened. Its decision was taken before the connect, and a
    /// config change meanwhile ran its revalidation pass before this connection was listed.
    fn recheck(&self, c: &conn::Tracker) {
        if c.guard().is_none() {
            return;
        }
        let denial = {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            Self::denial(&state, c)
        };
        if let Some(why) = denial {
            warn_limited!(per c.record().src.ip(); "closing a connection the policy stopped allowing while it was set up",
                %why, src = %c.record().src, dst = %c.record().dst);
            self.revoke(c, why);
        }
    }

    /// Connects to `record.dst` from inside the pod's namespace (marked, so capture lets it
    /// through) and starts accounting for the connection. Inbound connections leave from the
    /// client's address (`record.src`), so the pod sees its real caller. A failure is logged and
    /// counted as an `upstream` rejection.
    async fn connect_tracked(
        &self,
        pod: &Pod,
        record: conn::Record,
        guard: Option<conn::Guard>,
    ) -> Option<conn::Tracked<TcpStream>> {
        let source = (record.reporter == Reporter::destination).then(|| record.src.ip());
        match sockets::connect(&pod.ns, source, record.dst, self.settings.mark).await {
            Ok(up) => {
                let tracker = conn::Tracker::open_guarded(record, self.metrics.clone(), guard);
                self.recheck(&tracker);
                Some(conn::Tracked::new(up, tracker))
            }
            Err(e) => {
                tracing::info!(dst = %record.dst, direction = record.direction, error = %e, "upstream connect failed");
                self.metrics.reject(record.direction, "upstream");
                None
            }
        }
    }

    fn next_pick(&self) -> usize {
        self.round_robin.fetch_add(1, Ordering::Relaxed)
    }

    /// A connection slot, or `None` when at the cap (the caller resets the connection).
    fn admit(&self, direction: &'static str, source: IpAddr) -> Option<admission::Slot> {
        self.admission.admit(source).inspect_err(|refused| self.metrics.reject(direction, refused.reason())).ok()
    }

    /// A slot for a plaintext caller, which has proven nothing: plaintext callers together hold
    /// at most `max_plaintext_connections` (by default a quarter of the node's slots), so a flood
    /// from outside the mesh (from however many addresses) leaves local pods and mesh peers the rest.
    fn admit_plaintext(&self, source: IpAddr) -> Option<admission::Slot> {
        let refused = |r: &admission::Refused| self.metrics.reject("inbound_plaintext", r.reason());
        self.admission.admit_unknown(source).inspect_err(refused).ok()
    }

    /// A handshake slot for an HBONE connection, or `None` when at the handshake cap. A source
    /// that is not an HBONE workload also needs a slot of the unknown-source share.
    fn admit_handshake(&self, source: IpAddr) -> Option<admission::Slot> {
        let refused = |r: &admission::Refused| self.metrics.reject("inbound", r.handshake_reason());
        let known = {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            state.workload_by_ip(source).is_some_and(|w| w.tunnel_protocol == TunnelProtocol::Hbone as i32)
        };
        let admitted = if known { self.handshakes.admit(source) } else { self.handshakes.admit_unknown(source) };
        admitted.inspect_err(refused).ok()
    }

    /// Builds the pod's proxy context once its workload and certificate are known.
    pub fn pod(&self, uid: String, ns: Arc<Netns>, cert: &Issued) -> Result<Arc<Pod>, String> {
        let cfg = hbone::tls::server_config(cert.slot.clone(), self.roots.clone(), &self.settings.trust_domain)
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(Pod { uid, ns, acceptor: TlsAcceptor::from(Arc::new(cfg)) }))
    }

    /// Serves the pod's three listeners on the current (data-plane) runtime: those `inherited`
    /// from a ztunnel that handed the pod over, by port, and new ones opened inside the pod's
    /// namespace for the rest. Listeners are all ready before any is served, so a failure leaves
    /// nothing half-open. Returns the accept loops, and a descriptor of each listener to hand over.
    pub async fn serve_pod(
        self: &Arc<Self>,
        pod: Arc<Pod>,
        mut inherited: HashMap<u16, std::net::TcpListener>,
    ) -> std::io::Result<(Vec<JoinHandle<()>>, Vec<(u16, OwnedFd)>)> {
        let mut listeners = Vec::new();
        for port in LISTENER_PORTS {
            let l = match inherited.remove(&port) {
                Some(l) => {
                    l.set_nonblocking(true)?;
                    TcpListener::from_std(l)?
                }
                None => {
                    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
                    sockets::listen(&pod.ns, addr, self.settings.mark).await?
                }
            };
            listeners.push((port, l));
        }
        let handable = listeners
            .iter()
            .map(|(port, l)| Ok((*port, l.as_fd().try_clone_to_owned()?)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let tasks = listeners
            .into_iter()
            .map(|(port, l)| tokio::spawn(self.clone().accept_loop(pod.clone(), port, l)))
            .collect();
        Ok((tasks, handable))
    }

    /// Completes when ztunnel starts draining (at once if it already has).
    fn drained(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut draining = self.draining.clone();
        async move {
            let _ = draining.wait_for(|d| *d).await;
        }
    }

    async fn accept_loop(self: Arc<Self>, pod: Arc<Pod>, port: u16, listener: TcpListener) {
        let drained = self.drained();
        tokio::pin!(drained);
        loop {
            let (tcp, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn_limited!("accept failed", port, error = %e);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut drained => return,
            };
            let direction = match port {
                OUTBOUND_PORT => "outbound",
                PLAINTEXT_PORT => "inbound_plaintext",
                _ => "inbound",
            };
            // Proxied bytes must not wait for Nagle: latency is the whole point of an L4 proxy.
            let _ = tcp.set_nodelay(true);
            // An HBONE peer has proven nothing until its TLS handshake completes, so until then it
            // holds a handshake slot; `inbound` trades it for a connection slot once verified.
            let source = peer_of(&tcp).ip();
            let admitted = match port {
                HBONE_PORT => self.admit_handshake(source),
                PLAINTEXT_PORT => self.admit_plaintext(source),
                _ => self.admit(direction, source),
            };
            let Some(slot) = admitted else {
                sockets::reset(tcp);
                continue;
            };
            let (me, pod) = (self.clone(), pod.clone());
            tokio::spawn(async move {
                match port {
                    HBONE_PORT => me.inbound(pod, tcp, slot).await,
                    OUTBOUND_PORT => {
                        let _slot = slot;
                        me.outbound(pod, tcp).await
                    }
                    _ => {
                        let _slot = slot;
                        me.plaintext(pod, tcp).await
                    }
                }
            });
        }
    }
}

/// Runs `pass` after each change, then waits `pause`; changes that arrive during a pass or its
/// pause are coalesced into one more pass, so the last change always gets one.
async fn paced<F, Fut>(mut changes: watch::Receiver<u64>, pause: Duration, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    while changes.changed().await.is_ok() {
        pass().await;
        tokio::time::sleep(pause).await;
    }
}

/// Splices the client and the destination until both directions finish, or the connection is
/// revoked. An error on either side resets both, so neither mistakes the failure for a clean end.
async fn splice<A>(mut client: A, mut upstream: conn::Tracked<TcpStream>)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + hbone::Abort,
{
    let tracker = upstream.tracker().clone();
    let copied = tokio::select! {
        // Revocation first: nothing more is copied once it is seen.
        biased;
        e = std::future::poll_fn(|cx| tracker.poll_revoked(cx)) => Err(e),
        r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, COPY_BUFFER, COPY_BUFFER) => r.map(drop),
    };
    if let Err(e) = copied {
        tracing::debug!(error = %e, "connection ended with an error");
        client.abort_on_close();
        hbone::Abort::abort_on_close(&upstream);
    }
}

fn is_listener_loop(dst: SocketAddr) -> bool {
    LISTENER_PORTS.contains(&dst.port())
}

/// The peer's address, or the unspecified address if the socket is already gone.
fn peer_of(s: &TcpStream) -> SocketAddr {
    s.peer_addr().unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Config changing every 10 ms for a second gets a pass per pause, not one per change, and
    /// the last change still gets its pass. Time is paused, so the count does not depend on load.
    #[tokio::test(start_paused = true)]
    async fn revalidation_passes_are_paced_and_the_last_change_gets_one() {
        let (tx, rx) = watch::channel(0u64);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let runner = tokio::spawn({
            let seen = seen.clone();
            paced(rx.clone(), REVALIDATE_PAUSE, move || {
                seen.lock().unwrap().push(*rx.borrow());
                std::future::ready(())
            })
        });
        for change in 1..=100u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            tx.send_replace(change);
        }
        tokio::time::sleep(REVALIDATE_PAUSE * 2).await;
        drop(tx);
        runner.await.unwrap();
        let seen = seen.lock().unwrap().clone();
        // A second of changes, a pass at most every 200 ms: 6, against 100 without the pause.
        assert_eq!(seen.len(), 6, "passes saw {seen:?}");
        assert_eq!(seen.last(), Some(&100), "the last change got a pass: {seen:?}");
    }
}
