//! Per-connection accounting: metrics when a connection opens and closes, and one access log line
//! when it ends, whatever way it ends.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

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

/// Live accounting for one admitted connection; reported when dropped.
pub struct Tracker {
    record: Record,
    labels: TcpLabels,
    metrics: Arc<Metrics>,
    started: Instant,
    sent: AtomicU64,
    received: AtomicU64,
}

impl Tracker {
    pub fn open(record: Record, metrics: Arc<Metrics>) -> Arc<Tracker> {
        let labels = record.labels();
        metrics.opened.get_or_create(&labels).inc();
        metrics.active.inc();
        Arc::new(Tracker {
            record,
            labels,
            metrics,
            started: Instant::now(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
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

/// The destination-facing side of a proxied connection: writes count as sent, reads as received.
pub struct Tracked<S> {
    inner: S,
    tracker: Arc<Tracker>,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, tracker: Arc<Tracker>) -> Tracked<S> {
        Tracked { inner, tracker }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.tracker.received.fetch_add(n, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.tracker.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
