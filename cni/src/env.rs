//! The runtime's side of a call: `CNI_*` environment variables.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::error::{CniError, INVALID_ENV};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

#[derive(Debug, Clone)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, …).
    pub args: HashMap<String, String>,
}

fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 16
        && s != "."
        && s != ".."
        // '%' would make the kernel pick a name from a template ("eth%d" becomes "eth0").
        && !s.contains(['/', ':', '%'])
        && !s.contains(char::is_whitespace)
}

/// Parses the environment (`get` is `std::env::var` in the binary, a map in tests).
pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
    let bad = |m: String| CniError::new(INVALID_ENV, m);
    let command = match get("CNI_COMMAND").as_deref() {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("STATUS") => Command::Status,
        Some("GC") => Command::Gc,
        Some("VERSION") => Command::Version,
        Some(other) => return Err(bad(format!("CNI_COMMAND: unknown command {other:?}"))),
        None => return Err(bad("CNI_COMMAND is not set".into())),
    };
    let per_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
    let container_id = get("CNI_CONTAINERID").unwrap_or_default();
    if per_attachment && container_id.is_empty() {
        return Err(bad("CNI_CONTAINERID is required".into()));
    }
    let starts_ok = container_id.chars().next().is_none_or(|c| c.is_ascii_alphanumeric());
    if !starts_ok || !container_id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
        return Err(bad(format!(
            "CNI_CONTAINERID: {container_id:?} must start with a letter or digit and contain only letters, digits, '_', '.' and '-'"
        )));
    }
    let ifname = get("CNI_IFNAME").unwrap_or_default();
    if per_attachment && !valid_ifname(&ifname) {
        return Err(bad(format!("CNI_IFNAME: {ifname:?} is not a valid interface name")));
    }
    let netns = get("CNI_NETNS").filter(|s| !s.is_empty()).map(PathBuf::from);
    if matches!(command, Command::Add | Command::Check) && netns.is_none() {
        return Err(bad("CNI_NETNS is required".into()));
    }
    let mut args = HashMap::new();
    for kv in get("CNI_ARGS").unwrap_or_default().split(';').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').ok_or_else(|| bad(format!("CNI_ARGS: {kv:?} is not KEY=VALUE")))?;
        args.insert(k.to_string(), v.to_string());
    }
    Ok(Env { command, container_id, netns, ifname, args })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        parse(|k| m.get(k).cloned())
    }

    #[test]
    fn bad_env_is_code_4_naming_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "CNI_COMMAND"),
            (&[("CNI_COMMAND", "FROB")], "CNI_COMMAND"),
            (&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", "/x")], "CNI_CONTAINERID"),
            (&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1"), ("CNI_NETNS", "/x")], "CNI_IFNAME"),
            (&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "a-very-long-ifname")], "CNI_IFNAME"),
            (&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")], "CNI_NETNS"),
            (&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "../x"), ("CNI_IFNAME", "eth0")], "CNI_CONTAINERID"),
            (&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "-x"), ("CNI_IFNAME", "eth0")], "CNI_CONTAINERID"),
            (
                &[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth%d"), ("CNI_NETNS", "/x")],
                "CNI_IFNAME",
            ),
            (
                &[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0"), ("CNI_ARGS", "junk")],
                "CNI_ARGS",
            ),
        ];
        for (pairs, var) in cases {
            let e = env(pairs).unwrap_err();
            assert_eq!(e.code, INVALID_ENV, "{pairs:?}");
            assert!(e.msg.contains(var), "{pairs:?}: {}", e.msg);
        }
    }

    #[test]
    fn del_without_netns_and_cni_args() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=client"),
        ])
        .unwrap();
        assert_eq!(e.command, Command::Del);
        assert_eq!(e.netns, None);
        assert_eq!(e.args["K8S_POD_NAME"], "client");
    }
}
