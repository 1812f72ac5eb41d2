//! `?watch=true`: newline-delimited JSON watch events, Kubernetes-style.
//!
//! A watcher that reads too slowly falls behind the store's bounded event buffer; it then gets an
//! `ERROR` event with a 410 Status and the stream ends, so it can relist. It never holds up writers
//! or other watchers.

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use trellis_config::{Kind, Object};

use super::status::ApiError;
use crate::store::{EventType, Store};

fn line(kind: &str, object: Value) -> Result<Bytes, std::convert::Infallible> {
    let mut b = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    b.push(b'\n');
    Ok(Bytes::from(b))
}

fn wanted(o: &Object, kind: Kind, ns: Option<&str>) -> bool {
    o.kind() == kind && ns.is_none_or(|ns| o.meta().namespace.as_deref() == Some(ns))
}

pub fn serve(store: &dyn Store, kind: Kind, namespace: Option<String>, resource_version: Option<String>) -> Response {
    let w = store.watch();
    let from: Option<u64> = resource_version.as_deref().and_then(|v| v.parse().ok()).filter(|v| *v != 0);
    let mut initial = Vec::new();
    match from {
        None => {
            for o in w.objects.iter().filter(|o| wanted(o, kind, namespace.as_deref())) {
                initial.push(line(EventType::Added.as_str(), o.to_value()));
            }
        }
        Some(rv) if rv == w.revision => {}
        Some(rv) => {
            let status = ApiError::gone(format!("too old resource version: {rv} ({})", w.revision)).body();
            initial.push(line("ERROR", status));
            let body = Body::from_stream(futures::stream::iter(initial));
            return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
        }
    }
    let events = futures::stream::unfold((w.events, namespace, false), move |(mut rx, ns, done)| async move {
        if done {
            return None;
        }
        loop {
            match rx.recv().await {
                Ok(ev) if wanted(&ev.object, kind, ns.as_deref()) => {
                    return Some((line(ev.kind.as_str(), ev.object.to_value()), (rx, ns, false)));
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(n)) => {
                    let status =
                        ApiError::gone(format!("watcher fell {n} events behind; relist and watch again")).body();
                    return Some((line("ERROR", status), (rx, ns, true)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    let body = Body::from_stream(futures::stream::iter(initial).chain(events));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}
