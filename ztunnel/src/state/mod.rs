//! What ztunnel knows about the mesh, indexed the ways the proxy looks it up: workloads by uid and
//! by IP, services by name and by VIP, policies by name.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use trellis_proto::istio::security::Authorization;
use trellis_proto::istio::workload::{address, Service, Workload, WorkloadStatus};
use trellis_proto::trellis::pod::v1::PodMembership;

mod claims;
pub mod policy;
mod unknown_fields;
pub mod validate;

use claims::Claims;

#[derive(Default, Debug)]
pub struct State {
    workloads: HashMap<String, Workload>,
    workload_by_ip: Claims,
    services: HashMap<String, Service>,
    service_by_vip: Claims,
    /// Address resource name → when it was first seen (a counter), kept across updates.
    first_seen: HashMap<String, u64>,
    seen: u64,
    policies: HashMap<String, Authorization>,
    /// Service name → uids of the workloads that back it.
    endpoints: HashMap<String, BTreeSet<String>>,
    nodes: BTreeMap<String, Node>,
    /// Pod uid → membership, known before the pod has an IP (and so a workload).
    memberships: HashMap<String, PodMembership>,
}

/// A cluster node as the overlay needs it (IPv4 only).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Node {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    /// (network address, prefix length)
    pub pod_cidrs: Vec<(Ipv4Addr, u8)>,
}

pub fn ip(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

impl State {
    pub fn workload_by_uid(&self, uid: &str) -> Option<&Workload> {
        self.workloads.get(uid)
    }

    /// The workload an IP belongs to. When two claim it (a pod's IP reused while the old pod is
    /// still listed), a healthy one wins over an unhealthy one, then the one seen most recently.
    pub fn workload_by_ip(&self, addr: IpAddr) -> Option<&Workload> {
        self.workload_by_ip
            .claimants(addr)
            .iter()
            .filter_map(|c| Some((self.workloads.get(&c.owner)?, c.since)))
            .max_by_key(|(w, since)| (w.status == WorkloadStatus::Healthy as i32, *since))
            .map(|(w, _)| w)
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.get(name)
    }

    /// The service a VIP belongs to; while a reallocated VIP still has its old service listed,
    /// the one seen most recently.
    pub fn service_by_vip(&self, addr: IpAddr) -> Option<&Service> {
        let newest = self.service_by_vip.claimants(addr).iter().max_by_key(|c| c.since)?;
        self.services.get(&newest.owner)
    }

    /// The workloads backing a service, in uid order.
    pub fn endpoints(&self, service: &str) -> impl Iterator<Item = &Workload> {
        self.endpoints.get(service).into_iter().flatten().filter_map(|uid| self.workloads.get(uid))
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    pub fn policies(&self) -> impl Iterator<Item = (&String, &Authorization)> {
        self.policies.iter()
    }

    pub fn policy(&self, name: &str) -> Option<&Authorization> {
        self.policies.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn upsert_node(&mut self, n: Node) {
        self.nodes.insert(n.name.clone(), n);
    }

    pub fn remove_node(&mut self, name: &str) {
        self.nodes.remove(name);
    }

    pub fn membership(&self, uid: &str) -> Option<&PodMembership> {
        self.memberships.get(uid)
    }

    pub fn upsert_membership(&mut self, m: PodMembership) {
        self.memberships.insert(m.uid.clone(), m);
    }

    pub fn remove_membership(&mut self, uid: &str) {
        self.memberships.remove(uid);
    }

    /// (workloads, services, policies)
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.workloads.len(), self.services.len(), self.policies.len())
    }

    /// Inserts or replaces an Address resource under its xDS name.
    pub fn upsert_address(&mut self, name: &str, addr: address::Type) {
        self.unindex(name);
        let since = match self.first_seen.get(name) {
            Some(since) => *since,
            None => {
                self.seen += 1;
                self.first_seen.insert(name.to_string(), self.seen);
                self.seen
            }
        };
        match addr {
            address::Type::Workload(w) => {
                for a in w.addresses.iter().filter_map(|b| ip(b)) {
                    self.workload_by_ip.claim(a, name, since);
                }
                for svc in w.services.keys() {
                    self.endpoints.entry(svc.clone()).or_default().insert(name.to_string());
                }
                self.workloads.insert(name.to_string(), w);
            }
            address::Type::Service(s) => {
                for a in s.addresses.iter().filter_map(|n| ip(&n.address)) {
                    self.service_by_vip.claim(a, name, since);
                }
                self.services.insert(name.to_string(), s);
            }
        }
    }

    pub fn remove_address(&mut self, name: &str) {
        self.unindex(name);
        self.first_seen.remove(name);
    }

    /// Drops the resource and its index entries, leaving the claims of others on its addresses.
    fn unindex(&mut self, name: &str) {
        if let Some(w) = self.workloads.remove(name) {
            for a in w.addresses.iter().filter_map(|b| ip(b)) {
                self.workload_by_ip.release(a, name);
            }
            for svc in w.services.keys() {
                if let Some(set) = self.endpoints.get_mut(svc) {
                    set.remove(name);
                    if set.is_empty() {
                        self.endpoints.remove(svc);
                    }
                }
            }
        }
        if let Some(s) = self.services.remove(name) {
            for a in s.addresses.iter().filter_map(|n| ip(&n.address)) {
                self.service_by_vip.release(a, name);
            }
        }
    }

    pub fn upsert_policy(&mut self, name: &str, p: Authorization) {
        self.policies.insert(name.to_string(), p);
    }

    pub fn remove_policy(&mut self, name: &str) {
        self.policies.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::istio::workload::NetworkAddress;

    const IP: &str = "10.244.1.7";

    fn pod(uid: &str, healthy: bool) -> address::Type {
        let status = if healthy { WorkloadStatus::Healthy } else { WorkloadStatus::Unhealthy };
        address::Type::Workload(Workload {
            uid: uid.into(),
            addresses: vec![IP.parse::<Ipv4Addr>().unwrap().octets().to_vec()],
            status: status as i32,
            ..Default::default()
        })
    }

    fn owner(s: &State) -> Option<&str> {
        s.workload_by_ip(IP.parse().unwrap()).map(|w| w.uid.as_str())
    }

    #[test]
    fn a_reused_pod_ip_stays_with_the_new_pod_while_the_old_one_is_updated_and_removed() {
        let mut s = State::default();
        s.upsert_address("old", pod("old", true));
        s.upsert_address("new", pod("new", true));
        assert_eq!(owner(&s), Some("new"));
        // The old pod's update does not win the address back: age is first sight, not last write.
        s.upsert_address("old", pod("old", true));
        assert_eq!(owner(&s), Some("new"));
        s.remove_address("old");
        assert_eq!(owner(&s), Some("new"), "the old pod's removal leaves the new pod indexed");
        s.remove_address("new");
        assert_eq!(owner(&s), None);
    }

    #[test]
    fn a_healthy_claimant_wins_over_a_newer_unhealthy_one() {
        let mut s = State::default();
        s.upsert_address("running", pod("running", true));
        s.upsert_address("starting", pod("starting", false));
        assert_eq!(owner(&s), Some("running"));
        s.upsert_address("running", pod("running", false));
        assert_eq!(owner(&s), Some("starting"), "between unhealthy claimants the newer wins");
        s.remove_address("starting");
        assert_eq!(owner(&s), Some("running"));
    }

    #[test]
    fn a_removed_and_re_added_resource_counts_as_new() {
        let mut s = State::default();
        s.upsert_address("a", pod("a", true));
        s.upsert_address("b", pod("b", true));
        s.remove_address("a");
        s.upsert_address("a", pod("a", true));
        assert_eq!(owner(&s), Some("a"));
    }

    #[test]
    fn a_reallocated_vip_belongs_to_the_newer_service_until_it_is_removed() {
        let svc = |name: &str| {
            address::Type::Service(Service {
                name: name.into(),
                addresses: vec![NetworkAddress {
                    address: IP.parse::<Ipv4Addr>().unwrap().octets().to_vec(),
                    ..Default::default()
                }],
                ..Default::default()
            })
        };
        let vip = |s: &State| s.service_by_vip(IP.parse().unwrap()).map(|s| s.name.clone());
        let mut s = State::default();
        s.upsert_address("ns/old", svc("old"));
        s.upsert_address("ns/new", svc("new"));
        s.upsert_address("ns/old", svc("old"));
        assert_eq!(vip(&s).as_deref(), Some("new"));
        s.remove_address("ns/new");
        assert_eq!(vip(&s).as_deref(), Some("old"));
        s.remove_address("ns/old");
        assert_eq!(vip(&s), None);
    }
}
