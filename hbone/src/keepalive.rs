//! HTTP/2 PINGs on an open HBONE connection, from either end. A peer whose node vanished without
//! a FIN or RST would otherwise keep the connection, and every tunnel on it, hanging until TCP
//! gives up (minutes), or forever on a quiet connection that never sends.

use std::time::Duration;

#[derive(Clone, Copy, Debug)]
pub struct Keepalive {
    /// Time between PINGs.
    pub interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive { interval: Duration::from_secs(10), timeout: Duration::from_secs(10) }
    }
}

/// Completes once a PING has gone unanswered for the timeout. The connection must be polled
/// meanwhile (PONGs arrive through it); if it fails instead, this never completes and the
/// connection reports why.
pub(crate) async fn unanswered(pings: Option<h2::PingPong>, keepalive: Keepalive) {
    // `None`: the handle was already taken; without it there is nothing to send.
    let Some(mut pings) = pings else { return std::future::pending().await };
    loop {
        tokio::time::sleep(keepalive.interval).await;
        match tokio::time::timeout(keepalive.timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}
