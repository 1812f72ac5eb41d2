//! The kinds Trellis stores, with their API group, version and REST plural.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Node,
    ServiceAccount,
    Service,
    Pod,
    WorkloadEntry,
    PeerAuthentication,
    AuthorizationPolicy,
    Gateway,
    HttpRoute,
    GrpcRoute,
}

impl Kind {
    /// In apply order: containers before contents, so a fresh apply of a directory never
    /// references a namespace that is not written yet.
    pub const ALL: [Kind; 11] = [
        Kind::Namespace,
        Kind::Node,
        Kind::ServiceAccount,
        Kind::Service,
        Kind::Pod,
        Kind::WorkloadEntry,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::Gateway,
        Kind::HttpRoute,
        Kind::GrpcRoute,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::Service => "Service",
            Kind::Pod => "Pod",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::Gateway => "Gateway",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
        }
    }

    /// API group; empty for the core group.
    pub fn group(self) -> &'static str {
        match self {
            Kind::Namespace | Kind::Node | Kind::ServiceAccount | Kind::Service | Kind::Pod => "",
            Kind::WorkloadEntry => "networking.istio.io",
            Kind::PeerAuthentication | Kind::AuthorizationPolicy => "security.istio.io",
            Kind::Gateway | Kind::HttpRoute | Kind::GrpcRoute => "gateway.networking.k8s.io",
        }
    }

    pub fn version(self) -> &'static str {
        "v1"
    }

    pub fn api_version(self) -> String {
        match self.group() {
            "" => self.version().to_string(),
            g => format!("{g}/{}", self.version()),
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Node => "nodes",
            Kind::ServiceAccount => "serviceaccounts",
            Kind::Service => "services",
            Kind::Pod => "pods",
            Kind::WorkloadEntry => "workloadentries",
            Kind::PeerAuthentication => "peerauthentications",
            Kind::AuthorizationPolicy => "authorizationpolicies",
            Kind::Gateway => "gateways",
            Kind::HttpRoute => "httproutes",
            Kind::GrpcRoute => "grpcroutes",
        }
    }

    fn short_names(self) -> &'static [&'static str] {
        match self {
            Kind::Namespace => &["ns"],
            Kind::Node => &["no"],
            Kind::ServiceAccount => &["sa"],
            Kind::Service => &["svc"],
            Kind::Pod => &["po"],
            Kind::WorkloadEntry => &["we"],
            Kind::PeerAuthentication => &["pa"],
            Kind::AuthorizationPolicy => &["ap"],
            Kind::Gateway => &["gtw"],
            Kind::HttpRoute => &[],
            Kind::GrpcRoute => &[],
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }

    /// Resolves `apiVersion` + `kind` as written in a manifest.
    pub fn from_api(api_version: &str, kind: &str) -> Result<Kind, String> {
        let Some(k) = Kind::ALL.into_iter().find(|k| k.name() == kind) else {
            let known: Vec<_> = Kind::ALL.iter().map(|k| k.name()).collect();
            return Err(format!("unknown kind {kind:?}; supported kinds: {}", known.join(", ")));
        };
        if api_version != k.api_version() {
            return Err(format!("apiVersion {api_version:?} is not served for kind {kind}; use {:?}", k.api_version()));
        }
        Ok(k)
    }

    /// Resolves a REST path's group and plural (`""`, `"pods"`).
    pub fn from_rest(group: &str, version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.group() == group && k.version() == version && k.plural() == plural)
    }

    /// Resolves what a user types on the command line: plural, singular or short name, any case.
    pub fn from_cli(s: &str) -> Option<Kind> {
        let s = s.to_ascii_lowercase();
        Kind::ALL
            .into_iter()
            .find(|k| k.plural() == s || k.name().to_ascii_lowercase() == s || k.short_names().contains(&s.as_str()))
    }

    /// REST collection path, e.g. `/apis/security.istio.io/v1/namespaces/foo/authorizationpolicies`.
    /// `namespace` is ignored for cluster-scoped kinds; `None` lists across all namespaces.
    pub fn collection_path(self, namespace: Option<&str>) -> String {
        let prefix = match self.group() {
            "" => format!("/api/{}", self.version()),
            g => format!("/apis/{g}/{}", self.version()),
        };
        match namespace {
            Some(ns) if self.namespaced() => format!("{prefix}/namespaces/{ns}/{}", self.plural()),
            _ => format!("{prefix}/{}", self.plural()),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_api_version_and_plural() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_api(&k.api_version(), k.name()), Ok(k));
            assert_eq!(Kind::from_rest(k.group(), k.version(), k.plural()), Some(k));
            assert_eq!(Kind::from_cli(k.plural()), Some(k));
        }
    }

    #[test]
    fn wrong_api_version_names_the_right_one() {
        let err = Kind::from_api("security.istio.io/v1beta1", "AuthorizationPolicy").unwrap_err();
        assert!(err.contains("\"security.istio.io/v1\""), "{err}");
        assert!(Kind::from_api("v1", "Deployment").unwrap_err().contains("unknown kind"));
    }

    #[test]
    fn collection_paths_follow_kubernetes_layout() {
        assert_eq!(Kind::Pod.collection_path(Some("demo")), "/api/v1/namespaces/demo/pods");
        assert_eq!(Kind::Node.collection_path(Some("demo")), "/api/v1/nodes");
        assert_eq!(Kind::HttpRoute.collection_path(None), "/apis/gateway.networking.k8s.io/v1/httproutes");
    }
}
