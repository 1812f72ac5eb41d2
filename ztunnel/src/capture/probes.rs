//! The node's own health probes (kubelet's HTTP, gRPC and TCP checks) reach meshed pods under
//! STRICT mTLS.
//!
//! A probe is plaintext from the node, so capture would hand it to the 15006 listener, and under
//! STRICT the pod would never become ready. As in Istio ambient, one nftables table in the node's
//! namespace source-NATs TCP that a process on the node opens toward a meshed pod to the
//! link-local [`PROBE_SOURCE`], and both capture modes pass packets from that address straight to
//! the pod. A process on the node already has every pod's network at hand, so this grants it
//! nothing new.
//!
//! Only the node may use the address:
//! - the SNAT rule requires a local socket (`meta skuid`), so a packet the node forwards or
//!   bridges is never rewritten, even when `br_netfilter` runs bridged traffic through the IP
//!   hooks;
//! - packets from [`PROBE_SOURCE`] that the node forwards (from another node) or bridges (from
//!   a pod on this node's bridge) are dropped, so no pod can spoof its way past policy.
//!
//! The set of meshed pods' addresses is replaced as a whole (one transaction) whenever it
//! changes, so it cannot drift from the enrolled pods.

use std::io;
use std::net::Ipv4Addr;

/// The source address node probes carry into meshed pods (Istio ambient's choice).
pub const PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
pub const TABLE: &str = "trellis_node";
const SET: &str = "meshed_pods";

/// The whole node table, with an empty pod set; replaces any table a previous run left.
pub fn ruleset() -> String {
    format!(
        r#"table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  set {SET} {{ type ipv4_addr; }}
  chain probes_from_node {{
    type nat hook postrouting priority srcnat; policy accept;
    ip daddr @{SET} meta l4proto tcp meta skuid >= 0 snat ip to {PROBE_SOURCE}
  }}
  chain spoofed_probes {{
    type filter hook forward priority filter; policy accept;
    ip saddr {PROBE_SOURCE} drop
  }}
}}
table bridge {TABLE}
delete table bridge {TABLE}
table bridge {TABLE} {{
  chain spoofed_probes {{
    type filter hook forward priority filter; policy accept;
    ip saddr {PROBE_SOURCE} drop
  }}
}}
"#
    )
}

/// Replaces the set's contents with `pods`.
pub fn set_contents(pods: &[Ipv4Addr]) -> String {
    let mut script = format!("flush set inet {TABLE} {SET}\n");
    if !pods.is_empty() {
        let list: Vec<String> = pods.iter().map(ToString::to_string).collect();
        script += &format!("add element inet {TABLE} {SET} {{ {} }}\n", list.join(", "));
    }
    script
}

/// Installs the node table in the calling thread's namespace (the node's).
pub fn install() -> io::Result<()> {
    super::nftables::apply(&ruleset())
}

/// Makes the probe SNAT apply to exactly `pods`.
pub fn sync(pods: &[Ipv4Addr]) -> io::Result<()> {
    super::nftables::apply(&set_contents(pods))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_contents_replaces_the_whole_set() {
        assert_eq!(set_contents(&[]), "flush set inet trellis_node meshed_pods\n");
        let two = set_contents(&[Ipv4Addr::new(10, 244, 1, 10), Ipv4Addr::new(10, 244, 1, 20)]);
        assert_eq!(
            two,
            "flush set inet trellis_node meshed_pods\nadd element inet trellis_node meshed_pods { 10.244.1.10, 10.244.1.20 }\n"
        );
    }
}
