//! Connection slots for a listener that faces the network: a cap for the whole process, and a
//! smaller one per source address, so one misbehaving or compromised client cannot take the slots
//! every other client needs. An optional unknown-source share caps what sources the caller has
//! not verified may hold together, so a flood from many such addresses leaves known ones the rest.
//!
//! ztunnel admits every proxied connection and tunnel through one, and HBONE handshakes through a
//! smaller one (a peer that has proven nothing holds no connection slot); istiod-lite admits its
//! :15012 TLS handshakes through one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Admission {
    max: usize,
    node: Arc<Semaphore>,
    per_source: usize,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// What unknown sources may hold together; `None`: as much as anyone.
    unknown: Option<Arc<Semaphore>>,
}

/// Which limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The whole cap is taken (ztunnel's `--max-connections`: the node's).
    Node,
    /// The source holds `--max-connections-per-source` already.
    Source,
    /// The source is unknown and unknown sources hold their whole share.
    Unknown,
}

impl Refused {
    /// The `reason` label of `trellis_connections_rejected_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Node => "overload",
            Refused::Source => "source_limit",
            Refused::Unknown => "unknown_source_limit",
        }
    }

    /// The `reason` label when the handshake budget refused it.
    pub fn handshake_reason(self) -> &'static str {
        match self {
            Refused::Node => "handshake_overload",
            Refused::Source => "handshake_source_limit",
            Refused::Unknown => "handshake_unknown_source_limit",
        }
    }
}

/// One admitted connection's slot, process and source (and unknown-source share, if it took one);
/// all are given back when it is dropped.
pub struct Slot {
    _node: OwnedSemaphorePermit,
    _unknown: Option<OwnedSemaphorePermit>,
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
        Admission {
            max,
            node: Arc::new(Semaphore::new(max)),
            per_source: per_source.max(1),
            held: Arc::default(),
            unknown: None,
        }
    }

    /// Lets unknown sources (see [`Admission::admit_unknown`]) hold at most `share` slots between
    /// them, so the rest of the budget stays free for known ones.
    pub fn with_unknown_share(mut self, share: usize) -> Admission {
        self.unknown = Some(Arc::new(Semaphore::new(share)));
        self
    }

    /// A slot for a known source.
    pub fn admit(&self, source: IpAddr) -> Result<Slot, Refused> {
        self.take(source, false)
    }

    /// A slot for a source the caller does not know, taken from the unknown-source share too.
    pub fn admit_unknown(&self, source: IpAddr) -> Result<Slot, Refused> {
        self.take(source, true)
    }

    fn take(&self, source: IpAddr, unknown: bool) -> Result<Slot, Refused> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.get(&source).copied().unwrap_or(0);
        if n >= self.per_source {
            return Err(Refused::Source);
        }
        let share = match (&self.unknown, unknown) {
            (Some(share), true) => Some(share.clone().try_acquire_owned().map_err(|_| Refused::Unknown)?),
            _ => None,
        };
        let node = self.node.clone().try_acquire_owned().map_err(|_| Refused::Node)?;
        held.insert(source, n + 1);
        Ok(Slot { _node: node, _unknown: share, source, held: self.held.clone() })
    }

    /// Slots held now: connections admitted and not yet closed.
    pub fn held(&self) -> usize {
        self.max - self.node.available_permits()
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
        assert_eq!(a.held(), 5);
        assert_eq!(a.admit(ip("10.0.0.1")).err(), Some(Refused::Source), "a's own limit is checked first");
        drop(held_a);
        assert_eq!(a.sources(), 1, "a source with nothing held is forgotten");
        assert!(a.admit(ip("10.0.0.2")).is_ok(), "slots come back");
        drop(held_b);
        assert_eq!(a.held(), 0);
    }

    #[test]
    fn unknown_sources_share_part_of_the_budget() {
        let a = Admission::new(4, 2).with_unknown_share(2);
        let strangers: Vec<Slot> = ["10.0.0.1", "10.0.0.2"].map(|s| a.admit_unknown(ip(s)).unwrap()).into();
        assert_eq!(a.admit_unknown(ip("10.0.0.3")).err(), Some(Refused::Unknown), "the share is taken");
        assert_eq!(a.admit_unknown(ip("10.0.0.1")).err(), Some(Refused::Unknown));
        let mut known: Vec<Slot> = (0..2).map(|_| a.admit(ip("10.0.0.9")).unwrap()).collect();
        assert_eq!(a.admit(ip("10.0.0.8")).err(), Some(Refused::Node), "known sources still meet the node cap");
        drop(strangers);
        known.extend((0..2).map(|_| a.admit(ip("10.0.0.8")).unwrap()));
        assert_eq!(a.admit_unknown(ip("10.0.0.3")).err(), Some(Refused::Node), "a share slot is also a node slot");
        drop(known);
        let again: Vec<Slot> = ["10.0.0.3", "10.0.0.4"].map(|s| a.admit_unknown(ip(s)).unwrap()).into();
        assert_eq!(a.admit_unknown(ip("10.0.0.5")).err(), Some(Refused::Unknown), "no share slot leaked");
        drop(again);
        assert_eq!(a.sources(), 0);

        let unshared = Admission::new(2, 2);
        let _both: Vec<Slot> = (0..2).map(|_| unshared.admit_unknown(ip("10.0.0.1")).unwrap()).collect();
        assert_eq!(unshared.admit_unknown(ip("10.0.0.2")).err(), Some(Refused::Node), "without a share, only the caps");
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
