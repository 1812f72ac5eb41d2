//! Per-connection accounting: metrics when a connection opens and closes, and one access log line
//! when it ends, whatever way it ends. An inbound connection also keeps what its authorization was
//! decided on ([`Guard`]), so a policy change can re-decide it and cut it off ([`Tracker::revoke`]).

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use serde_json::{json, Value};

use futures_util::task::AtomicWaker;
use hbone::Identity;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::route::Peer;
use crate::metrics::{Metrics, Reporter, SecurityPolicy, TcpLabels};

/// Who talked to whom, as known when the connection was admitted.
pub struct Record {
    pub direction: &'static str,
    pub reporter: Reporter,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_peer: Peer,
    pub dst_peer: Peer,
    pub service: String,
    pub mtls: bool,
}

impl Record {
    fn labels(&self) -> TcpLabels {
        let principal = |p: &Peer| p.identity.as_ref().map(|i| i.to_string()).unwrap_or_else(|| "unknown".into());
        let or_unknown = |s: &str| if s.is_empty() { "unknown".to_string() } else { s.to_string() };
        TcpLabels {
            reporter: self.reporter,
            source_workload: or_unknown(&self.src_peer.name),
            source_canonical_service: or_unknown(&self.src_peer.app),
            source_workload_namespace: or_unknown(&self.src_peer.namespace),
            source_principal: principal(&self.src_peer),
            destination_workload: or_unknown(&self.dst_peer.name),
            destination_canonical_service: or_unknown(&self.dst_peer.app),
            destination_workload_namespace: or_unknown(&self.dst_peer.namespace),
            destination_principal: principal(&self.dst_peer),
            destination_service: or_unknown(&self.service),
            connection_security_policy: if self.mtls { SecurityPolicy::mutual_tls } else { SecurityPolicy::unknown },
        }
    }
}

/// How many finished connections the admin endpoint remembers.
const RECENT: usize = 64;

/// The connections in flight and the last [`RECENT`] finished ones, for `/config_dump` (and so
/// `meshctl ztunnel-config connections`). Holds only weak references: it never keeps a
/// connection's accounting alive.
#[derive(Default)]
pub struct Table {
    inner: Mutex<TableInner>,
}

#[derive(Default)]
struct TableInner {
    next_id: u64,
    live: BTreeMap<u64, Weak<Tracker>>,
    recent: VecDeque<Value>,
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, TableInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `(open, recently closed)`, oldest first.
    pub fn snapshot(&self) -> (Vec<Value>, Vec<Value>) {
        let (live, recent): (Vec<Arc<Tracker>>, Vec<Value>) = {
            let t = self.lock();
            (t.live.values().filter_map(Weak::upgrade).collect(), t.recent.iter().cloned().collect())
        };
        // Outside the lock: dropping the last reference here runs Tracker::drop, which takes it.
        (live.iter().map(|c| c.describe("open")).collect(), recent)
    }

    /// The open connections whose authorization can be decided again.
    pub fn guarded(&self) -> Vec<Arc<Tracker>> {
        let live: Vec<Arc<Tracker>> = self.lock().live.values().filter_map(Weak::upgrade).collect();
        // Filtered outside the lock: dropping the last reference runs Tracker::drop, which takes it.
        live.into_iter().filter(|c| c.guard.is_some()).collect()
    }
}

/// What an inbound connection's authorization was decided on: the pod it reaches and the
/// verified caller (`None` for plaintext). With the addresses in its [`Record`], that is all a
/// policy looks at.
pub struct Guard {
    pub pod_uid: String,
    pub source: Option<Identity>,
}

/// Set once a policy change no longer allows the connection; its sockets then fail.
#[derive(Default)]
struct Revocation {
    why: OnceLock<String>,
    /// The tasks reading and writing the destination socket, and the one splicing it, woken to
    /// see the revocation.
    reader: AtomicWaker,
    writer: AtomicWaker,
    splice: AtomicWaker,
}

/// Live accounting for one admitted connection; reported when dropped.
pub struct Tracker {
    id: u64,
    opened_at: SystemTime,
    record: Record,
    labels: TcpLabels,
    metrics: Arc<Metrics>,
    started: Instant,
    sent: AtomicU64,
    received: AtomicU64,
    guard: Option<Guard>,
    revocation: Revocation,
}

impl Tracker {
    pub fn open(record: Record, metrics: Arc<Metrics>) -> Arc<Tracker> {
        Self::open_guarded(record, metrics, None)
    }

    /// Opens accounting for a connection whose authorization may be re-decided.
    pub fn open_guarded(record: Record, metrics: Arc<Metrics>, guard: Option<Guard>) -> Arc<Tracker> {
        let labels = record.labels();
        metrics.opened.get_or_create(&labels).inc();
        metrics.active.inc();
        let mut table = metrics.connections.lock();
        table.next_id += 1;
        let id = table.next_id;
        let t = Arc::new(Tracker {
            id,
            opened_at: SystemTime::now(),
            record,
            labels,
            metrics: metrics.clone(),
            started: Instant::now(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            guard,
            revocation: Revocation::default(),
        });
        table.live.insert(id, Arc::downgrade(&t));
        t
    }

    pub fn record(&self) -> &Record {
        &self.record
    }

    pub fn guard(&self) -> Option<&Guard> {
        self.guard.as_ref()
    }

    /// Cuts the connection off: its destination socket's reads and writes fail from now on, so
    /// the splice ends with an error and resets both sides. Returns `false` if it already was.
    pub fn revoke(&self, why: String) -> bool {
        if self.revocation.why.set(why).is_err() {
            return false;
        }
        self.revocation.reader.wake();
        self.revocation.writer.wake();
        self.revocation.splice.wake();
        true
    }

    /// Whether the connection was revoked already.
    pub fn is_revoked(&self) -> bool {
        self.revocation.why.get().is_some()
    }

    /// Ready once the connection is revoked; never for one without a guard.
    pub fn poll_revoked(&self, cx: &Context<'_>) -> Poll<io::Error> {
        match self.revoked(&self.revocation.splice, cx) {
            Some(e) => Poll::Ready(e),
            None => Poll::Pending,
        }
    }

    /// The revocation as the error a socket operation returns, once `waker` will see a later one.
    fn revoked(&self, waker: &AtomicWaker, cx: &Context<'_>) -> Option<io::Error> {
        self.guard.as_ref()?;
        waker.register(cx.waker());
        let why = self.revocation.why.get()?;
        Some(io::Error::new(io::ErrorKind::PermissionDenied, why.clone()))
    }

    fn describe(&self, state: &str) -> Value {
        let r = &self.record;
        let workload = |p: &Peer| if p.name.is_empty() { String::new() } else { format!("{}/{}", p.namespace, p.name) };
        let id = |p: &Peer| p.identity.as_ref().map(|i| i.to_string()).unwrap_or_default();
        json!({
            "state": state,
            "direction": r.direction,
            "src": r.src.to_string(),
            "src_workload": workload(&r.src_peer),
            "src_identity": id(&r.src_peer),
            "dst": r.dst.to_string(),
            "dst_workload": workload(&r.dst_peer),
            "dst_identity": id(&r.dst_peer),
            "service": r.service,
            "mtls": r.mtls,
            "bytes_sent": self.sent.load(Ordering::Relaxed),
            "bytes_received": self.received.load(Ordering::Relaxed),
            "opened": time::OffsetDateTime::from(self.opened_at)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            "duration_ms": self.started.elapsed().as_millis() as u64,
        })
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let (sent, received) = (self.sent.load(Ordering::Relaxed), self.received.load(Ordering::Relaxed));
        let m = &self.metrics;
        m.closed.get_or_create(&self.labels).inc();
        m.sent.get_or_create(&self.labels).inc_by(sent);
        m.received.get_or_create(&self.labels).inc_by(received);
        m.active.dec();
        {
            let summary = self.describe("closed");
            let mut table = m.connections.lock();
            table.live.remove(&self.id);
            if table.recent.len() == RECENT {
                table.recent.pop_front();
            }
            table.recent.push_back(summary);
        }
        let r = &self.record;
        let id = |p: &Peer| p.identity.as_ref().map(|i| i.to_string()).unwrap_or_default();
        tracing::info!(
            target: "access",
            direction = r.direction,
            src.addr = %r.src,
            src.workload = r.src_peer.name,
            src.identity = id(&r.src_peer),
            dst.addr = %r.dst,
            dst.workload = r.dst_peer.name,
            dst.identity = id(&r.dst_peer),
            dst.service = r.service,
            mtls = r.mtls,
            bytes_sent = sent,
            bytes_recv = received,
            duration_ms = self.started.elapsed().as_millis() as u64,
            "connection complete"
        );
    }
}

/// One socket of a proxied connection, counting what passes through it, in Istio's (and Envoy's)
/// convention: `sent` is what goes back to the client (the response direction), `received` what
/// came from it (the request direction). So on the destination side reads are sent bytes and
/// writes received ones; on the client side it is the other way round.
pub struct Tracked<S> {
    inner: S,
    tracker: Arc<Tracker>,
    client_side: bool,
    /// The connection slot this socket holds, if the caller took one for it.
    _slot: Option<super::admission::Slot>,
}

impl<S> Tracked<S> {
    /// Wraps the socket facing the destination.
    pub fn new(inner: S, tracker: Arc<Tracker>) -> Tracked<S> {
        Tracked { inner, tracker, client_side: false, _slot: None }
    }

    /// Wraps the socket facing the client: used when the destination side is an HBONE tunnel,
    /// which is spliced without a byte-stream wrapper.
    pub fn client_side(inner: S, tracker: Arc<Tracker>) -> Tracked<S> {
        Tracked { inner, tracker, client_side: true, _slot: None }
    }

    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    /// Holds `slot` until the socket is dropped.
    pub fn holding(self, slot: super::admission::Slot) -> Tracked<S> {
        Tracked { _slot: Some(slot), ..self }
    }

    fn count_read(&self, n: u64) {
        let counter = if self.client_side { &self.tracker.received } else { &self.tracker.sent };
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn count_written(&self, n: u64) {
        let counter = if self.client_side { &self.tracker.sent } else { &self.tracker.received };
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl<S: hbone::Abort> hbone::Abort for Tracked<S> {
    fn abort_on_close(&self) {
        self.inner.abort_on_close();
    }

    fn poll_revoked(&self, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.tracker.poll_revoked(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.tracker.revoked(&self.tracker.revocation.reader, cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.count_read((buf.filled().len() - before) as u64);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(e) = self.tracker.revoked(&self.tracker.revocation.writer, cx) {
            return Poll::Ready(Err(e));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.count_written(n as u64);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A revoked connection ends with a reset, never a clean close.
        if let Some(e) = self.tracker.revoked(&self.tracker.revocation.writer, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn record() -> Record {
        Record {
            direction: "outbound",
            reporter: Reporter::source,
            src: "10.244.1.10:40000".parse().unwrap(),
            dst: "10.244.2.10:8080".parse().unwrap(),
            src_peer: Peer::default(),
            dst_peer: Peer::default(),
            service: String::new(),
            mtls: true,
        }
    }

    /// Writes 5 bytes into the wrapped socket and reads 3 back; returns the metric lines.
    async fn exchange(client_side: bool) -> String {
        let metrics = Arc::new(Metrics::new());
        let (ours, mut peer) = tokio::io::duplex(64);
        let tracker = Tracker::open(record(), metrics.clone());
        let mut s = if client_side { Tracked::client_side(ours, tracker) } else { Tracked::new(ours, tracker) };
        s.write_all(b"hello").await.unwrap();
        peer.write_all(b"abc").await.unwrap();
        let mut got = [0u8; 3];
        s.read_exact(&mut got).await.unwrap();
        drop(s);
        let text = metrics.encode();
        text.lines()
            .filter(|l| l.starts_with("istio_tcp_") && l.contains("_bytes_total{"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[tokio::test]
    async fn sent_counts_the_response_direction_and_received_the_request_direction() {
        // Destination side: the 5 bytes written go to the destination (request), the 3 read
        // come from it (response).
        let dst = exchange(false).await;
        assert!(dst.lines().any(|l| l.starts_with("istio_tcp_sent") && l.ends_with(" 3")), "{dst}");
        assert!(dst.lines().any(|l| l.starts_with("istio_tcp_received") && l.ends_with(" 5")), "{dst}");
        // Client side: the 5 bytes written go back to the client (response).
        let client = exchange(true).await;
        assert!(client.lines().any(|l| l.starts_with("istio_tcp_sent") && l.ends_with(" 5")), "{client}");
        assert!(client.lines().any(|l| l.starts_with("istio_tcp_received") && l.ends_with(" 3")), "{client}");
    }

    #[tokio::test]
    async fn a_revoked_connection_fails_its_pending_and_later_socket_operations() {
        let metrics = Arc::new(Metrics::new());
        let (ours, mut peer) = tokio::io::duplex(64);
        let guard = Guard { pod_uid: "Kubernetes//v1/Pod/demo/a".into(), source: None };
        let tracker = Tracker::open_guarded(record(), metrics.clone(), Some(guard));
        assert_eq!(metrics.connections.guarded().len(), 1);
        let mut s = Tracked::new(ours, tracker.clone());
        // Blocked on a read, as an idle connection is: the revocation wakes it.
        let reader = tokio::spawn(async move {
            let mut b = [0u8; 8];
            let e = s.read(&mut b).await.unwrap_err();
            (s, e)
        });
        tokio::task::yield_now().await;
        let splice_sees = tokio::spawn({
            let t = tracker.clone();
            async move { std::future::poll_fn(|cx| t.poll_revoked(cx)).await }
        });
        tokio::task::yield_now().await;
        assert!(!splice_sees.is_finished());
        assert!(tracker.revoke("denied by demo/cut".into()));
        let e = tokio::time::timeout(std::time::Duration::from_secs(5), splice_sees).await.unwrap().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "a splice idle on the other side sees it too");
        assert!(!tracker.revoke("again".into()), "revoked once");
        let (mut s, e) = tokio::time::timeout(std::time::Duration::from_secs(5), reader).await.unwrap().unwrap();
        assert_eq!((e.kind(), e.to_string()), (io::ErrorKind::PermissionDenied, "denied by demo/cut".to_string()));
        assert!(s.write_all(b"x").await.is_err(), "nothing more reaches the pod");
        peer.write_all(b"late").await.unwrap();
        assert!(s.read(&mut [0u8; 8]).await.is_err(), "nothing more reaches the caller");
        // Connections without a guard (outbound) are never listed for re-decision.
        let _outbound = Tracker::open(record(), metrics.clone());
        assert_eq!(metrics.connections.guarded().len(), 1);
    }
}
