//! The policy route both capture modes install in a pod's namespace: packets marked
//! [`STEER_MARK`] are delivered locally whatever their destination, as TPROXY's are.
//!
//! eBPF capture marks the packets it turns around (a pod's outbound flows, whose destination is
//! another host). nftables capture marks the pod's replies to ztunnel's inbound connections,
//! which ztunnel opens from the client's own address so the pod sees who is calling.

use std::io;
use std::net::Ipv4Addr;

use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};

/// The packet mark that selects local delivery; also the id of the routing table it selects.
pub const STEER_MARK: u32 = 0x53a;
const RULE_PRIORITY: u32 = 100;

/// Installs `fwmark STEER_MARK lookup STEER_MARK` and `local 0.0.0.0/0 dev lo table
/// STEER_MARK` in the calling thread's namespace. Idempotent.
pub fn install() -> io::Result<()> {
    netlink(async |h| {
        let rule = h.rule().add().v4().fw_mark(STEER_MARK).table_id(STEER_MARK).priority(RULE_PRIORITY);
        match rule.action(RuleAction::ToTable).execute().await {
            Err(e) if !exists(&e) => return Err(e),
            _ => {}
        }
        match h.route().add(route()).execute().await {
            Err(e) if !exists(&e) => Err(e),
            _ => Ok(()),
        }
    })
}

/// Removes what [`install`] added, so an unenrolled pod's namespace is as we found it.
pub fn remove() -> io::Result<()> {
    netlink(async |h| {
        let _ = h.route().del(route()).execute().await;
        let mut rule = RuleMessage::default();
        rule.header.family = rtnetlink::packet_route::AddressFamily::Inet;
        rule.attributes.push(RuleAttribute::FwMark(STEER_MARK));
        rule.attributes.push(RuleAttribute::Table(STEER_MARK));
        rule.attributes.push(RuleAttribute::Priority(RULE_PRIORITY));
        let _ = h.rule().del(rule).execute().await;
        Ok(())
    })
}

fn route() -> rtnetlink::packet_route::route::RouteMessage {
    use rtnetlink::packet_route::route::{RouteScope, RouteType};
    rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .output_interface(1) // loopback is always ifindex 1 in a namespace
        .table_id(STEER_MARK)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .build()
}

/// Runs `f` on a private runtime: callers are on a namespace's thread, outside any runtime.
fn netlink<T>(f: impl AsyncFnOnce(rtnetlink::Handle) -> Result<T, rtnetlink::Error>) -> io::Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    rt.block_on(async move {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        f(handle).await.map_err(|e| io::Error::other(format!("netlink: {e}")))
    })
}

fn exists(e: &rtnetlink::Error) -> bool {
    crate::netlink::errno(e) == -libc::EEXIST
}
