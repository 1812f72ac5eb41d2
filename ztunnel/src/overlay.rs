//! The VXLAN overlay between nodes (the flannel pattern), programmed by the node agent.
//!
//! One device, `trellis.vxlan` (VNI 1, UDP 4789, learning off), carries pod traffic to other
//! nodes. For each remote node learned from istiod-lite (`trellis.node.v1.Node`) it holds:
//!
//! - a route `podCIDR via <podCIDR .0> dev trellis.vxlan onlink`;
//! - a permanent neighbour `<podCIDR .0> → VTEP MAC`;
//! - a permanent FDB entry `VTEP MAC → underlay IP`.
//!
//! A VTEP's MAC is derived from its underlay IP ([`vtep_mac`]), so nodes need not publish it.
//! [`reconcile`] computes the desired entries from state and makes the kernel match: it adds what
//! is missing, replaces what differs and deletes what belongs to no node any more. It runs after
//! every xDS update and periodically, so a restart (or an operator's `ip route del`) converges.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use tokio::sync::watch;

use crate::netlink::errno;
use crate::state::{Node, State};

pub const DEVICE: &str = "trellis.vxlan";
const VNI: u32 = 1;
const PORT: u16 = 4789;
/// IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
const OVERHEAD: u32 = 50;
const RESYNC: Duration = Duration::from_secs(30);
/// Routes we install carry this protocol number, so we never touch anyone else's.
const PROTO: u8 = 0x54; // 'T'

#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    pub node_ip: Ipv4Addr,
}

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("{0}: {1}")]
    Netlink(String, rtnetlink::Error),
    #[error("{0}")]
    Setup(String),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> OverlayError {
    let what = what.into();
    move |e| OverlayError::Netlink(what, e)
}

/// Locally administered unicast MAC `0a:<IPv4>:01`, unique per underlay IP.
pub fn vtep_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, o[0], o[1], o[2], o[3], 0x01]
}

/// What the kernel should hold for one remote pod CIDR.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub cidr: (Ipv4Addr, u8),
    pub gateway: Ipv4Addr,
    pub vtep: Ipv4Addr,
}

fn contains((net, len): (Ipv4Addr, u8), ip: Ipv4Addr) -> bool {
    ipnet::Ipv4Net::new(net, len).is_ok_and(|n| n.contains(&ip))
}

/// The desired entries: every pod CIDR of every other node, and why any was left out. Pure, so it
/// is unit-tested. A CIDR that covers a node's underlay address would route the tunnel into
/// itself, and two overlapping CIDRs would fight over one gateway: such a CIDR is skipped (the
/// smaller address wins an overlap), not installed.
pub fn desired(nodes: &[Node], me: &str, my_ip: Ipv4Addr) -> (Vec<Entry>, Vec<String>) {
    let mut all: Vec<(Entry, &str)> = nodes
        .iter()
        .filter(|n| n.name != me && n.underlay_ip != my_ip)
        .flat_map(|n| {
            n.pod_cidrs.iter().map(move |&(net, len)| {
                (Entry { cidr: (net, len), gateway: net, vtep: n.underlay_ip }, n.name.as_str())
            })
        })
        .collect();
    all.sort();
    all.dedup_by(|a, b| a.0.cidr == b.0.cidr);
    let underlay: Vec<Ipv4Addr> = nodes.iter().map(|n| n.underlay_ip).chain([my_ip]).collect();
    let (mut out, mut skipped): (Vec<Entry>, Vec<String>) = (Vec::new(), Vec::new());
    for (e, node) in all {
        let (net, len) = e.cidr;
        if let Some(ip) = underlay.iter().find(|ip| contains(e.cidr, **ip)) {
            skipped.push(format!("node {node}: pod CIDR {net}/{len} contains the underlay address {ip}"));
        } else if let Some(o) = out.iter().find(|o| contains(o.cidr, net) || contains(e.cidr, o.cidr.0)) {
            skipped.push(format!("node {node}: pod CIDR {net}/{len} overlaps {}/{}", o.cidr.0, o.cidr.1));
        } else {
            out.push(e);
        }
    }
    (out, skipped)
}

fn mtu(l: &LinkMessage) -> u32 {
    l.attributes.iter().find_map(|a| if let LinkAttribute::Mtu(m) = a { Some(*m) } else { None }).unwrap_or(1500)
}

async fn link_index(h: &Handle, name: &str) -> Result<Option<(u32, u32)>, OverlayError> {
    match h.link().get().match_name(name.to_string()).execute().try_next().await {
        Ok(Some(l)) => Ok(Some((l.header.index, mtu(&l)))),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("looking up {name}"))(e)),
    }
}

/// The interface holding `ip`, and its MTU.
async fn underlay(h: &Handle, ip: Ipv4Addr) -> Result<(u32, u32), OverlayError> {
    let mut addrs = h.address().get().execute();
    while let Some(a) = addrs.try_next().await.map_err(nl("listing addresses"))? {
        let holds = a.attributes.iter().any(|x| matches!(x, AddressAttribute::Local(IpAddr::V4(l)) if *l == ip));
        if holds {
            let mut links = h.link().get().match_index(a.header.index).execute();
            if let Some(l) = links.try_next().await.map_err(nl("looking up the underlay link"))? {
                return Ok((a.header.index, mtu(&l)));
            }
        }
    }
    Err(OverlayError::Setup(format!("--node-ip {ip} is not an address of any interface on this node")))
}

/// What of an existing device differs from what this node needs, if anything: its local address,
/// MAC and MTU all follow the node's underlay, which may have changed since it was made.
fn device_mismatch(l: &LinkMessage, node_ip: Ipv4Addr, want_mtu: u32) -> Option<String> {
    let local = l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => v.iter().find_map(|x| match x {
                InfoVxlan::Local(ip) => Some(*ip),
                _ => None,
            }),
            _ => None,
        }),
        _ => None,
    });
    let mac = l.attributes.iter().find_map(|a| if let LinkAttribute::Address(m) = a { Some(m.clone()) } else { None });
    if local != Some(node_ip) {
        Some(format!("local address {local:?}, not {node_ip}"))
    } else if mac.as_deref() != Some(&vtep_mac(node_ip)[..]) {
        Some(format!("MAC {mac:02x?}, not {:02x?}", vtep_mac(node_ip)))
    } else if mtu(l) != want_mtu {
        Some(format!("MTU {}, not {want_mtu}", mtu(l)))
    } else {
        None
    }
}

/// Creates (or adopts) the VXLAN device and brings it up. Returns its index.
async fn ensure_device(h: &Handle, cfg: &Config) -> Result<u32, OverlayError> {
    let (under_idx, under_mtu) = underlay(h, cfg.node_ip).await?;
    let mtu = under_mtu.saturating_sub(OVERHEAD);
    let existing = match h.link().get().match_name(DEVICE.to_string()).execute().try_next().await {
        Ok(l) => l,
        Err(e) if errno(&e) == -libc::ENODEV => None,
        Err(e) => return Err(nl(format!("looking up {DEVICE}"))(e)),
    };
    if let Some(l) = existing {
        let idx = l.header.index;
        match device_mismatch(&l, cfg.node_ip, mtu) {
            None => {
                h.link().set(LinkUnspec::new_with_index(idx).up().build()).execute().await.map_err(nl("overlay up"))?;
                return Ok(idx);
            }
            // Left from before the node's address or MTU changed: peers would address frames to
            // a MAC it does not have. Recreated below; reconcile re-adds its entries.
            Some(why) => {
                tracing::warn!(device = DEVICE, why, "overlay device does not match this node; recreating it");
                h.link().del(idx).execute().await.map_err(nl(format!("deleting {DEVICE}")))?;
            }
        }
    }
    let msg = LinkVxlan::new(DEVICE, VNI)
        .dev(under_idx)
        .local(cfg.node_ip)
        .port(PORT)
        .learning(false)
        .mtu(mtu)
        .address(vtep_mac(cfg.node_ip).to_vec())
        .up()
        .build();
    match h.link().add(msg).execute().await {
        Ok(()) => {}
        Err(e) if errno(&e) == -libc::EEXIST => {}
        Err(e) => return Err(nl(format!("creating {DEVICE}"))(e)),
    }
    let (idx, _) = link_index(h, DEVICE).await?.ok_or_else(|| OverlayError::Setup(format!("{DEVICE} vanished")))?;
    tracing::info!(device = DEVICE, vni = VNI, port = PORT, mtu, local = %cfg.node_ip, "overlay device created");
    Ok(idx)
}

fn route_dst(r: &RouteMessage) -> Option<(Ipv4Addr, u8)> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(d)) => Some((*d, r.header.destination_prefix_length)),
        _ => None,
    })
}

fn neighbour_dst(n: &NeighbourMessage) -> Option<Ipv4Addr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => Some(*d),
        _ => None,
    })
}

fn neighbour_lladdr(n: &NeighbourMessage) -> Option<Vec<u8>> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) => Some(l.clone()),
        _ => None,
    })
}

/// Makes the kernel's overlay entries match `want`. Returns (added or replaced, removed).
pub async fn reconcile(h: &Handle, cfg: &Config, want: &[Entry]) -> Result<(usize, usize), OverlayError> {
    let idx = ensure_device(h, cfg).await?;
    let (mut added, mut removed) = (0, 0);

    // Removals first, so a CIDR that moved to another node is re-pointed cleanly.
    let want_cidrs: BTreeSet<(Ipv4Addr, u8)> = want.iter().map(|e| e.cidr).collect();
    let want_gw: BTreeSet<Ipv4Addr> = want.iter().map(|e| e.gateway).collect();
    let want_macs: BTreeSet<[u8; 6]> = want.iter().map(|e| vtep_mac(e.vtep)).collect();

    let mut routes = h.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    let mut stale_routes = Vec::new();
    let mut have_routes = BTreeSet::new();
    while let Some(r) = routes.try_next().await.map_err(nl("listing routes"))? {
        let ours = r.header.protocol == RouteProtocol::Other(PROTO)
            && r.attributes.iter().any(|a| matches!(a, RouteAttribute::Oif(i) if *i == idx));
        if !ours {
            continue;
        }
        match route_dst(&r) {
            Some(d) if want_cidrs.contains(&d) => {
                have_routes.insert(d);
            }
            _ => stale_routes.push(r),
        }
    }
    for r in stale_routes {
        h.route().del(r).execute().await.map_err(nl("deleting a stale overlay route"))?;
        removed += 1;
    }

    let mut neighbours = h.neighbours().get().set_address_family(AddressFamily::Inet).execute();
    let mut stale = Vec::new();
    let mut have_neigh = BTreeSet::new();
    while let Some(n) = neighbours.try_next().await.map_err(nl("listing neighbours"))? {
        if n.header.ifindex != idx {
            continue;
        }
        match neighbour_dst(&n) {
            Some(d) if want_gw.contains(&d) => {
                have_neigh.insert((d, neighbour_lladdr(&n)));
            }
            _ => stale.push(n),
        }
    }
    let mut fdb = h.neighbours().get().set_address_family(AddressFamily::Bridge).execute();
    let mut have_fdb = BTreeSet::new();
    while let Some(n) = fdb.try_next().await.map_err(nl("listing the FDB"))? {
        if n.header.ifindex != idx {
            continue;
        }
        let mac = neighbour_lladdr(&n).and_then(|m| <[u8; 6]>::try_from(m).ok());
        match (mac, neighbour_dst(&n)) {
            (Some(m), Some(d)) if want_macs.contains(&m) => {
                have_fdb.insert((m, d));
            }
            // The all-zero default entry is the kernel's; everything else here is ours.
            (Some([0, 0, 0, 0, 0, 0]), _) => {}
            _ => stale.push(n),
        }
    }
    for n in stale {
        match h.neighbours().del(n).execute().await {
            Ok(()) => removed += 1,
            Err(e) if errno(&e) == -libc::ENOENT => {}
            Err(e) => return Err(nl("deleting a stale overlay neighbour")(e)),
        }
    }

    // One entry the kernel refuses must not keep the others out: each is tried, and the first
    // failure is reported after all have been.
    let mut first_failure = None;
    for e in want {
        match add_entry(h, idx, e, &have_fdb, &have_neigh, &have_routes).await {
            Ok(n) => added += n,
            Err(err) => {
                tracing::warn!(cidr = %format!("{}/{}", e.cidr.0, e.cidr.1), vtep = %e.vtep, error = %err, "overlay entry not installed");
                first_failure.get_or_insert(err);
            }
        }
    }
    match first_failure {
        Some(err) => Err(err),
        None => Ok((added, removed)),
    }
}

/// Installs what is missing of one entry: FDB, neighbour, route. Returns how many were added.
async fn add_entry(
    h: &Handle,
    idx: u32,
    e: &Entry,
    have_fdb: &BTreeSet<([u8; 6], Ipv4Addr)>,
    have_neigh: &BTreeSet<(Ipv4Addr, Option<Vec<u8>>)>,
    have_routes: &BTreeSet<(Ipv4Addr, u8)>,
) -> Result<usize, OverlayError> {
    let mut added = 0;
    let mac = vtep_mac(e.vtep);
    if !have_fdb.contains(&(mac, e.vtep)) {
        h.neighbours()
            .add_bridge(idx, &mac)
            .destination(IpAddr::V4(e.vtep))
            .flags(NeighbourFlags::Own)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("FDB entry for {}", e.vtep)))?;
        added += 1;
    }
    if !have_neigh.contains(&(e.gateway, Some(mac.to_vec()))) {
        h.neighbours()
            .add(idx, IpAddr::V4(e.gateway))
            .link_layer_address(&mac)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("neighbour {}", e.gateway)))?;
        added += 1;
    }
    if !have_routes.contains(&e.cidr) {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(e.cidr.0, e.cidr.1)
            .gateway(e.gateway)
            .output_interface(idx)
            .protocol(RouteProtocol::Other(PROTO))
            .onlink()
            .build();
        h.route().add(route).replace().execute().await.map_err(nl(format!("route to {}/{}", e.cidr.0, e.cidr.1)))?;
        added += 1;
    }
    Ok(added)
}

fn enable_forwarding() {
    // Pods on this node reach other nodes through it; Kubernetes nodes require forwarding anyway.
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
        tracing::warn!(error = %e, "could not enable net.ipv4.ip_forward; cross-node pod traffic will not flow");
    }
}

/// Reconciles after every state change and every [`RESYNC`], until dropped.
pub async fn run(cfg: Config, state: Arc<RwLock<State>>, mut changes: watch::Receiver<u64>) {
    let (conn, h, _) = match rtnetlink::new_connection() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "overlay disabled: cannot open a netlink socket");
            return;
        }
    };
    tokio::spawn(conn);
    enable_forwarding();
    let mut last: Option<Vec<Entry>> = None;
    let mut last_skipped = Vec::new();
    loop {
        let (want, skipped) = {
            let s = state.read().unwrap_or_else(|e| e.into_inner());
            desired(&s.nodes().cloned().collect::<Vec<_>>(), &cfg.node_name, cfg.node_ip)
        };
        if skipped != last_skipped {
            for why in &skipped {
                tracing::warn!(why, "overlay: pod CIDR not routed");
            }
            last_skipped = skipped;
        }
        match reconcile(&h, &cfg, &want).await {
            Ok((added, removed)) => {
                if added + removed > 0 || last.as_ref() != Some(&want) {
                    tracing::info!(remote_cidrs = want.len(), added, removed, "overlay reconciled");
                }
                last = Some(want);
            }
            Err(e) => tracing::warn!(error = %e, "overlay reconcile failed; retrying"),
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(RESYNC) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: [u8; 4], cidr: [u8; 4]) -> Node {
        Node { name: name.into(), underlay_ip: ip.into(), pod_cidrs: vec![(cidr.into(), 24)] }
    }

    #[test]
    fn desired_skips_self_and_sorts() {
        let nodes = vec![
            node("n3", [172, 30, 0, 13], [10, 244, 3, 0]),
            node("n1", [172, 30, 0, 11], [10, 244, 1, 0]),
            node("n2", [172, 30, 0, 12], [10, 244, 2, 0]),
        ];
        let (d, skipped) = desired(&nodes, "n1", Ipv4Addr::new(172, 30, 0, 11));
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].cidr, (Ipv4Addr::new(10, 244, 2, 0), 24));
        assert_eq!(d[0].vtep, Ipv4Addr::new(172, 30, 0, 12));
        assert_eq!(d[1].gateway, Ipv4Addr::new(10, 244, 3, 0));
    }

    #[test]
    fn cidrs_that_overlap_or_cover_an_underlay_address_are_skipped() {
        let mut n4 = node("n4", [172, 30, 0, 14], [10, 244, 2, 0]);
        n4.pod_cidrs = vec![([10, 244, 2, 0].into(), 23)];
        let nodes = vec![
            node("n1", [172, 30, 0, 11], [10, 244, 1, 0]),
            node("n2", [172, 30, 0, 12], [10, 244, 2, 0]),
            node("n3", [172, 30, 0, 13], [172, 30, 0, 0]),
            n4,
            node("n5", [172, 30, 0, 15], [10, 244, 5, 0]),
        ];
        let (d, skipped) = desired(&nodes, "n1", Ipv4Addr::new(172, 30, 0, 11));
        let cidrs: Vec<String> = d.iter().map(|e| format!("{}/{}", e.cidr.0, e.cidr.1)).collect();
        assert_eq!(cidrs, ["10.244.2.0/23", "10.244.5.0/24"]);
        assert_eq!(
            skipped,
            [
                "node n2: pod CIDR 10.244.2.0/24 overlaps 10.244.2.0/23",
                "node n3: pod CIDR 172.30.0.0/24 contains the underlay address 172.30.0.11",
            ]
        );
    }

    #[test]
    fn vtep_macs_are_local_unicast_and_distinct() {
        let a = vtep_mac(Ipv4Addr::new(172, 30, 0, 11));
        let b = vtep_mac(Ipv4Addr::new(172, 30, 0, 12));
        assert_ne!(a, b);
        assert_eq!(a[0] & 0b11, 0b10, "locally administered, unicast");
    }
}
