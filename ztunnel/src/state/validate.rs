//! Checks on resources received from the control plane. A resource that fails is NACKed with the
//! reason and the last good state of that resource is kept, except an Authorization, which is
//! replaced by a deny-all of its scope ([`authorization_or_deny_all`]).

use prost::Message;
use trellis_proto::istio::security::{Action, Authorization, Rule, Scope};
use trellis_proto::istio::workload::{address, Address};
use trellis_proto::trellis::node::v1 as node_pb;
use trellis_proto::trellis::pod::v1::PodMembership;

use super::Node;

fn ip_len_ok(b: &[u8]) -> bool {
    b.len() == 4 || b.len() == 16
}

pub fn address(name: &str, bytes: &[u8]) -> Result<address::Type, String> {
    let a = Address::decode(bytes).map_err(|e| format!("{name}: not an istio.workload.Address: {e}"))?;
    match a.r#type {
        Some(address::Type::Workload(w)) => {
            if w.uid != name {
                return Err(format!("{name}: workload uid {:?} does not match the resource name", w.uid));
            }
            if w.addresses.is_empty() && w.hostname.is_empty() {
                return Err(format!("{name}: workload has neither addresses nor hostname"));
            }
            if let Some(bad) = w.addresses.iter().find(|a| !ip_len_ok(a)) {
                return Err(format!("{name}: workload address of {} bytes is not IPv4 or IPv6", bad.len()));
            }
            Ok(address::Type::Workload(w))
        }
        Some(address::Type::Service(s)) => {
            let expected = format!("{}/{}", s.namespace, s.hostname);
            if expected != name {
                return Err(format!("{name}: service resource name must be {expected:?}"));
            }
            if let Some(bad) = s.addresses.iter().find(|a| !ip_len_ok(&a.address)) {
                return Err(format!("{name}: service VIP of {} bytes is not IPv4 or IPv6", bad.address.len()));
            }
            Ok(address::Type::Service(s))
        }
        None => Err(format!("{name}: Address has neither workload nor service")),
    }
}

/// The policy to enforce for a received Authorization, and why it was rejected if it was. One
/// that ztunnel cannot enforce as written (including one with a field this build does not know,
/// see [`super::unknown_fields`]) is replaced by a DENY matching every connection, with
/// the scope it declares (GLOBAL when even that is unreadable), so it denies exactly where the
/// real one could have applied: an unknown policy fails closed, never open.
pub fn authorization_or_deny_all(name: &str, bytes: &[u8]) -> (Authorization, Option<String>) {
    let (reason, declared) = match Authorization::decode(bytes) {
        Ok(a) => match super::unknown_fields::check(bytes)
            .map_err(|e| format!("{name}: {e}"))
            .and_then(|()| check_authorization(name, &a))
        {
            Ok(()) => return (a, None),
            Err(reason) => (reason, Scope::try_from(a.scope).ok()),
        },
        Err(e) => (format!("{name}: not an istio.security.Authorization: {e}"), None),
    };
    let (namespace, short) = name.split_once('/').unwrap_or(("", name));
    let scope = match declared {
        Some(s) if name.contains('/') => s,
        _ => Scope::Global,
    };
    let deny_all = Authorization {
        name: short.to_string(),
        namespace: namespace.to_string(),
        scope: scope as i32,
        action: Action::Deny as i32,
        // A rule without clauses matches every connection.
        rules: vec![Rule { clauses: vec![] }],
    };
    (deny_all, Some(reason))
}

fn check_authorization(name: &str, a: &Authorization) -> Result<(), String> {
    if format!("{}/{}", a.namespace, a.name) != name {
        return Err(format!("{name}: policy is named {}/{}", a.namespace, a.name));
    }
    if Action::try_from(a.action).is_err() {
        return Err(format!("{name}: unknown action {}", a.action));
    }
    if Scope::try_from(a.scope).is_err() {
        return Err(format!("{name}: unknown scope {}", a.scope));
    }
    for (i, r) in a.rules.iter().enumerate() {
        for (j, c) in r.clauses.iter().enumerate() {
            for (k, m) in c.matches.iter().enumerate() {
                let at = format!("{name}: rules[{i}].clauses[{j}].matches[{k}]");
                let addrs = m
                    .source_ips
                    .iter()
                    .chain(&m.not_source_ips)
                    .chain(&m.destination_ips)
                    .chain(&m.not_destination_ips);
                for a in addrs {
                    let max = if a.address.len() == 4 { 32 } else { 128 };
                    if !ip_len_ok(&a.address) || a.length > max {
                        return Err(format!("{at} has an invalid CIDR"));
                    }
                }
                if m.destination_ports.iter().chain(&m.not_destination_ports).any(|p| *p == 0 || *p > 65535) {
                    return Err(format!("{at} has a port out of range"));
                }
                let strings =
                    m.namespaces.iter().chain(&m.not_namespaces).chain(&m.principals).chain(&m.not_principals);
                if strings.into_iter().any(|s| s.match_type.is_none()) {
                    return Err(format!("{at} has a string match of a kind ztunnel does not know"));
                }
            }
        }
    }
    Ok(())
}

fn ipv4(b: &[u8]) -> Option<std::net::Ipv4Addr> {
    <[u8; 4]>::try_from(b).ok().map(Into::into)
}

/// A pod's membership: named by its uid, and with what enrolling it needs.
pub fn membership(name: &str, bytes: &[u8]) -> Result<PodMembership, String> {
    let m = PodMembership::decode(bytes).map_err(|e| format!("{name}: not a trellis.pod.v1.PodMembership: {e}"))?;
    if m.uid != name {
        return Err(format!("{name}: membership has uid {:?}", m.uid));
    }
    if m.namespace.is_empty() || m.name.is_empty() {
        return Err(format!("{name}: membership without namespace or name"));
    }
    if m.meshed && m.service_account.is_empty() {
        return Err(format!("{name}: meshed pod without service_account (no identity to enroll it as)"));
    }
    Ok(m)
}

pub fn node(name: &str, bytes: &[u8]) -> Result<Node, String> {
    let n = node_pb::Node::decode(bytes).map_err(|e| format!("{name}: not a trellis.node.v1.Node: {e}"))?;
    if n.name != name {
        return Err(format!("{name}: node is named {:?}", n.name));
    }
    let underlay_ip = ipv4(&n.underlay_ip).ok_or_else(|| {
        format!("{name}: underlay_ip of {} bytes is not IPv4 (the overlay is IPv4 only)", n.underlay_ip.len())
    })?;
    let mut pod_cidrs = Vec::new();
    for (i, c) in n.pod_cidrs.iter().enumerate() {
        match ipv4(&c.address) {
            Some(a) if c.length <= 32 => {
                let net = ipnet::Ipv4Net::new(a, c.length as u8).map_err(|e| format!("{name}: pod_cidrs[{i}]: {e}"))?;
                if net.trunc() != net {
                    // The kernel refuses such a route; the address is the overlay's gateway.
                    return Err(format!("{name}: pod_cidrs[{i}] {net} has host bits set"));
                }
                pod_cidrs.push((a, c.length as u8))
            }
            // An IPv6 pod CIDR on a dual-stack node is not routed by this overlay; skip it.
            None if c.address.len() == 16 && c.length <= 128 => {}
            _ => return Err(format!("{name}: pod_cidrs[{i}] is not a valid CIDR")),
        }
    }
    Ok(Node { name: name.to_string(), underlay_ip, pod_cidrs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::istio::security as pb;
    use trellis_proto::istio::workload as wl;

    fn wl_bytes(uid: &str, addrs: Vec<Vec<u8>>) -> Vec<u8> {
        Address {
            r#type: Some(address::Type::Workload(wl::Workload {
                uid: uid.into(),
                addresses: addrs,
                ..Default::default()
            })),
        }
        .encode_to_vec()
    }

    #[test]
    fn invalid_resources_are_rejected_with_a_reason() {
        assert!(address("u1", &wl_bytes("u1", vec![vec![10, 0, 0, 1]])).is_ok(), "a valid workload passes");
        let bad: Vec<(String, String)> = vec![
            ("garbage".into(), address("u1", b"\xff\xff\xff").unwrap_err()),
            ("uid mismatch".into(), address("u2", &wl_bytes("u1", vec![vec![10, 0, 0, 1]])).unwrap_err()),
            ("no address".into(), address("u1", &wl_bytes("u1", vec![])).unwrap_err()),
            ("5-byte ip".into(), address("u1", &wl_bytes("u1", vec![vec![1, 2, 3, 4, 5]])).unwrap_err()),
            ("empty address".into(), address("x", &Address::default().encode_to_vec()).unwrap_err()),
            (
                "bad cidr".into(),
                authorization_or_deny_all(
                    "ns/p",
                    &pb::Authorization {
                        name: "p".into(),
                        namespace: "ns".into(),
                        rules: vec![pb::Rule {
                            clauses: vec![pb::Clause {
                                matches: vec![pb::Match {
                                    source_ips: vec![pb::Address { address: vec![10, 0, 0, 0], length: 33 }],
                                    ..Default::default()
                                }],
                            }],
                        }],
                        ..Default::default()
                    }
                    .encode_to_vec(),
                )
                .1
                .expect("rejected"),
            ),
        ];
        let want = [
            "not an istio.workload.Address",
            "does not match",
            "neither addresses",
            "5 bytes",
            "neither workload",
            "invalid CIDR",
        ];
        for ((name, err), want) in bad.iter().zip(want) {
            assert!(err.contains(want), "{name}: {err}");
        }
    }

    #[test]
    fn a_policy_that_cannot_be_enforced_becomes_a_deny_all_of_its_scope() {
        let valid = pb::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            scope: pb::Scope::Namespace as i32,
            action: pb::Action::Allow as i32,
            ..Default::default()
        };
        let (kept, err) = authorization_or_deny_all("ns/p", &valid.encode_to_vec());
        assert_eq!((kept, err), (valid.clone(), None), "a valid policy is enforced as written");
        let string_match = pb::Match { principals: vec![pb::StringMatch { match_type: None }], ..Default::default() };
        let with_rule = |m: pb::Match| pb::Authorization {
            rules: vec![pb::Rule { clauses: vec![pb::Clause { matches: vec![m] }] }],
            ..valid.clone()
        };
        let cases: Vec<(&str, Vec<u8>, &str, pb::Scope)> = vec![
            (
                "unknown action",
                pb::Authorization { action: 7, ..valid.clone() }.encode_to_vec(),
                "action",
                pb::Scope::Namespace,
            ),
            (
                "unknown scope",
                pb::Authorization { scope: 9, ..valid.clone() }.encode_to_vec(),
                "scope",
                pb::Scope::Global,
            ),
            ("unknown match kind", with_rule(string_match).encode_to_vec(), "string match", pb::Scope::Namespace),
            ("garbage", b"\xff\xff\xff".to_vec(), "not an istio.security.Authorization", pb::Scope::Global),
        ];
        for (what, bytes, reason, scope) in cases {
            let (p, err) = authorization_or_deny_all("ns/p", &bytes);
            assert!(err.as_deref().is_some_and(|e| e.contains(reason)), "{what}: {err:?}");
            assert_eq!((p.namespace.as_str(), p.name.as_str()), ("ns", "p"), "{what}");
            assert_eq!((p.action, p.scope), (pb::Action::Deny as i32, scope as i32), "{what}");
            assert_eq!(p.rules, vec![pb::Rule { clauses: vec![] }], "{what}: matches every connection");
        }
    }

    #[test]
    fn nodes_are_checked() {
        let enc = |n: node_pb::Node| n.encode_to_vec();
        let ok = node_pb::Node {
            name: "n2".into(),
            underlay_ip: vec![172, 30, 0, 12],
            pod_cidrs: vec![node_pb::Cidr { address: vec![10, 244, 2, 0], length: 24 }],
        };
        let n = node("n2", &enc(ok.clone())).expect("valid");
        assert_eq!(
            (n.underlay_ip.octets(), n.pod_cidrs.clone()),
            ([172, 30, 0, 12], vec![([10, 244, 2, 0].into(), 24)])
        );
        assert!(node("n3", &enc(ok.clone())).unwrap_err().contains("named"));
        let v6 = node_pb::Node { underlay_ip: vec![0; 16], ..ok.clone() };
        assert!(node("n2", &enc(v6)).unwrap_err().contains("IPv4"));
        let bad =
            node_pb::Node { pod_cidrs: vec![node_pb::Cidr { address: vec![10, 244, 2, 0], length: 33 }], ..ok.clone() };
        assert!(node("n2", &enc(bad)).unwrap_err().contains("pod_cidrs[0]"));
        let host =
            node_pb::Node { pod_cidrs: vec![node_pb::Cidr { address: vec![10, 244, 2, 5], length: 24 }], ..ok.clone() };
        assert_eq!(node("n2", &enc(host)).unwrap_err(), "n2: pod_cidrs[0] 10.244.2.5/24 has host bits set");
        let whole = node_pb::Node { pod_cidrs: vec![node_pb::Cidr { address: vec![0, 0, 0, 0], length: 0 }], ..ok };
        assert!(node("n2", &enc(whole)).is_ok(), "/0 has no host bits to check");
    }

    #[test]
    fn memberships_are_checked() {
        let uid = "Kubernetes//v1/Pod/demo/client";
        let ok = PodMembership {
            uid: uid.into(),
            namespace: "demo".into(),
            name: "client".into(),
            node: "node1".into(),
            service_account: "client".into(),
            trust_domain: "cluster.local".into(),
            meshed: true,
        };
        assert_eq!(membership(uid, &ok.encode_to_vec()), Ok(ok.clone()));
        assert!(membership("other", &ok.encode_to_vec()).unwrap_err().contains("uid"));
        let no_sa = PodMembership { service_account: String::new(), ..ok.clone() };
        assert!(membership(uid, &no_sa.encode_to_vec()).unwrap_err().contains("service_account"));
        let unmeshed = PodMembership { meshed: false, ..no_sa };
        assert!(membership(uid, &unmeshed.encode_to_vec()).is_ok(), "an unmeshed pod needs no identity");
        let anonymous = PodMembership { namespace: String::new(), ..ok };
        assert!(membership(uid, &anonymous.encode_to_vec()).unwrap_err().contains("namespace"));
        assert!(membership(uid, b"\xff\xff").unwrap_err().contains("not a trellis.pod.v1.PodMembership"));
    }
}
