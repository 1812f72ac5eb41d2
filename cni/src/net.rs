//! Netlink work for one attachment: the node bridge, the veth pair, and the pod side (name,
//! address, default route), through `rtnetlink`.
//!
//! The pod side is configured from a thread that has entered the pod's network namespace and
//! opened its own netlink socket there; a netlink socket talks to the namespace it was created in.

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::error::{io, netlink, CniError, CHECK_FAILED, NETNS};

pub const BRIDGE: &str = "trellis0";
const ENODEV: i32 = -libc::ENODEV;
const EEXIST: i32 = -libc::EEXIST;

/// One netlink session in the current (or a given) namespace on a private runtime.
pub fn with_netlink<T, F, Fut>(netns: Option<&Path>, f: F) -> Result<T, CniError>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T, CniError>>,
{
    let ns = match netns {
        Some(p) => Some(File::open(p).map_err(|e| CniError::new(NETNS, format!("netns {}: {e}", p.display())))?),
        None => None,
    };
    std::thread::scope(|s| {
        s.spawn(move || {
            if let Some(ns) = &ns {
                // SAFETY: setns on an open namespace fd; affects only this scoped thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(CniError::new(NETNS, format!("entering netns: {}", std::io::Error::last_os_error())));
                }
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().map_err(|e| io("runtime", e))?;
            rt.block_on(async move {
                let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| io("netlink socket", e))?;
                tokio::spawn(conn);
                f(handle).await
            })
        })
        .join()
        .unwrap_or_else(|_| Err(CniError::new(crate::error::NETLINK, "netlink worker panicked")))
    })
}

fn code(e: &rtnetlink::Error) -> i32 {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.raw_code(),
        _ => 0,
    }
}

pub async fn link(h: &Handle, name: &str) -> Result<Option<LinkMessage>, CniError> {
    match h.link().get().match_name(name.to_string()).execute().try_next().await {
        Ok(m) => Ok(m),
        Err(e) if code(&e) == ENODEV => Ok(None),
        Err(e) => Err(netlink(&format!("looking up {name}"), e)),
    }
}

pub fn mac(l: &LinkMessage) -> String {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(b) => Some(b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":")),
            _ => None,
        })
        .unwrap_or_default()
}

/// The node side: bridge `trellis0` holding the gateway address, with a fixed MAC, up. Idempotent.
pub async fn ensure_bridge(h: &Handle, gateway: Ipv4Addr, prefix: u8, mtu: u32) -> Result<u32, CniError> {
    let br = match link(h, BRIDGE).await? {
        Some(l) => {
            pin_mac(h, &l).await?;
            l
        }
        None => {
            let bridge = LinkBridge::new(BRIDGE).mtu(mtu).address(bridge_mac(gateway).to_vec()).up().build();
            match h.link().add(bridge).execute().await {
                Ok(()) => {}
                Err(e) if code(&e) == EEXIST => {} // a concurrent ADD created it
                Err(e) => return Err(netlink("creating bridge", e)),
            }
            link(h, BRIDGE).await?.ok_or_else(|| CniError::new(crate::error::NETLINK, "bridge vanished"))?
        }
    };
    let idx = br.header.index;
    match h.address().add(idx, IpAddr::V4(gateway), prefix).execute().await {
        Ok(()) => {}
        Err(e) if code(&e) == EEXIST => {}
        Err(e) => return Err(netlink("adding the gateway address", e)),
    }
    h.link().set(LinkUnspec::new_with_index(idx).up().build()).execute().await.map_err(|e| netlink("bridge up", e))?;
    Ok(idx)
}

/// The bridge's MAC address: locally administered, `0a:58` and then the gateway's IPv4 address,
/// so a re-created bridge answers with the address its pods have cached.
///
/// It must be set explicitly. A Linux bridge whose address was never set takes the lowest of its
/// ports' addresses, so a new pod's veth can change it; every other pod on the node then keeps
/// sending to the old gateway address, which the bridge drops, until its ARP entry expires: tens
/// of seconds in which established connections leaving the node stall.
pub fn bridge_mac(gateway: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = gateway.octets();
    [0x0a, 0x58, a, b, c, d]
}

/// A bridge that still follows its ports (made by an earlier version, or by hand) gets its
/// current address set explicitly: that stops it following them without changing what its pods
/// have cached. Setting it is skipped once done, because each set makes the node flush its ARP
/// entries on the bridge.
async fn pin_mac(h: &Handle, bridge: &LinkMessage) -> Result<(), CniError> {
    // NET_ADDR_SET in the kernel's `addr_assign_type`; unreadable counts as not set.
    const SET_BY_USER: &str = "3";
    let assigned = std::fs::read_to_string(format!("/sys/class/net/{BRIDGE}/addr_assign_type")).unwrap_or_default();
    if assigned.trim() == SET_BY_USER {
        return Ok(());
    }
    let Some(current) = bridge.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) => Some(b.clone()),
        _ => None,
    }) else {
        return Ok(());
    };
    let pin = LinkUnspec::new_with_index(bridge.header.index).address(current).build();
    h.link().set(pin).execute().await.map_err(|e| netlink("fixing the bridge's MAC address", e))
}

/// A short, stable host-side name per attachment (interface names are at most 15 bytes).
pub fn host_name(container: &str, ifname: &str) -> String {
    let mut h: u32 = 0x811c9dc5;
    for b in container.bytes().chain([0]).chain(ifname.bytes()) {
        h = (h ^ b as u32).wrapping_mul(0x01000193);
    }
    format!("trl{h:08x}")
}

/// Creates the veth pair, attaches the host side to the bridge, and moves the peer into the pod
/// namespace. Returns the host-side MAC.
pub async fn add_veth(h: &Handle, host: &str, bridge: u32, mtu: u32, netns: &Path) -> Result<String, CniError> {
    // A retried ADD: start from scratch (deleting one end removes both).
    if let Some(old) = link(h, host).await? {
        let _ = h.link().del(old.header.index).execute().await;
    }
    let peer = format!("tmp{}", &host[3..]);
    h.link()
        .add(LinkVeth::new(host, &peer).mtu(mtu).build())
        .execute()
        .await
        .map_err(|e| netlink("creating the veth pair", e))?;
    let ns = File::open(netns).map_err(|e| CniError::new(NETNS, format!("netns {}: {e}", netns.display())))?;
    let peer_idx =
        link(h, &peer).await?.ok_or_else(|| CniError::new(crate::error::NETLINK, "veth peer vanished"))?.header.index;
    h.link()
        .set(LinkUnspec::new_with_index(peer_idx).setns_by_fd(ns.as_raw_fd()).build())
        .execute()
        .await
        .map_err(|e| netlink("moving the veth into the pod netns", e))?;
    let host_link = link(h, host).await?.ok_or_else(|| CniError::new(crate::error::NETLINK, "host veth vanished"))?;
    h.link()
        .set(LinkUnspec::new_with_index(host_link.header.index).controller(bridge).up().build())
        .execute()
        .await
        .map_err(|e| netlink("attaching the veth to the bridge", e))?;
    Ok(mac(&host_link))
}

/// Deletes the host side (and with it the pod side); a missing link is fine.
pub async fn del_veth(h: &Handle, host: &str) -> Result<(), CniError> {
    if let Some(l) = link(h, host).await? {
        match h.link().del(l.header.index).execute().await {
            Ok(()) => {}
            Err(e) if code(&e) == ENODEV => {}
            Err(e) => return Err(netlink("deleting the veth", e)),
        }
    }
    Ok(())
}

/// Inside the pod: rename the peer to `ifname`, address it, bring it and `lo` up, and route
/// everything via the gateway. Returns the pod-side MAC.
pub async fn configure_pod(
    h: &Handle,
    peer: &str,
    ifname: &str,
    ip: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
    mtu: u32,
) -> Result<String, CniError> {
    let l = link(h, peer)
        .await?
        .ok_or_else(|| CniError::new(crate::error::NETLINK, format!("{peer} not in the pod netns")))?;
    let idx = l.header.index;
    h.link()
        .set(LinkUnspec::new_with_index(idx).name(ifname.to_string()).mtu(mtu).build())
        .execute()
        .await
        .map_err(|e| netlink("renaming", e))?;
    h.address().add(idx, IpAddr::V4(ip), prefix).execute().await.map_err(|e| netlink("adding the pod address", e))?;
    h.link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .map_err(|e| netlink("pod interface up", e))?;
    if let Some(lo) = link(h, "lo").await? {
        h.link()
            .set(LinkUnspec::new_with_index(lo.header.index).up().build())
            .execute()
            .await
            .map_err(|e| netlink("lo up", e))?;
    }
    let route = RouteMessageBuilder::<Ipv4Addr>::new().gateway(gateway).output_interface(idx).build();
    h.route().add(route).replace().execute().await.map_err(|e| netlink("adding the default route", e))?;
    Ok(mac(&l))
}

/// CHECK inside the pod: the interface is up, holds `ip/prefix`, and the default route goes via
/// the gateway.
pub async fn check_pod(h: &Handle, ifname: &str, ip: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> Result<(), CniError> {
    let fail = |m: String| CniError::new(CHECK_FAILED, m);
    let l = link(h, ifname).await?.ok_or_else(|| fail(format!("interface {ifname} is missing")))?;
    if !l.header.flags.contains(LinkFlags::Up) {
        return Err(fail(format!("interface {ifname} is down")));
    }
    let mut addrs = h.address().get().set_link_index_filter(l.header.index).execute();
    let mut found = false;
    while let Some(a) = addrs.try_next().await.map_err(|e| netlink("listing addresses", e))? {
        let has = a.attributes.iter().any(
            |at| matches!(at, rtnetlink::packet_route::address::AddressAttribute::Address(IpAddr::V4(v)) if *v == ip),
        );
        found |= has && a.header.prefix_len == prefix;
    }
    if !found {
        return Err(fail(format!("interface {ifname} does not hold {ip}/{prefix}")));
    }
    let mut routes = h.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    while let Some(r) = routes.try_next().await.map_err(|e| netlink("listing routes", e))? {
        let default = r.header.destination_prefix_length == 0;
        let via =
            r.attributes.iter().any(|at| matches!(at, RouteAttribute::Gateway(RouteAddress::Inet(g)) if *g == gateway));
        if default && via {
            return Ok(());
        }
    }
    Err(fail(format!("no default route via {gateway}")))
}
