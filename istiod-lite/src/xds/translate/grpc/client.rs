//! The client side of one Service: Listener → RouteConfiguration → Cluster → endpoints.

use std::collections::{BTreeMap, BTreeSet};

use trellis_config::duration::gateway_duration;
use trellis_config::object::{GrpcRoute, HttpRoute, Service};
use trellis_config::types::{
    BackendRef, GrpcRouteMatch, HttpRouteMatch, HttpRouteTimeouts, ParentReference, ValueMatch,
};
use trellis_config::{selector, Kind, Object};
use trellis_proto::envoy::envoy::config::cluster::v3 as cluster;
use trellis_proto::envoy::envoy::config::core::v3 as core;
use trellis_proto::envoy::envoy::config::endpoint::v3 as endpoint;
use trellis_proto::envoy::envoy::config::listener::v3 as listener;
use trellis_proto::envoy::envoy::config::route::v3 as route;
use trellis_proto::envoy::envoy::extensions::filters::http::router::v3::Router;
use trellis_proto::envoy::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use trellis_proto::envoy::envoy::extensions::transport_sockets::tls::v3 as tls;
use trellis_proto::envoy::envoy::r#type::matcher::v3 as matcher;
use trellis_proto::envoy::google::protobuf::{Duration, UInt32Value};

use super::super::policy::{inherited_mode, Mode};
use super::super::workload::{self, service_hostname};
use super::super::world::World;
use super::super::{Output, Settings};
use super::ROUTE_TYPE_URL;
use super::{any, cluster_name, encode, listener_name, CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL};

pub const HCM_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
pub const ROUTER_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
pub const UPSTREAM_TLS_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
/// The certificate provider instance every Trellis gRPC bootstrap defines.
pub const CERT_PROVIDER: &str = "default";

pub(crate) fn ads() -> core::ConfigSource {
    core::ConfigSource {
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(core::AggregatedConfigSource {})),
        resource_api_version: core::ApiVersion::V3 as i32,
        ..Default::default()
    }
}

pub(crate) fn router_filter() -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(ROUTER_TYPE_URL, &Router::default()))),
        ..Default::default()
    }
}

pub(crate) fn string_exact(s: &str) -> matcher::StringMatcher {
    matcher::StringMatcher {
        match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(s.into())),
        ..Default::default()
    }
}

pub(crate) fn string_regex(re: &str) -> matcher::StringMatcher {
    matcher::StringMatcher {
        match_pattern: Some(matcher::string_matcher::MatchPattern::SafeRegex(matcher::RegexMatcher {
            regex: re.into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The certificate material of the bootstrap's provider: `default` for the workload's own
/// certificate, `ROOTCA` for the trust bundle (gRFC A29). SANs go in `match_subject_alt_names`:
/// its typed successor is not read by grpc-js.
#[allow(deprecated)]
pub(crate) fn common_tls(sans: Vec<matcher::StringMatcher>) -> tls::CommonTlsContext {
    tls::CommonTlsContext {
        tls_certificate_provider_instance: Some(tls::CertificateProviderPluginInstance {
            instance_name: CERT_PROVIDER.into(),
            certificate_name: "default".into(),
        }),
        validation_context_type: Some(tls::common_tls_context::ValidationContextType::ValidationContext(
            tls::CertificateValidationContext {
                ca_certificate_provider_instance: Some(tls::CertificateProviderPluginInstance {
                    instance_name: CERT_PROVIDER.into(),
                    certificate_name: "ROOTCA".into(),
                }),
                match_subject_alt_names: sans,
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

pub fn render_service(world: &World, s: &Settings, svc: &Service, out: &mut Vec<Output>) {
    let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
    let host = service_hostname(s, ns, &svc.metadata.name);
    let endpoints = Endpoints::of(world, svc);
    for p in &svc.spec.ports {
        let port = p.port as u32;
        let name = listener_name(&host, port);
        out.push((LISTENER_TYPE_URL, name.clone(), encode(&client_listener(&name))));
        out.push((ROUTE_TYPE_URL, name.clone(), encode(&route_configuration(world, s, svc, &host, port))));
        let cname = cluster_name(&host, port);
        let mtls = inherited_mode(world, s, ns) == Mode::Strict;
        out.push((CLUSTER_TYPE_URL, cname.clone(), encode(&cluster_resource(&cname, mtls, &endpoints.identities(s)))));
        out.push((ENDPOINT_TYPE_URL, cname.clone(), encode(&endpoints.load_assignment(&cname, p))));
    }
}

fn client_listener(name: &str) -> listener::Listener {
    let manager = hcm::HttpConnectionManager {
        stat_prefix: name.into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(hcm::Rds {
            config_source: Some(ads()),
            route_config_name: name.into(),
        })),
        http_filters: vec![router_filter()],
        ..Default::default()
    };
    listener::Listener {
        name: name.into(),
        api_listener: Some(listener::ApiListener { api_listener: Some(any(super::client::HCM_TYPE_URL, &manager)) }),
        ..Default::default()
    }
}

// ---- routes -----------------------------------------------------------------------------------

fn attaches(parent: &ParentReference, route_ns: &str, svc: &Service, port: u32) -> bool {
    let kind_ok =
        parent.kind.as_deref() == Some("Service") && matches!(parent.group.as_deref(), None | Some("") | Some("core"));
    kind_ok
        && parent.name == svc.metadata.name
        && parent.namespace.as_deref().unwrap_or(route_ns) == svc.metadata.namespace.as_deref().unwrap_or_default()
        && parent.port.is_none_or(|p| p as u32 == port)
}

/// Routes attached to this Service port, oldest first, then by `namespace/name` (the tie-break
/// order of PROTOCOLS.md).
fn attached<'a, T>(
    world: &'a World,
    kind: Kind,
    get: impl Fn(&'a Object) -> Option<(&'a T, &'a [ParentReference])>,
    svc: &Service,
    port: u32,
) -> Vec<(&'a trellis_config::ObjectMeta, &'a T)>
where
    T: 'a,
{
    let mut v: Vec<_> = world
        .all(kind)
        .into_iter()
        .filter_map(|o| {
            let (spec, parents) = get(o.as_ref())?;
            let meta = o.meta();
            let ns = meta.namespace.as_deref().unwrap_or_default();
            parents.iter().any(|p| attaches(p, ns, svc, port)).then_some((meta, spec))
        })
        .collect();
    v.sort_by(|a, b| {
        (&a.0.creation_timestamp, &a.0.namespace, &a.0.name).cmp(&(&b.0.creation_timestamp, &b.0.namespace, &b.0.name))
    });
    v
}

/// A candidate route with its precedence key; lower sorts first: (match kind, longer path first,
/// method match first, more headers first, then route age and rule order).
struct Ranked {
    key: (u8, std::cmp::Reverse<usize>, u8, std::cmp::Reverse<usize>, usize),
    route: route::Route,
}

fn route_configuration(world: &World, s: &Settings, svc: &Service, host: &str, port: u32) -> route::RouteConfiguration {
    let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
    let grpc = attached(
        world,
        Kind::GrpcRoute,
        |o| match o {
            Object::GrpcRoute(r) => Some((r as &GrpcRoute, r.spec.parent_refs.as_slice())),
            _ => None,
        },
        svc,
        port,
    );
    let http = attached(
        world,
        Kind::HttpRoute,
        |o| match o {
            Object::HttpRoute(r) => Some((r as &HttpRoute, r.spec.parent_refs.as_slice())),
            _ => None,
        },
        svc,
        port,
    );
    let default_cluster = cluster_name(host, port);
    let mut ranked = Vec::new();
    let mut order = 0usize;
    // HTTPRoutes and GRPCRoutes are never merged; GRPCRoutes are the gRPC-specific API, so they win.
    if !grpc.is_empty() {
        for (meta, r) in &grpc {
            let route_ns = meta.namespace.as_deref().unwrap_or(ns);
            for rule in &r.spec.rules {
                let action = backends(s, &rule.backend_refs, route_ns, port, &default_cluster);
                let matches =
                    if rule.matches.is_empty() { vec![GrpcRouteMatch::default()] } else { rule.matches.clone() };
                for m in &matches {
                    order += 1;
                    ranked.push(grpc_match(m, action.clone(), order));
                }
            }
        }
    } else {
        for (meta, r) in &http {
            let route_ns = meta.namespace.as_deref().unwrap_or(ns);
            for rule in &r.spec.rules {
                let mut action = backends(s, &rule.backend_refs, route_ns, port, &default_cluster);
                action.max_stream_duration = rule.timeouts.as_ref().and_then(max_stream_duration);
                let matches =
                    if rule.matches.is_empty() { vec![HttpRouteMatch::default()] } else { rule.matches.clone() };
                for m in &matches {
                    order += 1;
                    ranked.extend(http_match(m, action.clone(), order));
                }
            }
        }
    }
    ranked.sort_by_key(|r| r.key);
    let mut routes: Vec<route::Route> = ranked.into_iter().map(|r| r.route).collect();
    if grpc.is_empty() && http.is_empty() {
        routes.push(route::Route {
            r#match: Some(prefix_match("")),
            action: Some(route::route::Action::Route(cluster_action(Some(default_cluster)))),
            ..Default::default()
        });
    }
    route::RouteConfiguration {
        name: listener_name(host, port),
        virtual_hosts: vec![route::VirtualHost {
            name: listener_name(host, port),
            domains: vec![listener_name(host, port), host.to_string()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn prefix_match(p: &str) -> route::RouteMatch {
    route::RouteMatch {
        path_specifier: Some(route::route_match::PathSpecifier::Prefix(p.into())),
        ..Default::default()
    }
}

fn cluster_action(c: Option<String>) -> route::RouteAction {
    route::RouteAction {
        cluster_specifier: c.map(route::route_action::ClusterSpecifier::Cluster),
        ..Default::default()
    }
}

/// The weighted clusters of a rule. A rule without backends sends to the parent Service itself.
fn backends(s: &Settings, refs: &[BackendRef], route_ns: &str, port: u32, parent: &str) -> route::RouteAction {
    if refs.is_empty() {
        return cluster_action(Some(parent.to_string()));
    }
    let mut weighted: Vec<(String, u32)> = Vec::new();
    for b in refs {
        let weight = b.weight.unwrap_or(1).clamp(0, 1_000_000) as u32;
        if weight == 0 || !matches!(b.kind.as_deref(), None | Some("Service")) {
            continue;
        }
        let ns = b.namespace.as_deref().unwrap_or(route_ns);
        let host = service_hostname(s, ns, &b.name);
        weighted.push((cluster_name(&host, b.port.map(|p| p as u32).unwrap_or(port)), weight));
    }
    match weighted.len() {
        // Every backend is invalid or weighted 0: no cluster, which gRPC fails as UNAVAILABLE.
        0 => cluster_action(Some(format!("{parent}#no-valid-backend"))),
        1 => cluster_action(weighted.pop().map(|(c, _)| c)),
        _ => route::RouteAction {
            cluster_specifier: Some(route::route_action::ClusterSpecifier::WeightedClusters(route::WeightedCluster {
                clusters: weighted
                    .into_iter()
                    .map(|(name, w)| route::weighted_cluster::ClusterWeight {
                        name,
                        weight: Some(UInt32Value { value: w }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })),
            ..Default::default()
        },
    }
}

/// An HTTPRoute rule's timeouts as gRPC honours them (gRFC A31): `max_stream_duration` caps the
/// deadline of each call (the application's own deadline still applies when shorter). A gRPC
/// client does not retry here, so a call is one backend request: the shorter of the two
/// timeouts bounds it. `0s` means none.
fn max_stream_duration(t: &HttpRouteTimeouts) -> Option<route::route_action::MaxStreamDuration> {
    let parse = |v: &Option<String>| v.as_deref().and_then(gateway_duration).filter(|d| !d.is_zero());
    let limit = match (parse(&t.request), parse(&t.backend_request)) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    Some(route::route_action::MaxStreamDuration {
        max_stream_duration: Some(Duration { seconds: limit.as_secs() as i64, nanos: limit.subsec_nanos() as i32 }),
        ..Default::default()
    })
}

fn header(v: &ValueMatch) -> route::HeaderMatcher {
    let m = match v.type_.as_deref() {
        Some("RegularExpression") => string_regex(&v.value),
        _ => string_exact(&v.value),
    };
    route::HeaderMatcher {
        name: v.name.to_ascii_lowercase(),
        header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(m)),
        ..Default::default()
    }
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// GRPCRoute precedence: a method match with service and method, then service only, then method
/// only, then none; then the most header matches; then route age and rule order.
fn grpc_match(m: &GrpcRouteMatch, action: route::RouteAction, order: usize) -> Ranked {
    use route::route_match::PathSpecifier;
    let (path, specificity) = match &m.method {
        None => (PathSpecifier::Prefix("/".into()), 3),
        Some(mm) => {
            let regex = mm.type_.as_deref() == Some("RegularExpression");
            match (mm.service.as_deref(), mm.method.as_deref(), regex) {
                (Some(s), Some(me), false) => (PathSpecifier::Path(format!("/{s}/{me}")), 0),
                (Some(s), None, false) => (PathSpecifier::Prefix(format!("/{s}/")), 1),
                (None, Some(me), false) => {
                    (PathSpecifier::SafeRegex(regex_matcher(&format!("/[^/]+/{}", regex_escape(me)))), 2)
                }
                (s, me, _) => (
                    PathSpecifier::SafeRegex(regex_matcher(&format!(
                        "/{}/{}",
                        s.unwrap_or("[^/]+"),
                        me.unwrap_or("[^/]+")
                    ))),
                    if s.is_some() && me.is_some() {
                        0
                    } else if s.is_some() {
                        1
                    } else {
                        2
                    },
                ),
            }
        }
    };
    Ranked {
        key: (specificity, std::cmp::Reverse(0), 0, std::cmp::Reverse(m.headers.len()), order),
        route: route::Route {
            r#match: Some(route::RouteMatch {
                path_specifier: Some(path),
                headers: m.headers.iter().map(header).collect(),
                ..Default::default()
            }),
            action: Some(route::route::Action::Route(action)),
            ..Default::default()
        },
    }
}

fn regex_matcher(re: &str) -> matcher::RegexMatcher {
    matcher::RegexMatcher { regex: re.into(), ..Default::default() }
}

/// HTTPRoute precedence: Exact path, then the longest PathPrefix, then a method match, then the
/// most header matches, then the most query matches. gRPC clients cannot match query parameters,
/// so a match that needs them is left out (it could never be satisfied by a gRPC call).
fn http_match(m: &HttpRouteMatch, action: route::RouteAction, order: usize) -> Option<Ranked> {
    use route::route_match::PathSpecifier;
    if !m.query_params.is_empty() {
        return None;
    }
    let (kind, value) = m
        .path
        .as_ref()
        .map(|p| (p.type_.as_deref().unwrap_or("PathPrefix"), p.value.as_deref().unwrap_or("/")))
        .unwrap_or(("PathPrefix", "/"));
    let (path, rank, len) = match kind {
        "Exact" => (PathSpecifier::Path(value.into()), 0, value.len()),
        "RegularExpression" => (PathSpecifier::SafeRegex(regex_matcher(value)), 2, 0),
        _ => {
            // Whole segments, trailing `/` ignored: `/a` matches `/a` and `/a/b`, not `/ab`.
            let trimmed = value.trim_end_matches('/');
            let p = if trimmed.is_empty() {
                PathSpecifier::Prefix("/".into())
            } else {
                PathSpecifier::SafeRegex(regex_matcher(&format!("{}(/.*)?", regex_escape(trimmed))))
            };
            (p, 1, trimmed.len())
        }
    };
    let mut headers: Vec<route::HeaderMatcher> = m.headers.iter().map(header).collect();
    if let Some(method) = &m.method {
        headers.push(route::HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(string_exact(
                method,
            ))),
            ..Default::default()
        });
    }
    Some(Ranked {
        key: (rank, std::cmp::Reverse(len), u8::from(m.method.is_none()), std::cmp::Reverse(m.headers.len()), order),
        route: route::Route {
            r#match: Some(route::RouteMatch { path_specifier: Some(path), headers, ..Default::default() }),
            action: Some(route::route::Action::Route(action)),
            ..Default::default()
        },
    })
}

// ---- clusters and endpoints -------------------------------------------------------------------

fn cluster_resource(name: &str, mtls: bool, sans: &BTreeSet<String>) -> cluster::Cluster {
    let transport_socket = mtls.then(|| {
        let ctx = tls::UpstreamTlsContext {
            common_tls_context: Some(common_tls(sans.iter().map(|s| string_exact(s)).collect())),
            ..Default::default()
        };
        core::TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(UPSTREAM_TLS_TYPE_URL, &ctx))),
        }
    });
    cluster::Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.into(),
        }),
        lb_policy: cluster::cluster::LbPolicy::RoundRobin as i32,
        connect_timeout: Some(Duration { seconds: 10, nanos: 0 }),
        transport_socket,
        ..Default::default()
    }
}

/// The workloads behind a Service, as endpoint candidates.
struct Endpoints<'a> {
    members: Vec<workload::Source<'a>>,
    namespace: &'a str,
}

impl<'a> Endpoints<'a> {
    fn of(world: &'a World, svc: &'a Service) -> Endpoints<'a> {
        let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
        let mut members = Vec::new();
        if let Some(sel) = svc.spec.selector.as_ref().filter(|s| !s.is_empty()) {
            for kind in [Kind::Pod, Kind::WorkloadEntry] {
                for o in world.in_namespace(kind, ns) {
                    if let Some(src) = workload::source(o.as_ref()) {
                        if selector::matches(sel, src.labels) {
                            members.push(src);
                        }
                    }
                }
            }
        }
        Endpoints { members, namespace: ns }
    }

    /// SPIFFE identities the client accepts from this Service's endpoints.
    fn identities(&self, s: &Settings) -> BTreeSet<String> {
        self.members
            .iter()
            .map(|m| format!("spiffe://{}/ns/{}/sa/{}", s.trust_domain, self.namespace, m.service_account))
            .collect()
    }

    fn load_assignment(
        &self,
        name: &str,
        port: &trellis_config::types::ServicePort,
    ) -> endpoint::ClusterLoadAssignment {
        // Locality string → (address, port, healthy, weight), sorted so the output is stable.
        // gRPC needs every locality present with a weight > 0.
        type Member = (std::net::IpAddr, u32, bool, u32);
        let mut by_locality: BTreeMap<&str, Vec<Member>> = BTreeMap::new();
        for m in &self.members {
            let Some(target) = workload::target_port(port, m) else { continue };
            for ip in &m.addresses {
                by_locality.entry(m.locality).or_default().push((*ip, target, m.healthy, m.weight.max(1)));
            }
        }
        let endpoint = |&(ip, port, healthy, weight): &Member| {
            let address = core::Address {
                address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                    address: ip.to_string(),
                    port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
                    ..Default::default()
                })),
            };
            let health = if healthy { core::HealthStatus::Healthy } else { core::HealthStatus::Unhealthy };
            endpoint::LbEndpoint {
                host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(endpoint::Endpoint {
                    address: Some(address),
                    ..Default::default()
                })),
                health_status: health as i32,
                load_balancing_weight: Some(UInt32Value { value: weight }),
                ..Default::default()
            }
        };
        let endpoints = by_locality
            .into_iter()
            .map(|(loc, mut members)| {
                members.sort_unstable();
                let lb_endpoints: Vec<endpoint::LbEndpoint> = members.iter().map(endpoint).collect();
                let mut parts = loc.splitn(3, '/');
                let weight: u32 = lb_endpoints
                    .iter()
                    .map(|e| e.load_balancing_weight.as_ref().map_or(1, |w| w.value))
                    .fold(0u32, u32::saturating_add);
                endpoint::LocalityLbEndpoints {
                    locality: Some(core::Locality {
                        region: parts.next().unwrap_or_default().into(),
                        zone: parts.next().unwrap_or_default().into(),
                        sub_zone: parts.next().unwrap_or_default().into(),
                    }),
                    lb_endpoints,
                    load_balancing_weight: Some(UInt32Value { value: weight.max(1) }),
                    ..Default::default()
                }
            })
            .collect();
        endpoint::ClusterLoadAssignment { cluster_name: name.into(), endpoints, ..Default::default() }
    }
}
