//! HBONE server: accepts CONNECT streams on an HTTP/2 connection over mutual TLS and splices each
//! accepted tunnel to the upstream the handler returns.
//!
//! Status codes (PROTOCOLS.md): 400 for a bad method or authority, and whatever the handler
//! decides (401 when policy denies, 503 when the upstream connect fails), 200 otherwise.

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::stream::H2Stream;
use crate::Identity;

const PREFACE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A tunnel request, after the method and authority have been checked.
#[derive(Debug)]
pub struct Inbound {
    pub authority: SocketAddr,
    pub headers: HeaderMap,
    /// The verified peer identity of the connection.
    pub peer: Option<Identity>,
}

/// Serves one HBONE connection until the peer closes it, or, once `drain` completes, until the
/// tunnels already open have finished: the peer gets a GOAWAY, so it opens new tunnels elsewhere
/// instead of on a connection that is about to go.
pub async fn serve<IO, D, H, F, U>(io: IO, peer: Option<Identity>, drain: D, handler: H) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    D: Future<Output = ()>,
    H: Fn(Inbound) -> F + Clone + Send + 'static,
    F: Future<Output = Result<U, StatusCode>> + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + crate::Abort + 'static,
{
    // A peer that completes TLS but never sends the HTTP/2 preface must not hold the connection.
    let mut conn =
        match tokio::time::timeout(PREFACE_TIMEOUT, crate::settings::server().handshake::<_, Bytes>(io)).await {
            Ok(c) => c?,
            Err(_) => {
                tracing::debug!(?peer, "no HTTP/2 preface within {PREFACE_TIMEOUT:?}");
                return Ok(());
            }
        };
    let drain = std::pin::pin!(drain);
    let mut drain = Some(drain);
    loop {
        let accepted = match drain.as_mut() {
            Some(d) => tokio::select! {
                a = conn.accept() => a,
                () = d.as_mut() => {
                    conn.graceful_shutdown();
                    drain = None;
                    continue;
                }
            },
            None => conn.accept().await,
        };
        let Some(accepted) = accepted else { break };
        let (req, mut respond) = accepted?;
        let (handler, peer) = (handler.clone(), peer.clone());
        tokio::spawn(async move {
            let authority = req.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok());
            let authority = match (req.method(), authority) {
                (&Method::CONNECT, Some(a)) => a,
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
                    let Ok(send) = respond.send_response(status(StatusCode::OK), false) else { return };
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
