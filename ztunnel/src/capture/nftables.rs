//! In-pod nftables capture: the fallback mode (`--capture nftables`).
//!
//! ztunnel opens its 15001/15006/15008 listeners inside the pod's namespace, and one nftables
//! table in that namespace steers the pod's TCP to them with `redirect`, which keeps the original
//! destination in conntrack for `SO_ORIGINAL_DST`:
//!
//! - outbound: every TCP connection the pod opens, except over loopback and except ztunnel's own
//!   (marked) sockets, goes to 15001;
//! - inbound: TCP arriving from outside goes to 15006 (plaintext), except HBONE on 15008, which
//!   ztunnel's 15008 listener receives directly, and the node's own probes, which arrive from
//!   [`PROBE_SOURCE`](super::probes::PROBE_SOURCE) and go to the pod untouched.
//!
//! The table is `inet`, so IPv6 TCP is redirected too, to ports where ztunnel has no IPv6
//! listener: it is refused rather than let around the mesh (the data plane is IPv4 only).
//!
//! Only the first packet of a connection traverses `nat` chains, so replies and established
//! flows are untouched. The table is replaced atomically (one `nft -f` transaction).
//!
//! ztunnel opens its connections to the pod from the client's address (`IP_TRANSPARENT`), so
//! the pod's replies are addressed to a host elsewhere. A `route` chain marks them
//! [`STEER_MARK`](super::local_route::STEER_MARK): conntrack remembers which connections
//! ztunnel opened (they carry its mark), and the policy route delivers marked packets locally.

use std::io::{self, Write};
use std::process::{Command, Stdio};

use crate::netns::Netns;

pub const TABLE: &str = "trellis";

pub fn ruleset(mark: u32) -> String {
    let steer = super::local_route::STEER_MARK;
    let probe = super::probes::PROBE_SOURCE;
    format!(
        r#"table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  chain replies_to_ztunnel {{
    type route hook output priority mangle; policy accept;
    meta mark {mark:#x} ct state new ct mark set {mark:#x}
    ct direction reply ct mark {mark:#x} meta mark set {steer:#x}
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark {mark:#x} return
    oifname "lo" return
    meta l4proto tcp redirect to :15001
  }}
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    iifname "lo" return
    ip saddr {probe} return
    tcp dport 15008 return
    meta l4proto tcp redirect to :15006
  }}
}}
"#
    )
}

/// Applies `script` as one `nft -f` transaction in the calling thread's network namespace.
pub(super) fn apply(script: &str) -> io::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("running nft (is nftables installed?): {e}")))?;
    child.stdin.take().ok_or_else(|| io::Error::other("nft stdin"))?.write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!("nft failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}

fn nft(ns: &Netns, script: String) -> io::Result<()> {
    // Spawned from the namespace worker thread, so `nft` runs inside the pod's namespace.
    ns.run_blocking(move || apply(&script))
}

/// Installs (or replaces) the capture table in `ns`.
pub(super) fn install(ns: &Netns, mark: u32) -> io::Result<()> {
    ns.run_blocking(super::local_route::install)?;
    nft(ns, ruleset(mark))
}

/// Removes the capture table; a missing table is not an error.
pub(super) fn remove(ns: &Netns) -> io::Result<()> {
    nft(ns, format!("table inet {TABLE}\ndelete table inet {TABLE}\n"))?;
    ns.run_blocking(super::local_route::remove)
}
