//! Delta ADS (`DeltaAggregatedResources`) for workload discovery.
//!
//! Each stream runs in its own task with a bounded outbound queue. A client that stops reading
//! fills its queue; after [`SEND_TIMEOUT`] its stream is closed. No other stream is affected: the
//! cache is shared read-mostly and wakeups go through a `watch` channel that never blocks.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use trellis_proto::envoy::envoy::config::core::v3::Node;
use trellis_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use trellis_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use trellis_proto::envoy::google::protobuf::Any;
use trellis_proto::trellis::pod::v1::PodMembership;
use trellis_proto::PARTIAL_PUSH_SUFFIX;

use super::cache::{Cache, Entry};
use super::drive::{drive, AdsStream, Shared};
use super::status::{Nack, Registry};
use super::{POD_MEMBERSHIP_TYPE_URL, TYPES};
use crate::ca::tokens::NodeTokens;
use crate::metrics::Metrics;

/// Responses queued per stream before the client counts as not reading.
pub(crate) const OUTBOUND_QUEUE: usize = 16;
/// How long a push may wait on a client that does not read, by default.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Unacknowledged responses remembered per type; older ones are forgotten (a client that never
/// ACKs must not grow server memory).
pub(crate) const MAX_PENDING: usize = 64;
/// Minimum time between two pushes on one stream. The first change after a quiet period is pushed
/// at once (no added latency); changes arriving faster are coalesced into the next push, which is
/// what keeps a bulk apply from becoming thousands of tiny responses per client.
pub(crate) const MIN_PUSH_INTERVAL: Duration = Duration::from_millis(50);
/// Split large pushes so every message stays well under gRPC's default 4 MiB decode limit.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

pub struct AdsServer {
    pub cache: Arc<Cache>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// `Some` on the TLS port: streams must present a valid node token.
    pub tokens: Option<Arc<NodeTokens>>,
    pub send_timeout: Duration,
    /// Streams end when this turns true, so a graceful shutdown is not held open by clients.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
impl AdsServer {
    fn shared(&self) -> Shared {
        Shared { cache: self.cache.clone(), registry: self.registry.clone(), metrics: self.metrics.clone() }
    }
}

type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        let credential = self.authenticate(&req)?;
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let stream = super::sotw::SotwStreamTask::new(
            self.cache.clone(),
            self.registry.clone(),
            self.metrics.clone(),
            tx.clone(),
            self.send_timeout,
            credential.as_ref().map(|c| c.node.clone()),
        );
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        self.spawn(drive(stream, self.shared(), req.into_inner(), peer.clone()), peer, credential, tx);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        let credential = self.authenticate(&req)?;
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let stream = DeltaStreamTask {
            cache: self.cache.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            tx: tx.clone(),
            send_timeout: self.send_timeout,
            subs: HashMap::new(),
            id: 0,
            nonce: 0,
            authenticated_node: credential.as_ref().map(|c| c.node.clone()),
            node_name: None,
        };
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        self.spawn(drive(stream, self.shared(), req.into_inner(), peer.clone()), peer, credential, tx);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What a stream on the secure port authenticated with.
struct Credential {
    node: String,
    token: String,
}

impl AdsServer {
    /// On the TLS port, the node named by the request's bearer token; elsewhere `None`.
    fn authenticate<T>(&self, req: &Request<T>) -> Result<Option<Credential>, Status> {
        let Some(tokens) = &self.tokens else { return Ok(None) };
        let token = crate::ca::service::bearer(req).unwrap_or_default();
        match tokens.verify(token) {
            Some(node) => Ok(Some(Credential { node, token: token.to_string() })),
            None => Err(Status::unauthenticated("a valid node bearer token is required on this port")),
        }
    }

    /// Runs a stream until the client leaves, istiod-lite shuts down, or the stream's token is
    /// rotated. A revoked stream ends with UNAUTHENTICATED, so the client reconnects and must
    /// present the new token.
    fn spawn<R: Send + 'static>(
        &self,
        drive: impl std::future::Future<Output = ()> + Send + 'static,
        peer: String,
        credential: Option<Credential>,
        tx: mpsc::Sender<Result<R, Status>>,
    ) {
        let mut shutdown = self.shutdown.clone();
        let tokens = self.tokens.clone();
        tokio::spawn(async move {
            let revoked = async {
                match (&tokens, &credential) {
                    (Some(tokens), Some(c)) => tokens.revoked(&c.token).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = drive => {}
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {}
                _ = revoked => {
                    let node = credential.map(|c| c.node).unwrap_or_default();
                    tracing::info!(node, peer, "closing an xDS stream whose node token was rotated");
                    let status = Status::unauthenticated(format!(
                        "the token of node {node} was rotated; reconnect with the new token"
                    ));
                    // Bounded like every send: a client that does not read is cut off anyway.
                    let _ = tokio::time::timeout(Duration::from_secs(1), tx.send(Err(status))).await;
                }
            }
        });
    }
}

/// One type's subscription state on one stream.
struct Subscription {
    wildcard: bool,
    names: HashSet<String>,
    /// What the client holds: name → version.
    sent: HashMap<String, u64, foldhash::fast::RandomState>,
    /// Cache sequence up to which this subscription is in sync.
    synced: u64,
    /// (nonce, version) of responses awaiting ACK, oldest first, at most [`MAX_PENDING`].
    pending: std::collections::VecDeque<(String, String)>,
}

impl Subscription {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

struct DeltaStreamTask {
    cache: Arc<Cache>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    send_timeout: Duration,
    subs: HashMap<&'static str, Subscription>,
    id: u64,
    nonce: u64,
    /// The node named by the bearer token on the secure port; the client may not claim another.
    authenticated_node: Option<String>,
    /// The client's node (from its token, else its `NODE_NAME`), which scopes pod memberships.
    node_name: Option<String>,
}

/// Whether a resource is for a client on `node`. A pod's membership is for the node agent of
/// the pod's node only, so each ztunnel holds the pods it hosts rather than every pod of the
/// cluster. A client that names no node (a debugging client on the plaintext port) sees all.
/// Both ADS flavours apply it.
pub(super) fn in_scope(node: Option<&str>, type_url: &str, body: &[u8]) -> bool {
    match node {
        Some(node) if type_url == POD_MEMBERSHIP_TYPE_URL => PodMembership::decode(body).is_ok_and(|m| m.node == node),
        _ => true,
    }
}

/// Removes the stream from the registry however the task ends.
pub(crate) struct Connected {
    pub id: u64,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.registry.disconnect(self.id);
        self.metrics.xds_connections.dec();
    }
}

/// Records a client's answer to one response: an ACK moves its acknowledged version, a NACK is
/// logged, counted and kept (with the client's reason) until a later ACK. Shared by delta and
/// state-of-the-world streams.
pub(crate) fn record_ack_or_nack(
    registry: &Registry,
    metrics: &Metrics,
    stream: u64,
    type_url: &str,
    nonce: &str,
    version: String,
    error: Option<&trellis_proto::envoy::google::rpc::Status>,
) {
    let nonce = nonce.to_string();
    match error {
        Some(err) => {
            metrics.xds_rejects.get_or_create(&Metrics::type_label(type_url)).inc();
            tracing::warn!(stream, type_url, nonce, error = err.message, "xDS client rejected a response (NACK)");
            let nack = Nack { nonce, version, error: err.message.clone(), at: crate::store::file::now_rfc3339() };
            registry.update(stream, type_url, |s| {
                s.last_nack = Some(nack);
                s.nacks_total += 1;
            });
        }
        None => registry.update(stream, type_url, |s| {
            s.acked_version = version;
            s.acked_nonce = nonce;
            s.last_nack = None;
        }),
    }
}

pub(crate) fn metadata_string(
    node: Option<&trellis_proto::envoy::envoy::config::core::v3::Node>,
    key: &str,
) -> Option<String> {
    use trellis_proto::envoy::google::protobuf::value::Kind;
    let v = node?.metadata.as_ref()?.fields.get(key)?;
    match &v.kind {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

impl AdsStream for DeltaStreamTask {
    type Request = DeltaDiscoveryRequest;
    const PROTOCOL: &'static str = "delta";

    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    async fn admit(&mut self, node: Option<&Node>) -> Result<(), ()> {
        let node_name = metadata_string(node, "NODE_NAME").unwrap_or_default();
        match &self.authenticated_node {
            Some(auth) if !node_name.is_empty() && node_name != *auth => {
                tracing::warn!(token_node = auth, node_name, "xDS client claims another node's name; closing");
                let _ = self.tx.send(Err(Status::permission_denied("NODE_NAME does not match the token's node"))).await;
                Err(())
            }
            _ => {
                self.node_name = self.authenticated_node.clone().or((!node_name.is_empty()).then_some(node_name));
                Ok(())
            }
        }
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), ()> {
        let Some(type_url) = TYPES.iter().copied().find(|t| *t == req.type_url) else {
            tracing::debug!(
                stream = self.id,
                type_url = req.type_url,
                "ignoring subscription to a type this server does not serve"
            );
            return Ok(());
        };
        if !req.response_nonce.is_empty() {
            self.on_ack_or_nack(type_url, &req);
        }
        let first = !self.subs.contains_key(type_url);
        let sub = self.subs.entry(type_url).or_insert_with(|| Subscription {
            wildcard: false,
            names: HashSet::new(),
            sent: HashMap::default(),
            synced: 0,
            pending: Default::default(),
        });
        if first {
            // Delta xDS: a first request with no names is a wildcard subscription.
            sub.wildcard = req.resource_names_subscribe.is_empty();
            // The client already holds these; only differences will be sent.
            sub.sent = req
                .initial_resource_versions
                .iter()
                .map(|(n, v)| (n.clone(), super::cache::parse_version(v).unwrap_or(0)))
                .collect();
        }
        let mut subscription_changed = first;
        for n in &req.resource_names_subscribe {
            subscription_changed = true;
            if n == "*" {
                sub.wildcard = true;
            } else {
                sub.names.insert(n.clone());
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                sub.wildcard = false;
            } else {
                sub.names.remove(n);
                sub.sent.remove(n);
            }
        }
        if subscription_changed {
            self.push(type_url, true).await?;
        }
        Ok(())
    }

    async fn push_changes(&mut self, type_url: &'static str) -> Result<(), ()> {
        self.push(type_url, false).await
    }

    fn is_subscribed(&self, type_url: &str) -> bool {
        self.subs.contains_key(type_url)
    }

    fn set_id(&mut self, id: u64) {
        self.id = id;
    }
}

impl DeltaStreamTask {
    fn on_ack_or_nack(&mut self, type_url: &'static str, req: &DeltaDiscoveryRequest) {
        let Some(sub) = self.subs.get_mut(type_url) else { return };
        let version = match sub.pending.iter().position(|(n, _)| *n == req.response_nonce) {
            Some(i) => sub.pending.remove(i).map(|(_, v)| v).unwrap_or_default(),
            None => String::new(),
        };
        record_ack_or_nack(
            &self.registry,
            &self.metrics,
            self.id,
            type_url,
            &req.response_nonce,
            version,
            req.error_detail.as_ref(),
        );
    }

    /// Sends what the client is missing for one type. `full` compares against the whole cache
    /// (new subscription); otherwise only the change log since the last push is read.
    async fn push(&mut self, type_url: &'static str, full: bool) -> Result<(), ()> {
        let Some(sub) = self.subs.get_mut(type_url) else { return Ok(()) };
        let node = self.node_name.as_deref();
        let mut updated: Vec<(String, Entry)> = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        let seq = if full {
            let (mut all, seq) = self.cache.all(type_url);
            all.retain(|(_, e)| in_scope(node, type_url, &e.body));
            let present: HashSet<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
            removed.extend(sub.sent.keys().filter(|n| !present.contains(n.as_str())).cloned());
            updated.extend(all.iter().filter(|(n, e)| sub.wants(n) && sub.sent.get(n) != Some(&e.version)).cloned());
            seq
        } else {
            let (changes, seq) = self.cache.changes_since(type_url, sub.synced);
            for (n, e) in changes.updated {
                if !in_scope(node, type_url, &e.body) {
                    // It left this client's scope (a pod recreated on another node).
                    if sub.sent.contains_key(&n) {
                        removed.push(n);
                    }
                } else if sub.wants(&n) && sub.sent.get(&n) != Some(&e.version) {
                    updated.push((n, e));
                }
            }
            removed.extend(changes.removed.into_iter().filter(|n| sub.sent.contains_key(n)));
            seq
        };
        sub.synced = seq;
        if updated.is_empty() && removed.is_empty() && !full {
            return Ok(());
        }
        updated.sort_by(|a, b| a.0.cmp(&b.0));
        for (n, e) in &updated {
            sub.sent.insert(n.clone(), e.version);
        }
        for n in &removed {
            sub.sent.remove(n);
        }
        let held = sub.sent.len();
        // Chunk by size; removals ride on the first chunk, and all but the last are marked partial.
        let mut chunks: Vec<Vec<(String, Entry)>> = vec![Vec::new()];
        let mut size = 0;
        for item in updated {
            if size + item.1.body.len() > MAX_RESPONSE_BYTES && !chunks.last().is_some_and(Vec::is_empty) {
                chunks.push(Vec::new());
                size = 0;
            }
            size += item.1.body.len();
            if let Some(last) = chunks.last_mut() {
                last.push(item);
            }
        }
        let mut removed = Some(removed);
        let pieces = chunks.len();
        for (piece, chunk) in chunks.into_iter().enumerate() {
            self.nonce += 1;
            let nonce = format!("{}-{}", seq, self.nonce);
            let more = if piece + 1 < pieces { PARTIAL_PUSH_SUFFIX } else { "" };
            let resp = DeltaDiscoveryResponse {
                system_version_info: format!("{seq}{more}"),
                type_url: type_url.to_string(),
                nonce: nonce.clone(),
                removed_resources: removed.take().unwrap_or_default(),
                resources: chunk
                    .into_iter()
                    .map(|(name, e)| Resource {
                        name,
                        version: super::cache::version_string(e.version),
                        resource: Some(Any { type_url: type_url.to_string(), value: e.body.to_vec() }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            };
            if let Some(sub) = self.subs.get_mut(type_url) {
                if sub.pending.len() >= MAX_PENDING {
                    sub.pending.pop_front();
                }
                sub.pending.push_back((nonce.clone(), seq.to_string()));
            }
            let count = resp.resources.len();
            match self.tx.send_timeout(Ok(resp), self.send_timeout).await {
                Ok(()) => {}
                Err(_) => {
                    tracing::warn!(stream = self.id, type_url, "xDS client is not reading its stream; closing it");
                    return Err(());
                }
            }
            self.metrics.xds_pushes.get_or_create(&Metrics::type_label(type_url)).inc();
            tracing::debug!(stream = self.id, type_url, count, nonce, "pushed");
            self.registry.update(self.id, type_url, |s| {
                s.sent_version = seq.to_string();
                s.sent_nonce = nonce;
                s.resources = held;
            });
        }
        Ok(())
    }
}
