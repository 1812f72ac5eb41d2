//! Semantic validation, after the typed parse has accepted the shape. Every check reports the
//! field path and a reason a user can act on. Limits follow Kubernetes and Gateway API where they
//! define one.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use crate::duration::gateway_duration;
use crate::error::{Errors, FieldError};
use crate::object::*;
use crate::types::*;

pub(crate) fn object(obj: &Object) -> Vec<FieldError> {
    let mut e = Errors::default();
    let kind = obj.kind();
    let meta = obj.meta();
    let label_named = matches!(kind, crate::Kind::Namespace | crate::Kind::Service);
    if meta.name.is_empty() {
        e.add("metadata.name", "is required");
    } else if label_named {
        dns_label(&mut e, "metadata.name", &meta.name);
    } else {
        dns_subdomain(&mut e, "metadata.name", &meta.name);
    }
    if let Some(prefix) = meta.generate_name.as_deref().filter(|p| !p.is_empty()) {
        generate_name(&mut e, prefix, label_named);
    }
    match (&meta.namespace, kind.namespaced()) {
        (Some(_), false) => e.add("metadata.namespace", format!("must be empty: {kind} is cluster-scoped")),
        (Some(ns), true) => dns_label(&mut e, "metadata.namespace", ns),
        _ => {}
    }
    labels(&mut e, "metadata.labels", &meta.labels);
    for k in meta.annotations.keys() {
        qualified_name(&mut e, &format!("metadata.annotations[{k}]"), k);
    }
    owner_references(&mut e, &meta.owner_references);
    match obj {
        Object::Namespace(_) | Object::ServiceAccount(_) => {}
        Object::Node(n) => node(&mut e, n),
        Object::Pod(p) => pod(&mut e, p),
        Object::Service(s) => service(&mut e, s),
        Object::WorkloadEntry(w) => workload_entry(&mut e, w),
        Object::AuthorizationPolicy(p) => authorization_policy(&mut e, &p.spec),
        Object::PeerAuthentication(p) => peer_authentication(&mut e, &p.spec),
        Object::Gateway(g) => gateway(&mut e, &g.spec),
        Object::HttpRoute(r) => http_route(&mut e, &r.spec),
        Object::GrpcRoute(r) => grpc_route(&mut e, &r.spec),
    }
    e.list
}

/// Fields kept as written must be ones Kubernetes defines for the type, so that a typo is still
/// an error; the nearest known name is offered.
fn kubernetes_fields<'a>(
    e: &mut Errors,
    at: &str,
    type_name: &str,
    keys: impl Iterator<Item = &'a String>,
    known: &[&str],
) {
    for k in keys.filter(|k| !known.contains(&k.as_str())) {
        let nearest = known.iter().map(|n| (edit_distance(k, n), *n)).min().filter(|(d, _)| *d <= 2);
        let hint = nearest.map(|(_, n)| format!("; did you mean `{n}`?")).unwrap_or_default();
        e.add(format!("{at}.{k}"), format!("unknown field `{k}`: not a Kubernetes {type_name} field{hint}"));
    }
}

/// Levenshtein distance, for suggestions between short field names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

fn owner_references(e: &mut Errors, owners: &[crate::OwnerReference]) {
    for (i, o) in owners.iter().enumerate() {
        let path = format!("metadata.ownerReferences[{i}]");
        for (field, value) in [("apiVersion", &o.api_version), ("kind", &o.kind)] {
            if value.is_empty() {
                e.add(format!("{path}.{field}"), "is required");
            }
        }
        if o.name.is_empty() {
            e.add(format!("{path}.name"), "is required");
        } else {
            dns_subdomain(e, &format!("{path}.name"), &o.name);
        }
    }
    if owners.iter().filter(|o| o.controller == Some(true)).count() > 1 {
        e.add("metadata.ownerReferences", "at most one may have controller: true");
    }
}

// ---- names, labels, addresses -----------------------------------------------------------------

const DNS_LABEL_RULE: &str = "lowercase letters, digits and '-', at most 63, starting and ending alphanumeric";
const DNS_SUBDOMAIN_RULE: &str = "lowercase letters, digits, '-' and '.', at most 253";

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn dns_label(e: &mut Errors, path: &str, s: &str) {
    if !is_dns_label(s) {
        e.add(path, format!("{s:?} is not a valid DNS label ({DNS_LABEL_RULE})"));
    }
}

/// `metadata.generateName`, checked as Kubernetes checks it: as the kind's names are, except
/// that it may end in '-', since the generated suffix follows. Kubernetes replaces the last two
/// characters of such a prefix with one letter before checking (its `maskTrailingDash`), so a
/// prefix one character over a name's limit passes and a lone '-' does not; the same here.
fn generate_name(e: &mut Errors, prefix: &str, label_named: bool) {
    let masked = match prefix.strip_suffix('-') {
        Some(rest) if !rest.is_empty() => {
            let mut m = rest.to_string();
            m.pop();
            m.push('a');
            m
        }
        _ => prefix.to_string(),
    };
    let (valid, what, rule) = if label_named {
        (is_dns_label(&masked), "DNS label", DNS_LABEL_RULE)
    } else {
        (is_dns_subdomain(&masked), "DNS subdomain", DNS_SUBDOMAIN_RULE)
    };
    // Kubernetes masks bytes, so a non-ASCII character before the '-' is never masked whole.
    if !(prefix.is_ascii() && valid) {
        e.add(
            "metadata.generateName",
            format!("{prefix:?} is not a valid name prefix: names of this kind are a {what} ({rule}; the prefix may end in '-')"),
        );
    }
}

/// A container port name (IANA service name): what a Service's named targetPort refers to.
fn is_port_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 15
        && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && n.bytes().any(|b| b.is_ascii_lowercase())
}

fn port_name(e: &mut Errors, path: &str, n: &str) {
    if !is_port_name(n) {
        e.add(path, format!("{n:?} is not a valid port name (at most 15 lowercase letters, digits and '-')"));
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn dns_subdomain(e: &mut Errors, path: &str, s: &str) {
    if !is_dns_subdomain(s) {
        e.add(path, format!("{s:?} is not a valid DNS subdomain ({DNS_SUBDOMAIN_RULE})"));
    }
}

/// `prefix/name` label and annotation keys.
fn qualified_name(e: &mut Errors, path: &str, key: &str) {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let mut sub = Errors::default();
        dns_subdomain(&mut sub, path, p);
        if !sub.list.is_empty() {
            e.add(path, format!("key {key:?} has an invalid prefix {p:?}"));
            return;
        }
    }
    if !label_value_ok(name) || name.is_empty() {
        e.add(path, format!("key {key:?} is not a valid qualified name"));
    }
}

fn label_value_ok(v: &str) -> bool {
    v.len() <= 63
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && v.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && v.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

fn labels(e: &mut Errors, path: &str, labels: &BTreeMap<String, String>) {
    for (k, v) in labels {
        qualified_name(e, &format!("{path}[{k}]"), k);
        if !label_value_ok(v) {
            e.add(format!("{path}[{k}]"), format!("value {v:?} is not a valid label value"));
        }
    }
}

fn ip(e: &mut Errors, path: &str, s: &str) -> Option<IpAddr> {
    match s.parse::<IpAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            e.add(path, format!("{s:?} is not an IP address"));
            None
        }
    }
}

/// An IP block: a CIDR or a single address. The address is read with the parser translation
/// uses (std's, which refuses leading zeros such as `010.0.0.0`), so nothing accepted here can be
/// dropped there.
fn ip_block(e: &mut Errors, path: &str, s: &str) {
    let Some((addr, len)) = s.split_once('/') else {
        if s.parse::<IpAddr>().is_err() {
            e.add(path, format!("{s:?} is not an IP address or CIDR"));
        }
        return;
    };
    let max = match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => 32,
        Ok(IpAddr::V6(_)) => 128,
        Err(_) => return e.add(path, format!("{s:?} is not a CIDR: {addr:?} is not an IP address")),
    };
    if !len.parse::<u8>().is_ok_and(|l| l <= max && len == l.to_string()) {
        e.add(path, format!("{s:?} is not a CIDR: the prefix length must be 0-{max}"));
    }
}

fn port(e: &mut Errors, path: &str, p: i64) {
    if !(1..=65535).contains(&p) {
        e.add(path, format!("{p} is out of range 1-65535"));
    }
}

fn one_of(e: &mut Errors, path: &str, v: &str, allowed: &[&str]) {
    if !allowed.contains(&v) {
        e.add(path, format!("{v:?} is not one of {}", allowed.join(", ")));
    }
}

// ---- core -------------------------------------------------------------------------------------

fn node(e: &mut Errors, n: &Node) {
    if let Some(c) = &n.spec.pod_cidr {
        if c.parse::<ipnet::IpNet>().is_err() {
            e.add("spec.podCIDR", format!("{c:?} is not a CIDR"));
        }
    }
    for (i, c) in n.spec.pod_cidrs.iter().enumerate() {
        if c.parse::<ipnet::IpNet>().is_err() {
            e.add(format!("spec.podCIDRs[{i}]"), format!("{c:?} is not a CIDR"));
        }
    }
    for (i, a) in n.status.iter().flat_map(|s| &s.addresses).enumerate() {
        one_of(
            e,
            &format!("status.addresses[{i}].type"),
            &a.type_,
            &["InternalIP", "ExternalIP", "Hostname", "InternalDNS", "ExternalDNS"],
        );
        if a.type_.ends_with("IP") {
            ip(e, &format!("status.addresses[{i}].address"), &a.address);
        }
    }
}

fn pod(e: &mut Errors, p: &Pod) {
    kubernetes_fields(e, "spec", "PodSpec", p.spec.other.keys(), POD_SPEC_FIELDS);
    if let Some(s) = &p.status {
        kubernetes_fields(e, "status", "PodStatus", s.other.keys(), POD_STATUS_FIELDS);
    }
    if let Some(n) = &p.spec.node_name {
        dns_subdomain(e, "spec.nodeName", n);
    }
    if let Some(sa) = &p.spec.service_account_name {
        dns_subdomain(e, "spec.serviceAccountName", sa);
    }
    if let Some(alias) = &p.spec.service_account {
        dns_subdomain(e, "spec.serviceAccount", alias);
        if p.spec.service_account_name.as_ref().is_some_and(|n| n != alias) {
            e.add("spec.serviceAccount", "must equal spec.serviceAccountName (it is its deprecated alias)");
        }
    }
    // Containers are kept as given, but their ports (and native sidecars') name Service
    // targetPorts.
    container_ports(e, "spec.containers", p.spec.containers.iter());
    match p.spec.other.get("initContainers") {
        Some(v) if v.is_array() => container_ports(e, "spec.initContainers", v.as_array().into_iter().flatten()),
        Some(v) if !v.is_null() => e.add("spec.initContainers", "must be a list"),
        _ => {}
    }
    if let Some(s) = &p.status {
        if let Some(a) = &s.pod_ip {
            ip(e, "status.podIP", a);
        }
        for (i, a) in s.pod_ips.iter().enumerate() {
            ip(e, &format!("status.podIPs[{i}].ip"), &a.ip);
        }
        if let Some(ph) = &s.phase {
            one_of(e, "status.phase", ph, &["Pending", "Running", "Succeeded", "Failed", "Unknown"]);
        }
    }
}

fn container_ports<'a>(e: &mut Errors, at: &str, containers: impl Iterator<Item = &'a serde_json::Value>) {
    for (i, c) in containers.enumerate() {
        let Some(ports) = c.get("ports") else { continue };
        let Some(ports) = ports.as_array() else {
            e.add(format!("{at}[{i}].ports"), "must be a list");
            continue;
        };
        for (j, cp) in ports.iter().enumerate() {
            let path = format!("{at}[{i}].ports[{j}]");
            match cp.get("containerPort").map(|v| v.as_i64()) {
                Some(Some(n)) => port(e, &format!("{path}.containerPort"), n),
                Some(None) => e.add(format!("{path}.containerPort"), "must be a number"),
                None => e.add(format!("{path}.containerPort"), "is required"),
            }
            if let Some(name) = cp.get("name") {
                match name.as_str() {
                    Some(n) => port_name(e, &format!("{path}.name"), n),
                    None => e.add(format!("{path}.name"), "must be a string"),
                }
            }
            if let Some(protocol) = cp.get("protocol") {
                match protocol.as_str() {
                    Some(v) => one_of(e, &format!("{path}.protocol"), v, &["TCP", "UDP", "SCTP"]),
                    None => e.add(format!("{path}.protocol"), "must be a string"),
                }
            }
        }
    }
}

fn service(e: &mut Errors, s: &Service) {
    let spec = &s.spec;
    if let Some(t) = &spec.type_ {
        one_of(e, "spec.type", t, &["ClusterIP", "NodePort", "LoadBalancer"]);
    }
    if let Some(sel) = &spec.selector {
        labels(e, "spec.selector", sel);
    }
    if let Some(c) = &spec.cluster_ip {
        if c != "None" && !c.is_empty() {
            ip(e, "spec.clusterIP", c);
        }
    }
    for (i, c) in spec.cluster_ips.iter().enumerate() {
        if c != "None" {
            ip(e, &format!("spec.clusterIPs[{i}]"), c);
        } else if spec.cluster_ips.len() > 1 {
            e.add(format!("spec.clusterIPs[{i}]"), "\"None\" (headless) must be the only entry");
        }
    }
    // As Kubernetes: clusterIPs[0] is clusterIP, so the two cannot name different VIPs.
    if let (Some(c), Some(first)) = (spec.cluster_ip.as_deref().filter(|c| !c.is_empty()), spec.cluster_ips.first()) {
        if c != first {
            e.add("spec.clusterIPs[0]", format!("{first:?} must equal spec.clusterIP ({c:?})"));
        }
    }
    let mut names = HashSet::new();
    let mut ports = HashSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        port(e, &format!("{path}.port"), p.port);
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        one_of(e, &format!("{path}.protocol"), proto, &["TCP", "UDP", "SCTP"]);
        if !ports.insert((p.port, proto.to_string())) {
            e.add(format!("{path}.port"), format!("duplicate port {} {proto}", p.port));
        }
        match &p.name {
            Some(n) => {
                dns_label(e, &format!("{path}.name"), n);
                if !names.insert(n.clone()) {
                    e.add(format!("{path}.name"), format!("duplicate port name {n:?}"));
                }
            }
            None if spec.ports.len() > 1 => {
                e.add(format!("{path}.name"), "is required when a Service has more than one port")
            }
            None => {}
        }
        match &p.target_port {
            Some(IntOrString::Int(t)) => port(e, &format!("{path}.targetPort"), *t),
            Some(IntOrString::String(n)) if !is_port_name(n) => {
                e.add(format!("{path}.targetPort"), format!("{n:?} is neither a port number nor a valid port name"))
            }
            Some(IntOrString::String(_)) => {}
            None => {}
        }
    }
}

fn workload_entry(e: &mut Errors, w: &WorkloadEntry) {
    let s = &w.spec;
    if s.address.is_empty() {
        e.add("spec.address", "is required");
    } else if s.address.parse::<IpAddr>().is_err() {
        dns_subdomain(e, "spec.address", &s.address);
    }
    for (name, p) in &s.ports {
        port(e, &format!("spec.ports[{name}]"), *p);
    }
    labels(e, "spec.labels", &s.labels);
    if let Some(wt) = s.weight {
        if !(0..=u32::MAX as i64).contains(&wt) {
            e.add("spec.weight", format!("{wt} is out of range 0-{}", u32::MAX));
        }
    }
    if let Some(sa) = &s.service_account {
        dns_subdomain(e, "spec.serviceAccount", sa);
    }
}

// ---- security ---------------------------------------------------------------------------------

fn authorization_policy(e: &mut Errors, spec: &AuthorizationPolicySpec) {
    let has_targets = spec.target_ref.is_some() || !spec.target_refs.is_empty();
    if spec.selector.is_some() && has_targets {
        e.add(
            "spec",
            "selector and targetRefs are mutually exclusive: selector applies at ztunnel, targetRefs at waypoints",
        );
    }
    if spec.target_ref.is_some() && !spec.target_refs.is_empty() {
        e.add("spec.targetRef", "use targetRefs only; targetRef and targetRefs are mutually exclusive");
    }
    if let Some(sel) = &spec.selector {
        labels(e, "spec.selector.matchLabels", &sel.match_labels);
    }
    let refs = spec.target_ref.iter().map(|r| ("spec.targetRef".to_string(), r));
    let refs = refs.chain(spec.target_refs.iter().enumerate().map(|(i, r)| (format!("spec.targetRefs[{i}]"), r)));
    for (path, r) in refs {
        match (r.group.as_str(), r.kind.as_str()) {
            ("gateway.networking.k8s.io", "Gateway" | "GatewayClass")
            | ("" | "core", "Service")
            | ("networking.istio.io", "ServiceEntry") => {}
            (g, k) => e.add(
                format!("{path}.kind"),
                format!("target {g:?}/{k:?} is not supported; use a Gateway, GatewayClass, Service or ServiceEntry"),
            ),
        }
        if r.kind == "GatewayClass" && r.name != "istio-waypoint" {
            e.add(format!("{path}.name"), "only GatewayClass \"istio-waypoint\" can be targeted");
        }
        dns_subdomain(e, &format!("{path}.name"), &r.name);
    }
    let action = spec.action.as_deref().unwrap_or("ALLOW");
    match action {
        "ALLOW" | "DENY" | "AUDIT" => {}
        "CUSTOM" => e.add(
            "spec.action",
            "CUSTOM (external authorization) is not supported by Trellis; use ALLOW, DENY or AUDIT",
        ),
        other => e.add("spec.action", format!("{other:?} is not one of ALLOW, DENY, AUDIT")),
    }
    if spec.provider.is_some() && action != "CUSTOM" {
        e.add("spec.provider", "is only valid with action CUSTOM");
    }
    if action == "DENY" && spec.rules.as_ref().is_none_or(|r| r.is_empty()) {
        // Istio treats a DENY without rules as matching nothing; say so rather than surprise.
        e.add("spec.rules", "a DENY policy needs at least one rule (use `rules: [{}]` to deny everything)");
    }
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let rp = format!("spec.rules[{i}]");
        for (j, f) in rule.from.iter().enumerate() {
            source(e, &format!("{rp}.from[{j}].source"), &f.source);
        }
        for (j, t) in rule.to.iter().enumerate() {
            operation(e, &format!("{rp}.to[{j}].operation"), &t.operation);
        }
        for (j, c) in rule.when.iter().enumerate() {
            condition(e, &format!("{rp}.when[{j}]"), c);
        }
    }
}

/// `v` without its first and last characters (by character: values may be any UTF-8).
fn inner(v: &str) -> &str {
    let mut c = v.chars();
    c.next();
    c.next_back();
    c.as_str()
}

fn non_empty_strings(e: &mut Errors, path: &str, field: &str, values: &[String]) {
    for (i, v) in values.iter().enumerate() {
        if v.is_empty() {
            e.add(format!("{path}.{field}[{i}]"), "must not be empty");
        } else if inner(v).contains('*') {
            e.add(format!("{path}.{field}[{i}]"), format!("{v:?}: '*' is only allowed as a prefix or suffix"));
        }
    }
}

fn source(e: &mut Errors, path: &str, s: &Source) {
    let fields: [(&str, &Vec<String>); 8] = [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
        ("namespaces", &s.namespaces),
        ("notNamespaces", &s.not_namespaces),
        ("serviceAccounts", &s.service_accounts),
        ("notServiceAccounts", &s.not_service_accounts),
    ];
    for (f, v) in fields {
        non_empty_strings(e, path, f, v);
    }
    if (!s.principals.is_empty() || !s.not_principals.is_empty())
        && (!s.service_accounts.is_empty() || !s.not_service_accounts.is_empty())
    {
        e.add(path, "principals and serviceAccounts cannot be combined in one source; use separate `from` entries");
    }
    if *s == Source::default() {
        e.add(path, "must set at least one field");
    }
    for (f, list) in [("serviceAccounts", &s.service_accounts), ("notServiceAccounts", &s.not_service_accounts)] {
        for (i, sa) in list.iter().enumerate() {
            let halves: Vec<&str> = sa.split('/').collect();
            if halves.len() != 2 || halves.iter().any(|h| h.is_empty()) || sa.contains('*') {
                e.add(format!("{path}.{f}[{i}]"), format!("{sa:?} must be \"namespace/name\" (no wildcards)"));
            }
        }
    }
    for (f, list) in [
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        for (i, b) in list.iter().enumerate() {
            ip_block(e, &format!("{path}.{f}[{i}]"), b);
        }
    }
}

fn operation(e: &mut Errors, path: &str, o: &Operation) {
    if *o == Operation::default() {
        e.add(path, "must set at least one field");
    }
    for (f, v) in [
        ("hosts", &o.hosts),
        ("notHosts", &o.not_hosts),
        ("methods", &o.methods),
        ("notMethods", &o.not_methods),
        ("paths", &o.paths),
        ("notPaths", &o.not_paths),
    ] {
        non_empty_strings(e, path, f, v);
    }
    for (f, v) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
        for (i, p) in v.iter().enumerate() {
            match p.parse::<i64>() {
                Ok(n) => port(e, &format!("{path}.{f}[{i}]"), n),
                Err(_) => e.add(format!("{path}.{f}[{i}]"), format!("{p:?} is not a port number")),
            }
        }
    }
}

/// `when` keys Istio defines. The L4 subset is listed in `trellis_config::L4_CONDITION_KEYS`.
fn condition(e: &mut Errors, path: &str, c: &Condition) {
    let known = matches!(
        c.key.as_str(),
        "source.ip"
            | "source.namespace"
            | "source.principal"
            | "source.serviceAccount"
            | "remote.ip"
            | "destination.ip"
            | "destination.port"
            | "connection.sni"
            | "request.auth.principal"
            | "request.auth.audiences"
            | "request.auth.presenter"
    ) || c.key.starts_with("request.headers[") && c.key.ends_with(']')
        || c.key.starts_with("request.auth.claims[") && c.key.ends_with(']')
        || c.key.starts_with("experimental.envoy.filters.");
    if !known {
        e.add(format!("{path}.key"), format!("{:?} is not a supported condition key", c.key));
    }
    if c.values.is_empty() && c.not_values.is_empty() {
        e.add(path, "must set values or notValues");
    }
    for (f, list) in [("values", &c.values), ("notValues", &c.not_values)] {
        for (i, v) in list.iter().enumerate() {
            let p = format!("{path}.{f}[{i}]");
            match c.key.as_str() {
                "source.ip" | "destination.ip" | "remote.ip" => ip_block(e, &p, v),
                "destination.port" => match v.parse::<i64>() {
                    Ok(n) => port(e, &p, n),
                    Err(_) => e.add(p, format!("{v:?} is not a port number")),
                },
                _ => {}
            }
        }
        // Matched like the fields of a source: a value that could never match would quietly
        // disable a DENY.
        if matches!(c.key.as_str(), "source.principal" | "source.namespace") {
            non_empty_strings(e, path, f, list);
        }
    }
}

fn peer_authentication(e: &mut Errors, spec: &PeerAuthenticationSpec) {
    const MODES: [&str; 4] = ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"];
    if let Some(m) = &spec.mtls {
        if !m.mode.is_empty() {
            one_of(e, "spec.mtls.mode", &m.mode, &MODES);
        }
    }
    if let Some(sel) = &spec.selector {
        labels(e, "spec.selector.matchLabels", &sel.match_labels);
    }
    if !spec.port_level_mtls.is_empty() && spec.selector.as_ref().is_none_or(|s| s.match_labels.is_empty()) {
        e.add("spec.portLevelMtls", "requires a selector (port-level settings apply to selected workloads only)");
    }
    for (p, m) in &spec.port_level_mtls {
        let path = format!("spec.portLevelMtls[{p}]");
        match p.parse::<i64>() {
            // Looked up by the port's decimal form: "08080" would never be found.
            Ok(n) if n.to_string() != *p => e.add(&path, format!("{p:?} must be written {n}")),
            Ok(n) => port(e, &path, n),
            Err(_) => e.add(&path, format!("{p:?} is not a port number")),
        }
        one_of(e, &format!("{path}.mode"), &m.mode, &MODES);
    }
}

// ---- gateway API ------------------------------------------------------------------------------

fn gateway(e: &mut Errors, spec: &GatewaySpec) {
    if spec.gateway_class_name.is_empty() {
        e.add("spec.gatewayClassName", "is required");
    }
    if spec.listeners.is_empty() {
        e.add("spec.listeners", "needs at least one listener");
    }
    let mut names = HashSet::new();
    for (i, l) in spec.listeners.iter().enumerate() {
        let path = format!("spec.listeners[{i}]");
        dns_label(e, &format!("{path}.name"), &l.name);
        if !names.insert(&l.name) {
            e.add(format!("{path}.name"), format!("duplicate listener name {:?}", l.name));
        }
        port(e, &format!("{path}.port"), l.port);
        one_of(e, &format!("{path}.protocol"), &l.protocol, &["HTTP", "HTTPS", "TLS", "TCP", "UDP", "HBONE"]);
        if let Some(h) = &l.hostname {
            hostname(e, &format!("{path}.hostname"), h);
        }
    }
}

fn hostname(e: &mut Errors, path: &str, h: &str) {
    let bare = h.strip_prefix("*.").unwrap_or(h);
    if h.parse::<IpAddr>().is_ok() {
        e.add(path, format!("{h:?}: an IP address is not a hostname"));
    } else {
        dns_subdomain(e, path, bare);
    }
}

fn parent_refs(e: &mut Errors, refs: &[ParentReference]) {
    for (i, p) in refs.iter().enumerate() {
        let path = format!("spec.parentRefs[{i}]");
        let group = p.group.as_deref().unwrap_or("gateway.networking.k8s.io");
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        match (group, kind) {
            ("gateway.networking.k8s.io", "Gateway") | ("" | "core", "Service") => {}
            (g, k) => e.add(
                format!("{path}.kind"),
                format!("parent {g:?}/{k:?} is not supported; use a Gateway or a Service (group \"\")"),
            ),
        }
        dns_subdomain(e, &format!("{path}.name"), &p.name);
        if let Some(pt) = p.port {
            port(e, &format!("{path}.port"), pt);
        }
    }
}

fn backend_refs(e: &mut Errors, path: &str, refs: &[BackendRef]) {
    for (i, b) in refs.iter().enumerate() {
        let bp = format!("{path}.backendRefs[{i}]");
        let group = b.group.as_deref().unwrap_or("");
        let kind = b.kind.as_deref().unwrap_or("Service");
        if !matches!((group, kind), ("" | "core", "Service") | ("networking.istio.io", "Hostname")) {
            e.add(format!("{bp}.kind"), format!("backend {group:?}/{kind:?} is not supported; use a Service"));
        }
        dns_subdomain(e, &format!("{bp}.name"), &b.name);
        match b.port {
            Some(p) => port(e, &format!("{bp}.port"), p),
            None if kind == "Service" => e.add(format!("{bp}.port"), "is required for a Service backend"),
            None => {}
        }
        if let Some(w) = b.weight {
            if !(0..=1_000_000).contains(&w) {
                e.add(format!("{bp}.weight"), format!("{w} is out of range 0-1000000"));
            }
        }
        filters(e, &bp, &b.filters);
    }
}

fn header_name(e: &mut Errors, path: &str, n: &str) {
    let ok = !n.is_empty()
        && n.len() <= 256
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !ok {
        e.add(path, format!("{n:?} is not a valid HTTP header name"));
    }
}

fn filters(e: &mut Errors, path: &str, list: &[RouteFilter]) {
    for (i, f) in list.iter().enumerate() {
        let fp = format!("{path}.filters[{i}]");
        let (want, set) = match f.type_.as_str() {
            "RequestHeaderModifier" => ("requestHeaderModifier", f.request_header_modifier.is_some()),
            "ResponseHeaderModifier" => ("responseHeaderModifier", f.response_header_modifier.is_some()),
            "RequestRedirect" => ("requestRedirect", f.request_redirect.is_some()),
            "URLRewrite" => ("urlRewrite", f.url_rewrite.is_some()),
            "RequestMirror" => ("requestMirror", f.request_mirror.is_some()),
            other => {
                e.add(format!("{fp}.type"), format!("{other:?} is not one of RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror"));
                continue;
            }
        };
        let count = [
            f.request_header_modifier.is_some(),
            f.response_header_modifier.is_some(),
            f.request_redirect.is_some(),
            f.url_rewrite.is_some(),
            f.request_mirror.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if !set || count != 1 {
            e.add(&fp, format!("type {} requires exactly the field {want}", f.type_));
        }
        for (name, m) in [
            ("requestHeaderModifier", &f.request_header_modifier),
            ("responseHeaderModifier", &f.response_header_modifier),
        ] {
            if let Some(m) = m {
                for (j, h) in m.set.iter().chain(&m.add).enumerate() {
                    header_name(e, &format!("{fp}.{name}.headers[{j}].name"), &h.name);
                }
                for (j, h) in m.remove.iter().enumerate() {
                    header_name(e, &format!("{fp}.{name}.remove[{j}]"), h);
                }
            }
        }
        if let Some(r) = &f.request_redirect {
            if let Some(s) = &r.scheme {
                one_of(e, &format!("{fp}.requestRedirect.scheme"), s, &["http", "https"]);
            }
            if let Some(c) = r.status_code {
                if c != 301 && c != 302 {
                    e.add(format!("{fp}.requestRedirect.statusCode"), format!("{c} is not one of 301, 302"));
                }
            }
            if let Some(p) = r.port {
                port(e, &format!("{fp}.requestRedirect.port"), p);
            }
            if let Some(p) = &r.path {
                path_modifier(e, &format!("{fp}.requestRedirect.path"), p);
            }
        }
        if let Some(u) = &f.url_rewrite {
            if let Some(p) = &u.path {
                path_modifier(e, &format!("{fp}.urlRewrite.path"), p);
            }
        }
        if let Some(m) = &f.request_mirror {
            backend_refs(e, &format!("{fp}.requestMirror"), std::slice::from_ref(&m.backend_ref));
        }
    }
}

fn path_modifier(e: &mut Errors, path: &str, p: &PathModifier) {
    match p.type_.as_str() {
        "ReplaceFullPath" if p.replace_full_path.is_some() && p.replace_prefix_match.is_none() => {}
        "ReplacePrefixMatch" if p.replace_prefix_match.is_some() && p.replace_full_path.is_none() => {}
        "ReplaceFullPath" => e.add(path, "type ReplaceFullPath requires replaceFullPath only"),
        "ReplacePrefixMatch" => e.add(path, "type ReplacePrefixMatch requires replacePrefixMatch only"),
        other => e.add(format!("{path}.type"), format!("{other:?} is not one of ReplaceFullPath, ReplacePrefixMatch")),
    }
}

fn value_matches(e: &mut Errors, path: &str, field: &str, list: &[ValueMatch], header: bool) {
    let mut seen = HashSet::new();
    for (i, m) in list.iter().enumerate() {
        let p = format!("{path}.{field}[{i}]");
        one_of(e, &format!("{p}.type"), m.type_.as_deref().unwrap_or("Exact"), &["Exact", "RegularExpression"]);
        if header {
            header_name(e, &format!("{p}.name"), &m.name);
        } else if m.name.is_empty() {
            e.add(format!("{p}.name"), "must not be empty");
        }
        let key = if header { m.name.to_ascii_lowercase() } else { m.name.clone() };
        if !seen.insert(key) {
            e.add(format!("{p}.name"), format!("duplicate match on {:?}", m.name));
        }
    }
}

fn route_common(e: &mut Errors, parents: &[ParentReference], hostnames: &[String], rules: usize) {
    parent_refs(e, parents);
    for (i, h) in hostnames.iter().enumerate() {
        hostname(e, &format!("spec.hostnames[{i}]"), h);
    }
    if rules > 16 {
        e.add("spec.rules", format!("{rules} rules exceed the Gateway API limit of 16"));
    }
}

fn http_route(e: &mut Errors, spec: &HttpRouteSpec) {
    route_common(e, &spec.parent_refs, &spec.hostnames, spec.rules.len());
    for (i, r) in spec.rules.iter().enumerate() {
        let rp = format!("spec.rules[{i}]");
        if r.matches.len() > 64 {
            e.add(format!("{rp}.matches"), "more than 64 matches");
        }
        for (j, m) in r.matches.iter().enumerate() {
            let mp = format!("{rp}.matches[{j}]");
            if let Some(p) = &m.path {
                let t = p.type_.as_deref().unwrap_or("PathPrefix");
                one_of(e, &format!("{mp}.path.type"), t, &["Exact", "PathPrefix", "RegularExpression"]);
                let v = p.value.as_deref().unwrap_or("/");
                if t != "RegularExpression" && !v.starts_with('/') {
                    e.add(format!("{mp}.path.value"), format!("{v:?} must start with '/'"));
                }
                if t == "PathPrefix" && (v.contains("//") || v.contains("/./") || v.contains("/../")) {
                    e.add(format!("{mp}.path.value"), format!("{v:?} must be a normalized path"));
                }
            }
            value_matches(e, &mp, "headers", &m.headers, true);
            value_matches(e, &mp, "queryParams", &m.query_params, false);
            if let Some(meth) = &m.method {
                one_of(
                    e,
                    &format!("{mp}.method"),
                    meth,
                    &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"],
                );
            }
        }
        filters(e, &rp, &r.filters);
        backend_refs(e, &rp, &r.backend_refs);
        if let Some(t) = &r.timeouts {
            let mut parsed = [None, None];
            for (i, (f, v)) in [("request", &t.request), ("backendRequest", &t.backend_request)].into_iter().enumerate()
            {
                if let Some(v) = v {
                    parsed[i] = gateway_duration(v);
                    if parsed[i].is_none() {
                        e.add(
                            format!("{rp}.timeouts.{f}"),
                            format!("{v:?} is not a Gateway API duration (e.g. 10s, 500ms, 1h)"),
                        );
                    }
                }
            }
            // As Gateway API's own CRD requires: one try cannot outlast the whole request (0s: none).
            if let [Some(request), Some(backend)] = parsed {
                if !request.is_zero() && backend > request {
                    e.add(
                        format!("{rp}.timeouts.backendRequest"),
                        format!(
                            "{:?} cannot be longer than timeouts.request {:?}",
                            t.backend_request.as_deref().unwrap_or_default(),
                            t.request.as_deref().unwrap_or_default()
                        ),
                    );
                }
            }
        }
    }
}

fn grpc_route(e: &mut Errors, spec: &GrpcRouteSpec) {
    route_common(e, &spec.parent_refs, &spec.hostnames, spec.rules.len());
    for (i, r) in spec.rules.iter().enumerate() {
        let rp = format!("spec.rules[{i}]");
        for (j, m) in r.matches.iter().enumerate() {
            let mp = format!("{rp}.matches[{j}]");
            if let Some(meth) = &m.method {
                let t = meth.type_.as_deref().unwrap_or("Exact");
                one_of(e, &format!("{mp}.method.type"), t, &["Exact", "RegularExpression"]);
                if meth.service.is_none() && meth.method.is_none() {
                    e.add(format!("{mp}.method"), "must set service, method or both");
                }
                if t == "Exact" {
                    if let Some(s) = &meth.service {
                        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_') {
                            e.add(format!("{mp}.method.service"), format!("{s:?} is not a valid gRPC service name"));
                        }
                    }
                    if let Some(m) = &meth.method {
                        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                            e.add(format!("{mp}.method.method"), format!("{m:?} is not a valid gRPC method name"));
                        }
                    }
                }
            }
            value_matches(e, &mp, "headers", &m.headers, true);
        }
        filters(e, &rp, &r.filters);
        backend_refs(e, &rp, &r.backend_refs);
    }
}
