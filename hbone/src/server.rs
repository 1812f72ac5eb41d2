//! HBONE server: accepts CONNECT streams on an HTTP/2 connection over mutual TLS and splices each
//! accepted tunnel to the upstream the handler returns.
//!
//! Status codes (PROTOCOLS.md): 400 for a bad method or authority, and whatever the handler
//! decides (401 when policy denies, 503 when the upstream connect fails), 200 otherwise.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::stream::H2Stream;
use crate::usage::Usage;
use crate::window::WindowBudget;
use crate::Identity;

const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// A tunnel request, after the method and authority have been checked.
#[derive(Debug)]
pub struct Inbound {
    pub authority: SocketAddr,
    pub headers: HeaderMap,
    /// The verified peer identity of the connection.
    pub peer: Option<Identity>,
}

/// Limits on one served connection.
#[derive(Clone)]
pub struct Limits {
    /// A connection without tunnels for this long is closed. Twice the client pool's idle
    /// timeout, so a well-behaved client normally lets go first; an idle peer cannot hold a
    /// connection (and its share of ztunnel's connection limit) forever.
    pub idle_timeout: Duration,
    /// PINGs to the client, so the tunnels of a client whose node vanished (no FIN, no RST) do
    /// not hold their upstream connections, and connection slots, until the pods give up.
    pub keepalive: crate::Keepalive,
    /// Where the connection's HTTP/2 window comes from; `None`: the full window, always.
    pub windows: Option<Arc<WindowBudget>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { idle_timeout: 2 * crate::pool::IDLE_TIMEOUT, keepalive: crate::Keepalive::default(), windows: None }
    }
}

/// Serves one HBONE connection until the peer closes it. Once `drain` completes, or the
/// connection has carried no tunnel for the idle timeout, the peer gets a GOAWAY and the tunnels
/// already open finish: the peer opens new tunnels elsewhere instead of on a connection that is
/// about to go.
pub async fn serve<IO, D, H, F, U>(
    io: IO,
    peer: Option<Identity>,
    limits: Limits,
    drain: D,
    handler: H,
) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    D: Future<Output = ()>,
    H: Fn(Inbound) -> F + Clone + Send + 'static,
    F: Future<Output = Result<U, StatusCode>> + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + crate::Abort + 'static,
{
    // Held until the connection ends: the data its window lets the peer send is buffered until then.
    let mut window = limits.windows.as_ref().map(|b| b.grant());
    let size = window.as_ref().map_or(crate::settings::CONNECTION_WINDOW, |w| w.size());
    // A peer that completes TLS but never sends the HTTP/2 preface must not hold the connection.
    let mut conn =
        match tokio::time::timeout(PREFACE_TIMEOUT, crate::settings::server(size).handshake::<_, Bytes>(io)).await {
            Ok(c) => c?,
            Err(_) => {
                tracing::debug!(?peer, "no HTTP/2 preface within {PREFACE_TIMEOUT:?}");
                return Ok(());
            }
        };
    let tunnels = Usage::new();
    let closing = {
        let (tunnels, peer) = (tunnels.clone(), peer.clone());
        async move {
            tokio::select! {
                () = drain => tracing::debug!(?peer, "draining: GOAWAY"),
                () = tunnels.idle(limits.idle_timeout) => tracing::debug!(?peer, "idle: GOAWAY"),
            }
        }
    };
    let mut closing = std::pin::pin!(closing);
    // Set once the GOAWAY is sent: `closing` has completed and must not be polled again.
    let mut closed = false;
    let mut unanswered = std::pin::pin!(crate::keepalive::unanswered(conn.ping_pong(), limits.keepalive));
    loop {
        let polled = tokio::select! {
            a = conn.accept() => Some(a),
            () = closing.as_mut(), if !closed => {
                conn.graceful_shutdown();
                closed = true;
                continue;
            }
            () = unanswered.as_mut() => None,
            size = crate::window::grown(window.as_mut()) => {
                conn.set_target_window_size(size);
                continue;
            }
        };
        let Some(accepted) = polled else {
            // Dropping the connection fails its streams, so each tunnel resets its upstream.
            tracing::warn!(?peer, timeout = ?limits.keepalive.timeout, "HBONE client did not answer a PING; closing the connection");
            return Ok(());
        };
        let Some(accepted) = accepted else { break };
        let (req, mut respond) = accepted?;
        let (handler, peer) = (handler.clone(), peer.clone());
        let tunnel = tunnels.enter();
        tokio::spawn(async move {
            let _tunnel = tunnel;
            let authority = req.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok());
            let authority = match (req.method(), authority) {
                // Port 0 parses but names no destination: a bad authority, not a failed upstream.
                (&Method::CONNECT, Some(a)) if a.port() != 0 => a,
                (m, _) => {
                    tracing::debug!(method = %m, uri = %req.uri(), "HBONE request is not CONNECT to ip:port");
                    let _ = respond.send_response(status(StatusCode::BAD_REQUEST), true);
                    return;
                }
            };
            let (parts, body) = req.into_parts();
            let inbound = Inbound { authority, headers: parts.headers, peer };
            match handler(inbound).await {
                Err(code) => {
                    let _ = respond.send_response(status(code), true);
                }
                Ok(upstream) => {
                    let Ok(send) = respond.send_response(status(StatusCode::OK), false) else {
                        // The client gave up meanwhile: the pod must see a failure, not a clean close.
                        crate::Abort::abort_on_close(&upstream);
                        return;
                    };
                    if let Err(e) = crate::splice(upstream, H2Stream::new(send, body)).await {
                        tracing::debug!(error = %e, %authority, "HBONE tunnel ended with an error");
                    }
                }
            }
        });
    }
    Ok(())
}

fn status(code: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = code;
    r
}
