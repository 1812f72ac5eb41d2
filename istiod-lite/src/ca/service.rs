//! `istio.v1.auth.IstioCertificateService/CreateCertificate`.
//!
//! Authorization: the caller presents a node bearer token; it may obtain identities only through
//! `ImpersonatedIdentity`, and only for service accounts of Pods whose `spec.nodeName` is its node.
//! Every denial is logged with its reason and counted; the caller gets PermissionDenied without
//! the details (which would tell an attacker what exists).

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use trellis_config::{Kind, Object};
use trellis_proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateService;
use trellis_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};

use super::tokens::NodeTokens;
use super::Identity;
use super::{Authority, CaError};
use crate::metrics::{Metrics, ReasonLabels};
use crate::store::Store;

pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Applied when the request leaves `validity_duration` at 0.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

pub struct CaService {
    pub authority: Arc<Authority>,
    pub tokens: Arc<NodeTokens>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub max_ttl: Duration,
}

pub(crate) fn bearer<T>(req: &Request<T>) -> Option<&str> {
    let v = req.metadata().get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).map(str::trim)
}

impl CaService {
    fn deny(&self, reason: &'static str, node: &str, identity: &str, detail: String) -> Status {
        self.metrics.csr_denied.get_or_create(&ReasonLabels { reason: reason.into() }).inc();
        tracing::warn!(node, identity, reason, detail, "certificate request denied");
        Status::permission_denied(format!("node {node} may not obtain {identity}"))
    }

    /// Does a workload with this identity run on `node`?
    fn scheduled_on(&self, id: &Identity, node: &str) -> bool {
        self.store.list(Some(Kind::Pod), Some(&id.namespace)).iter().any(|o| match o.as_ref() {
            Object::Pod(p) => {
                p.spec.node_name.as_deref() == Some(node) && p.spec.service_account() == id.service_account
            }
            _ => false,
        })
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        self.metrics.csr_count.inc();
        let Some(node) = bearer(&req).and_then(|t| self.tokens.verify(t)) else {
            self.metrics.csr_denied.get_or_create(&ReasonLabels { reason: "unauthenticated".into() }).inc();
            tracing::warn!("certificate request without a valid node token");
            return Err(Status::unauthenticated("a valid node bearer token is required"));
        };
        let body = req.into_inner();
        let requested =
            body.metadata.as_ref().and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)).and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        let Some(requested) = requested else {
            return Err(self.deny(
                "no_impersonation",
                &node,
                "",
                "node tokens obtain workload identities only via ImpersonatedIdentity".into(),
            ));
        };
        let id = Identity::parse(&requested).map_err(Status::invalid_argument)?;
        if id.trust_domain != self.authority.trust_domain {
            return Err(self.deny(
                "trust_domain",
                &node,
                &requested,
                format!("trust domain is {}", self.authority.trust_domain),
            ));
        }
        if !self.scheduled_on(&id, &node) {
            return Err(self.deny(
                "not_on_node",
                &node,
                &requested,
                format!(
                    "no pod with service account {} in namespace {} is scheduled on node {node}",
                    id.service_account, id.namespace
                ),
            ));
        }
        let ttl = match body.validity_duration {
            d if d <= 0 => DEFAULT_TTL,
            d => Duration::from_secs(d as u64),
        }
        .min(self.max_ttl);
        let chain = self.authority.sign_workload(&body.csr, &requested, ttl).map_err(|e| match e {
            CaError::BadCsr(reason) => {
                self.metrics.csr_denied.get_or_create(&ReasonLabels { reason: "bad_csr".into() }).inc();
                tracing::warn!(node, identity = requested, reason, "malformed certificate request");
                Status::invalid_argument(reason)
            }
            e @ CaError::SignerExpired(_) => {
                tracing::error!(node, identity = requested, error = %e, "cannot issue certificates");
                Status::unavailable(e.to_string())
            }
            other => Status::internal(other.to_string()),
        })?;
        self.metrics.certs_issued.inc();
        tracing::info!(node, identity = requested, ttl_s = ttl.as_secs(), "issued workload certificate");
        Ok(Response::new(IstioCertificateResponse { cert_chain: chain }))
    }
}
