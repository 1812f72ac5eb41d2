//! Table tests for translation: enrollment, services, policy scope, L7 stripping, STRICT.

use std::sync::Arc;

use prost::Message;
use trellis_config::load::load_text;
use trellis_config::Object;
use trellis_proto::istio::security as pb;
use trellis_proto::istio::workload as wl;

use super::*;
use crate::store::{Event, EventType};

fn objects(yaml: &str) -> Vec<Arc<Object>> {
    load_text("t.yaml", yaml, "default")
        .expect("test manifests are valid")
        .into_iter()
        .map(|l| Arc::new(l.object))
        .collect()
}

fn translate(yaml: &str) -> Vec<Output> {
    Translator::new(Settings::default()).load(objects(yaml))
}

fn workload(out: &[Output], name: &str) -> wl::Workload {
    let body = out
        .iter()
        .find(|(t, n, _)| *t == ADDRESS_TYPE_URL && n.ends_with(&format!("/{name}")))
        .and_then(|o| o.2.clone())
        .expect("workload rendered");
    match wl::Address::decode(body).expect("decodes").r#type {
        Some(wl::address::Type::Workload(w)) => w,
        other => panic!("not a workload: {other:?}"),
    }
}

fn authz(out: &[Output], name: &str) -> Option<pb::Authorization> {
    out.iter()
        .find(|(t, n, _)| *t == AUTHORIZATION_TYPE_URL && n == name)
        .and_then(|o| o.2.clone())
        .map(|b| pb::Authorization::decode(b).expect("decodes"))
}

const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n";

fn pod(ns: &str, name: &str, labels: &str, ip: &str) -> String {
    format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{nodeName: node1, serviceAccountName: sa-{name}, containers: [{{name: c, ports: [{{name: web, containerPort: 9090}}]}}]}}\nstatus: {{podIP: {ip}}}\n")
}

#[test]
fn enrollment_follows_namespace_label_and_pod_label_overrides() {
    let yaml = format!(
        "{NS}{}{}{}",
        pod("demo", "a", "app: a", "10.244.1.2"),
        pod("demo", "b", "istio.io/dataplane-mode: none", "10.244.1.3"),
        pod("plain", "c", "istio.io/dataplane-mode: ambient", "10.244.1.4")
    );
    let out = translate(&yaml);
    let cases = [("a", wl::TunnelProtocol::Hbone), ("b", wl::TunnelProtocol::None), ("c", wl::TunnelProtocol::Hbone)];
    for (name, want) in cases {
        assert_eq!(workload(&out, name).tunnel_protocol, want as i32, "pod {name}");
    }
    let a = workload(&out, "a");
    assert_eq!(a.uid, "Kubernetes//v1/Pod/demo/a");
    assert_eq!(a.addresses, vec![vec![10, 244, 1, 2]]);
    assert_eq!(
        (a.service_account.as_str(), a.node.as_str(), a.trust_domain.as_str()),
        ("sa-a", "node1", "cluster.local")
    );
    assert_eq!(a.canonical_name, "a");
}

/// A pod naming its service account only by the deprecated `serviceAccount` runs as that
/// account, as in Kubernetes, not as `default`.
#[test]
fn the_deprecated_service_account_field_names_the_identity() {
    let yaml = format!(
        "{NS}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: old, namespace: demo}}\nspec: {{nodeName: node1, serviceAccount: legacy}}\nstatus: {{podIP: 10.244.1.9}}\n"
    );
    assert_eq!(workload(&translate(&yaml), "old").service_account, "legacy");
}

#[test]
fn workloads_are_named_after_their_controller() {
    let owned = |name: &str, hash: &str, kind: &str, owner: &str| {
        let label = if hash.is_empty() { String::new() } else { format!(", pod-template-hash: {hash}") };
        format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: {{x: y{label}}}, ownerReferences: [{{apiVersion: v1, kind: {kind}, name: {owner}, controller: true}}]}}\nstatus: {{podIP: 10.244.1.9}}\n")
    };
    let yaml = [
        NS.to_string(),
        owned("web-5d8f7c9b4-x2k7q", "5d8f7c9b4", "ReplicaSet", "web-5d8f7c9b4"),
        owned("bare-rs-abcde", "", "ReplicaSet", "bare-rs"),
        owned("backup-29123456-qp2vd", "", "Job", "backup-29123456"),
        owned("migrate-7xk2p", "", "Job", "migrate"),
        owned("db-0", "", "StatefulSet", "db"),
        pod("demo", "solo", "x: y", "10.244.1.8"),
    ]
    .concat();
    let out = translate(&yaml);
    use wl::WorkloadType as T;
    for (pod, name, ty) in [
        ("web-5d8f7c9b4-x2k7q", "web", T::Deployment),
        ("bare-rs-abcde", "bare-rs", T::Pod),
        ("backup-29123456-qp2vd", "backup", T::Cronjob),
        ("migrate-7xk2p", "migrate", T::Job),
        ("db-0", "db", T::Pod),
        ("solo", "solo", T::Pod),
    ] {
        let w = workload(&out, pod);
        assert_eq!((w.workload_name.as_str(), w.workload_type), (name, ty as i32), "pod {pod}");
        assert_eq!(w.name, pod, "the workload itself is still the pod");
        assert_eq!(w.canonical_name, name, "without an app label the canonical service is the workload");
    }
}

#[test]
fn services_carry_vips_and_endpoints_carry_resolved_ports() {
    let yaml = format!(
        "{NS}{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\nspec: {{selector: {{app: a}}, clusterIP: 10.96.0.5, ports: [{{name: http, port: 80, targetPort: web}}, {{name: grpc, port: 81, targetPort: 7070}}]}}\n",
        pod("demo", "a", "app: a", "10.244.1.2")
    );
    let out = translate(&yaml);
    let svc =
        out.iter().find(|(_, n, _)| n == "demo/web.demo.svc.cluster.local").and_then(|o| o.2.clone()).expect("service");
    let Some(wl::address::Type::Service(s)) = wl::Address::decode(svc).unwrap().r#type else { panic!() };
    assert_eq!(s.addresses[0].address, vec![10, 96, 0, 5]);
    assert_eq!(
        s.ports,
        vec![wl::Port { service_port: 80, target_port: 0 }, wl::Port { service_port: 81, target_port: 7070 }]
    );
    let a = workload(&out, "a");
    let ports = &a.services["demo/web.demo.svc.cluster.local"].ports;
    assert_eq!(
        ports,
        &vec![wl::Port { service_port: 80, target_port: 9090 }, wl::Port { service_port: 81, target_port: 7070 }]
    );
}

#[test]
fn a_named_target_port_resolves_as_kubernetes_does() {
    // `web` names a TCP port of a container, a UDP port before it, and ports of init containers:
    // a native sidecar (restartPolicy Always) and a plain one that has exited.
    let yaml = format!(
        "{NS}---
apiVersion: v1
kind: Pod
metadata: {{name: a, namespace: demo, labels: {{app: a}}}}
spec:
  nodeName: node1
  initContainers:
  - {{name: setup, ports: [{{name: proxy, containerPort: 1111}}]}}
  - {{name: sidecar, restartPolicy: Always, ports: [{{name: proxy, containerPort: 15001}}, {{name: web, containerPort: 2222}}]}}
  containers:
  - {{name: c, ports: [{{name: web, containerPort: 5353, protocol: UDP}}, {{name: web, containerPort: 9090}}]}}
status: {{podIP: 10.244.1.2}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec: {{selector: {{app: a}}, clusterIP: 10.96.0.5, ports: [{{name: a, port: 80, targetPort: web}}, {{name: b, port: 81, targetPort: proxy, protocol: TCP}}, {{name: c, port: 82, targetPort: web, protocol: UDP}}]}}
"
    );
    let out = translate(&yaml);
    let ports = &workload(&out, "a").services["demo/web.demo.svc.cluster.local"].ports;
    let port = |service_port, target_port| wl::Port { service_port, target_port };
    assert_eq!(ports, &vec![port(80, 9090), port(81, 15001), port(82, 5353)]);
}

fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n")
}

#[test]
fn policy_scope_comes_from_selector_namespace_or_root() {
    let yaml = format!(
        "{NS}{}{}{}{}{}",
        pod("demo", "a", "app: a", "10.244.1.2"),
        policy("demo", "sel", "{selector: {matchLabels: {app: a}}, rules: [{}]}"),
        policy("demo", "ns-wide", "{rules: [{}]}"),
        policy("istio-system", "mesh", "{rules: [{}]}"),
        policy("demo", "waypoint", "{targetRefs: [{kind: Service, group: \"\", name: web}], rules: [{}]}")
    );
    let out = translate(&yaml);
    assert_eq!(authz(&out, "demo/sel").unwrap().scope, pb::Scope::WorkloadSelector as i32);
    assert_eq!(authz(&out, "demo/ns-wide").unwrap().scope, pb::Scope::Namespace as i32);
    assert_eq!(authz(&out, "istio-system/mesh").unwrap().scope, pb::Scope::Global as i32);
    assert!(authz(&out, "demo/waypoint").is_none(), "targetRefs policies are enforced by waypoints only");
    assert_eq!(workload(&out, "a").authorization_policies, vec!["demo/sel".to_string()]);
}

/// (name, action, rules YAML, expected number of rules, expected clause match counts per rule)
const L7_CASES: &[(&str, &str, &str, usize, &[&[usize]])] = &[
    ("empty spec denies all", "ALLOW", "", 0, &[]),
    ("rules [{}] matches all", "ALLOW", "rules: [{}]", 1, &[&[]]),
    (
        "allow L4 only kept",
        "ALLOW",
        "rules: [{from: [{source: {namespaces: [demo]}}], to: [{operation: {ports: ['80']}}]}]",
        1,
        &[&[1, 1]],
    ),
    ("allow with methods dropped", "ALLOW", "rules: [{to: [{operation: {methods: [GET]}}]}]", 0, &[]),
    (
        "allow mixed keeps L4 rule",
        "ALLOW",
        "rules: [{to: [{operation: {paths: [/a]}}]}, {from: [{source: {principals: ['*']}}]}]",
        1,
        &[&[1]],
    ),
    (
        "allow with request principal dropped",
        "ALLOW",
        "rules: [{from: [{source: {requestPrincipals: ['*']}}]}]",
        0,
        &[],
    ),
    ("allow with L7 condition dropped", "ALLOW", "rules: [{when: [{key: 'request.headers[x]', values: [a]}]}]", 0, &[]),
    ("deny L7-only operation never matches", "DENY", "rules: [{to: [{operation: {methods: [GET]}}]}]", 1, &[&[0]]),
    ("deny strips L7 keeps ports", "DENY", "rules: [{to: [{operation: {methods: [GET], ports: ['80']}}]}]", 1, &[&[1]]),
    (
        "deny L7 condition clause never matches",
        "DENY",
        "rules: [{from: [{source: {namespaces: [x]}}], when: [{key: request.auth.principal, values: [a]}]}]",
        1,
        &[&[1, 0]],
    ),
    ("deny L4 condition kept", "DENY", "rules: [{when: [{key: source.ip, values: [10.0.0.0/8]}]}]", 1, &[&[1]]),
];

#[test]
fn l7_attributes_are_stripped_at_l4() {
    for (name, action, rules, want_rules, clauses) in L7_CASES {
        let spec =
            if rules.is_empty() { format!("{{action: {action}}}") } else { format!("{{action: {action}, {rules}}}") };
        let spec = if rules.is_empty() && *action == "ALLOW" { "{}".to_string() } else { spec };
        let out = translate(&format!("{NS}{}", policy("demo", "p", &spec)));
        let a = authz(&out, "demo/p").unwrap_or_else(|| panic!("{name}: not rendered"));
        assert_eq!(a.rules.len(), *want_rules, "{name}: {a:?}");
        for (r, want) in a.rules.iter().zip(clauses.iter()) {
            let got: Vec<usize> = r.clauses.iter().map(|c| c.matches.len()).collect();
            assert_eq!(&got, want, "{name}");
        }
    }
}

#[test]
fn string_and_address_matches_follow_istio_forms() {
    let out = translate(&format!(
        "{NS}{}",
        policy("demo", "p", "{rules: [{from: [{source: {principals: ['*', 'cluster.local/ns/a/*', '*/sa/b', 'spiffe://cluster.local/ns/c/sa/d'], ipBlocks: [10.1.0.0/16, 10.2.3.4]}}]}]}")
    ));
    let m = &authz(&out, "demo/p").unwrap().rules[0].clauses[0].matches[0];
    use pb::string_match::MatchType::*;
    let kinds: Vec<_> = m.principals.iter().map(|p| p.match_type.clone().unwrap()).collect();
    assert_eq!(
        kinds,
        vec![
            Presence(()),
            Prefix("cluster.local/ns/a/".into()),
            Suffix("/sa/b".into()),
            Exact("cluster.local/ns/c/sa/d".into())
        ]
    );
    assert_eq!(
        m.source_ips,
        vec![
            pb::Address { address: vec![10, 1, 0, 0], length: 16 },
            pb::Address { address: vec![10, 2, 3, 4], length: 32 }
        ]
    );
}

fn peer(ns: &str, name: &str, spec: &str) -> String {
    format!("---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n")
}

#[test]
fn strict_mtls_is_a_deny_without_peer_identity_attached_per_workload() {
    let strict = "istio-system/istio_converted_static_strict".to_string();
    let base = format!(
        "{NS}{}{}{}",
        pod("demo", "a", "app: a", "10.244.1.2"),
        pod("plain", "b", "app: b", "10.244.1.3"),
        peer("istio-system", "default", "{mtls: {mode: STRICT}}")
    );
    let out = translate(&base);
    let s = authz(&out, &strict).unwrap();
    assert_eq!(s.action, pb::Action::Deny as i32);
    assert_eq!(
        s.rules[0].clauses[0].matches[0].not_principals[0].match_type,
        Some(pb::string_match::MatchType::Presence(()))
    );
    assert!(workload(&out, "a").authorization_policies.contains(&strict));
    assert!(workload(&out, "b").authorization_policies.contains(&strict));

    let out = translate(&format!("{base}{}", peer("plain", "relaxed", "{mtls: {mode: PERMISSIVE}}")));
    assert!(workload(&out, "a").authorization_policies.contains(&strict));
    assert!(
        !workload(&out, "b").authorization_policies.contains(&strict),
        "namespace PERMISSIVE overrides mesh STRICT"
    );

    let out = translate(&format!(
        "{base}{}",
        peer("demo", "ports", "{selector: {matchLabels: {app: a}}, portLevelMtls: {'8080': {mode: PERMISSIVE}}}")
    ));
    let a = workload(&out, "a");
    assert_eq!(a.authorization_policies, vec!["demo/converted_peer_authentication_ports".to_string()]);
    let conv = authz(&out, "demo/converted_peer_authentication_ports").unwrap();
    assert_eq!(conv.rules[0].clauses[0].matches[0].not_destination_ports, vec![8080]);
}

#[test]
fn a_one_pod_change_renders_one_resource() {
    let mut t = Translator::new(Settings::default());
    let objs = objects(&format!("{NS}{}{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\nspec: {{selector: {{app: a}}, clusterIP: 10.96.0.5, ports: [{{port: 80}}]}}\n", pod("demo", "a", "app: a", "10.244.1.2"), pod("demo", "b", "app: a", "10.244.1.3")));
    // gRPC resources are re-rendered per namespace; the cache drops the unchanged ones, so what
    // reaches clients is counted through a cache.
    let cache = crate::xds::cache::Cache::default();
    let publish = |out: Vec<Output>| -> Vec<String> {
        let mut changed = Vec::new();
        for (t, n, b) in out {
            if cache.apply(t, vec![(n.clone(), b)]) > 0 {
                changed.push(n);
            }
        }
        changed
    };
    publish(t.load(objs.clone()));
    let old = objs.iter().find(|o| o.meta().name == "b").unwrap().clone();
    let mut new = (*old).clone();
    new.meta_mut().labels.insert("version".into(), "v2".into());
    let out = t.apply(&[Event {
        kind: EventType::Modified,
        object: Arc::new(new),
        previous: Some(old.clone()),
        revision: 9,
    }]);
    assert_eq!(publish(out), vec!["Kubernetes//v1/Pod/demo/b"]);
    let out = t.apply(&[Event { kind: EventType::Deleted, object: old, previous: None, revision: 10 }]);
    let workload_outputs: Vec<&Output> = out.iter().filter(|o| !crate::xds::GRPC_TYPES.contains(&o.0)).collect();
    let types: Vec<&str> = workload_outputs.iter().map(|o| o.0).collect();
    assert_eq!(types, vec![ADDRESS_TYPE_URL, POD_MEMBERSHIP_TYPE_URL], "the pod's workload and membership");
    assert!(workload_outputs.iter().all(|o| o.2.is_none()), "a deleted pod renders as removals");
}

#[test]
fn nodes_render_only_when_routable() {
    let out = translate(
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.244.1.0/24}\nstatus: {addresses: [{type: Hostname, address: n1}, {type: InternalIP, address: 172.30.0.11}]}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: no-ip}\nspec: {podCIDR: 10.244.2.0/24}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: no-cidr}\nstatus: {addresses: [{type: InternalIP, address: 172.30.0.13}]}\n",
    );
    let nodes: Vec<_> = out.iter().filter(|(t, _, _)| *t == NODE_TYPE_URL).collect();
    assert_eq!(nodes.len(), 3, "every node is a target");
    let n1 = nodes.iter().find(|o| o.1 == "n1").and_then(|o| o.2.clone()).expect("n1 rendered");
    let n1 = trellis_proto::trellis::node::v1::Node::decode(n1).expect("decodes");
    assert_eq!(n1.underlay_ip, vec![172, 30, 0, 11]);
    assert_eq!(n1.pod_cidrs.len(), 1);
    assert_eq!((n1.pod_cidrs[0].address.clone(), n1.pod_cidrs[0].length), (vec![10, 244, 1, 0], 24));
    for name in ["no-ip", "no-cidr"] {
        assert!(nodes.iter().find(|o| o.1 == name).expect("target").2.is_none(), "{name} must not render");
    }
}

fn membership(out: &[Output], name: &str) -> Option<trellis_proto::trellis::pod::v1::PodMembership> {
    let o = out.iter().find(|(t, n, _)| *t == POD_MEMBERSHIP_TYPE_URL && n.ends_with(&format!("/{name}")))?;
    o.2.clone().map(|b| Message::decode(b).expect("decodes"))
}

/// Membership is published once a pod is scheduled, before it has an IP (and so before it has a
/// workload), and follows the namespace label.
#[test]
fn membership_is_known_before_the_pod_has_an_ip() {
    let unscheduled = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: pending, namespace: demo}\nspec: {}\n";
    let host = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: host, namespace: demo}\nspec: {nodeName: node1, hostNetwork: true}\n";
    let yaml = format!(
        "{NS}{}{}{unscheduled}{host}",
        pod("demo", "new", "app: new", "").replace("status: {podIP: }\n", ""),
        pod("plain", "other", "app: other", "").replace("status: {podIP: }\n", ""),
    );
    let mut t = Translator::new(Settings::default());
    let out = t.load(objects(&yaml));
    assert!(
        !out.iter().any(|(t, n, b)| *t == ADDRESS_TYPE_URL && n.ends_with("/new") && b.is_some()),
        "no IP, no workload"
    );
    let m = membership(&out, "new").expect("scheduled pod has a membership");
    assert_eq!(
        (m.uid.as_str(), m.namespace.as_str(), m.node.as_str(), m.service_account.as_str(), m.meshed),
        ("Kubernetes//v1/Pod/demo/new", "demo", "node1", "sa-new", true)
    );
    assert_eq!(m.trust_domain, "cluster.local");
    assert!(!membership(&out, "other").expect("rendered").meshed, "namespace plain is not ambient");
    assert!(membership(&out, "pending").is_none(), "not scheduled yet");
    assert!(membership(&out, "host").is_none(), "host network is never captured");

    // Labelling the namespace re-renders its pods' memberships.
    let plain = objects("apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n").remove(0);
    let labelled = objects(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: plain, labels: {istio.io/dataplane-mode: ambient}}\n",
    )
    .remove(0);
    let out = t.apply(&[Event { kind: EventType::Modified, object: labelled, previous: Some(plain), revision: 2 }]);
    assert!(membership(&out, "other").expect("re-rendered").meshed);
}
