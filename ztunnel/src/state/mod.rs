//! What ztunnel knows about the mesh, indexed the ways the proxy looks it up: workloads by uid and
//! by IP, services by name and by VIP, policies by name.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use trellis_proto::istio::security::Authorization;
use trellis_proto::istio::workload::{address, Service, Workload};
use trellis_proto::trellis::pod::v1::PodMembership;

pub mod policy;
pub mod validate;

#[derive(Default, Debug)]
pub struct State {
    workloads: HashMap<String, Workload>,
    workload_by_ip: HashMap<IpAddr, String>,
    services: HashMap<String, Service>,
    service_by_vip: HashMap<IpAddr, String>,
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

    pub fn workload_by_ip(&self, addr: IpAddr) -> Option<&Workload> {
        self.workloads.get(self.workload_by_ip.get(&addr)?)
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.get(name)
    }

    pub fn service_by_vip(&self, addr: IpAddr) -> Option<&Service> {
        self.services.get(self.service_by_vip.get(&addr)?)
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
        self.remove_address(name);
        match addr {
            address::Type::Workload(w) => {
                for a in w.addresses.iter().filter_map(|b| ip(b)) {
                    self.workload_by_ip.insert(a, name.to_string());
                }
                for svc in w.services.keys() {
                    self.endpoints.entry(svc.clone()).or_default().insert(name.to_string());
                }
                self.workloads.insert(name.to_string(), w);
            }
            address::Type::Service(s) => {
                for a in s.addresses.iter().filter_map(|n| ip(&n.address)) {
                    self.service_by_vip.insert(a, name.to_string());
                }
                self.services.insert(name.to_string(), s);
            }
        }
    }

    pub fn remove_address(&mut self, name: &str) {
        if let Some(w) = self.workloads.remove(name) {
            for a in w.addresses.iter().filter_map(|b| ip(b)) {
                if self.workload_by_ip.get(&a).is_some_and(|n| n == name) {
                    self.workload_by_ip.remove(&a);
                }
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
                if self.service_by_vip.get(&a).is_some_and(|n| n == name) {
                    self.service_by_vip.remove(&a);
                }
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
