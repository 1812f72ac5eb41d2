//! The HBONE connection pool: tunnels with the same [`PoolKey`] share HTTP/2 connections, at most
//! [`settings::MAX_STREAMS`](crate::settings::MAX_STREAMS) at a time on each; a connection idle
//! for the idle timeout (5 minutes by default) is released, and a closed one, or one that left a
//! CONNECT unanswered, is never handed out again.
//!
//! The key includes both identities, so a connection authenticated as one workload is never
//! reused for another, and the destination address, so it only ever reaches the peer whose
//! certificate was verified.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::client::{Connection, HboneError, Tunnel};
use crate::usage::{Slot, Usage};
use crate::{H2Stream, Identity};

pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source_identity: Identity,
    pub destination_identities: Vec<Identity>,
    pub source_ip: IpAddr,
    pub destination: SocketAddr,
}

struct Pooled {
    conn: Connection,
    usage: Arc<Usage>,
}

/// One dial per key at a time; remembers the last failure for the tunnels queued behind it.
type DialGate = Arc<tokio::sync::Mutex<Option<DialFailure>>>;

struct DialFailure {
    at: Instant,
    why: String,
    tls: bool,
}

pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    dials: Mutex<HashMap<PoolKey, DialGate>>,
    max_streams: usize,
    idle_timeout: Duration,
}

impl Pool {
    /// Creates a pool and a background task that releases idle connections; the task ends when
    /// the pool is dropped.
    pub fn new(max_streams: usize, idle_timeout: Duration) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            conns: Mutex::default(),
            dials: Mutex::default(),
            max_streams: max_streams.max(1),
            idle_timeout,
        });
        let weak: Weak<Pool> = Arc::downgrade(&pool);
        let period = (idle_timeout / 4).max(Duration::from_millis(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                match weak.upgrade() {
                    Some(p) => p.release_idle(),
                    None => return,
                }
            }
        });
        pool
    }

    /// Connections currently held, for all keys.
    pub fn connections(&self) -> usize {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).values().map(Vec::len).sum()
    }

    /// Drops closed connections, and open ones without streams for the idle timeout.
    fn release_idle(&self) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for list in conns.values_mut() {
            list.retain(|p| p.conn.is_open() && p.usage.idle_for().is_none_or(|idle| idle < self.idle_timeout));
        }
        conns.retain(|_, l| !l.is_empty());
        drop(conns);
        // A gate only matters to the tunnels holding or queued on it.
        self.dials.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, g| Arc::strong_count(g) > 1);
    }

    /// Reserves a stream slot on an open pooled connection with room, if any, dropping closed
    /// ones on the way.
    fn reserve(&self, key: &PoolKey) -> Option<(Connection, Slot)> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = conns.get_mut(key)?;
        list.retain(|p| p.conn.is_open());
        list.iter().find_map(|p| Some((p.conn.clone(), p.usage.try_enter(self.max_streams)?)))
    }

    fn forget(&self, key: &PoolKey, usage: &Arc<Usage>) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = conns.get_mut(key) {
            list.retain(|p| !Arc::ptr_eq(&p.usage, usage));
        }
    }

    /// Opens a tunnel on a pooled connection for `key`, dialing a new one (with `dial`) when none
    /// has a free stream. A pooled connection that turns out to be dead (the peer went away or
    /// sent GOAWAY since its last use) is forgotten and the tunnel is retried once on a new one:
    /// the CONNECT never reached an upstream, so the retry is invisible to the application.
    ///
    /// Dials for one key happen one at a time, so tunnels opened together share the connection
    /// the first of them makes instead of each making its own; those queued behind a dial that
    /// failed fail with it rather than each waiting out a dial of their own.
    pub async fn open<F, Fut>(&self, key: &PoolKey, tunnel: &Tunnel, dial: F) -> Result<PooledStream, HboneError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Connection, HboneError>>,
    {
        if let Some(reserved) = self.reserve(key) {
            if let Some(stream) = self.open_reserved(key, tunnel, reserved).await? {
                return Ok(stream);
            }
        }
        let queued_at = Instant::now();
        let gate = self.dials.lock().unwrap_or_else(|e| e.into_inner()).entry(key.clone()).or_default().clone();
        let mut last_failure = loop {
            let last_failure = gate.lock().await;
            let Some(reserved) = self.reserve(key) else { break last_failure };
            // A connection the tunnel ahead in the queue dialed: the gate is only for dialing, so
            // it is released before the CONNECT round trip and the tunnels queued behind open theirs
            // at the same time instead of one after another.
            drop(last_failure);
            if let Some(stream) = self.open_reserved(key, tunnel, reserved).await? {
                return Ok(stream);
            }
            // That connection was dead and is forgotten; look again.
        };
        if let Some(f) = last_failure.as_ref().filter(|f| f.at >= queued_at) {
            return Err(HboneError::DialFailed { why: f.why.clone(), tls: f.tls, ago: f.at.elapsed() });
        }
        let conn = match dial().await {
            Ok(c) => c,
            Err(e) => {
                *last_failure = Some(DialFailure { at: Instant::now(), why: e.to_string(), tls: e.is_tls() });
                return Err(e);
            }
        };
        *last_failure = None;
        let slot = Usage::new().enter();
        let pooled = Pooled { conn: conn.clone(), usage: slot.usage().clone() };
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).entry(key.clone()).or_default().push(pooled);
        drop(last_failure);
        match conn.open(tunnel).await {
            Ok(stream) => Ok(PooledStream { stream, _slot: slot }),
            Err(e) => {
                if is_connection_failure(&conn, &e) || is_suspect(&e) {
                    self.forget(key, slot.usage());
                }
                Err(e)
            }
        }
    }

    /// A tunnel on the pooled connection `reserved` holds a stream slot of, or `None` when that
    /// connection turns out to be dead (it is then forgotten).
    async fn open_reserved(
        &self,
        key: &PoolKey,
        tunnel: &Tunnel,
        (conn, slot): (Connection, Slot),
    ) -> Result<Option<PooledStream>, HboneError> {
        match conn.open(tunnel).await {
            Ok(stream) => Ok(Some(PooledStream { stream, _slot: slot })),
            Err(e) if is_suspect(&e) => {
                tracing::warn!(error = %e, "pooled HBONE connection is unresponsive; new tunnels will use a new one");
                self.forget(key, slot.usage());
                Err(e)
            }
            Err(e) if !is_connection_failure(&conn, &e) => Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "pooled HBONE connection is gone; dialing a new one");
                self.forget(key, slot.usage());
                Ok(None)
            }
        }
    }
}

/// Whether a failed CONNECT means the whole connection is unusable, so the tunnel may be retried
/// on a new one. A refusal (non-200) or a reset of this one stream leave the other tunnels on it
/// healthy.
fn is_connection_failure(conn: &Connection, e: &HboneError) -> bool {
    !conn.is_open() || matches!(e, HboneError::H2(e) if e.is_io() || e.is_go_away())
}

/// Whether a failed CONNECT casts doubt on the connection: no answer at all within the response
/// timeout. A peer that can still answer says 503 when its pod is slow, well within that timeout,
/// so silence more likely means a peer that is gone without a FIN, which keepalive would take up
/// to its interval plus timeout to notice. The connection stops taking new tunnels at once; those
/// already on it keep it, and it closes with the last of them. The CONNECT itself is not retried:
/// the peer may have acted on it.
fn is_suspect(e: &HboneError) -> bool {
    matches!(e, HboneError::Timeout(_))
}

/// A tunnel opened through the pool; dropping it frees its stream slot.
pub struct PooledStream {
    stream: H2Stream,
    _slot: Slot,
}

impl AsMut<H2Stream> for PooledStream {
    fn as_mut(&mut self) -> &mut H2Stream {
        &mut self.stream
    }
}

impl AsyncRead for PooledStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PooledStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
