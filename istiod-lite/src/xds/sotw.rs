//! State-of-the-world ADS (`StreamAggregatedResources`), as proxyless gRPC clients speak it.
//!
//! Each response for a type carries every subscribed resource that exists, so a name missing from
//! an LDS or CDS response means "does not exist" to the client at once. A stream is woken by the
//! cache's sequence like a delta stream, reads only the change log since its last push, and sends
//! nothing unless a resource it holds or asked for changed. A NACK leaves the client on its last
//! accepted state; it is logged, counted and shown in `/debug/syncz`.
//!
//! A gRPC server listening on a wildcard address asks for `…/inbound/0.0.0.0:port`; it is served
//! the listener of its own workload IP (from the node id, `sidecar~IP~…`), renamed and readdressed
//! to what it asked for.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::Status;
use trellis_proto::envoy::envoy::config::core::v3::Node;
use trellis_proto::envoy::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use trellis_proto::envoy::google::protobuf::Any;

use super::cache::{version_of, Cache, Entry};
use super::drive::AdsStream;
use super::server::{metadata_string, record_ack_or_nack, MAX_PENDING};
use super::status::Registry;
use super::translate::grpc::{inbound, inbound_name, INBOUND_PREFIX};
use super::{CLUSTER_TYPE_URL, LISTENER_TYPE_URL, TYPES};
use crate::metrics::Metrics;

/// Largest number of names one subscription may hold: a client asking for more is refused.
const MAX_NAMES: usize = 16_384;

struct Subscription {
    wildcard: bool,
    /// Requested name → name in the cache (they differ only for wildcard-address listeners).
    names: BTreeMap<String, String>,
    /// What the last response held: requested name → version.
    sent: BTreeMap<String, u64>,
    /// Cache sequence this subscription has been compared against.
    synced: u64,
    /// (nonce, version_info) of responses awaiting ACK, oldest first.
    pending: VecDeque<(String, String)>,
}

pub(crate) struct SotwStreamTask {
    cache: Arc<Cache>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    send_timeout: Duration,
    subs: HashMap<&'static str, Subscription>,
    id: u64,
    nonce: u64,
    node_ip: Option<IpAddr>,
    /// The node of the stream's token, if it came with one (the TLS port).
    authenticated_node: Option<String>,
    /// Whose pod memberships the stream sees: the token's node, else the node the client names.
    node_name: Option<String>,
}

/// The workload IP of a gRPC node: Istio's node id is `sidecar~IP~pod.ns~ns.svc.cluster.local`;
/// `INSTANCE_IPS` metadata is the fallback.
fn node_ip(node: Option<&Node>) -> Option<IpAddr> {
    let from_id = node.and_then(|n| n.id.split('~').nth(1)).and_then(|ip| ip.parse().ok());
    from_id.or_else(|| metadata_string(node, "INSTANCE_IPS")?.split(',').next()?.trim().parse().ok())
}

/// The names a client may subscribe to with an empty list (legacy wildcard): LDS and CDS, and
/// Trellis's own workload types.
fn wildcard_capable(type_url: &str) -> bool {
    type_url == LISTENER_TYPE_URL || type_url == CLUSTER_TYPE_URL || !super::GRPC_TYPES.contains(&type_url)
}

impl SotwStreamTask {
    pub(crate) fn new(
        cache: Arc<Cache>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
        send_timeout: Duration,
        authenticated_node: Option<String>,
    ) -> Self {
        SotwStreamTask {
            cache,
            registry,
            metrics,
            tx,
            send_timeout,
            subs: HashMap::new(),
            id: 0,
            nonce: 0,
            node_ip: None,
            authenticated_node,
            node_name: None,
        }
    }
}

impl AdsStream for SotwStreamTask {
    type Request = DiscoveryRequest;
    const PROTOCOL: &'static str = "state-of-the-world";

    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    async fn admit(&mut self, node: Option<&Node>) -> Result<(), ()> {
        self.node_ip = node_ip(node);
        let named = metadata_string(node, "NODE_NAME").filter(|n| !n.is_empty());
        self.node_name = self.authenticated_node.clone().or(named);
        Ok(())
    }

    async fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), ()> {
        let Some(type_url) = TYPES.iter().copied().find(|t| *t == req.type_url) else {
            tracing::debug!(stream = self.id, type_url = req.type_url, "ignoring a type this server does not serve");
            return Ok(());
        };
        if req.resource_names.len() > MAX_NAMES {
            tracing::warn!(
                stream = self.id,
                type_url,
                names = req.resource_names.len(),
                "subscription too large; closing"
            );
            let _ = self
                .tx
                .send(Err(Status::resource_exhausted(format!("at most {MAX_NAMES} names per type may be subscribed"))))
                .await;
            return Err(());
        }
        if !req.response_nonce.is_empty() {
            self.on_ack_or_nack(type_url, &req);
        }
        let first = !self.subs.contains_key(type_url);
        let wildcard = req.resource_names.iter().any(|n| n == "*")
            || (req.resource_names.is_empty() && wildcard_capable(type_url) && (first || self.subs[type_url].wildcard));
        let names: BTreeMap<String, String> =
            req.resource_names.iter().filter(|n| *n != "*").map(|n| (n.clone(), self.resolve(type_url, n))).collect();
        let sub = self.subs.entry(type_url).or_insert_with(|| Subscription {
            wildcard,
            names: BTreeMap::new(),
            sent: BTreeMap::new(),
            synced: 0,
            pending: VecDeque::new(),
        });
        let changed = first || sub.wildcard != wildcard || sub.names != names;
        sub.wildcard = wildcard;
        sub.names = names;
        if changed {
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

impl SotwStreamTask {
    /// Maps a requested name to the cache's: a wildcard-address server listener becomes the
    /// listener of this node's IP.
    fn resolve(&self, type_url: &str, name: &str) -> String {
        if type_url == LISTENER_TYPE_URL {
            if let Some(addr) = name.strip_prefix(INBOUND_PREFIX).and_then(|a| a.parse::<SocketAddr>().ok()) {
                if let (true, Some(ip)) = (addr.ip().is_unspecified(), self.node_ip) {
                    return inbound_name(ip, addr.port() as u32);
                }
            }
        }
        name.to_string()
    }

    fn on_ack_or_nack(&mut self, type_url: &'static str, req: &DiscoveryRequest) {
        let Some(sub) = self.subs.get_mut(type_url) else { return };
        let version = match sub.pending.iter().position(|(n, _)| *n == req.response_nonce) {
            Some(i) => sub.pending.remove(i).map(|(_, v)| v).unwrap_or_default(),
            // A nonce this stream no longer tracks: the client answers an older response.
            None => return,
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

    /// The resources this subscription currently sees, by requested name.
    fn view(&self, type_url: &str, sub: &Subscription) -> (BTreeMap<String, Entry>, u64) {
        let node = self.node_name.as_deref();
        if sub.wildcard {
            let (all, seq) = self.cache.all(type_url);
            return (all.into_iter().filter(|(_, e)| super::server::in_scope(node, type_url, &e.body)).collect(), seq);
        }
        let (found, seq) = self.cache.get_many(type_url, sub.names.values().map(String::as_str));
        let by_concrete: HashMap<String, Entry> = found.into_iter().collect();
        let view = sub
            .names
            .iter()
            .filter_map(|(requested, concrete)| {
                let e = by_concrete.get(concrete).filter(|e| super::server::in_scope(node, type_url, &e.body))?;
                if requested == concrete {
                    return Some((requested.clone(), e.clone()));
                }
                let bind: SocketAddr = requested.strip_prefix(INBOUND_PREFIX)?.parse().ok()?;
                let body = inbound::for_wildcard(&e.body, requested, bind).ok()?;
                Some((requested.clone(), Entry::new(bytes::Bytes::from(body))))
            })
            .collect();
        (view, seq)
    }

    /// Sends the full set for one type if anything the client holds or asked for changed;
    /// `force` sends even when nothing did (a new or changed subscription always gets an answer).
    async fn push(&mut self, type_url: &'static str, force: bool) -> Result<(), ()> {
        let Some(sub) = self.subs.get(type_url) else { return Ok(()) };
        if !force {
            let (changes, seq) = self.cache.changes_since(type_url, sub.synced);
            let relevant = sub.wildcard
                || changes
                    .updated
                    .iter()
                    .map(|(n, _)| n)
                    .chain(changes.removed.iter())
                    .any(|n| sub.names.values().any(|c| c == n));
            if !relevant {
                if let Some(sub) = self.subs.get_mut(type_url) {
                    sub.synced = seq;
                }
                return Ok(());
            }
        }
        let (view, seq) = self.view(type_url, sub);
        let sent: BTreeMap<String, u64> = view.iter().map(|(n, e)| (n.clone(), e.version)).collect();
        let Some(sub) = self.subs.get_mut(type_url) else { return Ok(()) };
        sub.synced = seq;
        if !force && sent == sub.sent {
            return Ok(());
        }
        let mut digest = Vec::with_capacity(sent.len() * 24);
        for (n, v) in &sent {
            digest.extend_from_slice(n.as_bytes());
            digest.extend_from_slice(&v.to_le_bytes());
        }
        let version = super::cache::version_string(version_of(&digest));
        self.nonce += 1;
        let nonce = format!("{seq}-{}", self.nonce);
        if sub.pending.len() >= MAX_PENDING {
            sub.pending.pop_front();
        }
        sub.pending.push_back((nonce.clone(), version.clone()));
        sub.sent = sent;
        let count = view.len();
        let resp = DiscoveryResponse {
            version_info: version.clone(),
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            resources: view
                .into_values()
                .map(|e| Any { type_url: type_url.to_string(), value: e.body.to_vec() })
                .collect(),
            ..Default::default()
        };
        if self.tx.send_timeout(Ok(resp), self.send_timeout).await.is_err() {
            tracing::warn!(stream = self.id, type_url, "xDS client is not reading its stream; closing it");
            return Err(());
        }
        self.metrics.xds_pushes.get_or_create(&Metrics::type_label(type_url)).inc();
        tracing::debug!(stream = self.id, type_url, count, nonce, "pushed state of the world");
        self.registry.update(self.id, type_url, |s| {
            s.sent_version = version;
            s.sent_nonce = nonce;
            s.resources = count;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ip_comes_from_istio_node_id() {
        let n = Node { id: "sidecar~10.1.2.3~a.demo~demo.svc.cluster.local".into(), ..Default::default() };
        assert_eq!(node_ip(Some(&n)), Some("10.1.2.3".parse().unwrap()));
        let n = Node { id: "garbage".into(), ..Default::default() };
        assert_eq!(node_ip(Some(&n)), None);
    }
}
