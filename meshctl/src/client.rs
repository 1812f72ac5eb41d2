//! A small client for istiod-lite's kube-style REST API.

use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Every request gets this long; the API answers in milliseconds unless the server is stuck.
const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Client {
    base: String,
    http: HyperClient<HttpConnector, Full<Bytes>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub outcome: Option<String>,
    pub body: Value,
}

impl Client {
    pub fn new(server: &str) -> anyhow::Result<Client> {
        let base = server.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            return Err(anyhow!("--server {server:?}: only http:// URLs are supported"));
        }
        Ok(Client { base, http: HyperClient::builder(TokioExecutor::new()).build_http() })
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> anyhow::Result<Reply> {
        let url = format!("{}{path}", self.base);
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap_or_default()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(&url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .context("building request")?;
        let resp = tokio::time::timeout(TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| anyhow!("{url}: no answer within {}s", TIMEOUT.as_secs()))?
            .map_err(|e| {
                anyhow!(
                    "cannot reach istiod-lite at {}: {e} (is it running? set --server or TRELLIS_SERVER)",
                    self.base
                )
            })?;
        let status = resp.status();
        let outcome = resp.headers().get("x-trellis-outcome").and_then(|v| v.to_str().ok()).map(String::from);
        let raw = tokio::time::timeout(TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| anyhow!("{url}: response body timed out"))?
            .map_err(|e| anyhow!("{url}: reading response: {e}"))?
            .to_bytes();
        let body = if raw.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&raw).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into()))
        };
        Ok(Reply { status, outcome, body })
    }

    /// Like [`call`](Self::call) but turns a non-2xx reply into an error carrying the server's
    /// Status message.
    pub async fn ok(&self, method: Method, path: &str, body: Option<&Value>) -> anyhow::Result<Reply> {
        let r = self.call(method, path, body).await?;
        if r.status.is_success() {
            Ok(r)
        } else {
            Err(anyhow!("{}", status_message(&r)))
        }
    }
}

pub fn status_message(r: &Reply) -> String {
    match r.body.get("message").and_then(Value::as_str) {
        Some(m) => m.to_string(),
        None => format!("server answered {}", r.status),
    }
}
