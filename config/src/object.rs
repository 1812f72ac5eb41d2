//! [`Object`]: one typed resource of any stored kind, and its conversion from untyped JSON.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{FieldError, Invalid};
use crate::kind::Kind;
use crate::meta::{ObjectKey, ObjectMeta};
use crate::types::*;
use crate::validate;

/// A Kubernetes-shaped resource with a typed spec and status.
/// Status is opaque `Value` for kinds whose status Trellis does not read.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[serde(bound(
    serialize = "S: Serialize + Default + PartialEq, T: Serialize",
    deserialize = "S: Deserialize<'de> + Default, T: Deserialize<'de>"
))]
pub struct Resource<S, T = Value> {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "is_default")]
    pub spec: S,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<T>,
}

fn is_default<S: Default + PartialEq>(s: &S) -> bool {
    *s == S::default()
}

pub type Namespace = Resource<EmptySpec>;
pub type Node = Resource<NodeSpec, NodeStatus>;
pub type ServiceAccount = Resource<EmptySpec>;
pub type Service = Resource<ServiceSpec>;
pub type Pod = Resource<PodSpec, PodStatus>;
pub type WorkloadEntry = Resource<WorkloadEntrySpec>;
pub type PeerAuthentication = Resource<PeerAuthenticationSpec>;
pub type AuthorizationPolicy = Resource<AuthorizationPolicySpec>;
pub type Gateway = Resource<GatewaySpec>;
pub type HttpRoute = Resource<HttpRouteSpec>;
pub type GrpcRoute = Resource<GrpcRouteSpec>;

#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    Node(Node),
    ServiceAccount(ServiceAccount),
    Service(Service),
    Pod(Pod),
    WorkloadEntry(WorkloadEntry),
    PeerAuthentication(PeerAuthentication),
    AuthorizationPolicy(AuthorizationPolicy),
    Gateway(Gateway),
    HttpRoute(HttpRoute),
    GrpcRoute(GrpcRoute),
}

/// Applies one expression to whichever resource an [`Object`] holds.
macro_rules! each {
    ($obj:expr, $r:ident => $e:expr) => {
        match $obj {
            Object::Namespace($r) => $e,
            Object::Node($r) => $e,
            Object::ServiceAccount($r) => $e,
            Object::Service($r) => $e,
            Object::Pod($r) => $e,
            Object::WorkloadEntry($r) => $e,
            Object::PeerAuthentication($r) => $e,
            Object::AuthorizationPolicy($r) => $e,
            Object::Gateway($r) => $e,
            Object::HttpRoute($r) => $e,
            Object::GrpcRoute($r) => $e,
        }
    };
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Node(_) => Kind::Node,
            Object::ServiceAccount(_) => Kind::ServiceAccount,
            Object::Service(_) => Kind::Service,
            Object::Pod(_) => Kind::Pod,
            Object::WorkloadEntry(_) => Kind::WorkloadEntry,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::Gateway(_) => Kind::Gateway,
            Object::HttpRoute(_) => Kind::HttpRoute,
            Object::GrpcRoute(_) => Kind::GrpcRoute,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        each!(self, r => &r.metadata)
    }

    pub fn meta_mut(&mut self) -> &mut ObjectMeta {
        each!(self, r => &mut r.metadata)
    }

    pub fn key(&self) -> ObjectKey {
        let m = self.meta();
        ObjectKey::new(self.kind(), m.namespace.clone().unwrap_or_default(), m.name.clone())
    }

    /// True when the desired state differs: spec (and status, which Trellis treats as input,
    /// e.g. a Pod's IP). Drives `metadata.generation`.
    pub fn spec_differs(&self, other: &Object) -> bool {
        fn parts<S: Serialize, T: Serialize>(r: &Resource<S, T>) -> (Value, Value) {
            (
                serde_json::to_value(&r.spec).unwrap_or(Value::Null),
                serde_json::to_value(&r.status).unwrap_or(Value::Null),
            )
        }
        let a = each!(self, r => parts(r));
        let b = each!(other, r => parts(r));
        self.kind() != other.kind() || a != b
    }

    pub fn to_value(&self) -> Value {
        // Serializing plain data structs into a `Value` cannot fail (string map keys only).
        each!(self, r => serde_json::to_value(r).unwrap_or(Value::Null))
    }

    /// Parses and validates an untyped object. The namespace is left as written; callers that
    /// default it (meshctl's `-n`, the REST path) do so before calling.
    pub fn from_value(value: Value) -> Result<Object, Invalid> {
        let label = describe(&value);
        let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
        let kind_name = value.get("kind").and_then(Value::as_str).unwrap_or_default();
        if kind_name.is_empty() {
            return Err(Invalid::single(label, "kind", "is required"));
        }
        if api_version.is_empty() {
            return Err(Invalid::single(label, "apiVersion", "is required"));
        }
        let kind =
            Kind::from_api(api_version, kind_name).map_err(|reason| Invalid::single(label.clone(), "", reason))?;
        let obj = match kind {
            Kind::Namespace => Object::Namespace(typed(value, &label)?),
            Kind::Node => Object::Node(typed(value, &label)?),
            Kind::ServiceAccount => Object::ServiceAccount(typed(value, &label)?),
            Kind::Service => Object::Service(typed(value, &label)?),
            Kind::Pod => Object::Pod(typed(value, &label)?),
            Kind::WorkloadEntry => Object::WorkloadEntry(typed(value, &label)?),
            Kind::PeerAuthentication => Object::PeerAuthentication(typed(value, &label)?),
            Kind::AuthorizationPolicy => Object::AuthorizationPolicy(typed(value, &label)?),
            Kind::Gateway => Object::Gateway(typed(value, &label)?),
            Kind::HttpRoute => Object::HttpRoute(typed(value, &label)?),
            Kind::GrpcRoute => Object::GrpcRoute(typed(value, &label)?),
        };
        let errors = validate::object(&obj);
        if errors.is_empty() {
            Ok(obj)
        } else {
            Err(Invalid { object: label, errors })
        }
    }
}

fn typed<T: DeserializeOwned>(value: Value, label: &str) -> Result<T, Invalid> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        Invalid { object: label.to_string(), errors: vec![FieldError { path, reason: e.inner().to_string() }] }
    })
}

/// `Kind namespace/name` from whatever an untyped object carries, for error messages.
pub fn describe(value: &Value) -> String {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("<no kind>");
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("<no name>");
    match meta.and_then(|m| m.get("namespace")).and_then(Value::as_str) {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}
