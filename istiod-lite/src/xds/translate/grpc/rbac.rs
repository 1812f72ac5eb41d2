//! AuthorizationPolicy → Envoy RBAC HTTP filters for gRPC servers (gRFC A41).
//!
//! One DENY filter, then one ALLOW filter, each present only if a policy of that action applies:
//! a request must escape every DENY policy and, if any ALLOW policy exists, match one. An ALLOW
//! policy without rules adds the filter with no policies, which denies everything.
//!
//! Principals are the peer's SPIFFE URI SAN. Attributes a gRPC server cannot evaluate
//! (`requestPrincipals`, unknown `when` keys) fail closed: in an ALLOW rule they never match, in
//! a DENY rule they always match.

use std::collections::BTreeMap;

use trellis_config::object::AuthorizationPolicy;
use trellis_config::types::{Condition, Operation, Rule, Source};
use trellis_proto::envoy::envoy::config::core::v3::CidrRange;
use trellis_proto::envoy::envoy::config::rbac::v3 as rbac;
use trellis_proto::envoy::envoy::config::route::v3 as route;
use trellis_proto::envoy::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use trellis_proto::envoy::envoy::r#type::matcher::v3 as matcher;
use trellis_proto::envoy::google::protobuf::{Any, UInt32Value};

use super::client::{string_exact, string_regex};

pub const RBAC_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";

/// `envoy.extensions.filters.http.rbac.v3.RBAC` with only `rules`, and `config.rbac.v3.RBAC` with
/// an ordered map: the generated type keeps `policies` in a `HashMap`, whose random order would
/// give identical policies different bytes (and versions) on every render.
#[derive(Clone, PartialEq, prost::Message)]
struct RbacFilter {
    #[prost(message, optional, tag = "1")]
    rules: Option<RbacRules>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RbacRules {
    #[prost(int32, tag = "1")]
    action: i32,
    #[prost(btree_map = "string, message", tag = "2")]
    policies: BTreeMap<String, rbac::Policy>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
}

pub fn filters(policies: &[&AuthorizationPolicy]) -> Vec<hcm::HttpFilter> {
    let mut deny = None::<BTreeMap<String, rbac::Policy>>;
    let mut allow = None::<BTreeMap<String, rbac::Policy>>;
    for ap in policies {
        let action = match ap.spec.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            // AUDIT does not decide; CUSTOM is rejected at validation.
            _ => continue,
        };
        let map = match action {
            Action::Allow => allow.get_or_insert_with(BTreeMap::new),
            Action::Deny => deny.get_or_insert_with(BTreeMap::new),
        };
        let ns = ap.metadata.namespace.as_deref().unwrap_or_default();
        for (i, r) in ap.spec.rules.iter().flatten().enumerate() {
            map.insert(format!("ns[{ns}]-policy[{}]-rule[{i}]", ap.metadata.name), policy(r, action));
        }
    }
    let mut out = Vec::new();
    for (name, action, map) in [("deny", rbac::rbac::Action::Deny, deny), ("allow", rbac::rbac::Action::Allow, allow)] {
        if let Some(policies) = map {
            let cfg = RbacFilter { rules: Some(RbacRules { action: action as i32, policies }) };
            out.push(hcm::HttpFilter {
                name: format!("envoy.filters.http.rbac.{name}"),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(Any {
                    type_url: RBAC_TYPE_URL.into(),
                    value: prost::Message::encode_to_vec(&cfg),
                })),
                ..Default::default()
            });
        }
    }
    out
}

fn any_principal() -> rbac::Principal {
    rbac::Principal { identifier: Some(rbac::principal::Identifier::Any(true)) }
}

fn any_permission() -> rbac::Permission {
    rbac::Permission { rule: Some(rbac::permission::Rule::Any(true)) }
}

fn no_principal() -> rbac::Principal {
    rbac::Principal { identifier: Some(rbac::principal::Identifier::NotId(Box::new(any_principal()))) }
}

fn no_permission() -> rbac::Permission {
    rbac::Permission { rule: Some(rbac::permission::Rule::NotRule(Box::new(any_permission()))) }
}

/// What an attribute the server cannot evaluate turns into: never in ALLOW, always in DENY.
fn unsupported_principal(a: Action) -> rbac::Principal {
    if a == Action::Allow {
        no_principal()
    } else {
        any_principal()
    }
}

fn or_ids(ids: Vec<rbac::Principal>) -> rbac::Principal {
    rbac::Principal { identifier: Some(rbac::principal::Identifier::OrIds(rbac::principal::Set { ids })) }
}

fn and_ids(ids: Vec<rbac::Principal>) -> rbac::Principal {
    if ids.is_empty() {
        return any_principal();
    }
    rbac::Principal { identifier: Some(rbac::principal::Identifier::AndIds(rbac::principal::Set { ids })) }
}

fn not_id(p: rbac::Principal) -> rbac::Principal {
    rbac::Principal { identifier: Some(rbac::principal::Identifier::NotId(Box::new(p))) }
}

fn or_rules(rules: Vec<rbac::Permission>) -> rbac::Permission {
    rbac::Permission { rule: Some(rbac::permission::Rule::OrRules(rbac::permission::Set { rules })) }
}

fn and_rules(rules: Vec<rbac::Permission>) -> rbac::Permission {
    if rules.is_empty() {
        return any_permission();
    }
    rbac::Permission { rule: Some(rbac::permission::Rule::AndRules(rbac::permission::Set { rules })) }
}

fn not_rule(p: rbac::Permission) -> rbac::Permission {
    rbac::Permission { rule: Some(rbac::permission::Rule::NotRule(Box::new(p))) }
}

/// Istio's string patterns: exact, `prefix*`, `*suffix`, `*` (present).
fn pattern(p: &str) -> matcher::StringMatcher {
    use matcher::string_matcher::MatchPattern;
    let m = if p == "*" {
        MatchPattern::SafeRegex(matcher::RegexMatcher { regex: ".+".into(), ..Default::default() })
    } else if let Some(s) = p.strip_prefix('*') {
        MatchPattern::Suffix(s.into())
    } else if let Some(s) = p.strip_suffix('*') {
        MatchPattern::Prefix(s.into())
    } else {
        MatchPattern::Exact(p.into())
    };
    matcher::StringMatcher { match_pattern: Some(m), ..Default::default() }
}

fn authenticated(m: matcher::StringMatcher) -> rbac::Principal {
    rbac::Principal {
        identifier: Some(rbac::principal::Identifier::Authenticated(rbac::principal::Authenticated {
            principal_name: Some(m),
        })),
    }
}

/// `cluster.local/ns/a/sa/b` (Istio's principal form) matches the URI SAN `spiffe://…`.
fn principal(p: &str) -> rbac::Principal {
    let p = p.strip_prefix("spiffe://").unwrap_or(p);
    if p == "*" {
        return authenticated(string_regex("spiffe://.+"));
    }
    let m = match pattern(p).match_pattern {
        Some(matcher::string_matcher::MatchPattern::Exact(e)) => string_exact(&format!("spiffe://{e}")),
        Some(matcher::string_matcher::MatchPattern::Prefix(e)) => pattern(&format!("spiffe://{e}*")),
        _ => pattern(p),
    };
    authenticated(m)
}

fn regex_glob(p: &str) -> String {
    let mut out = String::new();
    for c in p.chars() {
        match c {
            '*' => out.push_str("[^/]*"),
            c if "\\.+?()|[]{}^$".contains(c) => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

fn namespace(ns: &str) -> rbac::Principal {
    authenticated(string_regex(&format!("spiffe://[^/]+/ns/{}/sa/[^/]+", regex_glob(ns))))
}

fn service_account(sa: &str) -> rbac::Principal {
    match sa.split_once('/') {
        Some((ns, sa)) => {
            authenticated(string_regex(&format!("spiffe://[^/]+/ns/{}/sa/{}", regex_glob(ns), regex_glob(sa))))
        }
        None => no_principal(),
    }
}

fn cidr(block: &str) -> Option<CidrRange> {
    let (ip, len) = match block.split_once('/') {
        Some((ip, len)) => (ip.parse::<std::net::IpAddr>().ok()?, len.parse::<u32>().ok()?),
        None => {
            let ip = block.parse::<std::net::IpAddr>().ok()?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    Some(CidrRange { address_prefix: ip.to_string(), prefix_len: Some(UInt32Value { value: len }) })
}

fn remote_ip(block: &str) -> rbac::Principal {
    match cidr(block) {
        Some(c) => rbac::Principal { identifier: Some(rbac::principal::Identifier::DirectRemoteIp(c)) },
        None => no_principal(),
    }
}

fn header_principal(name: &str, value: &str) -> rbac::Principal {
    rbac::Principal { identifier: Some(rbac::principal::Identifier::Header(header(name, value))) }
}

fn header(name: &str, value: &str) -> route::HeaderMatcher {
    route::HeaderMatcher {
        name: name.to_ascii_lowercase(),
        header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(pattern(value))),
        ..Default::default()
    }
}

/// One field of a source: values ORed, `not` values negated, both ANDed.
fn field(
    out: &mut Vec<rbac::Principal>,
    values: &[String],
    not_values: &[String],
    f: impl Fn(&str) -> rbac::Principal,
) {
    if !values.is_empty() {
        out.push(or_ids(values.iter().map(|v| f(v)).collect()));
    }
    if !not_values.is_empty() {
        out.push(not_id(or_ids(not_values.iter().map(|v| f(v)).collect())));
    }
}

fn perm_field(
    out: &mut Vec<rbac::Permission>,
    values: &[String],
    not_values: &[String],
    f: impl Fn(&str) -> rbac::Permission,
) {
    if !values.is_empty() {
        out.push(or_rules(values.iter().map(|v| f(v)).collect()));
    }
    if !not_values.is_empty() {
        out.push(not_rule(or_rules(not_values.iter().map(|v| f(v)).collect())));
    }
}

fn source(s: &Source, a: Action) -> rbac::Principal {
    let mut ids = Vec::new();
    field(&mut ids, &s.principals, &s.not_principals, principal);
    field(&mut ids, &s.namespaces, &s.not_namespaces, namespace);
    field(&mut ids, &s.service_accounts, &s.not_service_accounts, service_account);
    field(&mut ids, &s.ip_blocks, &s.not_ip_blocks, remote_ip);
    field(&mut ids, &s.remote_ip_blocks, &s.not_remote_ip_blocks, remote_ip);
    if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
        // JWT is not evaluated by gRPC servers.
        ids.push(unsupported_principal(a));
    }
    and_ids(ids)
}

fn port_permission(p: &str) -> rbac::Permission {
    match p.parse::<u32>() {
        Ok(n) => rbac::Permission { rule: Some(rbac::permission::Rule::DestinationPort(n)) },
        Err(_) => no_permission(),
    }
}

fn path_permission(p: &str) -> rbac::Permission {
    rbac::Permission {
        rule: Some(rbac::permission::Rule::UrlPath(matcher::PathMatcher {
            rule: Some(matcher::path_matcher::Rule::Path(pattern(p))),
        })),
    }
}

fn header_permission(name: &str, value: &str) -> rbac::Permission {
    rbac::Permission { rule: Some(rbac::permission::Rule::Header(header(name, value))) }
}

fn operation(o: &Operation) -> rbac::Permission {
    let mut rules = Vec::new();
    perm_field(&mut rules, &o.hosts, &o.not_hosts, |h| header_permission(":authority", h));
    perm_field(&mut rules, &o.ports, &o.not_ports, port_permission);
    perm_field(&mut rules, &o.methods, &o.not_methods, |m| header_permission(":method", m));
    perm_field(&mut rules, &o.paths, &o.not_paths, path_permission);
    and_rules(rules)
}

/// A `when` condition lands on the principal side (who is asking) or the permission side (what is
/// asked for), as in Istio.
enum When {
    Principal(rbac::Principal),
    Permission(rbac::Permission),
}

fn condition(c: &Condition, a: Action) -> When {
    let (v, nv) = (&c.values, &c.not_values);
    let key = c.key.as_str();
    let mut ids = Vec::new();
    let mut perms = Vec::new();
    match key {
        "source.ip" | "remote.ip" => field(&mut ids, v, nv, remote_ip),
        "source.namespace" => field(&mut ids, v, nv, namespace),
        "source.principal" => field(&mut ids, v, nv, principal),
        "destination.port" => perm_field(&mut perms, v, nv, port_permission),
        "destination.ip" => perm_field(&mut perms, v, nv, |b| match cidr(b) {
            Some(c) => rbac::Permission { rule: Some(rbac::permission::Rule::DestinationIp(c)) },
            None => no_permission(),
        }),
        k => match k.strip_prefix("request.headers[").and_then(|r| r.strip_suffix(']')) {
            Some(h) => field(&mut ids, v, nv, |val| header_principal(h, val)),
            None => return When::Principal(unsupported_principal(a)),
        },
    }
    if perms.is_empty() {
        When::Principal(and_ids(ids))
    } else {
        When::Permission(and_rules(perms))
    }
}

fn policy(r: &Rule, a: Action) -> rbac::Policy {
    let mut principals = Vec::new();
    let mut permissions = Vec::new();
    if !r.from.is_empty() {
        principals.push(or_ids(r.from.iter().map(|f| source(&f.source, a)).collect()));
    }
    if !r.to.is_empty() {
        permissions.push(or_rules(r.to.iter().map(|t| operation(&t.operation)).collect()));
    }
    for c in &r.when {
        match condition(c, a) {
            When::Principal(p) => principals.push(p),
            When::Permission(p) => permissions.push(p),
        }
    }
    if a == Action::Allow && principals.is_empty() && permissions.is_empty() {
        return rbac::Policy {
            permissions: vec![any_permission()],
            principals: vec![any_principal()],
            ..Default::default()
        };
    }
    rbac::Policy {
        permissions: vec![and_rules(permissions)],
        principals: vec![and_ids(principals)],
        ..Default::default()
    }
}
