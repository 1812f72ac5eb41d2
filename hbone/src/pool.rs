//! The HBONE connection pool: tunnels with the same [`PoolKey`] share HTTP/2 connections, at most
//! [`settings::MAX_STREAMS`](crate::settings::MAX_STREAMS) at a time on each; a connection idle
//! for the idle timeout (5 minutes by default) is released.
//!
//! The key includes both identities, so a connection authenticated as one workload is never
//! reused for another, and the destination address, so it only ever reaches the peer whose
//! certificate was verified.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::client::{Connection, HboneError, Tunnel};
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
    active: Arc<AtomicUsize>,
    idle_since: Instant,
}

pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    max_streams: usize,
    idle_timeout: Duration,
}

impl Pool {
    /// Creates a pool and a background task that releases idle connections; the task ends when
    /// the pool is dropped.
    pub fn new(max_streams: usize, idle_timeout: Duration) -> Arc<Pool> {
        let pool = Arc::new(Pool { conns: Mutex::default(), max_streams: max_streams.max(1), idle_timeout });
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

    fn release_idle(&self) {
        let now = Instant::now();
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for list in conns.values_mut() {
            for p in list.iter_mut() {
                if p.active.load(Ordering::Acquire) > 0 {
                    p.idle_since = now;
                }
            }
            list.retain(|p| {
                p.active.load(Ordering::Acquire) > 0 || now.duration_since(p.idle_since) < self.idle_timeout
            });
        }
        conns.retain(|_, l| !l.is_empty());
    }

    /// Reserves a stream slot on a pooled connection with room, if any.
    fn reserve(&self, key: &PoolKey) -> Option<(Connection, Arc<AtomicUsize>)> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.get(key)?.iter().find_map(|p| {
            p.active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max_streams).then_some(n + 1))
                .ok()
                .map(|_| (p.conn.clone(), p.active.clone()))
        })
    }

    fn forget(&self, key: &PoolKey, active: &Arc<AtomicUsize>) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = conns.get_mut(key) {
            list.retain(|p| !Arc::ptr_eq(&p.active, active));
        }
    }

    /// Opens a tunnel on a pooled connection for `key`, dialing a new one (with `dial`) when none
    /// has a free stream.
    pub async fn open<F, Fut>(&self, key: &PoolKey, tunnel: &Tunnel, dial: F) -> Result<PooledStream, HboneError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Connection, HboneError>>,
    {
        let (conn, active) = match self.reserve(key) {
            Some(r) => r,
            None => {
                let conn = dial().await?;
                let active = Arc::new(AtomicUsize::new(1));
                let pooled = Pooled { conn: conn.clone(), active: active.clone(), idle_since: Instant::now() };
                self.conns.lock().unwrap_or_else(|e| e.into_inner()).entry(key.clone()).or_default().push(pooled);
                (conn, active)
            }
        };
        let guard = Slot(active.clone());
        match conn.open(tunnel).await {
            Ok(stream) => Ok(PooledStream { stream, _slot: guard }),
            Err(e) => {
                // A refused tunnel (non-200) leaves the connection healthy; a protocol or I/O
                // failure means it is broken and must not be handed out again.
                if !matches!(e, HboneError::Status(_)) {
                    self.forget(key, &active);
                }
                Err(e)
            }
        }
    }
}

/// Frees the stream slot when the tunnel ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
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
