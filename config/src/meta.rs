//! Object metadata and identity.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::kind::Kind;

/// Kubernetes `ObjectMeta`. The server owns `uid`, `resourceVersion`, `generation` and
/// `creationTimestamp`; values a client sends for them are replaced, except `resourceVersion`,
/// which is an optimistic-concurrency precondition. What another API server kept about an
/// object it served (`managedFields`, `selfLink`, `deletionTimestamp`,
/// `deletionGracePeriodSeconds`) is accepted, so that `kubectl get -o yaml` output applies as
/// it is, and dropped: it describes that server's bookkeeping, not the object.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Kept as written. A REST create (POST) without a name gets one generated from it; files
    /// applied by meshctl (PUT) still need `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate_name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// What this object belongs to. The controller among them names the workload a Pod is part
    /// of (its Deployment, CronJob, StatefulSet ...) in telemetry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// RFC 3339, UTC, second precision (as Kubernetes writes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// Kept as written. Nothing in Trellis runs finalizers, so a delete is not held up by them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finalizers: Vec<String>,
    #[serde(default, skip_serializing)]
    pub managed_fields: Dropped,
    #[serde(default, skip_serializing)]
    pub self_link: Dropped,
    #[serde(default, skip_serializing)]
    pub deletion_timestamp: Dropped,
    #[serde(default, skip_serializing)]
    pub deletion_grace_period_seconds: Dropped,
}

/// A field another API server owns: read (whatever its value) and never kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped;

impl<'de> Deserialize<'de> for Dropped {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Dropped, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| Dropped)
    }
}

/// Kubernetes `OwnerReference`. The owner need not be stored in Trellis (Deployments and
/// ReplicaSets are not), so its `uid` is optional here.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OwnerReference {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_owner_deletion: Option<bool>,
}

impl ObjectMeta {
    /// The owner that manages this object (`controller: true`); validation allows at most one.
    pub fn controller(&self) -> Option<&OwnerReference> {
        self.owner_references.iter().find(|o| o.controller == Some(true))
    }
}

/// Identity of a stored object: kind, namespace (empty for cluster-scoped kinds) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        let namespace = if kind.namespaced() { namespace.into() } else { String::new() };
        ObjectKey { kind, namespace, name: name.into() }
    }
}

impl fmt::Display for ObjectKey {
    /// `Kind namespace/name`, or `Kind name` for cluster-scoped kinds.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl serde::Serialize for Kind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Kind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown kind {s:?}")))
    }
}
