//! `POST /apis/trellis.dev/v1/namespaces/{ns}/workloadcertificates`: an admin (holder of the
//! config API) obtains the certificate of one workload for a proxyless gRPC application, as
//! `meshctl x grpc-bootstrap` does. The caller keeps its private key and sends a CSR; the identity
//! is the workload's service account, never one the caller names.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use trellis_config::{Kind, Object, ObjectKey};

use super::status::ApiError;
use super::ApiState;
use crate::ca::CaError;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateRequest {
    /// `Pod` or `WorkloadEntry`; when absent a Pod is looked up first, then a WorkloadEntry.
    #[serde(default)]
    kind: Option<String>,
    name: String,
    csr: String,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

pub async fn create(State(s): State<ApiState>, Path(ns): Path<String>, body: axum::body::Bytes) -> Response {
    match issue(&s, &ns, &body) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

fn issue(s: &ApiState, ns: &str, body: &[u8]) -> Result<serde_json::Value, ApiError> {
    let req: CertificateRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("workload certificate request: {e}")))?;
    let kinds: &[Kind] = match req.kind.as_deref() {
        None => &[Kind::Pod, Kind::WorkloadEntry],
        Some("Pod") => &[Kind::Pod],
        Some("WorkloadEntry") => &[Kind::WorkloadEntry],
        Some(other) => {
            return Err(ApiError::bad_request(format!("kind {other:?} is not a workload kind (Pod or WorkloadEntry)")))
        }
    };
    let obj = kinds.iter().find_map(|k| s.store.get(&ObjectKey::new(*k, ns, &req.name))).ok_or_else(|| {
        ApiError::not_found(format!("workload {ns}/{}: no Pod or WorkloadEntry of that name", req.name))
    })?;
    let (kind, service_account, field, addresses) = match obj.as_ref() {
        Object::Pod(p) => {
            let ips: Vec<String> = p
                .status
                .iter()
                .flat_map(|st| st.pod_ips.iter().map(|i| i.ip.clone()).chain(st.pod_ip.clone()))
                .collect();
            ("Pod", p.spec.declared_service_account().map(str::to_string), "spec.serviceAccountName", ips)
        }
        Object::WorkloadEntry(w) => {
            ("WorkloadEntry", w.spec.service_account.clone(), "spec.serviceAccount", vec![w.spec.address.clone()])
        }
        other => {
            return Err(ApiError::bad_request(format!("{} {ns}/{} is not a workload", other.kind().name(), req.name)))
        }
    };
    let Some(sa) = service_account.filter(|sa| !sa.is_empty()) else {
        return Err(ApiError::unprocessable(
            kind,
            &req.name,
            field,
            format!(
                "{kind} {ns}/{} has no {field}: a workload certificate names the service account it runs as",
                req.name
            ),
        ));
    };
    let identity = format!("spiffe://{}/ns/{ns}/sa/{sa}", s.authority.trust_domain);
    if req.ttl_seconds == Some(0) {
        // Would be a certificate that expires as it is issued.
        return Err(ApiError::bad_request(
            "workload certificate request: ttlSeconds must be at least 1; omit it for the 24 h default",
        ));
    }
    let ttl =
        Duration::from_secs(req.ttl_seconds.unwrap_or(crate::ca::service::DEFAULT_TTL.as_secs())).min(s.max_cert_ttl);
    let chain = s.authority.sign_for_admin(&req.csr, &identity, ttl).map_err(|e| match e {
        CaError::BadCsr(reason) => ApiError::bad_request(format!("csr: {reason}")),
        other => ApiError::bad_request(other.to_string()),
    })?;
    tracing::info!(
        namespace = ns,
        workload = req.name,
        identity,
        ttl_s = ttl.as_secs(),
        "issued a workload certificate over the config API"
    );
    let mut addresses = addresses;
    addresses.dedup();
    Ok(json!({
        "kind": kind,
        "name": req.name,
        "namespace": ns,
        "identity": identity,
        "addresses": addresses,
        "certChain": chain,
        "rootCert": s.authority.root_pem(),
    }))
}
