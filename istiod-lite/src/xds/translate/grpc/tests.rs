//! Table tests of the gRPC translation: names, weighted routes and their precedence, endpoints
//! with localities, mTLS contexts, RBAC, and incremental removals.

use std::sync::Arc;

use prost::Message;
use trellis_config::load::load_text;
use trellis_config::Object;
use trellis_proto::envoy::envoy::config::cluster::v3::Cluster;
use trellis_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
use trellis_proto::envoy::envoy::config::listener::v3::Listener;
use trellis_proto::envoy::envoy::config::route::v3::{route, route_action, route_match, Route, RouteConfiguration};
use trellis_proto::envoy::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, http_filter, HttpConnectionManager,
};

use super::super::{Output, Settings, Translator};
use super::*;
use crate::store::{Event, EventType};

fn objects(yaml: &str) -> Vec<Arc<Object>> {
    load_text("t.yaml", yaml, "demo").expect("valid test manifests").into_iter().map(|l| Arc::new(l.object)).collect()
}

fn body<'a>(out: &'a [Output], t: &str, name: &str) -> Option<&'a bytes::Bytes> {
    out.iter().find(|(ty, n, _)| *ty == t && n == name).and_then(|o| o.2.as_ref())
}

const BASE: &str = "apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec: {selector: {app: echo}, ports: [{name: grpc, port: 7070, targetPort: grpc}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2}
spec: {selector: {app: echo-v2}, ports: [{name: grpc, port: 7070, targetPort: 50051}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: a}
spec: {address: 10.0.0.1, ports: {grpc: 50051}, labels: {app: echo}, serviceAccount: echo, locality: us/east/1a, weight: 3}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: b}
spec: {address: 10.0.0.2, ports: {grpc: 50052}, labels: {app: echo}, serviceAccount: echo-b}
";

const HOST: &str = "echo.demo.svc.cluster.local";

fn load(extra: &str) -> Vec<Output> {
    Translator::new(Settings::default()).load(objects(&format!("{BASE}{extra}")))
}

fn hcm(l: &Listener, server: bool) -> HttpConnectionManager {
    let any = if server {
        match l.filter_chains[0].filters[0].config_type.as_ref() {
            Some(trellis_proto::envoy::envoy::config::listener::v3::filter::ConfigType::TypedConfig(a)) => a.clone(),
            _ => panic!("no typed config"),
        }
    } else {
        l.api_listener.as_ref().and_then(|a| a.api_listener.clone()).expect("api_listener")
    };
    HttpConnectionManager::decode(any.value.as_slice()).unwrap()
}

#[test]
fn client_chain_names_and_shapes_follow_the_grpc_contract() {
    let out = load("");
    let lname = format!("{HOST}:7070");
    let cname = format!("outbound|7070||{HOST}");
    let l = Listener::decode(body(&out, LISTENER_TYPE_URL, &lname).unwrap().clone()).unwrap();
    let m = hcm(&l, false);
    match m.route_specifier {
        Some(http_connection_manager::RouteSpecifier::Rds(rds)) => {
            assert_eq!(rds.route_config_name, lname);
            assert!(rds.config_source.unwrap().config_source_specifier.is_some(), "RDS over ADS");
        }
        other => panic!("client listener must use RDS: {other:?}"),
    }
    let last = m.http_filters.last().expect("at least one filter");
    assert_eq!(last.name, "envoy.filters.http.router", "the router is last");
    let rc = RouteConfiguration::decode(body(&out, ROUTE_TYPE_URL, &lname).unwrap().clone()).unwrap();
    assert!(rc.virtual_hosts[0].domains.contains(&lname), "domains match host:port");
    let c = Cluster::decode(body(&out, CLUSTER_TYPE_URL, &cname).unwrap().clone()).unwrap();
    assert_eq!(c.eds_cluster_config.as_ref().unwrap().service_name, cname);
    assert!(c.transport_socket.is_none(), "PERMISSIVE: plaintext");

    let cla = ClusterLoadAssignment::decode(body(&out, ENDPOINT_TYPE_URL, &cname).unwrap().clone()).unwrap();
    assert_eq!(cla.endpoints.len(), 2, "one LocalityLbEndpoints per locality");
    for l in &cla.endpoints {
        assert!(l.locality.is_some(), "locality always set");
        assert!(l.load_balancing_weight.as_ref().unwrap().value > 0, "locality weight > 0");
    }
    let east = cla.endpoints.iter().find(|l| l.locality.as_ref().unwrap().region == "us").unwrap();
    assert_eq!(east.locality.as_ref().unwrap().zone, "east");
    assert_eq!(east.load_balancing_weight.as_ref().unwrap().value, 3, "sum of endpoint weights");
    let addrs: Vec<String> = cla.endpoints.iter().flat_map(|l| &l.lb_endpoints).map(|e| format!("{e:?}")).collect();
    assert!(addrs.iter().any(|a| a.contains("10.0.0.2") && a.contains("50052")), "named target port per endpoint");
}

#[test]
fn server_listeners_exist_per_workload_ip_and_target_port() {
    let out = load("");
    for name in ["xds.istio.io/grpc/lds/inbound/10.0.0.1:50051", "xds.istio.io/grpc/lds/inbound/10.0.0.2:50052"] {
        let l = Listener::decode(body(&out, LISTENER_TYPE_URL, name).expect(name).clone()).unwrap();
        assert!(format!("{:?}", l.address).contains(name.rsplit_once('/').unwrap().1.split(':').next().unwrap()));
        let m = hcm(&l, true);
        assert_eq!(m.http_filters.len(), 1, "no policy: router only");
        assert!(l.filter_chains[0].transport_socket.is_none(), "PERMISSIVE: plaintext");
    }
}

#[test]
fn strict_adds_mtls_on_both_sides_with_the_endpoint_identities() {
    let out = load(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default}\nspec: {mtls: {mode: STRICT}}\n",
    );
    let c = Cluster::decode(body(&out, CLUSTER_TYPE_URL, &format!("outbound|7070||{HOST}")).unwrap().clone()).unwrap();
    let ts = format!("{:?}", c.transport_socket.expect("UpstreamTlsContext"));
    assert!(ts.contains("UpstreamTlsContext"));
    let l = Listener::decode(
        body(&out, LISTENER_TYPE_URL, "xds.istio.io/grpc/lds/inbound/10.0.0.1:50051").unwrap().clone(),
    )
    .unwrap();
    let any = match l.filter_chains[0].transport_socket.as_ref().unwrap().config_type.as_ref().unwrap() {
        trellis_proto::envoy::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(a) => a.clone(),
    };
    let d = trellis_proto::envoy::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext::decode(
        any.value.as_slice(),
    )
    .unwrap();
    assert_eq!(d.require_client_certificate.map(|b| b.value), Some(true));
    let sans = {
        let u = trellis_proto::envoy::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext::decode(
            match c_transport(&out) {
                Some(a) => a,
                None => panic!("no tls"),
            }
            .as_slice(),
        )
        .unwrap();
        format!("{u:?}")
    };
    assert!(sans.contains("spiffe://cluster.local/ns/demo/sa/echo\"") && sans.contains("sa/echo-b"), "{sans}");
    assert!(sans.contains("ROOTCA"), "root from the certificate provider");
}

fn c_transport(out: &[Output]) -> Option<Vec<u8>> {
    let c = Cluster::decode(body(out, CLUSTER_TYPE_URL, &format!("outbound|7070||{HOST}"))?.clone()).ok()?;
    match c.transport_socket?.config_type? {
        trellis_proto::envoy::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(a) => Some(a.value),
    }
}

/// The routes of `echo`:7070 once a route of `kind` with these `rules` (YAML list items) attaches.
fn echo_routes(kind: &str, rules: &str) -> Vec<Route> {
    let out = load(&format!(
        "---
apiVersion: gateway.networking.k8s.io/v1
kind: {kind}
metadata: {{name: r}}
spec:
  parentRefs: [{{group: '', kind: Service, name: echo, port: 7070}}]
  rules:
{rules}"
    ));
    let rc = RouteConfiguration::decode(body(&out, ROUTE_TYPE_URL, &format!("{HOST}:7070")).unwrap().clone()).unwrap();
    rc.virtual_hosts.into_iter().next().unwrap().routes
}

#[test]
fn grpcroute_weights_and_precedence() {
    let routes = &echo_routes(
        "GRPCRoute",
        "  - backendRefs: [{name: echo, port: 7070, weight: 80}, {name: echo-v2, port: 7070, weight: 20}]
  - matches: [{method: {service: pkg.Svc, method: Get}}]
    backendRefs: [{name: echo-v2, port: 7070}]
  - matches: [{method: {service: pkg.Svc}, headers: [{name: X-User, value: alice}]}]
    backendRefs: [{name: echo-v2, port: 7070}]
",
    );
    assert_eq!(routes.len(), 3);
    // Service+method first, then service with a header, then the catch-all.
    assert_eq!(
        routes[0].r#match.as_ref().unwrap().path_specifier,
        Some(route_match::PathSpecifier::Path("/pkg.Svc/Get".into()))
    );
    assert_eq!(
        routes[1].r#match.as_ref().unwrap().path_specifier,
        Some(route_match::PathSpecifier::Prefix("/pkg.Svc/".into()))
    );
    assert_eq!(routes[1].r#match.as_ref().unwrap().headers[0].name, "x-user", "header names are lower-cased");
    match routes[2].action.as_ref().unwrap() {
        route::Action::Route(a) => match a.cluster_specifier.as_ref().unwrap() {
            route_action::ClusterSpecifier::WeightedClusters(w) => {
                let got: Vec<(String, u32)> =
                    w.clusters.iter().map(|c| (c.name.clone(), c.weight.as_ref().unwrap().value)).collect();
                assert_eq!(
                    got,
                    [
                        (format!("outbound|7070||{HOST}"), 80),
                        ("outbound|7070||echo-v2.demo.svc.cluster.local".to_string(), 20)
                    ]
                );
            }
            other => panic!("expected weighted clusters: {other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

#[test]
fn httproute_timeouts_cap_each_calls_deadline() {
    let routes = echo_routes(
        "HTTPRoute",
        "  - matches: [{path: {type: Exact, value: /a.S/Both}}]
    timeouts: {request: 2s, backendRequest: 1500ms}
  - matches: [{path: {type: Exact, value: /a.S/Request}}]
    timeouts: {request: 1m1s}
  - matches: [{path: {type: Exact, value: /a.S/Backend}}]
    timeouts: {request: 0s, backendRequest: 250ms}
  - matches: [{path: {type: Exact, value: /a.S/None}}]
    timeouts: {request: 0s}
  - matches: [{path: {type: Exact, value: /a.S/Unset}}]
",
    );
    let mut limits: Vec<(String, Option<(i64, i32)>)> = routes
        .iter()
        .map(|r| {
            let path = match r.r#match.as_ref().unwrap().path_specifier.as_ref().unwrap() {
                route_match::PathSpecifier::Path(p) => p.clone(),
                other => panic!("{other:?}"),
            };
            let route::Action::Route(a) = r.action.as_ref().unwrap() else { panic!() };
            let m = a.max_stream_duration.as_ref().map(|m| {
                assert!(m.grpc_timeout_header_max.is_none(), "the application's shorter deadline must still apply");
                let d = m.max_stream_duration.as_ref().unwrap();
                (d.seconds, d.nanos)
            });
            assert!(a.timeout.is_none(), "gRPC ignores RouteAction.timeout");
            (path, m)
        })
        .collect();
    limits.sort();
    let want = [
        ("/a.S/Backend", Some((0, 250_000_000))),
        ("/a.S/Both", Some((1, 500_000_000))),
        ("/a.S/None", None),
        ("/a.S/Request", Some((61, 0))),
        ("/a.S/Unset", None),
    ];
    assert_eq!(limits, want.map(|(p, m)| (p.to_string(), m)));
}

#[test]
fn authorization_policies_become_rbac_filters_deny_before_allow() {
    let out = load(
        "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-bad}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/bad]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-ns}
spec:
  rules: [{from: [{source: {namespaces: [demo]}}], to: [{operation: {paths: [/pkg.Svc/*]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-only}
spec:
  targetRefs: [{kind: Service, group: '', name: echo}]
  action: DENY
  rules: [{}]
",
    );
    let l = Listener::decode(
        body(&out, LISTENER_TYPE_URL, "xds.istio.io/grpc/lds/inbound/10.0.0.1:50051").unwrap().clone(),
    )
    .unwrap();
    let filters = hcm(&l, true).http_filters;
    let names: Vec<&str> = filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["envoy.filters.http.rbac.deny", "envoy.filters.http.rbac.allow", "envoy.filters.http.router"]);
    let deny = match filters[0].config_type.as_ref().unwrap() {
        http_filter::ConfigType::TypedConfig(a) => a.clone(),
        _ => panic!(),
    };
    assert_eq!(deny.type_url, rbac::RBAC_TYPE_URL);
    let decoded =
        trellis_proto::envoy::envoy::extensions::filters::http::rbac::v3::Rbac::decode(deny.value.as_slice()).unwrap();
    let rules = decoded.rules.unwrap();
    assert_eq!(rules.policies.len(), 1, "the targetRefs policy belongs to waypoints: {:?}", rules.policies.keys());
    assert!(format!("{rules:?}").contains("spiffe://cluster.local/ns/demo/sa/bad"));
}

#[test]
fn rbac_bytes_are_stable_across_renders() {
    let extra = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: many}
spec:
  rules: [{from: [{source: {principals: [a]}}]}, {from: [{source: {principals: [b]}}]}, {from: [{source: {principals: [c]}}]}, {from: [{source: {principals: [d]}}]}]
";
    let first = load(extra);
    for _ in 0..5 {
        assert_eq!(
            body(&load(extra), LISTENER_TYPE_URL, "xds.istio.io/grpc/lds/inbound/10.0.0.1:50051"),
            body(&first, LISTENER_TYPE_URL, "xds.istio.io/grpc/lds/inbound/10.0.0.1:50051"),
            "identical policy must encode identically (versions are content hashes)"
        );
    }
}

#[test]
fn deleting_a_service_removes_its_resources() {
    let mut t = Translator::new(Settings::default());
    let objs = objects(BASE);
    t.load(objs.clone());
    let svc = objs.iter().find(|o| o.meta().name == "echo" && o.kind() == trellis_config::Kind::Service).unwrap();
    let out = t.apply(&[Event { kind: EventType::Deleted, object: svc.clone(), previous: None, revision: 0 }]);
    let removed: Vec<&str> = out.iter().filter(|o| o.2.is_none()).map(|o| o.1.as_str()).collect();
    for name in [
        format!("{HOST}:7070"),
        format!("outbound|7070||{HOST}"),
        "xds.istio.io/grpc/lds/inbound/10.0.0.1:50051".into(),
    ] {
        assert!(removed.contains(&name.as_str()), "{name} removed: {removed:?}");
    }
}

#[test]
fn wildcard_server_listener_is_renamed_and_readdressed() {
    let out = load("");
    let concrete = body(&out, LISTENER_TYPE_URL, "xds.istio.io/grpc/lds/inbound/10.0.0.1:50051").unwrap();
    let requested = "xds.istio.io/grpc/lds/inbound/0.0.0.0:50051";
    let b = inbound::for_wildcard(concrete, requested, "0.0.0.0:50051".parse().unwrap()).unwrap();
    let l = Listener::decode(b.as_slice()).unwrap();
    assert_eq!(l.name, requested);
    assert!(format!("{:?}", l.address).contains("0.0.0.0"));
}
