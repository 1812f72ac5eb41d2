//! Steering an enrolled pod's TCP to ztunnel's listeners inside the pod's namespace.
//!
//! Both modes work in the pod's own network namespace (the in-pod model): outbound connections
//! go to 15001, inbound plaintext to 15006, and HBONE on 15008 reaches its listener directly.
//! ztunnel's own sockets carry the proxy mark and are never captured, and the node's own probes
//! pass untouched ([`probes`]). Capture is installed only after the listeners exist, and removed
//! before they close. (A ztunnel that handed its pods over closes only its own descriptors of
//! their listeners; the sockets stay open with the newer ztunnel.)

pub mod ebpf;
pub mod local_route;
pub mod nftables;
pub mod probes;

use std::io;
use std::sync::Arc;

use crate::netns::Netns;

/// The capture mode chosen with `--capture`.
#[derive(Clone, Debug)]
pub enum Capture {
    Ebpf(Arc<ebpf::Programs>),
    Nftables { mark: u32 },
}

impl Capture {
    pub fn name(&self) -> &'static str {
        match self {
            Capture::Ebpf(_) => "ebpf",
            Capture::Nftables { .. } => "nftables",
        }
    }

    /// Installs (or replaces) capture in `ns`. `key` names the pod's persistent objects.
    pub fn install(&self, ns: &Netns, key: &str) -> io::Result<()> {
        match self {
            Capture::Ebpf(p) => p.install(ns, key),
            Capture::Nftables { mark } => nftables::install(ns, *mark),
        }
    }

    /// Removes capture; `ns` is `None` when the pod's namespace is already gone. Idempotent.
    pub fn remove(&self, ns: Option<&Netns>, key: &str) -> io::Result<()> {
        match (self, ns) {
            (Capture::Ebpf(p), ns) => p.remove(ns, key),
            (Capture::Nftables { .. }, Some(ns)) => nftables::remove(ns),
            // The table lived in the namespace and went with it.
            (Capture::Nftables { .. }, None) => Ok(()),
        }
    }
}
