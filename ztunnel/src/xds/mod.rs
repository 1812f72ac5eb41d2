//! The delta xDS client: subscribes to workload and authorization resources, keeps [`State`] in
//! step, reconnects with backoff, and resumes with `initial_resource_versions`.
//!
//! Each resource of a response is checked on its own: valid ones and all removals apply, an
//! invalid one keeps its last good state, except an Authorization, which is enforced as a deny-all
//! of its scope (an unknown policy fails closed), and the response is NACKed with every reason.
//! Applying the valid rest matters: a new DENY must not wait behind someone's broken policy. While
//! istiod-lite is unreachable the proxy serves with the last state it had.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use trellis_proto::envoy::envoy::config::core::v3::Node;
use trellis_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use trellis_proto::envoy::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use trellis_proto::envoy::google::protobuf::{value::Kind, Struct, Value};
use trellis_proto::envoy::google::rpc::Status as RpcStatus;
use trellis_proto::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, NODE_TYPE_URL, PARTIAL_PUSH_SUFFIX, POD_MEMBERSHIP_TYPE_URL,
};

use crate::state::{validate, State};

/// Nodes are Trellis's own type: the overlay's routes.
const TYPES: [&str; 4] = [AUTHORIZATION_TYPE_URL, ADDRESS_TYPE_URL, NODE_TYPE_URL, POD_MEMBERSHIP_TYPE_URL];
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Responses are chunked by the server; this bounds a single message.
const MAX_MESSAGE: usize = 64 << 20;
/// Longest NACK message: the first reasons of a response with many bad resources.
const MAX_NACK_MESSAGE: usize = 4096;

#[derive(Clone, Debug)]
pub struct Config {
    /// `http://host:15010` or `https://host:15012`.
    pub address: String,
    /// PEM root to trust for https; the mesh root.
    pub root_pem: Option<String>,
    /// Node bearer token (required on :15012), read afresh for every connection.
    pub token: crate::token::NodeToken,
    pub node_id: String,
    pub node_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("connecting to {0}: {1}")]
    Connect(String, tonic::transport::Error),
    #[error("xDS stream: {0}")]
    Stream(#[from] tonic::Status),
    #[error("invalid configuration: {0}")]
    Config(String),
}

pub struct Client {
    cfg: Config,
    state: Arc<RwLock<State>>,
    /// What we hold, per type: name → version. Sent as initial_resource_versions on reconnect.
    versions: HashMap<&'static str, HashMap<String, String>>,
    synced: watch::Sender<bool>,
    /// Bumped after every applied response, so the node agent can reconcile pods and overlay.
    changed: watch::Sender<u64>,
}

impl Client {
    pub fn new(cfg: Config, state: Arc<RwLock<State>>) -> (Client, watch::Receiver<bool>) {
        let (synced, rx) = watch::channel(false);
        let (changed, _) = watch::channel(0);
        (Client { cfg, state, versions: HashMap::new(), synced, changed }, rx)
    }

    /// A receiver that wakes after each applied update.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Runs until the task is dropped: one session after another, with exponential backoff
    /// between failures (reset once a session has synced).
    pub async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut got_snapshot = false;
            match self.session(&mut got_snapshot).await {
                Ok(()) => tracing::info!(address = self.cfg.address, "xDS stream closed by the server"),
                Err(e) => {
                    tracing::warn!(address = self.cfg.address, error = %e, retry_in = ?backoff, "xDS session failed; serving last known state")
                }
            }
            // A session that got as far as a full snapshot was a working connection: the next
            // failure starts the backoff over.
            if got_snapshot {
                backoff = BACKOFF_MIN;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn node(&self) -> Node {
        let mut fields = std::collections::HashMap::new();
        fields.insert("NODE_NAME".to_string(), Value { kind: Some(Kind::StringValue(self.cfg.node_name.clone())) });
        Node { id: self.cfg.node_id.clone(), metadata: Some(Struct { fields }), ..Default::default() }
    }

    /// One stream; `got_snapshot` is set once every type's first state has arrived whole on it.
    async fn session(&mut self, got_snapshot: &mut bool) -> Result<(), XdsError> {
        let mut endpoint = Endpoint::from_shared(self.cfg.address.clone())
            .map_err(|e| XdsError::Config(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if let Some(root) = &self.cfg.root_pem {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(root))
                .domain_name("istiod.istio-system.svc");
            endpoint = endpoint.tls_config(tls).map_err(|e| XdsError::Config(e.to_string()))?;
        }
        let channel = endpoint.connect().await.map_err(|e| XdsError::Connect(self.cfg.address.clone(), e))?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        let (tx, rx) = mpsc::channel(16);
        for t in TYPES {
            let initial = self.versions.get(t).cloned().unwrap_or_default();
            let req = DeltaDiscoveryRequest {
                node: Some(self.node()),
                type_url: t.into(),
                initial_resource_versions: initial,
                ..Default::default()
            };
            tx.send(req).await.map_err(|_| XdsError::Config("request channel closed".into()))?;
        }
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = self.cfg.token.current() {
            let v = format!("Bearer {token}")
                .parse()
                .map_err(|_| XdsError::Config("token is not a valid header value".into()))?;
            req.metadata_mut().insert("authorization", v);
        }
        let mut stream = client.delta_aggregated_resources(req).await?.into_inner();
        let mut seen_types = std::collections::HashSet::new();
        while let Some(resp) = stream.message().await? {
            let (changed, errors) = self.apply(&resp);
            if changed {
                self.changed.send_modify(|n| *n += 1);
            }
            let error_detail = (!errors.is_empty()).then(|| {
                for reason in &errors {
                    tracing::warn!(
                        type_url = resp.type_url,
                        nonce = resp.nonce,
                        reason,
                        "rejecting an xDS resource (NACK); keeping its last good state, or denying for a policy"
                    );
                }
                let mut message = errors.join("; ");
                if message.len() > MAX_NACK_MESSAGE {
                    // `floor_char_boundary` is newer than the workspace's rust-version (1.88).
                    let end = (0..=MAX_NACK_MESSAGE).rev().find(|&i| message.is_char_boundary(i)).unwrap_or(0);
                    message.truncate(end);
                    message.push_str(" …");
                }
                RpcStatus { code: tonic::Code::InvalidArgument as i32, message, details: vec![] }
            });
            let ack = DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail,
                ..Default::default()
            };
            if tx.send(ack).await.is_err() {
                break;
            }
            // The first state of a type is complete at its first response that is not one of
            // several pieces of a push.
            if !resp.system_version_info.ends_with(PARTIAL_PUSH_SUFFIX) {
                seen_types.insert(resp.type_url.clone());
            }
            if seen_types.len() == TYPES.len() {
                *got_snapshot = true;
                self.synced.send_replace(true);
            }
        }
        Ok(())
    }

    /// Applies a response resource by resource. Removals always apply. An invalid resource keeps
    /// its last good state, except a policy, which becomes a deny-all of its scope (fail closed);
    /// the reasons are returned for the NACK. Whether anything changed is `true` in the result.
    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> (bool, Vec<String>) {
        let Some(t) = TYPES.iter().copied().find(|t| *t == resp.type_url) else {
            return (false, vec![format!("unexpected type {}", resp.type_url)]);
        };
        let mut errors = Vec::new();
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let versions = self.versions.entry(t).or_default();
        for name in &resp.removed_resources {
            match t {
                ADDRESS_TYPE_URL => state.remove_address(name),
                NODE_TYPE_URL => state.remove_node(name),
                POD_MEMBERSHIP_TYPE_URL => state.remove_membership(name),
                _ => state.remove_policy(name),
            }
            versions.remove(name);
        }
        let mut changed = !resp.removed_resources.is_empty();
        for r in &resp.resources {
            let body = r.resource.as_ref().map(|a| a.value.as_slice()).unwrap_or_default();
            let applied = match t {
                ADDRESS_TYPE_URL => validate::address(&r.name, body).map(|a| state.upsert_address(&r.name, a)),
                NODE_TYPE_URL => validate::node(&r.name, body).map(|n| state.upsert_node(n)),
                POD_MEMBERSHIP_TYPE_URL => validate::membership(&r.name, body).map(|m| state.upsert_membership(m)),
                _ => {
                    let (policy, rejected) = validate::authorization_or_deny_all(&r.name, body);
                    state.upsert_policy(&r.name, policy);
                    if rejected.is_some() {
                        // The deny-all enforced follows from this version: holding it lets the
                        // server send a removal or a newer version after a reconnect.
                        versions.insert(r.name.clone(), r.version.clone());
                        changed = true;
                    }
                    rejected.map_or(Ok(()), Err)
                }
            };
            match applied {
                Ok(()) => {
                    changed = true;
                    versions.insert(r.name.clone(), r.version.clone());
                }
                // The last good version stays the one held, so the server resends this one after
                // a reconnect, or removes the resource if it is gone by then.
                Err(reason) => errors.push(reason),
            }
        }
        (changed, errors)
    }
}
