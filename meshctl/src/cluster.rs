//! A read-only snapshot of mesh config, from the live API or from files, with the lookups
//! `describe` and `analyze` share.

use std::collections::BTreeMap;

use anyhow::anyhow;
use hyper::Method;
use serde_json::Value;
use trellis_config::object::{AuthorizationPolicy, PeerAuthentication, Pod, Service};
use trellis_config::types::WorkloadSelector;
use trellis_config::{Kind, Object};

use crate::client::Client;

/// Istio's root namespace: policies there apply mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Default)]
pub struct Cluster {
    pub objects: Vec<Object>,
}

/// A workload a selector can match: a Pod or a WorkloadEntry.
pub struct Workload<'a> {
    pub kind: Kind,
    pub namespace: &'a str,
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

impl Cluster {
    /// Every object istiod-lite stores.
    pub async fn fetch(client: &Client) -> anyhow::Result<Cluster> {
        let mut objects = Vec::new();
        for kind in Kind::ALL {
            let r = client.ok(Method::GET, &kind.collection_path(None), None).await?;
            for item in r.body.get("items").and_then(Value::as_array).into_iter().flatten() {
                let o = Object::from_value(item.clone())
                    .map_err(|e| anyhow!("istiod-lite served an invalid {}: {e}", kind.name()))?;
                objects.push(o);
            }
        }
        Ok(Cluster { objects })
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.objects.iter().filter_map(|o| if let Object::Pod(p) = o { Some(p) } else { None })
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.objects.iter().filter_map(|o| if let Object::Service(s) = o { Some(s) } else { None })
    }

    pub fn authorization_policies(&self) -> impl Iterator<Item = &AuthorizationPolicy> {
        self.objects.iter().filter_map(|o| if let Object::AuthorizationPolicy(p) = o { Some(p) } else { None })
    }

    pub fn peer_authentications(&self) -> impl Iterator<Item = &PeerAuthentication> {
        self.objects.iter().filter_map(|o| if let Object::PeerAuthentication(p) = o { Some(p) } else { None })
    }

    pub fn workloads(&self) -> impl Iterator<Item = Workload<'_>> {
        self.objects.iter().filter_map(|o| match o {
            Object::Pod(p) => Some(Workload {
                kind: Kind::Pod,
                namespace: p.metadata.namespace.as_deref().unwrap_or_default(),
                name: &p.metadata.name,
                labels: &p.metadata.labels,
            }),
            Object::WorkloadEntry(w) => Some(Workload {
                kind: Kind::WorkloadEntry,
                namespace: w.metadata.namespace.as_deref().unwrap_or_default(),
                name: &w.metadata.name,
                labels: &w.spec.labels,
            }),
            _ => None,
        })
    }

    pub fn has(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.objects.iter().any(|o| {
            o.kind() == kind && o.meta().name == name && o.meta().namespace.as_deref().unwrap_or_default() == namespace
        })
    }

    pub fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        self.objects
            .iter()
            .find_map(|o| match o {
                Object::Namespace(n) if n.metadata.name == ns => Some(n.metadata.labels.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// Whether a workload is enrolled in the mesh.
    pub fn enrolled(&self, namespace: &str, labels: &BTreeMap<String, String>) -> trellis_config::mesh::Enrollment {
        trellis_config::mesh::enrollment(namespace, labels, &self.namespace_labels(namespace))
    }
}

/// Whether a policy in `policy_ns` with `selector` applies to a workload: same namespace (or the
/// root namespace, mesh-wide) and every selector label present.
pub fn selects(
    policy_ns: &str,
    selector: Option<&WorkloadSelector>,
    workload_ns: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    (policy_ns == workload_ns || policy_ns == ROOT_NAMESPACE)
        && selector.is_none_or(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

pub fn selector_text(selector: Option<&WorkloadSelector>) -> String {
    match selector {
        Some(s) if !s.match_labels.is_empty() => {
            s.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
        }
        _ => String::new(),
    }
}
