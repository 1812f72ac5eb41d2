//! The config REST API on :15014: kube-style resource paths, `/metrics`, `/ready` and `/debug`.
//!
//! Writes are validated with the same code `meshctl` uses, then handed to the store; a body that
//! does not parse is 400, one that parses but is invalid is 422, a stale `resourceVersion` is 409.

mod certs;
mod path;
pub mod status;
mod watch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use trellis_config::{Kind, ObjectKey};

use crate::ca::tokens::NodeTokens;
use crate::metrics::{Metrics, WriteLabels};
use crate::store::{Applied, Store, Write};
use crate::xds::status::Registry;
use status::ApiError;

/// Largest request body accepted. Kubernetes uses 3 MiB for an object; ours are smaller.
pub const MAX_BODY: usize = 1 << 20;

#[derive(Clone)]
pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    pub proxies: Arc<Registry>,
    pub tokens: Arc<NodeTokens>,
    pub cache: Arc<crate::xds::cache::Cache>,
    pub authority: Arc<crate::ca::Authority>,
    pub max_cert_ttl: std::time::Duration,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/debug/syncz", get(syncz))
        .route("/debug/xdsz", get(xdsz))
        .route("/apis/trellis.dev/v1/nodetokens/{node}", put(create_node_token))
        .route("/apis/trellis.dev/v1/namespaces/{ns}/workloadcertificates", axum::routing::post(certs::create))
        .fallback(resource)
        .with_state(state)
}

async fn ready(State(s): State<ApiState>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn metrics(State(s): State<ApiState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.encode()).into_response()
}

async fn syncz(State(s): State<ApiState>) -> Response {
    Json(s.proxies.snapshot()).into_response()
}

/// What workload discovery currently serves: resource names and versions per type.
async fn xdsz(State(s): State<ApiState>) -> Response {
    let mut out = serde_json::Map::new();
    for t in crate::xds::TYPES {
        let (mut all, _) = s.cache.all(t);
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let items: Vec<Value> =
            all.into_iter().map(|(n, e)| json!({"name": n, "version": crate::xds::cache::version_string(e.version), "bytes": e.body.len()})).collect();
        out.insert(t.to_string(), Value::Array(items));
    }
    Json(Value::Object(out)).into_response()
}

/// Issues (or rotates) the bearer token a node's ztunnel presents to the CA and xDS.
/// The token is returned once; only its hash is kept.
async fn create_node_token(
    State(s): State<ApiState>,
    axum::extract::Path(node): axum::extract::Path<String>,
) -> Response {
    match s.tokens.issue(&node) {
        Ok(token) => Json(json!({"node": node, "token": token})).into_response(),
        Err(e) => ApiError::bad_request(e.to_string()).into_response(),
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ListParams {
    watch: Option<String>,
    resource_version: Option<String>,
}

async fn resource(State(s): State<ApiState>, Query(q): Query<ListParams>, req: Request) -> Response {
    match handle(s, q, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle(s: ApiState, q: ListParams, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let rp = path::parse(parts.uri.path()).map_err(ApiError::not_found)?;
    match (&parts.method, rp.name) {
        (&Method::GET, None) if q.watch.as_deref().is_some_and(|w| w == "true" || w == "1") => {
            Ok(watch::serve(s.store.as_ref(), rp.kind, rp.namespace, q.resource_version))
        }
        (&Method::GET, None) => {
            let items: Vec<Value> =
                s.store.list(Some(rp.kind), rp.namespace.as_deref()).iter().map(|o| o.to_value()).collect();
            Ok(Json(json!({
                "kind": format!("{}List", rp.kind.name()),
                "apiVersion": rp.kind.api_version(),
                "metadata": {"resourceVersion": s.store.revision().to_string()},
                "items": items,
            }))
            .into_response())
        }
        (&Method::GET, Some(name)) => {
            let key = ObjectKey::new(rp.kind, rp.namespace.unwrap_or_default(), name);
            let obj = s.store.get(&key).ok_or_else(|| ApiError::not_found(format!("{key} not found")))?;
            Ok(Json(obj.to_value()).into_response())
        }
        (&Method::PUT, Some(name)) => {
            let body = read_body(&parts.headers, body).await?;
            let (obj, _) = decode_object(rp.kind, rp.namespace.as_deref(), Some(&name), &body)?;
            write(&s, rp.kind, "put", Write::Put(obj)).await
        }
        (&Method::POST, None) => {
            let body = read_body(&parts.headers, body).await?;
            // A name generated from `generateName` that is taken is generated afresh, as the
            // Kubernetes API server does, a few times before giving up.
            for _ in 0..GENERATE_NAME_TRIES {
                let (obj, generated) = decode_object(rp.kind, rp.namespace.as_deref(), None, &body)?;
                match write(&s, rp.kind, "create", Write::Create(obj)).await {
                    Err(e) if generated && e.reason() == "AlreadyExists" => continue,
                    done => return done,
                }
            }
            Err(ApiError::already_exists(format!(
                "no free name from metadata.generateName after {GENERATE_NAME_TRIES} tries"
            )))
        }
        (&Method::DELETE, Some(name)) => {
            let key = ObjectKey::new(rp.kind, rp.namespace.unwrap_or_default(), name);
            write(&s, rp.kind, "delete", Write::Delete { key, resource_version: None }).await
        }
        (m, _) => Err(ApiError::method_not_allowed(format!("{m} is not supported on {}", parts.uri.path()))),
    }
}

async fn write(s: &ApiState, kind: Kind, op: &str, w: Write) -> Result<Response, ApiError> {
    let result = s.store.write(w).await;
    let outcome = match &result {
        Ok(Applied::Created(_)) => "created",
        Ok(Applied::Updated(_)) => "configured",
        Ok(Applied::Unchanged(_)) => "unchanged",
        Ok(Applied::Deleted(_)) => "deleted",
        Err(_) => "error",
    };
    s.metrics
        .config_writes
        .get_or_create(&WriteLabels { kind: kind.name().into(), op: op.into(), result: outcome.into() })
        .inc();
    let applied = result?;
    let code = if matches!(applied, Applied::Created(_)) { StatusCode::CREATED } else { StatusCode::OK };
    let mut resp = (code, Json(applied.object().to_value())).into_response();
    // Lets clients print created/configured/unchanged without comparing objects.
    resp.headers_mut().insert("x-trellis-outcome", header::HeaderValue::from_static(outcome));
    Ok(resp)
}

async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    if let Some(len) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok()) {
        if len > MAX_BODY {
            return Err(ApiError::too_large(MAX_BODY));
        }
    }
    axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| ApiError::too_large(MAX_BODY))
}

const GENERATE_NAME_TRIES: usize = 8;
/// Kubernetes' generated-name suffix: five of these (no vowels, so no words), after a prefix cut
/// to leave room for them in 63 characters.
const NAME_SUFFIX_CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
const NAME_SUFFIX_LEN: usize = 5;

fn generate_name(prefix: &str) -> String {
    let max_prefix = 63 - NAME_SUFFIX_LEN;
    let cut = prefix.char_indices().nth(max_prefix).map_or(prefix.len(), |(i, _)| i);
    // Random bytes below the largest multiple of the alphabet's size, so that every character
    // is equally likely (a plain modulo would favour the first 13).
    let fair = (256 / NAME_SUFFIX_CHARS.len() * NAME_SUFFIX_CHARS.len()) as u8;
    let random = std::iter::repeat_with(|| uuid::Uuid::new_v4().into_bytes()).flatten().filter(|b| *b < fair);
    let suffix = random.take(NAME_SUFFIX_LEN).map(|b| NAME_SUFFIX_CHARS[b as usize % NAME_SUFFIX_CHARS.len()] as char);
    prefix[..cut].chars().chain(suffix).collect()
}

/// Parses a JSON or YAML body, reconciles it with the URL, and validates it. A create (no name
/// in the URL) whose body has no name but a `generateName` gets a generated one: the flag says so.
fn decode_object(
    kind: Kind,
    namespace: Option<&str>,
    name: Option<&str>,
    body: &[u8],
) -> Result<(trellis_config::Object, bool), ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| ApiError::bad_request("request body is not UTF-8"))?;
    if let Some((_, why)) = trellis_config::load::repeated_key(text) {
        return Err(ApiError::bad_request(format!("malformed body: {why}")));
    }
    let mut value: Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?
    } else {
        serde_yaml::from_str(text).map_err(|e| ApiError::bad_request(format!("malformed YAML body: {e}")))?
    };
    let Some(meta) = value.as_object_mut().map(|o| o.entry("metadata").or_insert_with(|| json!({}))) else {
        return Err(ApiError::bad_request("request body must be an object"));
    };
    let Some(meta) = meta.as_object_mut() else {
        return Err(ApiError::bad_request("metadata must be an object"));
    };
    if let Some(url_ns) = namespace {
        agree_with_url(meta, "namespace", url_ns)?;
    }
    if let Some(url_name) = name {
        agree_with_url(meta, "name", url_name)?;
    }
    // As Kubernetes: only a create without a name (missing, null or empty) and with a non-empty
    // generateName.
    let unnamed = meta.get("name").is_none_or(|n| n.is_null() || n.as_str() == Some(""));
    let prefix = meta.get("generateName").and_then(Value::as_str).filter(|p| !p.is_empty());
    let generated = match (name, unnamed, prefix) {
        (None, true, Some(prefix)) => {
            let n = generate_name(prefix);
            meta.insert("name".into(), Value::String(n));
            true
        }
        _ => false,
    };
    let body_kind = value.get("kind").and_then(Value::as_str).unwrap_or_default();
    if !body_kind.is_empty() && body_kind != kind.name() {
        return Err(ApiError::bad_request(format!(
            "body kind {body_kind} does not match the URL's resource {}",
            kind.plural()
        )));
    }
    let obj_name = name.map(str::to_string).or_else(|| meta_name(&value)).unwrap_or_default();
    let obj = trellis_config::Object::from_value(value).map_err(|e| ApiError::invalid(kind.name(), &obj_name, &e))?;
    if kind.namespaced() && obj.meta().namespace.is_none() {
        return Err(ApiError::bad_request(format!("{} is namespaced: use a /namespaces/{{ns}}/ path", kind.plural())));
    }
    Ok((obj, generated))
}

fn meta_name(value: &Value) -> Option<String> {
    value.get("metadata")?.get("name")?.as_str().map(str::to_string)
}

/// A body may omit `metadata.<field>` (the URL supplies it) but must not contradict the URL.
fn agree_with_url(meta: &mut serde_json::Map<String, Value>, field: &str, url_value: &str) -> Result<(), ApiError> {
    match meta.get(field).and_then(Value::as_str) {
        Some(v) if v != url_value => Err(ApiError::bad_request(format!(
            "the {field} of the object ({v}) does not match the {field} in the URL ({url_value})"
        ))),
        _ => {
            meta.insert(field.into(), Value::String(url_value.into()));
            Ok(())
        }
    }
}
