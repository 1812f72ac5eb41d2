//! Discovery: translate the store into Istio's `Address` and `Authorization` resources and the
//! Envoy LDS/RDS/CDS/EDS resources proxyless gRPC reads ([`translate`]), keep them versioned
//! ([`cache`]), and serve them over delta ADS ([`server`]) and state-of-the-world ADS ([`sotw`]).
//!
//! Data flow: store watch → [`translate::Translator`] recomputes only what an event affects →
//! [`cache::Cache`] stores changed resources under a content-hash version and bumps its sequence →
//! each stream wakes, asks the cache for changes since the sequence it last sent, and pushes them.

pub mod cache;
mod drive;
pub mod server;
pub mod sotw;
pub mod status;
pub mod sync;
pub mod translate;

pub use trellis_proto::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, NODE_TYPE_URL,
    POD_MEMBERSHIP_TYPE_URL, ROUTE_TYPE_URL,
};

/// The types this server publishes, in the order they are pushed (policies before the workloads
/// that reference them; for gRPC, clusters and endpoints before the listeners and routes that
/// use them). Nodes and pod memberships are Trellis's own types, for the node agent; a client
/// that does not subscribe to them (Istio's ztunnel) never sees them.
pub const TYPES: [&str; 8] = [
    AUTHORIZATION_TYPE_URL,
    ADDRESS_TYPE_URL,
    NODE_TYPE_URL,
    POD_MEMBERSHIP_TYPE_URL,
    CLUSTER_TYPE_URL,
    ENDPOINT_TYPE_URL,
    LISTENER_TYPE_URL,
    ROUTE_TYPE_URL,
];

/// The Envoy types served to proxyless gRPC over state-of-the-world ADS.
pub const GRPC_TYPES: [&str; 4] = [LISTENER_TYPE_URL, ROUTE_TYPE_URL, CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL];
