//! The loop every ADS stream runs, delta or state-of-the-world: register on the first request,
//! answer requests, and push changes no more often than [`MIN_PUSH_INTERVAL`], until the client
//! goes away or a send fails. The two protocols differ only in the [`AdsStream`] hooks.

use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::Streaming;
use trellis_proto::envoy::envoy::config::core::v3::Node;

use super::cache::Cache;
use super::server::{metadata_string, Connected, MIN_PUSH_INTERVAL};
use super::status::Registry;
use super::TYPES;
use crate::metrics::Metrics;

/// One protocol's side of a stream. `Err(())` from any hook ends the stream.
pub(crate) trait AdsStream {
    type Request;
    /// For log lines: "delta" or "state-of-the-world".
    const PROTOCOL: &'static str;

    fn node(req: &Self::Request) -> Option<&Node>;
    /// Checks the client's first request before it is registered, and keeps what the stream
    /// needs from its node.
    async fn admit(&mut self, node: Option<&Node>) -> Result<(), ()>;
    async fn on_request(&mut self, req: Self::Request) -> Result<(), ()>;
    /// Sends what changed in the cache for one subscribed type.
    async fn push_changes(&mut self, type_url: &'static str) -> Result<(), ()>;
    fn is_subscribed(&self, type_url: &str) -> bool;
    /// Set once the stream is registered; names it in logs and in the registry.
    fn set_id(&mut self, id: u64);
}

/// What a stream shares with the rest of the server.
pub(crate) struct Shared {
    pub cache: Arc<Cache>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
}

pub(crate) async fn drive<S: AdsStream>(
    mut stream: S,
    shared: Shared,
    mut inbound: Streaming<S::Request>,
    peer: String,
) {
    let mut seq_rx = shared.cache.subscribe();
    let mut connected: Option<Connected> = None;
    let mut dirty = false;
    let mut next_push = tokio::time::Instant::now();
    let id = |c: &Option<Connected>| c.as_ref().map(|c| c.id).unwrap_or_default();
    loop {
        tokio::select! {
            msg = inbound.next() => {
                let req = match msg {
                    Some(Ok(r)) => r,
                    Some(Err(e)) => {
                        tracing::debug!(stream = id(&connected), error = %e, "xDS stream ended with error");
                        break;
                    }
                    None => break,
                };
                if connected.is_none() {
                    let node = S::node(&req);
                    if stream.admit(node).await.is_err() {
                        break;
                    }
                    let node_id = node.map(|n| n.id.clone()).unwrap_or_default();
                    let node_name = metadata_string(node, "NODE_NAME").unwrap_or_default();
                    let stream_id = shared.registry.connect(node_id.clone(), node_name, peer.clone());
                    stream.set_id(stream_id);
                    shared.metrics.xds_connections.inc();
                    connected = Some(Connected { id: stream_id, registry: shared.registry.clone(), metrics: shared.metrics.clone() });
                    tracing::info!(stream = stream_id, node = node_id, peer, protocol = S::PROTOCOL, "xDS client connected");
                }
                if stream.on_request(req).await.is_err() {
                    break;
                }
            }
            changed = seq_rx.changed(), if !dirty => {
                if changed.is_err() {
                    break;
                }
                dirty = true;
            }
            _ = tokio::time::sleep_until(next_push), if dirty => {
                dirty = false;
                next_push = tokio::time::Instant::now() + MIN_PUSH_INTERVAL;
                let types: Vec<&'static str> = TYPES.iter().copied().filter(|t| stream.is_subscribed(t)).collect();
                let mut failed = false;
                for t in types {
                    if stream.push_changes(t).await.is_err() {
                        failed = true;
                        break;
                    }
                }
                if failed {
                    break;
                }
            }
        }
    }
    tracing::info!(stream = id(&connected), protocol = S::PROTOCOL, "xDS client disconnected");
}
