//! Store objects → Envoy LDS/RDS/CDS/EDS resources for proxyless gRPC (gRFC A27/A28/A29/A36/A41).
//!
//! Per Service port `p` of `host` (`name.ns.svc.<suffix>`) the client side gets:
//! - Listener `host:p`: an `api_listener` whose HttpConnectionManager fetches RDS `host:p`;
//! - RouteConfiguration `host:p`: GRPCRoutes (or else HTTPRoutes) attached to the Service, with
//!   weighted clusters, else one route to the Service's own cluster;
//! - Cluster and ClusterLoadAssignment `outbound|p||host`.
//!
//! Each workload IP and target port it serves gets a server Listener
//! `xds.istio.io/grpc/lds/inbound/IP:port` carrying the RBAC filter translated from its
//! AuthorizationPolicies and, under STRICT, a DownstreamTlsContext that requires client
//! certificates.
//!
//! Rendering is per namespace: an event re-renders the namespaces whose resources read the changed
//! object ([`affected_namespaces`]); the cache then drops whatever did not change byte for byte.

mod client;
pub mod inbound;
mod rbac;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;

use bytes::Bytes;
use prost::Message;
use trellis_config::{Kind, Object};
use trellis_proto::envoy::google::protobuf::Any;

use super::world::World;
use super::{Output, Settings};

pub use trellis_proto::{CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL};

/// `server_listener_resource_name_template` without its `%s`.
pub const INBOUND_PREFIX: &str = "xds.istio.io/grpc/lds/inbound/";

/// `outbound|8080||foo.ns.svc.cluster.local`.
pub fn cluster_name(host: &str, port: u32) -> String {
    format!("outbound|{port}||{host}")
}

/// `foo.ns.svc.cluster.local:8080`: the client listener and its route configuration.
pub fn listener_name(host: &str, port: u32) -> String {
    format!("{host}:{port}")
}

pub fn inbound_name(ip: std::net::IpAddr, port: u32) -> String {
    match ip {
        std::net::IpAddr::V4(a) => format!("{INBOUND_PREFIX}{a}:{port}"),
        std::net::IpAddr::V6(a) => format!("{INBOUND_PREFIX}[{a}]:{port}"),
    }
}

pub(crate) fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any { type_url: type_url.to_string(), value: m.encode_to_vec() }
}

/// Namespaces whose gRPC resources read `o`. A route also affects the namespaces of the Services
/// it attaches to; a mesh-wide policy (in the root namespace) affects every namespace.
pub fn affected_namespaces(world: &World, settings: &Settings, o: &Object, out: &mut BTreeSet<String>) {
    let ns = o.meta().namespace.clone().unwrap_or_default();
    match o {
        Object::Service(_) | Object::Pod(_) | Object::WorkloadEntry(_) => {
            out.insert(ns);
        }
        Object::Namespace(_) => {
            out.insert(o.meta().name.clone());
        }
        Object::AuthorizationPolicy(_) | Object::PeerAuthentication(_) => {
            if ns == settings.root_namespace {
                out.extend(world.namespaces());
            }
            out.insert(ns);
        }
        Object::GrpcRoute(r) => {
            out.extend(r.spec.parent_refs.iter().map(|p| p.namespace.clone().unwrap_or_else(|| ns.clone())));
        }
        Object::HttpRoute(r) => {
            out.extend(r.spec.parent_refs.iter().map(|p| p.namespace.clone().unwrap_or_else(|| ns.clone())));
        }
        _ => {}
    }
}

/// Every gRPC resource whose owner lives in `ns`.
pub fn render_namespace(world: &World, settings: &Settings, ns: &str) -> Vec<Output> {
    let mut out = Vec::new();
    for svc in world.in_namespace(Kind::Service, ns) {
        let Object::Service(svc) = svc.as_ref() else { continue };
        client::render_service(world, settings, svc, &mut out);
    }
    let mut seen = BTreeSet::new();
    for kind in [Kind::Pod, Kind::WorkloadEntry] {
        for w in world.in_namespace(kind, ns) {
            inbound::render_workload(world, settings, w, &mut seen, &mut out);
        }
    }
    out
}

fn encode<M: Message>(m: &M) -> Option<Bytes> {
    Some(Bytes::from(m.encode_to_vec()))
}
