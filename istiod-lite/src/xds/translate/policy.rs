//! AuthorizationPolicy and PeerAuthentication → `istio.security.Authorization`, as ztunnel
//! enforces them at L4.
//!
//! L7 stripping (PROTOCOLS.md): an ALLOW rule with any L7 attribute is dropped whole (so an ALLOW
//! policy left without rules denies everything); in a DENY rule the L7 fields are removed, and a
//! clause left with no matches never matches. PeerAuthentication STRICT is expressed the way
//! Istio does: a DENY policy that matches connections without a peer principal, attached to each
//! workload whose effective mode is STRICT.

use std::collections::BTreeMap;
use std::net::IpAddr;

use trellis_config::object::{AuthorizationPolicy, PeerAuthentication};
use trellis_config::selector;
use trellis_config::types::{Condition, Operation, Rule, Source};
use trellis_config::{Kind, Object};
use trellis_proto::istio::security as pb;

use super::world::World;
use super::Settings;

pub const STATIC_STRICT: &str = "istio_converted_static_strict";
pub const CONVERTED_PREFIX: &str = "converted_peer_authentication_";
/// The `when` keys ztunnel can evaluate.
pub const L4_CONDITION_KEYS: [&str; 5] =
    ["source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"];

fn string_match(pattern: &str) -> pb::StringMatch {
    use pb::string_match::MatchType;
    let m = if pattern == "*" {
        MatchType::Presence(())
    } else if let Some(s) = pattern.strip_prefix('*') {
        MatchType::Suffix(s.to_string())
    } else if let Some(p) = pattern.strip_suffix('*') {
        MatchType::Prefix(p.to_string())
    } else {
        MatchType::Exact(pattern.to_string())
    };
    pb::StringMatch { match_type: Some(m) }
}

fn principals(list: &[String]) -> Vec<pb::StringMatch> {
    list.iter().map(|p| string_match(p.strip_prefix("spiffe://").unwrap_or(p))).collect()
}

fn strings(list: &[String]) -> Vec<pb::StringMatch> {
    list.iter().map(|s| string_match(s)).collect()
}

fn address(block: &str) -> Option<pb::Address> {
    let (ip, len) = match block.split_once('/') {
        Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, len.parse::<u32>().ok()?),
        None => {
            let ip = block.parse::<IpAddr>().ok()?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    let address = match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    Some(pb::Address { address, length: len })
}

fn addresses(list: &[String]) -> Vec<pb::Address> {
    list.iter().filter_map(|b| address(b)).collect()
}

fn ports(list: &[String]) -> Vec<u32> {
    list.iter().filter_map(|p| p.parse().ok()).collect()
}

fn source_has_l7(s: &Source) -> bool {
    !s.request_principals.is_empty()
        || !s.not_request_principals.is_empty()
        || !s.remote_ip_blocks.is_empty()
        || !s.not_remote_ip_blocks.is_empty()
}

fn operation_has_l7(o: &Operation) -> bool {
    !o.hosts.is_empty()
        || !o.not_hosts.is_empty()
        || !o.methods.is_empty()
        || !o.not_methods.is_empty()
        || !o.paths.is_empty()
        || !o.not_paths.is_empty()
}

fn condition_is_l7(c: &Condition) -> bool {
    !L4_CONDITION_KEYS.contains(&c.key.as_str())
}

pub fn rule_has_l7(r: &Rule) -> bool {
    r.from.iter().any(|f| source_has_l7(&f.source))
        || r.to.iter().any(|t| operation_has_l7(&t.operation))
        || r.when.iter().any(condition_is_l7)
}

fn is_empty(m: &pb::Match) -> bool {
    *m == pb::Match::default()
}

/// The L4 part of a source; `None` when nothing L4 is left.
fn source_match(s: &Source) -> Option<pb::Match> {
    let m = pb::Match {
        // serviceAccounts "ns/sa" is the principal "<any trust domain>/ns/<ns>/sa/<sa>"; the
        // validator forbids mixing it with principals in one source, so OR-ing them is exact.
        principals: principals(&s.principals)
            .into_iter()
            .chain(s.service_accounts.iter().filter_map(|sa| service_account(sa)))
            .collect(),
        not_principals: principals(&s.not_principals)
            .into_iter()
            .chain(s.not_service_accounts.iter().filter_map(|sa| service_account(sa)))
            .collect(),
        namespaces: strings(&s.namespaces),
        not_namespaces: strings(&s.not_namespaces),
        source_ips: addresses(&s.ip_blocks),
        not_source_ips: addresses(&s.not_ip_blocks),
        ..Default::default()
    };
    (!is_empty(&m)).then_some(m)
}

fn service_account(s: &str) -> Option<pb::StringMatch> {
    let (namespace, service_account) = s.split_once('/')?;
    Some(string_match(&format!("*/ns/{namespace}/sa/{service_account}")))
}

fn operation_match(o: &Operation) -> Option<pb::Match> {
    let m = pb::Match {
        destination_ports: ports(&o.ports),
        not_destination_ports: ports(&o.not_ports),
        ..Default::default()
    };
    (!is_empty(&m)).then_some(m)
}

fn condition_match(c: &Condition) -> Option<pb::Match> {
    let (v, nv) = (&c.values, &c.not_values);
    let m = match c.key.as_str() {
        "source.ip" => pb::Match { source_ips: addresses(v), not_source_ips: addresses(nv), ..Default::default() },
        "source.namespace" => pb::Match { namespaces: strings(v), not_namespaces: strings(nv), ..Default::default() },
        "source.principal" => {
            pb::Match { principals: principals(v), not_principals: principals(nv), ..Default::default() }
        }
        "destination.ip" => {
            pb::Match { destination_ips: addresses(v), not_destination_ips: addresses(nv), ..Default::default() }
        }
        "destination.port" => {
            pb::Match { destination_ports: ports(v), not_destination_ports: ports(nv), ..Default::default() }
        }
        _ => return None,
    };
    (!is_empty(&m)).then_some(m)
}

/// One policy rule at L4. `None` means the rule is dropped (ALLOW with L7 attributes).
pub fn rule(r: &Rule, deny: bool) -> Option<pb::Rule> {
    if !deny && rule_has_l7(r) {
        return None;
    }
    let mut clauses = Vec::new();
    if !r.from.is_empty() {
        clauses.push(pb::Clause { matches: r.from.iter().filter_map(|f| source_match(&f.source)).collect() });
    }
    if !r.to.is_empty() {
        clauses.push(pb::Clause { matches: r.to.iter().filter_map(|t| operation_match(&t.operation)).collect() });
    }
    for c in &r.when {
        clauses.push(pb::Clause { matches: condition_match(c).into_iter().collect() });
    }
    Some(pb::Rule { clauses })
}

/// Resource name of an Authorization: `<namespace>/<name>`.
pub fn resource_name(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The L4 Authorization for a policy, or `None` when ztunnel has nothing to enforce for it
/// (waypoint-targeted policies, AUDIT).
pub fn authorization(settings: &Settings, ap: &AuthorizationPolicy) -> Option<pb::Authorization> {
    let spec = &ap.spec;
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        return None;
    }
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => pb::Action::Allow,
        "DENY" => pb::Action::Deny,
        _ => return None,
    };
    let ns = ap.metadata.namespace.clone().unwrap_or_default();
    let scope = match &spec.selector {
        Some(sel) if !sel.match_labels.is_empty() => pb::Scope::WorkloadSelector,
        _ if ns == settings.root_namespace => pb::Scope::Global,
        _ => pb::Scope::Namespace,
    };
    let deny = action == pb::Action::Deny;
    let rules = spec.rules.iter().flatten().filter_map(|r| rule(r, deny)).collect();
    Some(pb::Authorization {
        name: ap.metadata.name.clone(),
        namespace: ns,
        scope: scope as i32,
        action: action as i32,
        rules,
    })
}

fn no_peer_principal() -> pb::Match {
    pb::Match { not_principals: vec![string_match("*")], ..Default::default() }
}

/// The DENY policy that makes a workload STRICT: refuse connections without a peer identity.
pub fn static_strict(settings: &Settings) -> pb::Authorization {
    pb::Authorization {
        name: STATIC_STRICT.into(),
        namespace: settings.root_namespace.clone(),
        scope: pb::Scope::WorkloadSelector as i32,
        action: pb::Action::Deny as i32,
        rules: vec![pb::Rule { clauses: vec![pb::Clause { matches: vec![no_peer_principal()] }] }],
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Strict,
    Permissive,
}

fn mode_of(s: &str) -> Option<Mode> {
    match s {
        "STRICT" => Some(Mode::Strict),
        "PERMISSIVE" | "DISABLE" => Some(Mode::Permissive),
        _ => None,
    }
}

fn pa_mode(pa: &PeerAuthentication) -> Option<Mode> {
    pa.spec.mtls.as_ref().and_then(|m| mode_of(&m.mode))
}

/// Oldest first, then by name: Istio's rule for picking among conflicting policies.
fn oldest(mut list: Vec<&PeerAuthentication>) -> Option<&PeerAuthentication> {
    list.sort_by(|a, b| {
        (&a.metadata.creation_timestamp, &a.metadata.name).cmp(&(&b.metadata.creation_timestamp, &b.metadata.name))
    });
    list.into_iter().next()
}

fn peer_policies<'a>(world: &'a World, ns: &str) -> impl Iterator<Item = &'a PeerAuthentication> {
    world.in_namespace(Kind::PeerAuthentication, ns).filter_map(|o| match o.as_ref() {
        Object::PeerAuthentication(p) => Some(p),
        _ => None,
    })
}

fn has_selector(pa: &PeerAuthentication) -> bool {
    pa.spec.selector.as_ref().is_some_and(|s| !s.match_labels.is_empty())
}

/// Mode inherited from the namespace policy, then the mesh-wide one, then PERMISSIVE.
pub fn inherited_mode(world: &World, settings: &Settings, ns: &str) -> Mode {
    let ns_pa = oldest(peer_policies(world, ns).filter(|p| !has_selector(p)).collect());
    let mesh_pa = oldest(peer_policies(world, &settings.root_namespace).filter(|p| !has_selector(p)).collect());
    ns_pa.and_then(pa_mode).or_else(|| mesh_pa.and_then(pa_mode)).unwrap_or(Mode::Permissive)
}

fn workload_pa<'a>(world: &'a World, ns: &str, labels: &BTreeMap<String, String>) -> Option<&'a PeerAuthentication> {
    oldest(
        peer_policies(world, ns)
            .filter(|p| {
                p.spec
                    .selector
                    .as_ref()
                    .is_some_and(|s| !s.match_labels.is_empty() && selector::matches(&s.match_labels, labels))
            })
            .collect(),
    )
}

/// Port-level PeerAuthentication as a DENY policy for the workloads it selects.
pub fn converted_peer_authentication(
    world: &World,
    settings: &Settings,
    pa: &PeerAuthentication,
) -> Option<pb::Authorization> {
    if !has_selector(pa) || pa.spec.port_level_mtls.is_empty() {
        return None;
    }
    let ns = pa.metadata.namespace.clone().unwrap_or_default();
    let default = pa_mode(pa).unwrap_or_else(|| inherited_mode(world, settings, &ns));
    let with_mode = |m: Mode| -> Vec<u32> {
        pa.spec
            .port_level_mtls
            .iter()
            .filter(|(_, s)| mode_of(&s.mode) == Some(m))
            .filter_map(|(p, _)| p.parse().ok())
            .collect()
    };
    let rules = match default {
        Mode::Strict => {
            let exempt = with_mode(Mode::Permissive);
            let mut clauses = Vec::new();
            if !exempt.is_empty() {
                clauses.push(pb::Clause {
                    matches: vec![pb::Match { not_destination_ports: exempt, ..Default::default() }],
                });
            }
            clauses.push(pb::Clause { matches: vec![no_peer_principal()] });
            vec![pb::Rule { clauses }]
        }
        Mode::Permissive => {
            let strict = with_mode(Mode::Strict);
            if strict.is_empty() {
                vec![]
            } else {
                vec![pb::Rule {
                    clauses: vec![
                        pb::Clause { matches: vec![pb::Match { destination_ports: strict, ..Default::default() }] },
                        pb::Clause { matches: vec![no_peer_principal()] },
                    ],
                }]
            }
        }
    };
    Some(pb::Authorization {
        name: format!("{CONVERTED_PREFIX}{}", pa.metadata.name),
        namespace: ns,
        scope: pb::Scope::WorkloadSelector as i32,
        action: pb::Action::Deny as i32,
        rules,
    })
}

/// Names of the selector-scoped policies that apply to a workload with these labels, including
/// the PeerAuthentication-derived ones. Namespace- and mesh-scoped policies apply by scope.
pub fn selected_policies(
    world: &World,
    settings: &Settings,
    ns: &str,
    labels: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut scan = |policy_ns: &str| {
        for o in world.in_namespace(Kind::AuthorizationPolicy, policy_ns) {
            let Object::AuthorizationPolicy(ap) = o.as_ref() else { continue };
            let Some(sel) = &ap.spec.selector else { continue };
            if sel.match_labels.is_empty() || !selector::matches(&sel.match_labels, labels) {
                continue;
            }
            if authorization(settings, ap).is_some() {
                out.push(resource_name(policy_ns, &ap.metadata.name));
            }
        }
    };
    scan(ns);
    if ns != settings.root_namespace {
        scan(&settings.root_namespace);
    }
    match workload_pa(world, ns, labels) {
        Some(pa) if !pa.spec.port_level_mtls.is_empty() => {
            out.push(resource_name(ns, &format!("{CONVERTED_PREFIX}{}", pa.metadata.name)))
        }
        wpa => {
            let mode = wpa.and_then(pa_mode).unwrap_or_else(|| inherited_mode(world, settings, ns));
            if mode == Mode::Strict {
                out.push(resource_name(&settings.root_namespace, STATIC_STRICT));
            }
        }
    }
    out
}

/// The mTLS mode for traffic to `port` of a workload: its own PeerAuthentication (port level
/// first), then the namespace's, then the mesh's, then PERMISSIVE.
pub fn effective_mode(
    world: &World,
    settings: &Settings,
    ns: &str,
    labels: &BTreeMap<String, String>,
    port: u32,
) -> Mode {
    let inherited = || inherited_mode(world, settings, ns);
    match workload_pa(world, ns, labels) {
        Some(pa) => pa
            .spec
            .port_level_mtls
            .get(&port.to_string())
            .and_then(|m| mode_of(&m.mode))
            .or_else(|| pa_mode(pa))
            .unwrap_or_else(inherited),
        None => inherited(),
    }
}
