//! Connection slots. The node has `--max-connections` of them; a source (the client's address:
//! a local pod outbound, the calling pod inbound) may hold at most `--max-connections-per-source`
//! at once, so one misbehaving or compromised client cannot take the slots every other pod on
//! the node needs. HBONE peers wait for their TLS handshake in a separate, smaller budget of the
//! same shape (see [`crate::proxy`]), so a peer that has proven nothing holds no connection slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Admission {
    node: Arc<Semaphore>,
    per_source: usize,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// Which limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The node is at `--max-connections`.
    Node,
    /// The source holds `--max-connections-per-source` already.
    Source,
}

impl Refused {
    /// The `reason` label of `trellis_connections_rejected_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Node => "overload",
            Refused::Source => "source_limit",
        }
    }

    /// The `reason` label when the handshake budget refused it.
    pub fn handshake_reason(self) -> &'static str {
        match self {
            Refused::Node => "handshake_overload",
            Refused::Source => "handshake_source_limit",
        }
    }
}

/// One admitted connection's slot, node and source; both are given back when it is dropped.
pub struct Slot {
    _node: OwnedSemaphorePermit,
    source: IpAddr,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.source);
            }
        }
    }
}

impl Admission {
    /// `per_source` is at least 1.
    pub fn new(max: usize, per_source: usize) -> Admission {
        Admission { node: Arc::new(Semaphore::new(max)), per_source: per_source.max(1), held: Arc::default() }
    }

    pub fn admit(&self, source: IpAddr) -> Result<Slot, Refused> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.get(&source).copied().unwrap_or(0);
        if n >= self.per_source {
            return Err(Refused::Source);
        }
        let node = self.node.clone().try_acquire_owned().map_err(|_| Refused::Node)?;
        held.insert(source, n + 1);
        Ok(Slot { _node: node, source, held: self.held.clone() })
    }

    /// Sources holding at least one slot.
    #[cfg(test)]
    fn sources(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_gets_its_share_and_the_node_its_cap() {
        let a = Admission::new(5, 3);
        let held_a: Vec<Slot> = (0..3).map(|_| a.admit(ip("10.0.0.1")).unwrap()).collect();
        assert_eq!(a.admit(ip("10.0.0.1")).err(), Some(Refused::Source));
        let held_b: Vec<Slot> = (0..2).map(|_| a.admit(ip("10.0.0.2")).unwrap()).collect();
        assert_eq!(a.admit(ip("10.0.0.2")).err(), Some(Refused::Node), "the node is full before b's share");
        assert_eq!(a.admit(ip("10.0.0.1")).err(), Some(Refused::Source), "a's own limit is checked first");
        drop(held_a);
        assert_eq!(a.sources(), 1, "a source with nothing held is forgotten");
        assert!(a.admit(ip("10.0.0.2")).is_ok(), "slots come back");
        drop(held_b);
    }

    #[test]
    fn a_refusal_takes_nothing() {
        let a = Admission::new(1, 1);
        let first = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.2")).err(), Some(Refused::Node));
        assert_eq!(a.sources(), 1, "the refused source holds nothing");
        drop(first);
        assert_eq!(a.sources(), 0);
        assert!(a.admit(ip("10.0.0.2")).is_ok());
    }
}
