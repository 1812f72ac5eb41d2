//! Kubernetes `Status` error bodies, so kubectl-style clients understand our failures.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use trellis_config::Invalid;

use crate::store::StoreError;

pub struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError { code: StatusCode::BAD_REQUEST, reason: "BadRequest", message: message.into(), details: None }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError { code: StatusCode::NOT_FOUND, reason: "NotFound", message: message.into(), details: None }
    }
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        ApiError {
            code: StatusCode::METHOD_NOT_ALLOWED,
            reason: "MethodNotAllowed",
            message: message.into(),
            details: None,
        }
    }
    pub fn too_large(limit: usize) -> Self {
        ApiError {
            code: StatusCode::PAYLOAD_TOO_LARGE,
            reason: "RequestEntityTooLarge",
            message: format!("request body exceeds {limit} bytes"),
            details: None,
        }
    }
    /// The Kubernetes Status reason, e.g. `AlreadyExists`.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
    pub fn already_exists(message: impl Into<String>) -> Self {
        ApiError { code: StatusCode::CONFLICT, reason: "AlreadyExists", message: message.into(), details: None }
    }
    /// 422 for a request that names an object unfit for it; names the field and the reason.
    pub fn unprocessable(kind: &str, name: &str, field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        ApiError {
            code: StatusCode::UNPROCESSABLE_ENTITY,
            reason: "Invalid",
            details: Some(
                json!({"kind": kind, "name": name, "causes": [{"reason": "FieldValueInvalid", "field": field, "message": message}]}),
            ),
            message,
        }
    }
    pub fn gone(message: impl Into<String>) -> Self {
        ApiError { code: StatusCode::GONE, reason: "Expired", message: message.into(), details: None }
    }
    pub fn invalid(kind: &str, name: &str, invalid: &Invalid) -> Self {
        let causes: Vec<Value> = invalid
            .errors
            .iter()
            .map(|e| json!({"reason": "FieldValueInvalid", "field": e.path, "message": e.reason}))
            .collect();
        ApiError {
            code: StatusCode::UNPROCESSABLE_ENTITY,
            reason: "Invalid",
            message: invalid.to_string(),
            details: Some(json!({"kind": kind, "name": name, "causes": causes})),
        }
    }

    pub fn body(&self) -> Value {
        let mut v = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        });
        if let Some(d) = &self.details {
            v["details"] = d.clone();
        }
        v
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::Conflict { .. } | StoreError::AlreadyExists(_) => StatusCode::CONFLICT,
            StoreError::Io(_) | StoreError::Closed => StatusCode::SERVICE_UNAVAILABLE,
        };
        let reason = match &e {
            StoreError::NotFound(_) => "NotFound",
            StoreError::Conflict { .. } => "Conflict",
            StoreError::AlreadyExists(_) => "AlreadyExists",
            _ => "ServiceUnavailable",
        };
        ApiError { code, reason, message: e.to_string(), details: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.code, Json(self.body())).into_response()
    }
}
