//! Store objects → workload-discovery resources. Pure: no I/O, deterministic output.
//!
//! [`Translator`] keeps an indexed [`World`] and, for each store event, works out which resources
//! depend on the changed object ([`Target`]s), re-renders only those and reports them. The cache
//! then drops the ones whose bytes did not change, so a one-pod change reaches clients as one
//! resource.

pub mod grpc;
pub mod membership;
pub mod node;
pub mod policy;
#[cfg(test)]
mod tests;
pub mod workload;
pub mod world;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use trellis_config::{selector, Kind, Object, ObjectKey};
use trellis_proto::istio::workload as wl;

use super::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, NODE_TYPE_URL, POD_MEMBERSHIP_TYPE_URL};
use crate::store::{Event, EventType};
pub use world::World;

#[derive(Clone, Debug)]
pub struct Settings {
    /// Istio's default cluster id is `Kubernetes`.
    pub cluster_id: String,
    pub trust_domain: String,
    pub domain_suffix: String,
    /// Policies here without a selector apply mesh-wide.
    pub root_namespace: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cluster_id: "Kubernetes".into(),
            trust_domain: "cluster.local".into(),
            domain_suffix: "cluster.local".into(),
            root_namespace: "istio-system".into(),
        }
    }
}

/// A resource that may need re-rendering.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Workload(ObjectKey),
    /// A Pod's [`membership`], rendered alongside its workload.
    Membership(ObjectKey),
    Service(ObjectKey),
    Policy(ObjectKey),
    PeerPolicy(ObjectKey),
    Node(ObjectKey),
    StaticStrict,
}

/// One rendered resource: type, name, and encoded body (`None` = removed).
pub type Output = (&'static str, String, Option<Bytes>);

pub struct Translator {
    world: World,
    settings: Settings,
    /// gRPC resources last rendered per namespace, so a re-render can also report removals.
    grpc_rendered: HashMap<String, BTreeSet<(&'static str, String)>>,
}

impl Translator {
    pub fn new(settings: Settings) -> Self {
        Translator { world: World::default(), settings, grpc_rendered: HashMap::new() }
    }

    /// Loads a full snapshot and renders everything.
    pub fn load(&mut self, objects: impl IntoIterator<Item = Arc<Object>>) -> Vec<Output> {
        let mut targets = BTreeSet::from([Target::StaticStrict]);
        for o in objects {
            targets.insert(self.own_target(&o));
            if o.kind() == Kind::Pod {
                targets.insert(Target::Membership(o.key()));
            }
            self.world.upsert(o);
        }
        let mut out: Vec<Output> = targets.into_iter().filter_map(|t| self.render(&t)).collect();
        let namespaces: BTreeSet<String> = self.world.namespaces().collect();
        out.extend(self.render_grpc(namespaces));
        out
    }

    /// Re-renders the gRPC resources of `namespaces`; names no longer produced are removals.
    fn render_grpc(&mut self, namespaces: BTreeSet<String>) -> Vec<Output> {
        let mut out = Vec::new();
        for ns in namespaces {
            let rendered = grpc::render_namespace(&self.world, &self.settings, &ns);
            let names: BTreeSet<(&'static str, String)> = rendered.iter().map(|(t, n, _)| (*t, n.clone())).collect();
            let previous = self.grpc_rendered.remove(&ns).unwrap_or_default();
            out.extend(previous.difference(&names).map(|(t, n)| (*t, n.clone(), None)));
            out.extend(rendered);
            if !names.is_empty() {
                self.grpc_rendered.insert(ns, names);
            }
        }
        out
    }

    /// Applies a batch of store events and renders what they affect.
    pub fn apply(&mut self, events: &[Event]) -> Vec<Output> {
        let mut targets = BTreeSet::new();
        let mut grpc_namespaces = BTreeSet::new();
        for ev in events {
            // Dependents are found against both the old and the new state: a workload that stops
            // matching a selector must be re-rendered as much as one that starts.
            let old = match ev.kind {
                EventType::Added => None,
                EventType::Modified => ev.previous.clone(),
                EventType::Deleted => Some(ev.object.clone()),
            };
            if let Some(o) = &old {
                self.dependents(o, &mut targets);
                grpc::affected_namespaces(&self.world, &self.settings, o, &mut grpc_namespaces);
            }
            match ev.kind {
                EventType::Deleted => self.world.remove(&ev.object.key()),
                _ => self.world.upsert(ev.object.clone()),
            }
            if ev.kind != EventType::Deleted {
                self.dependents(&ev.object, &mut targets);
                grpc::affected_namespaces(&self.world, &self.settings, &ev.object, &mut grpc_namespaces);
            }
        }
        let mut out: Vec<Output> = targets.into_iter().filter_map(|t| self.render(&t)).collect();
        out.extend(self.render_grpc(grpc_namespaces));
        out
    }

    fn own_target(&self, o: &Object) -> Target {
        let key = o.key();
        match o.kind() {
            Kind::Pod | Kind::WorkloadEntry => Target::Workload(key),
            Kind::Service => Target::Service(key),
            Kind::AuthorizationPolicy => Target::Policy(key),
            Kind::PeerAuthentication => Target::PeerPolicy(key),
            Kind::Node => Target::Node(key),
            _ => Target::StaticStrict,
        }
    }

    fn workloads_in(&self, ns: Option<&str>, mut keep: impl FnMut(&Object) -> bool, out: &mut BTreeSet<Target>) {
        for kind in [Kind::Pod, Kind::WorkloadEntry] {
            let objs: Vec<&Arc<Object>> = match ns {
                Some(ns) => self.world.in_namespace(kind, ns).collect(),
                None => self.world.all(kind),
            };
            for o in objs {
                if keep(o) {
                    out.insert(Target::Workload(o.key()));
                }
            }
        }
    }

    /// Everything whose rendering reads `o`.
    fn dependents(&self, o: &Object, out: &mut BTreeSet<Target>) {
        let key = o.key();
        let root = self.settings.root_namespace.clone();
        match o {
            Object::Pod(_) => {
                out.insert(Target::Membership(key.clone()));
                out.insert(Target::Workload(key));
            }
            Object::WorkloadEntry(_) => {
                out.insert(Target::Workload(key));
            }
            Object::Service(s) => {
                out.insert(Target::Service(key.clone()));
                if let Some(sel) = s.spec.selector.clone().filter(|s| !s.is_empty()) {
                    self.workloads_in(Some(&key.namespace), |w| selector::matches(&sel, workload_labels(w)), out);
                }
            }
            Object::Namespace(_) => {
                self.workloads_in(Some(&key.name), |_| true, out);
                out.extend(self.world.in_namespace(Kind::Pod, &key.name).map(|p| Target::Membership(p.key())));
            }
            Object::Node(_) => {
                out.insert(Target::Node(key));
            }
            Object::AuthorizationPolicy(ap) => {
                out.insert(Target::Policy(key.clone()));
                if let Some(sel) = ap.spec.selector.as_ref().filter(|s| !s.match_labels.is_empty()) {
                    let ns = (key.namespace != root).then_some(key.namespace.as_str());
                    self.workloads_in(ns, |w| selector::matches(&sel.match_labels, workload_labels(w)), out);
                }
            }
            Object::PeerAuthentication(_) => {
                out.insert(Target::PeerPolicy(key.clone()));
                let ns = (key.namespace != root).then_some(key.namespace.as_str());
                self.workloads_in(ns, |_| true, out);
            }
            _ => {}
        }
    }

    fn render(&self, t: &Target) -> Option<Output> {
        let s = &self.settings;
        Some(match t {
            Target::Workload(key) => {
                let name = workload::uid(s, key);
                let body =
                    self.world.get(key).and_then(|o| workload::workload(&self.world, s, o)).map(|w| {
                        Bytes::from(wl::Address { r#type: Some(wl::address::Type::Workload(w)) }.encode_to_vec())
                    });
                (ADDRESS_TYPE_URL, name, body)
            }
            Target::Membership(key) => {
                let body = match self.world.get(key).map(|o| o.as_ref()) {
                    Some(Object::Pod(p)) => membership::membership(&self.world, s, key, p),
                    _ => None,
                };
                (POD_MEMBERSHIP_TYPE_URL, workload::uid(s, key), body.map(|m| Bytes::from(m.encode_to_vec())))
            }
            Target::Service(key) => {
                let name = workload::service_name(s, key);
                let body = match self.world.get(key).map(|o| o.as_ref()) {
                    Some(Object::Service(svc)) => Some(Bytes::from(
                        wl::Address { r#type: Some(wl::address::Type::Service(workload::service(s, svc))) }
                            .encode_to_vec(),
                    )),
                    _ => None,
                };
                (ADDRESS_TYPE_URL, name, body)
            }
            Target::Policy(key) => {
                let name = policy::resource_name(&key.namespace, &key.name);
                let body = match self.world.get(key).map(|o| o.as_ref()) {
                    Some(Object::AuthorizationPolicy(ap)) => {
                        policy::authorization(s, ap).map(|a| Bytes::from(a.encode_to_vec()))
                    }
                    _ => None,
                };
                (AUTHORIZATION_TYPE_URL, name, body)
            }
            Target::PeerPolicy(key) => {
                let name = policy::resource_name(&key.namespace, &format!("{}{}", policy::CONVERTED_PREFIX, key.name));
                let body = match self.world.get(key).map(|o| o.as_ref()) {
                    Some(Object::PeerAuthentication(pa)) => policy::converted_peer_authentication(&self.world, s, pa)
                        .map(|a| Bytes::from(a.encode_to_vec())),
                    _ => None,
                };
                (AUTHORIZATION_TYPE_URL, name, body)
            }
            Target::Node(key) => {
                let body = match self.world.get(key).map(|o| o.as_ref()) {
                    Some(Object::Node(n)) => node::node(n).map(|n| Bytes::from(n.encode_to_vec())),
                    _ => None,
                };
                (NODE_TYPE_URL, key.name.clone(), body)
            }
            Target::StaticStrict => (
                AUTHORIZATION_TYPE_URL,
                policy::resource_name(&s.root_namespace, policy::STATIC_STRICT),
                Some(Bytes::from(policy::static_strict(s).encode_to_vec())),
            ),
        })
    }
}

fn workload_labels(o: &Object) -> &std::collections::BTreeMap<String, String> {
    match o {
        Object::WorkloadEntry(w) if !w.spec.labels.is_empty() => &w.spec.labels,
        other => &other.meta().labels,
    }
}
