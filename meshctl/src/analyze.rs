//! `meshctl analyze`: misconfigurations that validation cannot see because they span objects.
//! Each finding has a stable code; scripts may match on it.

use std::collections::BTreeMap;

use serde::Serialize;
use trellis_config::types::{BackendRef, ParentReference};
use trellis_config::{Kind, Object};

use crate::cluster::{selector_text, selects, Cluster, ROOT_NAMESPACE};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Severity {
    Error,
    Warning,
    Info,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub code: &'static str,
    pub severity: Severity,
    /// `Kind namespace/name`.
    pub resource: String,
    pub message: String,
}

/// The codes, stable across releases.
pub mod codes {
    /// An AuthorizationPolicy or PeerAuthentication selector matches no workload.
    pub const SELECTOR_MATCHES_NOTHING: &str = "TR0101";
    /// A route's parentRef names a Service or Gateway that does not exist.
    pub const ROUTE_PARENT_NOT_FOUND: &str = "TR0201";
    /// A route's backendRef names a Service that does not exist.
    pub const ROUTE_BACKEND_NOT_FOUND: &str = "TR0202";
    /// Routes that conflict on one Service: an HTTPRoute and a GRPCRoute (never merged), or two
    /// GRPCRoutes with an identical match (the older wins).
    pub const ROUTES_CONFLICT: &str = "TR0203";
    /// STRICT mTLS where workloads outside the mesh would be clients.
    pub const STRICT_WITH_NON_MESH_CLIENTS: &str = "TR0301";
    /// A pod's dataplane-mode label overrides its namespace's.
    pub const POD_OVERRIDES_NAMESPACE: &str = "TR0401";
    /// Two Services share a cluster IP.
    pub const DUPLICATE_VIP: &str = "TR0501";
}

fn resource(kind: Kind, ns: Option<&str>, name: &str) -> String {
    match ns {
        Some(ns) if !ns.is_empty() => format!("{} {ns}/{name}", kind.name()),
        _ => format!("{} {name}", kind.name()),
    }
}

pub fn analyze(c: &Cluster) -> Vec<Finding> {
    let mut out = Vec::new();
    selectors(c, &mut out);
    routes(c, &mut out);
    conflicts(c, &mut out);
    strict(c, &mut out);
    overrides(c, &mut out);
    vips(c, &mut out);
    out.sort_by(|a, b| (a.severity, a.code, &a.resource).cmp(&(b.severity, b.code, &b.resource)));
    out
}

fn selectors(c: &Cluster, out: &mut Vec<Finding>) {
    let policies = c
        .authorization_policies()
        .map(|p| (Kind::AuthorizationPolicy, &p.metadata, p.spec.selector.as_ref()))
        .chain(c.peer_authentications().map(|p| (Kind::PeerAuthentication, &p.metadata, p.spec.selector.as_ref())));
    for (kind, meta, selector) in policies {
        // Without a selector a policy covers its namespace, which may legitimately be empty.
        let Some(sel) = selector.filter(|s| !s.match_labels.is_empty()) else { continue };
        let ns = meta.namespace.as_deref().unwrap_or_default();
        if !c.workloads().any(|w| selects(ns, Some(sel), w.namespace, w.labels)) {
            let scope = if ns == ROOT_NAMESPACE { "any namespace".to_string() } else { format!("namespace {ns}") };
            out.push(Finding {
                code: codes::SELECTOR_MATCHES_NOTHING,
                severity: Severity::Warning,
                resource: resource(kind, Some(ns), &meta.name),
                message: format!(
                    "selector {} matches no pod or workload entry in {scope}, so this policy has no effect",
                    selector_text(Some(sel))
                ),
            });
        }
    }
}

fn routes(c: &Cluster, out: &mut Vec<Finding>) {
    let mut check = |kind: Kind,
                     meta: &trellis_config::ObjectMeta,
                     parents: &[ParentReference],
                     backends: Vec<&BackendRef>| {
        let ns = meta.namespace.as_deref().unwrap_or_default();
        for p in parents {
            let pns = p.namespace.as_deref().unwrap_or(ns);
            let (pkind, what) = match p.kind.as_deref() {
                Some("Service") => (Kind::Service, "Service"),
                None | Some("Gateway") => (Kind::Gateway, "Gateway"),
                Some(_) => continue,
            };
            if !c.has(pkind, pns, &p.name) {
                out.push(Finding {
                    code: codes::ROUTE_PARENT_NOT_FOUND,
                    severity: Severity::Error,
                    resource: resource(kind, Some(ns), &meta.name),
                    message: format!("parentRef {what} {pns}/{} does not exist; the route is not attached", p.name),
                });
            }
        }
        for b in backends {
            if !matches!(b.kind.as_deref(), None | Some("Service")) {
                continue;
            }
            let bns = b.namespace.as_deref().unwrap_or(ns);
            if !c.has(Kind::Service, bns, &b.name) {
                out.push(Finding {
                    code: codes::ROUTE_BACKEND_NOT_FOUND,
                    severity: Severity::Error,
                    resource: resource(kind, Some(ns), &meta.name),
                    message: format!("backendRef Service {bns}/{} does not exist; requests routed to it fail", b.name),
                });
            }
        }
    };
    for o in &c.objects {
        match o {
            Object::HttpRoute(r) => check(
                Kind::HttpRoute,
                &r.metadata,
                &r.spec.parent_refs,
                r.spec.rules.iter().flat_map(|x| x.backend_refs.iter()).collect(),
            ),
            Object::GrpcRoute(r) => check(
                Kind::GrpcRoute,
                &r.metadata,
                &r.spec.parent_refs,
                r.spec.rules.iter().flat_map(|x| x.backend_refs.iter()).collect(),
            ),
            _ => {}
        }
    }
}

/// The Services (namespace, name, port) a route attaches to.
fn service_parents<'a>(
    ns: &'a str,
    parents: &'a [ParentReference],
) -> impl Iterator<Item = (&'a str, &'a str, Option<i64>)> {
    parents
        .iter()
        .filter(|p| p.kind.as_deref() == Some("Service"))
        .map(move |p| (p.namespace.as_deref().unwrap_or(ns), p.name.as_str(), p.port))
}

fn same_parent(a: (&str, &str, Option<i64>), b: (&str, &str, Option<i64>)) -> bool {
    a.0 == b.0 && a.1 == b.1 && (a.2.is_none() || b.2.is_none() || a.2 == b.2)
}

fn conflicts(c: &Cluster, out: &mut Vec<Finding>) {
    let mut grpc: Vec<&trellis_config::object::GrpcRoute> =
        c.objects.iter().filter_map(|o| if let Object::GrpcRoute(r) = o { Some(r) } else { None }).collect();
    grpc.sort_by(|a, b| {
        (&a.metadata.creation_timestamp, &a.metadata.namespace, &a.metadata.name).cmp(&(
            &b.metadata.creation_timestamp,
            &b.metadata.namespace,
            &b.metadata.name,
        ))
    });
    let ns_of = |m: &trellis_config::ObjectMeta| m.namespace.clone().unwrap_or_default();
    for o in &c.objects {
        let Object::HttpRoute(h) = o else { continue };
        let hns = ns_of(&h.metadata);
        for g in &grpc {
            let gns = ns_of(&g.metadata);
            let shared = service_parents(&hns, &h.spec.parent_refs)
                .find(|hp| service_parents(&gns, &g.spec.parent_refs).any(|gp| same_parent(*hp, gp)));
            if let Some((sns, sname, _)) = shared {
                out.push(Finding {
                    code: codes::ROUTES_CONFLICT,
                    severity: Severity::Warning,
                    resource: resource(Kind::HttpRoute, Some(&hns), &h.metadata.name),
                    message: format!(
                        "GRPCRoute {gns}/{} also attaches to Service {sns}/{sname}; HTTPRoutes and GRPCRoutes are never merged, so proxyless gRPC clients follow the GRPCRoute and ignore this route",
                        g.metadata.name
                    ),
                });
            }
        }
    }
    for (i, newer) in grpc.iter().enumerate() {
        let nns = ns_of(&newer.metadata);
        for older in &grpc[..i] {
            let ons = ns_of(&older.metadata);
            let shared = service_parents(&nns, &newer.spec.parent_refs)
                .any(|np| service_parents(&ons, &older.spec.parent_refs).any(|op| same_parent(np, op)));
            if !shared {
                continue;
            }
            let matches = |r: &trellis_config::object::GrpcRoute| -> Vec<_> {
                r.spec
                    .rules
                    .iter()
                    .flat_map(
                        |rule| {
                            if rule.matches.is_empty() {
                                vec![Default::default()]
                            } else {
                                rule.matches.clone()
                            }
                        },
                    )
                    .collect::<Vec<trellis_config::types::GrpcRouteMatch>>()
            };
            let theirs = matches(older);
            if let Some(m) = matches(newer).into_iter().find(|m| theirs.contains(m)) {
                let what = match &m.method {
                    Some(mm) => format!(
                        "method {}/{}",
                        mm.service.as_deref().unwrap_or("*"),
                        mm.method.as_deref().unwrap_or("*")
                    ),
                    None => "every method".to_string(),
                };
                out.push(Finding {
                    code: codes::ROUTES_CONFLICT,
                    severity: Severity::Warning,
                    resource: resource(Kind::GrpcRoute, Some(&nns), &newer.metadata.name),
                    message: format!(
                        "GRPCRoute {ons}/{} (older) has an identical match for {what} on the same Service; it wins and this rule never applies",
                        older.metadata.name
                    ),
                });
            }
        }
    }
}

/// STRICT mTLS refuses plaintext, so a workload outside the mesh cannot reach workloads that
/// STRICT covers. Namespace- or mesh-wide STRICT is reported when such workloads exist.
fn strict(c: &Cluster, out: &mut Vec<Finding>) {
    let outside: Vec<String> = c
        .pods()
        .filter(|p| !p.spec.host_network.unwrap_or(false))
        .filter(|p| {
            let ns = p.metadata.namespace.as_deref().unwrap_or_default();
            !c.enrolled(ns, &p.metadata.labels).enrolled
        })
        .map(|p| format!("{}/{}", p.metadata.namespace.as_deref().unwrap_or_default(), p.metadata.name))
        .collect();
    if outside.is_empty() {
        return;
    }
    for pa in c.peer_authentications() {
        let strict = pa.spec.mtls.as_ref().is_some_and(|m| m.mode == "STRICT");
        if !strict || pa.spec.selector.as_ref().is_some_and(|s| !s.match_labels.is_empty()) {
            continue;
        }
        let ns = pa.metadata.namespace.as_deref().unwrap_or_default();
        let scope = if ns == ROOT_NAMESPACE { "the whole mesh".to_string() } else { format!("namespace {ns}") };
        let shown: Vec<&str> = outside.iter().take(5).map(String::as_str).collect();
        let more = if outside.len() > 5 { format!(" and {} more", outside.len() - 5) } else { String::new() };
        out.push(Finding {
            code: codes::STRICT_WITH_NON_MESH_CLIENTS,
            severity: Severity::Warning,
            resource: resource(Kind::PeerAuthentication, Some(ns), &pa.metadata.name),
            message: format!(
                "STRICT mTLS for {scope}, but pods outside the mesh ({}{more}) cannot reach it: their plaintext connections are refused",
                shown.join(", ")
            ),
        });
    }
}

fn overrides(c: &Cluster, out: &mut Vec<Finding>) {
    for p in c.pods() {
        let ns = p.metadata.namespace.as_deref().unwrap_or_default();
        let e = c.enrolled(ns, &p.metadata.labels);
        if e.pod_overrides_namespace {
            out.push(Finding {
                code: codes::POD_OVERRIDES_NAMESPACE,
                severity: Severity::Info,
                resource: resource(Kind::Pod, Some(ns), &p.metadata.name),
                message: format!("{}: the pod is {} the mesh", e.reason, if e.enrolled { "in" } else { "outside" }),
            });
        }
    }
}

fn vips(c: &Cluster, out: &mut Vec<Finding>) {
    let mut by_vip: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for s in c.services() {
        let mut ips: Vec<&str> = s.spec.cluster_ips.iter().map(String::as_str).collect();
        ips.extend(s.spec.cluster_ip.as_deref());
        ips.sort();
        ips.dedup();
        for ip in ips.into_iter().filter(|ip| !ip.is_empty() && *ip != "None") {
            by_vip.entry(ip).or_default().push(format!(
                "{}/{}",
                s.metadata.namespace.as_deref().unwrap_or_default(),
                s.metadata.name
            ));
        }
    }
    for (vip, owners) in by_vip.into_iter().filter(|(_, o)| o.len() > 1) {
        for (i, owner) in owners.iter().enumerate() {
            let others: Vec<&str> =
                owners.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, o)| o.as_str()).collect();
            let (ns, name) = owner.split_once('/').unwrap_or(("", owner));
            out.push(Finding {
                code: codes::DUPLICATE_VIP,
                severity: Severity::Error,
                resource: resource(Kind::Service, Some(ns), name),
                message: format!(
                    "cluster IP {vip} is also used by {}; traffic to it reaches only one of them",
                    others.join(", ")
                ),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(yaml: &str) -> Cluster {
        let objects = trellis_config::load::load_text("test.yaml", yaml, "default")
            .unwrap_or_else(|e| panic!("fixture: {e:?}"))
            .into_iter()
            .map(|l| l.object)
            .collect();
        Cluster { objects }
    }

    const BASE: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: demo, labels: {app: echo}}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec: {selector: {app: echo}, clusterIP: 10.96.0.20, ports: [{port: 80}]}
";

    fn codes_of(extra: &str) -> Vec<(&'static str, String)> {
        analyze(&cluster(&format!("{BASE}---\n{extra}"))).into_iter().map(|f| (f.code, f.resource)).collect()
    }

    #[test]
    fn a_clean_config_has_no_findings() {
        assert_eq!(analyze(&cluster(BASE)), vec![]);
    }

    #[test]
    fn each_misconfiguration_is_found_with_its_code_and_resource() {
        let cases: &[(&str, &str, Vec<(&str, &str)>)] = &[
            (
                "policy selector matches nothing",
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: demo}\nspec: {selector: {matchLabels: {app: ech0}}, action: DENY, rules: [{}]}\n",
                vec![(codes::SELECTOR_MATCHES_NOTHING, "AuthorizationPolicy demo/p")],
            ),
            (
                "selector in another namespace does not count",
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa, namespace: other}\nspec: {selector: {matchLabels: {app: echo}}, mtls: {mode: PERMISSIVE}}\n",
                vec![(codes::SELECTOR_MATCHES_NOTHING, "PeerAuthentication other/pa")],
            ),
            (
                "an HTTPRoute and a GRPCRoute on one Service conflict",
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: h, namespace: demo}\nspec: {parentRefs: [{group: '', kind: Service, name: echo}], rules: [{backendRefs: [{name: echo, port: 80}]}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: demo}\nspec: {parentRefs: [{group: '', kind: Service, name: echo, port: 80}], rules: [{backendRefs: [{name: echo, port: 80}]}]}\n",
                vec![(codes::ROUTES_CONFLICT, "HTTPRoute demo/h")],
            ),
            (
                "two GRPCRoutes with an identical match: the newer is shadowed",
                "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: a-old, namespace: demo, creationTimestamp: '2026-01-01T00:00:00Z'}\nspec: {parentRefs: [{group: '', kind: Service, name: echo}], rules: [{matches: [{method: {service: pkg.S, method: M}}], backendRefs: [{name: echo, port: 80}]}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: b-new, namespace: demo, creationTimestamp: '2026-02-01T00:00:00Z'}\nspec: {parentRefs: [{group: '', kind: Service, name: echo}], rules: [{matches: [{method: {service: pkg.S, method: M}}], backendRefs: [{name: echo, port: 80}]}]}\n",
                vec![(codes::ROUTES_CONFLICT, "GRPCRoute demo/b-new")],
            ),
            (
                "GRPCRoutes with different methods do not conflict",
                "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: a, namespace: demo}\nspec: {parentRefs: [{group: '', kind: Service, name: echo}], rules: [{matches: [{method: {service: pkg.S, method: M}}], backendRefs: [{name: echo, port: 80}]}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: b, namespace: demo}\nspec: {parentRefs: [{group: '', kind: Service, name: echo}], rules: [{matches: [{method: {service: pkg.S, method: N}}], backendRefs: [{name: echo, port: 80}]}]}\n",
                vec![],
            ),
            (
                "route parent Service missing",
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: demo}\nspec: {parentRefs: [{group: '', kind: Service, name: nope}], rules: [{backendRefs: [{name: echo, port: 80}]}]}\n",
                vec![(codes::ROUTE_PARENT_NOT_FOUND, "HTTPRoute demo/r")],
            ),
            (
                "route backend Service missing",
                "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: demo}\nspec: {parentRefs: [{group: '', kind: Service, name: echo}], rules: [{backendRefs: [{name: gone, port: 80}]}]}\n",
                vec![(codes::ROUTE_BACKEND_NOT_FOUND, "GRPCRoute demo/g")],
            ),
            (
                "STRICT with a pod outside the mesh",
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: old, namespace: legacy}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n",
                vec![(codes::STRICT_WITH_NON_MESH_CLIENTS, "PeerAuthentication demo/strict")],
            ),
            (
                "pod label overrides namespace",
                "apiVersion: v1\nkind: Pod\nmetadata: {name: opt-out, namespace: demo, labels: {istio.io/dataplane-mode: none}}\n",
                vec![(codes::POD_OVERRIDES_NAMESPACE, "Pod demo/opt-out")],
            ),
            (
                "duplicate VIP",
                "apiVersion: v1\nkind: Service\nmetadata: {name: echo2, namespace: demo}\nspec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}\n",
                vec![(codes::DUPLICATE_VIP, "Service demo/echo"), (codes::DUPLICATE_VIP, "Service demo/echo2")],
            ),
        ];
        for (what, extra, want) in cases {
            let got = codes_of(extra);
            let want: Vec<(&str, String)> = want.iter().map(|(c, r)| (*c, r.to_string())).collect();
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn strict_without_outsiders_and_a_matching_selector_are_fine() {
        let extra = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: mesh, namespace: istio-system}\nspec: {selector: {matchLabels: {app: echo}}, rules: [{}]}\n";
        assert_eq!(codes_of(extra), vec![]);
    }

    #[test]
    fn a_pod_opting_out_is_both_an_override_and_an_outsider_under_strict() {
        let extra = "apiVersion: v1\nkind: Pod\nmetadata: {name: out, namespace: demo, labels: {istio.io/dataplane-mode: none}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: mesh, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n";
        let f = analyze(&cluster(&format!("{BASE}---\n{extra}")));
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f[0].code, codes::STRICT_WITH_NON_MESH_CLIENTS);
        assert!(f[0].message.contains("the whole mesh") && f[0].message.contains("demo/out"), "{}", f[0].message);
        assert_eq!(f[1].code, codes::POD_OVERRIDES_NAMESPACE);
    }
}
