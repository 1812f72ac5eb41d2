//! The network configuration on stdin, validated with errors that name the field.

use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde_json::Value;

use crate::error::{CniError, INCOMPATIBLE_VERSION, INVALID_CONFIG};

pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0", "1.1.0"];
pub const DEFAULT_DATA_DIR: &str = "/var/lib/trellis/cni";
pub const DEFAULT_MTU: u32 = 1450;
/// The largest pod range one node may have (a /16).
const MIN_PREFIX: u8 = 16;
/// Namespaces whose pods are never registered with the node agent. The control plane's own pods
/// live there: if their start waited on the control plane, a node could never bring it back.
pub const DEFAULT_EXCLUDE_NAMESPACES: &[&str] = &["kube-system", "istio-system"];

#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub pod_cidr: Ipv4Net,
    pub data_dir: PathBuf,
    pub mtu: u32,
    pub agent_socket: Option<PathBuf>,
    /// Pods in these namespaces start without the node agent (and so are never meshed).
    pub exclude_namespaces: Vec<String>,
    /// GC: the attachments the runtime still knows, as (container id, ifname).
    pub valid_attachments: Vec<(String, String)>,
    pub raw: Value,
}

fn invalid(field: &str, why: impl std::fmt::Display) -> CniError {
    CniError::new(INVALID_CONFIG, format!("{field}: {why}"))
}

fn string(v: &Value, field: &str, required: bool) -> Result<Option<String>, CniError> {
    match v.get(field) {
        None | Some(Value::Null) if required => Err(invalid(field, "is required")),
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if required && s.is_empty() => Err(invalid(field, "must not be empty")),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(field, format!("must be a string, not {other}"))),
    }
}

/// Parses a plugin configuration. `pod_cidr_required` is false for VERSION/STATUS/GC, which
/// only need what they use.
pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
    let raw: Value = serde_json::from_slice(stdin).map_err(|e| invalid("config", format!("not valid JSON: {e}")))?;
    if !raw.is_object() {
        return Err(invalid("config", "must be a JSON object"));
    }
    let cni_version = string(&raw, "cniVersion", true)?.unwrap_or_default();
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            format!("cniVersion: {cni_version:?} is not supported (supported: {})", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let name = string(&raw, "name", true)?.unwrap_or_default();
    // The CNI spec's rule; it also keeps "." and ".." out of the IPAM store's path.
    let starts_ok = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !starts_ok || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
        return Err(invalid(
            "name",
            format!("{name:?} must start with a letter or digit and contain only letters, digits, '_', '.' and '-'"),
        ));
    }
    let cidr_text = string(&raw, "podCIDR", true)?.unwrap_or_default();
    let pod_cidr: Ipv4Net =
        cidr_text.parse().map_err(|_| invalid("podCIDR", format!("{cidr_text:?} is not an IPv4 CIDR")))?;
    if pod_cidr.prefix_len() > 30 {
        return Err(invalid("podCIDR", format!("{pod_cidr} is too small: it needs room for a gateway and a pod")));
    }
    // A node's pod range; IPAM scans it on every ADD, so a mistaken /0 must not be taken literally.
    if pod_cidr.prefix_len() < MIN_PREFIX {
        return Err(invalid(
            "podCIDR",
            format!("{pod_cidr} is too large for one node's pods (at most a /{MIN_PREFIX}, 65,534 addresses)"),
        ));
    }
    if pod_cidr.trunc() != pod_cidr {
        return Err(invalid("podCIDR", format!("{pod_cidr} has host bits set (did you mean {}?)", pod_cidr.trunc())));
    }
    let data_dir = PathBuf::from(string(&raw, "dataDir", false)?.unwrap_or_else(|| DEFAULT_DATA_DIR.into()));
    if !data_dir.is_absolute() {
        return Err(invalid("dataDir", format!("{} must be an absolute path", data_dir.display())));
    }
    let mtu = match raw.get("mtu") {
        None | Some(Value::Null) => DEFAULT_MTU,
        Some(v) => match v.as_u64() {
            Some(m) if (576..=9000).contains(&m) => m as u32,
            _ => return Err(invalid("mtu", format!("{v} must be an integer from 576 to 9000"))),
        },
    };
    let agent_socket = string(&raw, "agentSocket", false)?.map(PathBuf::from);
    let exclude_namespaces = match raw.get("excludeNamespaces") {
        None | Some(Value::Null) => DEFAULT_EXCLUDE_NAMESPACES.iter().map(|s| s.to_string()).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v.as_str() {
                Some(ns) if is_dns_label(ns) => Ok(ns.to_string()),
                _ => Err(invalid(&format!("excludeNamespaces[{i}]"), format!("{v} is not a namespace name"))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(invalid("excludeNamespaces", format!("must be a list of namespaces, not {other}"))),
    };
    let mut valid_attachments = Vec::new();
    if let Some(list) = raw.get("cni.dev/valid-attachments") {
        let items = list.as_array().ok_or_else(|| invalid("cni.dev/valid-attachments", "must be a list"))?;
        for (i, a) in items.iter().enumerate() {
            let field = format!("cni.dev/valid-attachments[{i}]");
            let id = string(a, "containerID", true).map_err(|e| invalid(&field, e.msg))?.unwrap_or_default();
            let ifname = string(a, "ifname", true).map_err(|e| invalid(&field, e.msg))?.unwrap_or_default();
            valid_attachments.push((id, ifname));
        }
    }
    Ok(NetConf { cni_version, name, pod_cidr, data_dir, mtu, agent_socket, exclude_namespaces, valid_attachments, raw })
}

/// ADD's `prevResult` (the result of the plugins before this one in the chain), checked as far
/// as ADD amends it: an object whose `interfaces`, `ips` and `routes` are lists of objects. A
/// plugin that mangled it would otherwise make us drop what it configured. Only ADD reads it:
/// DEL must succeed whatever it is handed.
pub fn prev_result(raw: &Value) -> Result<Option<&Value>, CniError> {
    let prev = match raw.get("prevResult") {
        None | Some(Value::Null) => return Ok(None),
        Some(p @ Value::Object(_)) => p,
        Some(other) => return Err(invalid("prevResult", format!("must be an object, not {other}"))),
    };
    for key in ["interfaces", "ips", "routes"] {
        match prev.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                if let Some(i) = items.iter().position(|v| !v.is_object()) {
                    return Err(invalid(&format!("prevResult.{key}[{i}]"), "must be an object"));
                }
            }
            Some(other) => return Err(invalid(&format!("prevResult.{key}"), format!("must be a list, not {other}"))),
        }
    }
    Ok(Some(prev))
}

/// A Kubernetes namespace name: an RFC 1123 label.
fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl NetConf {
    /// The node's address on the pod network: the first host of the CIDR.
    pub fn gateway(&self) -> std::net::Ipv4Addr {
        self.pod_cidr.hosts().next().unwrap_or(self.pod_cidr.network())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"cniVersion":"1.1.0","name":"trellis","type":"trellis-cni","podCIDR":"10.244.1.0/24","dataDir":"/var/lib/trellis/cni","mtu":1450}"#;

    #[test]
    fn the_documented_config_parses() {
        let c = parse(GOOD.as_bytes()).unwrap();
        assert_eq!(c.pod_cidr.to_string(), "10.244.1.0/24");
        assert_eq!(c.gateway().to_string(), "10.244.1.1");
        assert_eq!((c.mtu, c.agent_socket), (1450, None));
        assert_eq!(c.exclude_namespaces, ["kube-system", "istio-system"]);
        let c = parse(GOOD.replace("}", r#","excludeNamespaces":["infra","kube-system"]}"#).as_bytes()).unwrap();
        assert_eq!(c.exclude_namespaces, ["infra", "kube-system"]);
        let c = parse(GOOD.replace("}", r#","excludeNamespaces":[]}"#).as_bytes()).unwrap();
        assert!(c.exclude_namespaces.is_empty());
        let c = parse(GOOD.replace("1.1.0", "1.0.0").as_bytes()).unwrap();
        assert_eq!(c.cni_version, "1.0.0");
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let cases: &[(&str, &str, &str, u32)] = &[
            ("\"podCIDR\":\"10.244.1.0/24\"", "\"podCIDR\":\"10.244.1.0/33\"", "podCIDR", INVALID_CONFIG),
            ("\"podCIDR\":\"10.244.1.0/24\"", "\"podCIDR\":\"10.244.1.7/24\"", "podCIDR", INVALID_CONFIG),
            ("\"podCIDR\":\"10.244.1.0/24\",", "", "podCIDR", INVALID_CONFIG),
            ("\"mtu\":1450", "\"mtu\":70000", "mtu", INVALID_CONFIG),
            ("\"mtu\":1450", "\"mtu\":\"big\"", "mtu", INVALID_CONFIG),
            ("\"dataDir\":\"/var/lib/trellis/cni\"", "\"dataDir\":\"relative\"", "dataDir", INVALID_CONFIG),
            ("\"name\":\"trellis\"", "\"name\":\"../x\"", "name", INVALID_CONFIG),
            ("\"name\":\"trellis\"", "\"name\":\"..\"", "name", INVALID_CONFIG),
            ("\"podCIDR\":\"10.244.1.0/24\"", "\"podCIDR\":\"0.0.0.0/0\"", "podCIDR", INVALID_CONFIG),
            ("\"podCIDR\":\"10.244.1.0/24\"", "\"podCIDR\":\"10.0.0.0/8\"", "podCIDR", INVALID_CONFIG),
            ("\"name\":\"trellis\"", "\"name\":7", "name", INVALID_CONFIG),
            ("\"cniVersion\":\"1.1.0\"", "\"cniVersion\":\"0.3.1\"", "cniVersion", INCOMPATIBLE_VERSION),
            ("{", "[", "config", INVALID_CONFIG),
            ("\"mtu\":1450", "\"mtu\":1450,\"excludeNamespaces\":\"kube-system\"", "excludeNamespaces", INVALID_CONFIG),
            (
                "\"mtu\":1450",
                "\"mtu\":1450,\"excludeNamespaces\":[\"ok\",\"Bad_NS\"]",
                "excludeNamespaces[1]",
                INVALID_CONFIG,
            ),
            ("\"mtu\":1450", "\"mtu\":1450,\"excludeNamespaces\":[7]", "excludeNamespaces[0]", INVALID_CONFIG),
        ];
        for (from, to, field, code) in cases {
            let text = GOOD.replacen(from, to, 1);
            let e = parse(text.as_bytes()).unwrap_err();
            assert_eq!(e.code, *code, "{text}: {e:?}");
            assert!(e.msg.starts_with(field), "{text}: {}", e.msg);
        }
    }

    #[test]
    fn a_bad_prev_result_names_the_field() {
        for (prev, field) in [
            (r#"[]"#, "prevResult"),
            (r#"{"ips":{}}"#, "prevResult.ips"),
            (r#"{"interfaces":[{},"eth9"]}"#, "prevResult.interfaces[1]"),
        ] {
            let text = GOOD.replacen("}", &format!(r#","prevResult":{prev}}}"#), 1);
            let conf = parse(text.as_bytes()).expect("only ADD reads prevResult");
            let e = prev_result(&conf.raw).unwrap_err();
            assert_eq!(e.code, INVALID_CONFIG);
            assert!(e.msg.starts_with(field), "{text}: {}", e.msg);
        }
        let conf = parse(GOOD.as_bytes()).unwrap();
        assert!(prev_result(&conf.raw).unwrap().is_none());
    }
}
