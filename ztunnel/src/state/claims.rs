//! Address → owner index for addresses that can briefly have two owners.
//!
//! Kubernetes hands a deleted pod's IP to a new pod, and a Service VIP can be reallocated, while
//! the old owner is still in ztunnel's state: its removal may arrive after the new owner's
//! addition, and it may even be updated in between. A plain map would then point the address at
//! whichever owner was written last and lose it entirely when that one is removed, so traffic to
//! the live owner would stop being recognised as mesh traffic. Every claim is kept instead, and
//! the caller picks among the claimants.

use std::collections::HashMap;
use std::net::IpAddr;

/// One owner's claim on an address. `since` orders owners by when ztunnel first learned of
/// them (not by their last update), so an update to a departing owner cannot win the address
/// back from its successor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub owner: String,
    pub since: u64,
}

#[derive(Default, Debug)]
pub struct Claims {
    by_addr: HashMap<IpAddr, Vec<Claim>>,
}

impl Claims {
    pub fn claim(&mut self, addr: IpAddr, owner: &str, since: u64) {
        let claims = self.by_addr.entry(addr).or_default();
        claims.retain(|c| c.owner != owner);
        claims.push(Claim { owner: owner.to_string(), since });
    }

    pub fn release(&mut self, addr: IpAddr, owner: &str) {
        if let Some(claims) = self.by_addr.get_mut(&addr) {
            claims.retain(|c| c.owner != owner);
            if claims.is_empty() {
                self.by_addr.remove(&addr);
            }
        }
    }

    pub fn claimants(&self, addr: IpAddr) -> &[Claim] {
        self.by_addr.get(&addr).map(Vec::as_slice).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn owners(c: &Claims, addr: &str) -> Vec<String> {
        c.claimants(ip(addr)).iter().map(|c| c.owner.clone()).collect()
    }

    #[test]
    fn an_address_keeps_every_claim_until_each_is_released() {
        let mut c = Claims::default();
        c.claim(ip("10.0.0.1"), "old", 1);
        c.claim(ip("10.0.0.1"), "new", 2);
        assert_eq!(owners(&c, "10.0.0.1"), ["old", "new"]);
        c.release(ip("10.0.0.1"), "old");
        assert_eq!(owners(&c, "10.0.0.1"), ["new"]);
        c.release(ip("10.0.0.1"), "new");
        assert!(c.claimants(ip("10.0.0.1")).is_empty());
        assert!(c.by_addr.is_empty(), "an address nobody claims is forgotten");
    }

    #[test]
    fn claiming_again_replaces_the_owners_claim() {
        let mut c = Claims::default();
        c.claim(ip("10.0.0.1"), "a", 1);
        c.claim(ip("10.0.0.1"), "a", 1);
        assert_eq!(c.claimants(ip("10.0.0.1")), [Claim { owner: "a".into(), since: 1 }]);
        c.release(ip("10.0.0.1"), "someone-else");
        assert_eq!(owners(&c, "10.0.0.1"), ["a"]);
    }
}
