//! Server Listeners for xDS-enabled gRPC servers (gRFC A36): one per workload IP and port it
//! serves, with the workload's AuthorizationPolicies as RBAC filters and, under STRICT, mTLS that
//! requires a client certificate.

use std::collections::BTreeSet;
use std::net::IpAddr;

use trellis_config::object::AuthorizationPolicy;
use trellis_config::{selector, Kind, Object};
use trellis_proto::envoy::envoy::config::core::v3 as core;
use trellis_proto::envoy::envoy::config::listener::v3 as listener;
use trellis_proto::envoy::envoy::config::route::v3 as route;
use trellis_proto::envoy::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use trellis_proto::envoy::envoy::extensions::transport_sockets::tls::v3 as tls;
use trellis_proto::envoy::google::protobuf::BoolValue;

use super::super::policy::{effective_mode, Mode};
use super::super::workload;
use super::super::world::World;
use super::super::{Output, Settings};
use super::client::{common_tls, router_filter, HCM_TYPE_URL};
use super::{any, encode, inbound_name, rbac, LISTENER_TYPE_URL};

pub const DOWNSTREAM_TLS_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";

pub fn render_workload(world: &World, s: &Settings, obj: &Object, seen: &mut BTreeSet<String>, out: &mut Vec<Output>) {
    let Some(src) = workload::source(obj) else { return };
    let ns = obj.meta().namespace.clone().unwrap_or_default();
    let mut ports = BTreeSet::new();
    for svc in world.in_namespace(Kind::Service, &ns) {
        let Object::Service(svc) = svc.as_ref() else { continue };
        let Some(sel) = svc.spec.selector.as_ref().filter(|s| !s.is_empty()) else { continue };
        if selector::matches(sel, src.labels) {
            ports.extend(svc.spec.ports.iter().filter_map(|p| workload::target_port(p, &src)));
        }
    }
    if ports.is_empty() {
        return;
    }
    let policies = applicable_policies(world, s, &ns, src.labels);
    for ip in &src.addresses {
        for &port in &ports {
            let name = inbound_name(*ip, port);
            if seen.insert(name.clone()) {
                let mtls = effective_mode(world, s, &ns, src.labels, port) == Mode::Strict;
                out.push((
                    LISTENER_TYPE_URL,
                    name.clone(),
                    encode(&server_listener(&name, *ip, port, mtls, &policies)),
                ));
            }
        }
    }
}

/// Selector policies in the workload's namespace and the root namespace that match it, plus the
/// namespace- and mesh-wide ones. `targetRefs` policies belong to waypoints and are left out.
fn applicable_policies<'a>(
    world: &'a World,
    s: &Settings,
    ns: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> Vec<&'a AuthorizationPolicy> {
    let mut out = Vec::new();
    let mut scan = |policy_ns: &str| {
        for o in world.in_namespace(Kind::AuthorizationPolicy, policy_ns) {
            let Object::AuthorizationPolicy(ap) = o.as_ref() else { continue };
            if ap.spec.target_ref.is_some() || !ap.spec.target_refs.is_empty() {
                continue;
            }
            let applies = match ap.spec.selector.as_ref().filter(|sel| !sel.match_labels.is_empty()) {
                Some(sel) => selector::matches(&sel.match_labels, labels),
                None => true,
            };
            if applies {
                out.push(ap);
            }
        }
    };
    scan(ns);
    if ns != s.root_namespace {
        scan(&s.root_namespace);
    }
    out
}

fn server_listener(
    name: &str,
    ip: IpAddr,
    port: u32,
    mtls: bool,
    policies: &[&AuthorizationPolicy],
) -> listener::Listener {
    let mut http_filters = rbac::filters(policies);
    http_filters.push(router_filter());
    let manager = hcm::HttpConnectionManager {
        stat_prefix: name.into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(route::RouteConfiguration {
            name: format!("inbound|{port}"),
            virtual_hosts: vec![route::VirtualHost {
                name: format!("inbound|grpc|{port}"),
                domains: vec!["*".into()],
                routes: vec![route::Route {
                    r#match: Some(route::RouteMatch {
                        path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(route::route::Action::NonForwardingAction(route::NonForwardingAction {})),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        })),
        http_filters,
        ..Default::default()
    };
    let transport_socket = mtls.then(|| {
        let ctx = tls::DownstreamTlsContext {
            common_tls_context: Some(common_tls(Vec::new())),
            require_client_certificate: Some(BoolValue { value: true }),
            ..Default::default()
        };
        core::TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(DOWNSTREAM_TLS_TYPE_URL, &ctx))),
        }
    });
    listener::Listener {
        name: name.into(),
        address: Some(core::Address {
            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                address: ip.to_string(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        filter_chains: vec![listener::FilterChain {
            filters: vec![listener::Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(any(HCM_TYPE_URL, &manager))),
            }],
            transport_socket,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A copy of a server Listener for a server that listens on a wildcard address: same policy and
/// TLS, with the name it asked for and the address it binds (gRFC A36 compares the two).
pub fn for_wildcard(
    concrete: &[u8],
    requested_name: &str,
    bind: std::net::SocketAddr,
) -> Result<Vec<u8>, prost::DecodeError> {
    use prost::Message;
    let mut l = listener::Listener::decode(concrete)?;
    l.name = requested_name.to_string();
    l.address = Some(core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: bind.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(bind.port() as u32)),
            ..Default::default()
        })),
    });
    Ok(l.encode_to_vec())
}
