//! Outbound destination resolution: pure, over [`State`], table-tested.
//!
//! A Service VIP resolves to one healthy endpoint (round robin by the caller's counter) and its
//! target port; a workload IP resolves to that workload; anything else is outside the mesh.
//! Meshed (HBONE) endpoints are reached through their 15008; others in plain TCP.

use std::net::{IpAddr, SocketAddr};

use hbone::Identity;
use trellis_proto::istio::workload::{Service, TunnelProtocol, Workload, WorkloadStatus};
use trellis_proto::trellis::pod::v1::PodMembership;

use crate::state::{ip, State};

pub const HBONE_PORT: u16 = 15008;

/// What telemetry and policy need to know about a workload, cheap to clone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub namespace: String,
    /// canonical service (the `app` label, by default)
    pub app: String,
    pub identity: Option<Identity>,
}

/// What telemetry calls the workload: the one the pod belongs to (its Deployment, say), as the
/// control plane names it, so that series outlive pods; the pod's own name if it sent none.
pub fn workload_name(w: &Workload) -> &str {
    if w.workload_name.is_empty() {
        &w.name
    } else {
        &w.workload_name
    }
}

impl Peer {
    pub fn of(w: &Workload) -> Peer {
        Peer {
            name: workload_name(w).to_string(),
            namespace: w.namespace.clone(),
            app: w.canonical_name.clone(),
            identity: identity(w),
        }
    }

    /// An inbound caller at `addr` whose verified identity is `identity` (if any): the workload at
    /// that address when it carries the identity, else just the identity. Never what the caller
    /// says of itself (HBONE `baggage`): any holder of a mesh certificate could put a fresh name
    /// in every tunnel, and each would become metric series that are never removed.
    pub fn at(state: &State, addr: IpAddr, identity: Option<Identity>) -> Peer {
        match state.workload_by_ip(addr).map(Peer::of) {
            Some(p) if p.identity.is_some() && p.identity == identity => p,
            _ => Peer {
                namespace: identity.as_ref().map(|i| i.namespace.clone()).unwrap_or_default(),
                identity,
                ..Peer::default()
            },
        }
    }

    /// A meshed pod not yet known as a workload (it has no IP in the control plane yet).
    pub fn of_membership(m: &PodMembership) -> Peer {
        Peer {
            name: m.name.clone(),
            namespace: m.namespace.clone(),
            app: String::new(),
            identity: identity_of(&m.trust_domain, &m.namespace, &m.service_account),
        }
    }
}

/// The SPIFFE identity a workload's certificate carries.
pub fn identity(w: &Workload) -> Option<Identity> {
    identity_of(&w.trust_domain, &w.namespace, &w.service_account)
}

/// The SPIFFE identity of a service account; an empty trust domain means `cluster.local`.
pub fn identity_of(trust_domain: &str, namespace: &str, service_account: &str) -> Option<Identity> {
    if service_account.is_empty() || namespace.is_empty() {
        return None;
    }
    let td = if trust_domain.is_empty() { "cluster.local" } else { trust_domain };
    Some(Identity { trust_domain: td.into(), namespace: namespace.into(), service_account: service_account.into() })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// An HBONE tunnel to `addr` (`podIP:15008`) for `authority` (`podIP:targetPort`); the server
    /// must prove one of `identities`.
    Hbone { addr: SocketAddr, authority: SocketAddr, identities: Vec<Identity>, peer: Peer, service: Option<String> },
    /// Plain TCP to a workload that is not in the mesh.
    Direct { addr: SocketAddr, peer: Peer, service: Option<String> },
    /// Not a mesh address: forwarded untouched.
    Passthrough(SocketAddr),
    /// A Service VIP with no healthy endpoint.
    NoEndpoint { service: String },
}

fn first_ip(w: &Workload, family_of: IpAddr) -> Option<IpAddr> {
    let ips = w.addresses.iter().filter_map(|b| ip(b));
    ips.clone().find(|a| a.is_ipv4() == family_of.is_ipv4()).or_else(|| ips.clone().next())
}

fn to_workload(w: &Workload, ip: IpAddr, port: u16, svc: Option<&Service>) -> Route {
    let peer = Peer::of(w);
    let service = svc.map(|s| s.hostname.clone());
    if w.tunnel_protocol != TunnelProtocol::Hbone as i32 {
        return Route::Direct { addr: SocketAddr::new(ip, port), peer, service };
    }
    let mut identities: Vec<Identity> = peer.identity.iter().cloned().collect();
    for san in svc.map(|s| s.subject_alt_names.as_slice()).unwrap_or_default() {
        if let Ok(id) = Identity::parse(san) {
            if !identities.contains(&id) {
                identities.push(id);
            }
        }
    }
    Route::Hbone {
        addr: SocketAddr::new(ip, HBONE_PORT),
        authority: SocketAddr::new(ip, port),
        identities,
        peer,
        service,
    }
}

/// The port a workload serves a Service's `port` on, or `None` when the Service names its target
/// port (target 0) and this workload has no port of that name: as in Kubernetes, it is then not an
/// endpoint for that port, rather than being sent traffic on a port it may not serve.
fn target_port(svc: &Service, w: &Workload, port: u16) -> Option<u16> {
    let key = format!("{}/{}", svc.namespace, svc.hostname);
    let from_workload = w.services.get(&key).and_then(|l| l.ports.iter().find(|p| p.service_port == port as u32));
    let from_service = svc.ports.iter().find(|p| p.service_port == port as u32);
    let target = match (from_workload.map(|p| p.target_port).filter(|t| *t != 0), from_service) {
        (Some(t), _) => t,
        (None, Some(p)) if p.target_port != 0 => p.target_port,
        (None, Some(_)) => return None,
        // Not a port of the Service: sent on as addressed.
        (None, None) => return Some(port),
    };
    u16::try_from(target).ok()
}

/// Resolves `dst` as the pod behind `src` would reach it. `pick` chooses among endpoints.
pub fn outbound(state: &State, dst: SocketAddr, pick: usize) -> Route {
    if let Some(svc) = state.service_by_vip(dst.ip()) {
        let key = format!("{}/{}", svc.namespace, svc.hostname);
        let healthy: Vec<(&Workload, u16)> = state
            .endpoints(&key)
            .filter(|w| w.status == WorkloadStatus::Healthy as i32)
            .filter_map(|w| Some((w, target_port(svc, w, dst.port())?)))
            .collect();
        if healthy.is_empty() {
            return Route::NoEndpoint { service: key };
        }
        let (w, port) = healthy[pick % healthy.len()];
        return match first_ip(w, dst.ip()) {
            Some(ip) => to_workload(w, ip, port, Some(svc)),
            None => Route::NoEndpoint { service: key },
        };
    }
    match state.workload_by_ip(dst.ip()) {
        Some(w) => to_workload(w, dst.ip(), dst.port(), None),
        None => Route::Passthrough(dst),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use trellis_proto::istio::workload::{address, NetworkAddress, Port, PortList};

    fn ipb(s: &str) -> Vec<u8> {
        match s.parse::<IpAddr>().unwrap() {
            IpAddr::V4(v) => v.octets().to_vec(),
            IpAddr::V6(v) => v.octets().to_vec(),
        }
    }

    fn pod(name: &str, addr: &str, hbone: bool, healthy: bool, svc: Option<(u32, u32)>) -> Workload {
        let mut services = HashMap::new();
        if let Some((sp, tp)) = svc {
            services.insert(
                "demo/echo.demo.svc.cluster.local".to_string(),
                PortList { ports: vec![Port { service_port: sp, target_port: tp }] },
            );
        }
        Workload {
            uid: format!("c//v1/Pod/demo/{name}"),
            name: name.into(),
            namespace: "demo".into(),
            service_account: "echo".into(),
            trust_domain: "cluster.local".into(),
            addresses: vec![ipb(addr)],
            tunnel_protocol: if hbone { TunnelProtocol::Hbone } else { TunnelProtocol::None } as i32,
            status: if healthy { WorkloadStatus::Healthy } else { WorkloadStatus::Unhealthy } as i32,
            services,
            ..Default::default()
        }
    }

    fn state(pods: Vec<Workload>) -> State {
        let mut s = State::default();
        for p in pods {
            s.upsert_address(&p.uid.clone(), address::Type::Workload(p));
        }
        s.upsert_address(
            "demo/echo.demo.svc.cluster.local",
            address::Type::Service(Service {
                name: "echo".into(),
                namespace: "demo".into(),
                hostname: "echo.demo.svc.cluster.local".into(),
                addresses: vec![NetworkAddress { network: String::new(), address: ipb("10.96.0.20") }],
                // 81 has a named target port: resolved per workload.
                ports: vec![Port { service_port: 80, target_port: 8080 }, Port { service_port: 81, target_port: 0 }],
                subject_alt_names: vec!["spiffe://cluster.local/ns/demo/sa/extra".into()],
                ..Default::default()
            }),
        );
        s
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn vip_round_robins_over_healthy_endpoints_with_target_port() {
        let s = state(vec![
            pod("a", "10.244.1.5", true, true, Some((80, 8080))),
            pod("b", "10.244.2.5", true, true, Some((80, 9090))),
            pod("sick", "10.244.2.6", true, false, Some((80, 8080))),
        ]);
        let picked: Vec<SocketAddr> = (0..4)
            .map(|i| match outbound(&s, addr("10.96.0.20:80"), i) {
                Route::Hbone { authority, addr: a, identities, .. } => {
                    assert_eq!(a.port(), HBONE_PORT);
                    assert_eq!(identities.len(), 2, "workload identity plus the service SAN");
                    authority
                }
                r => panic!("unexpected {r:?}"),
            })
            .collect();
        assert_eq!(picked[0], addr("10.244.1.5:8080"));
        assert_eq!(picked[1], addr("10.244.2.5:9090"));
        assert_eq!(picked[2], picked[0]);
    }

    #[test]
    fn service_port_falls_back_to_service_target_port() {
        let s = state(vec![pod("a", "10.244.1.5", true, true, Some((80, 0)))]);
        assert!(
            matches!(outbound(&s, addr("10.96.0.20:80"), 0), Route::Hbone { authority, .. } if authority == addr("10.244.1.5:8080"))
        );
    }

    #[test]
    fn a_named_target_port_goes_only_to_endpoints_that_have_it() {
        let s = state(vec![
            pod("named", "10.244.1.5", true, true, Some((81, 9000))),
            pod("other", "10.244.2.5", true, true, Some((80, 8080))),
        ]);
        for pick in 0..4 {
            let r = outbound(&s, addr("10.96.0.20:81"), pick);
            assert!(matches!(r, Route::Hbone { authority, .. } if authority == addr("10.244.1.5:9000")), "{r:?}");
        }
        // An endpoint of the Service, without a port of that name.
        let s = state(vec![pod("other", "10.244.2.5", true, true, Some((80, 8080)))]);
        assert_eq!(
            outbound(&s, addr("10.96.0.20:81"), 0),
            Route::NoEndpoint { service: "demo/echo.demo.svc.cluster.local".into() }
        );
        // A port the Service does not list is sent on as addressed.
        assert!(
            matches!(outbound(&s, addr("10.96.0.20:82"), 0), Route::Hbone { authority, .. } if authority == addr("10.244.2.5:82"))
        );
    }

    #[test]
    fn vip_without_healthy_endpoints() {
        let s = state(vec![pod("sick", "10.244.2.6", true, false, Some((80, 8080)))]);
        assert_eq!(
            outbound(&s, addr("10.96.0.20:80"), 0),
            Route::NoEndpoint { service: "demo/echo.demo.svc.cluster.local".into() }
        );
    }

    #[test]
    fn pod_ip_direct_or_hbone_by_tunnel_protocol() {
        let s = state(vec![pod("m", "10.244.1.5", true, true, None), pod("u", "10.244.1.6", false, true, None)]);
        match outbound(&s, addr("10.244.1.5:7000"), 0) {
            Route::Hbone { addr: a, authority, identities, peer, service } => {
                assert_eq!((a, authority), (addr("10.244.1.5:15008"), addr("10.244.1.5:7000")));
                assert_eq!(identities, vec![Identity::parse("spiffe://cluster.local/ns/demo/sa/echo").unwrap()]);
                assert_eq!((peer.name.as_str(), service), ("m", None));
            }
            r => panic!("unexpected {r:?}"),
        }
        assert!(
            matches!(outbound(&s, addr("10.244.1.6:7000"), 0), Route::Direct { addr: a, .. } if a == addr("10.244.1.6:7000"))
        );
    }

    #[test]
    fn telemetry_names_the_owning_workload_and_falls_back_to_the_pod() {
        let mut w = pod("web-5d8f7c9b4-x2k7q", "10.244.1.5", true, true, None);
        assert_eq!(Peer::of(&w).name, "web-5d8f7c9b4-x2k7q", "a control plane that sends no workload name");
        w.workload_name = "web".into();
        assert_eq!(Peer::of(&w).name, "web");
    }

    #[test]
    fn unknown_address_passes_through() {
        let s = state(vec![]);
        assert_eq!(outbound(&s, addr("192.0.2.1:443"), 0), Route::Passthrough(addr("192.0.2.1:443")));
    }

    #[test]
    fn an_inbound_caller_is_named_from_state_only_when_it_carries_the_verified_identity() {
        let s = state(vec![pod("a", "10.244.1.5", true, true, None)]);
        let ip = |a: &str| a.parse::<IpAddr>().unwrap();
        let echo = Identity::parse("spiffe://cluster.local/ns/demo/sa/echo").ok();
        let other = Identity::parse("spiffe://cluster.local/ns/other/sa/x").ok();
        assert_eq!(
            Peer::at(&s, ip("10.244.1.5"), echo.clone()),
            Peer::of(s.workload_by_uid("c//v1/Pod/demo/a").unwrap())
        );
        let bare =
            |id: &Option<Identity>, ns: &str| Peer { namespace: ns.into(), identity: id.clone(), ..Peer::default() };
        assert_eq!(
            Peer::at(&s, ip("10.244.1.5"), other.clone()),
            bare(&other, "other"),
            "another identity at its address"
        );
        assert_eq!(Peer::at(&s, ip("10.244.1.99"), echo.clone()), bare(&echo, "demo"), "no workload at the address");
        assert_eq!(Peer::at(&s, ip("10.244.1.5"), None), Peer::default(), "plaintext names nobody");
    }
}
