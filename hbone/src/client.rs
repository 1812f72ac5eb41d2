//! HBONE client: one HTTP/2 connection over mutual TLS, many CONNECT tunnels on it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

pub use crate::keepalive::Keepalive;
use crate::stream::H2Stream;
use crate::window::WindowGrant;

/// How long a CONNECT may wait for its response by default. The pool takes silence for this long
/// as a sign the peer is gone, so ztunnel's upstream connect timeout is at most half of it (checked
/// at compile time there): a peer that is merely slow to reach its pod answers 503 well within it.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(h2::Error),
    #[error("tunnel refused with status {0}")]
    Status(StatusCode),
    #[error("HTTP/2 error: {0}")]
    H2(#[from] h2::Error),
    #[error("no CONNECT response within {0:?}")]
    Timeout(Duration),
    #[error("invalid request: {0}")]
    Request(String),
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    /// The dial this tunnel queued behind failed; `tls` if it failed mutual TLS.
    #[error("the dial this tunnel waited for failed {ago:?} ago: {why}")]
    DialFailed { why: String, tls: bool, ago: Duration },
}

impl HboneError {
    /// Whether the peer failed mutual TLS (an untrusted or expired certificate, an identity other
    /// than the expected ones, no handshake in time), here or in the dial this tunnel waited for.
    /// Telemetry tells these apart from an unreachable peer: they can mean an impostor.
    pub fn is_tls(&self) -> bool {
        matches!(self, HboneError::Tls(_) | HboneError::DialFailed { tls: true, .. })
    }
}

/// Telemetry metadata of the source workload, sent as the `baggage` header.
#[derive(Clone, Debug, Default)]
pub struct Baggage {
    pub cluster: String,
    pub namespace: String,
    /// e.g. `pod`, `deployment`
    pub workload_type: String,
    pub workload_name: String,
    pub service_name: String,
    pub service_version: String,
}

impl Baggage {
    pub fn header(&self) -> String {
        let mut parts = Vec::new();
        let mut push = |k: String, v: &str| {
            if !v.is_empty() {
                parts.push(format!("{k}={v}"));
            }
        };
        push("k8s.cluster.name".into(), &self.cluster);
        push("k8s.namespace.name".into(), &self.namespace);
        if !self.workload_type.is_empty() {
            push(format!("k8s.{}.name", self.workload_type), &self.workload_name);
        }
        push("service.name".into(), &self.service_name);
        push("service.version".into(), &self.service_version);
        parts.join(",")
    }
}

/// One tunnel to open: where to (`podIP:port`, or `VIP:port` via a waypoint) and on whose behalf.
#[derive(Clone, Debug)]
pub struct Tunnel {
    pub authority: SocketAddr,
    /// The original client address, sent as `forwarded: for="…"`.
    pub source: SocketAddr,
    pub baggage: Baggage,
}

/// A random W3C `traceparent` (version 00, sampled).
pub fn traceparent() -> String {
    let mut b = [0u8; 24];
    // The system RNG failing is not recoverable in a meaningful way; a zero trace id is still a
    // well-formed header.
    let _ = crate::tls::provider().secure_random.fill(&mut b);
    let hex = |s: &[u8]| s.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("00-{}-{}-01", hex(&b[..16]), hex(&b[16..]))
}

fn forwarded(source: SocketAddr) -> String {
    match source {
        SocketAddr::V4(a) => format!("for=\"{a}\""),
        SocketAddr::V6(a) => format!("for=\"[{}]:{}\"", a.ip(), a.port()),
    }
}

/// An established HBONE connection. Cheap to clone; each clone opens streams on the same
/// connection.
#[derive(Clone)]
pub struct Connection {
    send: h2::client::SendRequest<Bytes>,
    /// Cleared when the connection's task ends: the peer closed it, it failed, or keepalive
    /// gave up on it.
    open: Arc<AtomicBool>,
    response_timeout: Duration,
}

impl Connection {
    /// Runs the HTTP/2 handshake over an established (mutual TLS) stream and drives the
    /// connection in a background task until it closes, with the default [`Keepalive`].
    pub async fn handshake<IO>(io: IO) -> Result<Connection, HboneError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Self::handshake_with(io, Keepalive::default(), None).await
    }

    /// As [`Connection::handshake`], with `keepalive`, and the connection window `window` grants
    /// instead of the full one (see [`crate::window`]); the grant is held until the connection ends.
    pub async fn handshake_with<IO>(
        io: IO,
        keepalive: Keepalive,
        mut window: Option<WindowGrant>,
    ) -> Result<Connection, HboneError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let size = window.as_ref().map_or(crate::settings::CONNECTION_WINDOW, WindowGrant::size);
        let (send, mut conn) = crate::settings::client(size).handshake(io).await.map_err(HboneError::Handshake)?;
        let open = Arc::new(AtomicBool::new(true));
        let unanswered = crate::keepalive::unanswered(conn.ping_pong(), keepalive);
        let flag = open.clone();
        tokio::spawn(async move {
            let mut unanswered = std::pin::pin!(unanswered);
            loop {
                tokio::select! {
                    r = &mut conn => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "HBONE connection ended");
                        }
                    }
                    () = unanswered.as_mut() => {
                        tracing::warn!(timeout = ?keepalive.timeout, "HBONE peer did not answer a PING; closing the connection");
                    }
                    size = crate::window::grown(window.as_mut()) => {
                        conn.set_target_window_size(size);
                        continue;
                    }
                }
                break;
            }
            flag.store(false, Ordering::Release);
        });
        Ok(Connection { send, open, response_timeout: RESPONSE_TIMEOUT })
    }

    /// How long each CONNECT on this connection waits for its response (default
    /// [`RESPONSE_TIMEOUT`]).
    pub fn with_response_timeout(mut self, timeout: Duration) -> Connection {
        self.response_timeout = timeout;
        self
    }

    /// False once the connection has ended; a pool must not hand it out again.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Opens one tunnel. Anything but 200 is a failure carrying the status.
    pub async fn open(&self, t: &Tunnel) -> Result<H2Stream, HboneError> {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(t.authority.to_string())
            .header("baggage", t.baggage.header())
            .header("forwarded", forwarded(t.source))
            .header("traceparent", traceparent())
            .body(())
            .map_err(|e| HboneError::Request(e.to_string()))?;
        let mut send = self.send.clone().ready().await?;
        let (response, stream) = send.send_request(req, false)?;
        let resp = tokio::time::timeout(self.response_timeout, response)
            .await
            .map_err(|_| HboneError::Timeout(self.response_timeout))??;
        if resp.status() != StatusCode::OK {
            return Err(HboneError::Status(resp.status()));
        }
        Ok(H2Stream::new(stream, resp.into_body()))
    }
}
