//! Nodes → `trellis.node.v1.Node`, the overlay's view of the cluster.

use std::net::IpAddr;

use ipnet::IpNet;
use trellis_config::object::Node;
use trellis_proto::trellis::node::v1 as pb;

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// A node is rendered only once it has both an InternalIP and a pod CIDR: without either, no
/// other node can route to its pods, and a half-known node would install a broken route.
pub fn node(n: &Node) -> Option<pb::Node> {
    let underlay = n
        .status
        .iter()
        .flat_map(|s| &s.addresses)
        .find(|a| a.type_ == "InternalIP")
        .and_then(|a| a.address.parse::<IpAddr>().ok())?;
    let cidrs: Vec<pb::Cidr> = n
        .spec
        .pod_cidrs
        .iter()
        .chain(n.spec.pod_cidr.iter())
        .filter_map(|c| c.parse::<IpNet>().ok())
        .map(|c| c.trunc())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|c| pb::Cidr { address: ip_bytes(c.addr()), length: c.prefix_len() as u32 })
        .collect();
    if cidrs.is_empty() {
        return None;
    }
    Some(pb::Node { name: n.metadata.name.clone(), underlay_ip: ip_bytes(underlay), pod_cidrs: cidrs })
}
