//! L4 AuthorizationPolicy evaluation (PROTOCOLS.md), pure and table-tested.
//!
//! Applicable policies: GLOBAL ones, NAMESPACE ones of the destination's namespace, and the
//! WORKLOAD_SELECTOR ones the workload lists. Any matching DENY denies. Then, if the workload has
//! ALLOW policies, one must match. A policy matches if any rule does; a rule if all its clauses
//! do (a rule without clauses matches everything); a clause if any match does (a clause without
//! matches never does); a match if every field it sets is satisfied. A match that sets no field
//! never matches, as in Istio's ztunnel: it cannot say who it admits (istiod-lite never sends one,
//! it drops a source or operation with nothing L4 in it).

use std::net::{IpAddr, SocketAddr};

use trellis_proto::istio::security::{
    string_match::MatchType, Action, Address, Authorization, Match, Scope, StringMatch,
};
use trellis_proto::istio::workload::Workload;

use super::State;
use hbone::Identity;

/// What is known about a connection when it is authorized.
#[derive(Clone, Debug)]
pub struct Connection {
    /// `None` for plaintext (no verified peer).
    pub source: Option<Identity>,
    pub source_ip: IpAddr,
    pub destination: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied, naming the deciding policy (`ns/name`), or why no ALLOW applied.
    Deny(String),
}

fn string_matches(m: &StringMatch, value: Option<&str>) -> bool {
    let Some(v) = value else { return false };
    match &m.match_type {
        Some(MatchType::Exact(e)) => v == e,
        Some(MatchType::Prefix(p)) => v.starts_with(p.as_str()),
        Some(MatchType::Suffix(s)) => v.ends_with(s.as_str()),
        Some(MatchType::Presence(())) => !v.is_empty(),
        None => false,
    }
}

fn cidr_contains(a: &Address, ip: IpAddr) -> bool {
    let (net, bits): (Vec<u8>, u32) = match ip {
        IpAddr::V4(v) if a.address.len() == 4 => (v.octets().to_vec(), 32),
        IpAddr::V6(v) if a.address.len() == 16 => (v.octets().to_vec(), 128),
        _ => return false,
    };
    let len = a.length.min(bits) as usize;
    let (full, rest) = (len / 8, len % 8);
    net[..full] == a.address[..full] && (rest == 0 || (net[full] ^ a.address[full]) >> (8 - rest) == 0)
}

/// A field with values must have one that matches; a `not_` field must have none.
fn field<T>(yes: &[T], no: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (yes.is_empty() || yes.iter().any(&hit)) && !no.iter().any(&hit)
}

fn match_matches(m: &Match, c: &Connection) -> bool {
    if *m == Match::default() {
        return false;
    }
    let principal =
        c.source.as_ref().map(|id| format!("{}/ns/{}/sa/{}", id.trust_domain, id.namespace, id.service_account));
    let namespace = c.source.as_ref().map(|id| id.namespace.as_str());
    field(&m.namespaces, &m.not_namespaces, |s| string_matches(s, namespace))
        && field(&m.principals, &m.not_principals, |s| string_matches(s, principal.as_deref()))
        && field(&m.source_ips, &m.not_source_ips, |a| cidr_contains(a, c.source_ip))
        && field(&m.destination_ips, &m.not_destination_ips, |a| cidr_contains(a, c.destination.ip()))
        && field(&m.destination_ports, &m.not_destination_ports, |p| *p == c.destination.port() as u32)
}

pub fn policy_matches(p: &Authorization, c: &Connection) -> bool {
    p.rules.iter().any(|r| r.clauses.iter().all(|cl| cl.matches.iter().any(|m| match_matches(m, c))))
}

/// The policies that apply to `w`, as `(name, policy)`.
pub fn applicable<'a>(state: &'a State, w: &Workload) -> Vec<(String, &'a Authorization)> {
    let mut out: Vec<(String, &Authorization)> = state
        .policies
        .iter()
        .filter(|(_, p)| match Scope::try_from(p.scope) {
            Ok(Scope::Global) => true,
            Ok(Scope::Namespace) => p.namespace == w.namespace,
            _ => false,
        })
        .map(|(n, p)| (n.clone(), p))
        .collect();
    for name in &w.authorization_policies {
        if let Some(p) = state.policies.get(name) {
            out.push((name.clone(), p));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

pub fn evaluate(state: &State, w: &Workload, c: &Connection) -> Decision {
    let policies = applicable(state, w);
    let deny = |p: &&Authorization| p.action == Action::Deny as i32;
    if let Some((name, _)) = policies.iter().find(|(_, p)| deny(p) && policy_matches(p, c)) {
        return Decision::Deny(name.clone());
    }
    let allows: Vec<_> = policies.iter().filter(|(_, p)| p.action == Action::Allow as i32).collect();
    if allows.is_empty() || allows.iter().any(|(_, p)| policy_matches(p, c)) {
        Decision::Allow
    } else {
        let names: Vec<&str> = allows.iter().map(|(n, _)| n.as_str()).collect();
        Decision::Deny(format!("no ALLOW policy matched ({})", names.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::istio::security::{Clause, Rule};

    fn sm(t: MatchType) -> StringMatch {
        StringMatch { match_type: Some(t) }
    }

    fn policy(
        ns: &str,
        name: &str,
        scope: Scope,
        action: Action,
        rules: Vec<Vec<Vec<Match>>>,
    ) -> (String, Authorization) {
        let rules = rules
            .into_iter()
            .map(|r| Rule { clauses: r.into_iter().map(|m| Clause { matches: m }).collect() })
            .collect();
        (
            format!("{ns}/{name}"),
            Authorization {
                name: name.into(),
                namespace: ns.into(),
                scope: scope as i32,
                action: action as i32,
                rules,
            },
        )
    }

    fn conn(src: Option<&str>, ip: &str, port: u16) -> Connection {
        Connection {
            source: src.map(|s| Identity::parse(s).unwrap()),
            source_ip: ip.parse().unwrap(),
            destination: format!("10.244.1.11:{port}").parse().unwrap(),
        }
    }

    const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
    const PROD: &str = "spiffe://cluster.local/ns/prod/sa/x";

    fn principal(p: &str) -> Match {
        Match { principals: vec![sm(MatchType::Exact(p.into()))], ..Default::default() }
    }

    fn decide(policies: Vec<(String, Authorization)>, selected: &[&str], c: &Connection) -> Decision {
        let mut state = State::default();
        for (n, p) in policies {
            state.upsert_policy(&n, p);
        }
        let w = Workload {
            namespace: "demo".into(),
            authorization_policies: selected.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        evaluate(&state, &w, c)
    }

    #[test]
    fn l4_policy_table() {
        use Action::*;
        use Scope::*;
        let client = conn(Some(CLIENT), "10.244.1.10", 8080);
        let prod = conn(Some(PROD), "10.244.2.10", 8080);
        let plain = conn(None, "10.244.1.10", 8080);
        let plain_9090 = conn(None, "10.244.1.10", 9090);
        let allow_client = policy(
            "demo",
            "sel",
            WorkloadSelector,
            Allow,
            vec![vec![vec![principal("cluster.local/ns/demo/sa/client")]]],
        );
        let no_peer = Match { not_principals: vec![sm(MatchType::Presence(()))], ..Default::default() };
        let strict = policy(
            "istio-system",
            "istio_converted_static_strict",
            WorkloadSelector,
            Deny,
            vec![vec![vec![no_peer.clone()]]],
        );
        let cases: Vec<(&str, Vec<(String, Authorization)>, Vec<&str>, &Connection, Decision)> = vec![
            ("no policy allows", vec![], vec![], &prod, Decision::Allow),
            ("allow by principal", vec![allow_client.clone()], vec!["demo/sel"], &client, Decision::Allow),
            (
                "allow policy without match denies",
                vec![allow_client.clone()],
                vec!["demo/sel"],
                &prod,
                Decision::Deny("no ALLOW policy matched (demo/sel)".into()),
            ),
            ("selector policy not listed does not apply", vec![allow_client.clone()], vec![], &prod, Decision::Allow),
            (
                "spec {} denies all",
                vec![policy("demo", "none", Namespace, Allow, vec![])],
                vec![],
                &client,
                Decision::Deny("no ALLOW policy matched (demo/none)".into()),
            ),
            (
                "rules [{}] allows all",
                vec![policy("demo", "all", Namespace, Allow, vec![vec![]])],
                vec![],
                &prod,
                Decision::Allow,
            ),
            (
                "deny by namespace wins over allow",
                vec![
                    policy("demo", "all", Namespace, Allow, vec![vec![]]),
                    policy(
                        "demo",
                        "deny-prod",
                        Namespace,
                        Deny,
                        vec![vec![vec![Match {
                            namespaces: vec![sm(MatchType::Exact("prod".into()))],
                            ..Default::default()
                        }]]],
                    ),
                ],
                vec![],
                &prod,
                Decision::Deny("demo/deny-prod".into()),
            ),
            (
                "namespace policy of another namespace ignored",
                vec![policy("other", "none", Namespace, Allow, vec![])],
                vec![],
                &client,
                Decision::Allow,
            ),
            (
                "global policy applies",
                vec![policy("istio-system", "none", Global, Allow, vec![])],
                vec![],
                &client,
                Decision::Deny("no ALLOW policy matched (istio-system/none)".into()),
            ),
            (
                "STRICT denies plaintext",
                vec![strict.clone()],
                vec!["istio-system/istio_converted_static_strict"],
                &plain,
                Decision::Deny("istio-system/istio_converted_static_strict".into()),
            ),
            (
                "STRICT admits mTLS",
                vec![strict.clone()],
                vec!["istio-system/istio_converted_static_strict"],
                &client,
                Decision::Allow,
            ),
            (
                "port-level STRICT only on 9090",
                vec![policy(
                    "demo",
                    "ports",
                    WorkloadSelector,
                    Deny,
                    vec![vec![
                        vec![Match { destination_ports: vec![9090], ..Default::default() }],
                        vec![no_peer.clone()],
                    ]],
                )],
                vec!["demo/ports"],
                &plain_9090,
                Decision::Deny("demo/ports".into()),
            ),
            (
                "port-level STRICT leaves 8080 permissive",
                vec![policy(
                    "demo",
                    "ports",
                    WorkloadSelector,
                    Deny,
                    vec![vec![vec![Match { destination_ports: vec![9090], ..Default::default() }], vec![no_peer]]],
                )],
                vec!["demo/ports"],
                &plain,
                Decision::Allow,
            ),
            (
                "empty clause never matches (stripped L7 deny)",
                vec![policy("demo", "l7", Namespace, Deny, vec![vec![vec![]]])],
                vec![],
                &prod,
                Decision::Allow,
            ),
            (
                "a match that sets nothing admits no one (ALLOW)",
                vec![policy("demo", "empty", Namespace, Allow, vec![vec![vec![Match::default()]]])],
                vec![],
                &client,
                Decision::Deny("no ALLOW policy matched (demo/empty)".into()),
            ),
            (
                "a match that sets nothing matches no one (DENY)",
                vec![policy("demo", "empty", Namespace, Deny, vec![vec![vec![Match::default()]]])],
                vec![],
                &client,
                Decision::Allow,
            ),
            (
                "an empty match beside a real one leaves the real one",
                vec![policy(
                    "demo",
                    "both",
                    Namespace,
                    Allow,
                    vec![vec![vec![Match::default(), principal("cluster.local/ns/demo/sa/client")]]],
                )],
                vec![],
                &client,
                Decision::Allow,
            ),
            (
                "source CIDR",
                vec![policy(
                    "demo",
                    "cidr",
                    Namespace,
                    Allow,
                    vec![vec![vec![Match {
                        source_ips: vec![Address { address: vec![10, 244, 1, 0], length: 24 }],
                        ..Default::default()
                    }]]],
                )],
                vec![],
                &prod,
                Decision::Deny("no ALLOW policy matched (demo/cidr)".into()),
            ),
            (
                "prefix and suffix principals",
                vec![policy(
                    "demo",
                    "ps",
                    Namespace,
                    Allow,
                    vec![vec![vec![Match {
                        principals: vec![
                            sm(MatchType::Prefix("cluster.local/ns/demo/".into())),
                            sm(MatchType::Suffix("/sa/nobody".into())),
                        ],
                        ..Default::default()
                    }]]],
                )],
                vec![],
                &client,
                Decision::Allow,
            ),
            (
                "plaintext cannot satisfy a principal",
                vec![policy(
                    "demo",
                    "p",
                    Namespace,
                    Allow,
                    vec![vec![vec![principal("cluster.local/ns/demo/sa/client")]]],
                )],
                vec![],
                &plain,
                Decision::Deny("no ALLOW policy matched (demo/p)".into()),
            ),
        ];
        let mut failures = Vec::new();
        for (name, policies, selected, c, want) in cases {
            let got = decide(policies, &selected, c);
            if got != want {
                failures.push(format!("{name}: got {got:?}, want {want:?}"));
            }
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }

    #[test]
    fn cidr_containment_handles_partial_bytes_and_families() {
        let a = Address { address: vec![10, 244, 1, 128], length: 25 };
        assert!(cidr_contains(&a, "10.244.1.200".parse().unwrap()));
        assert!(!cidr_contains(&a, "10.244.1.100".parse().unwrap()));
        assert!(!cidr_contains(&a, "::1".parse().unwrap()));
        assert!(cidr_contains(&Address { address: vec![0; 4], length: 0 }, "192.0.2.1".parse().unwrap()));
    }
}
