//! trellis-echo: a test server that reports what it saw. One port speaks HTTP/1.1, h2c (prior
//! knowledge) and gRPC; a request is gRPC when its content-type says so.
//!
//! HTTP answers are JSON: the serving pod and namespace, the protocol, method, path, headers, body
//! size, and the peer address of the socket. The gRPC `trellis.echo.v1.Echo/Echo` method answers
//! the same facts.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::codegen::Service;
use trellis_proto::trellis::echo::v1::echo_server::{Echo, EchoServer};
use trellis_proto::trellis::echo::v1::{EchoRequest, EchoResponse};

/// Bodies beyond this are refused with 413: an echo server has no use for more.
pub const MAX_BODY: usize = 1 << 20;
/// Connections beyond this wait for a slot.
const MAX_CONNECTIONS: usize = 1024;
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Who is answering: the pod this server runs in.
#[derive(Clone, Debug)]
pub struct Identity {
    pub pod: String,
    pub namespace: String,
}

/// The peer address of the connection a request arrived on, as a request extension.
#[derive(Clone, Copy, Debug)]
struct Peer(SocketAddr);

struct GrpcEcho {
    me: Identity,
}

#[tonic::async_trait]
impl Echo for GrpcEcho {
    async fn echo(&self, req: tonic::Request<EchoRequest>) -> Result<tonic::Response<EchoResponse>, tonic::Status> {
        let peer = req.extensions().get::<Peer>().map(|p| p.0.to_string()).unwrap_or_default();
        let method = req.extensions().get::<GrpcPath>().map(|p| p.0.clone()).unwrap_or_default();
        let mut headers = std::collections::HashMap::new();
        for (k, v) in req.metadata().clone().into_headers().iter() {
            let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
            headers.entry(k.as_str().to_string()).and_modify(|e: &mut String| *e = format!("{e}, {v}")).or_insert(v);
        }
        Ok(tonic::Response::new(EchoResponse {
            message: req.into_inner().message,
            pod: self.me.pod.clone(),
            namespace: self.me.namespace.clone(),
            method,
            headers,
            peer,
        }))
    }
}

/// tonic hides the request path from handlers; we keep it to echo it back.
#[derive(Clone, Debug)]
struct GrpcPath(String);

fn headers_json(h: &http::HeaderMap) -> Value {
    let mut m = Map::new();
    for k in h.keys() {
        let vals: Vec<String> =
            h.get_all(k).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
        m.insert(k.as_str().to_string(), Value::String(vals.join(", ")));
    }
    Value::Object(m)
}

fn json_response(status: StatusCode, v: &Value) -> Response<tonic::body::Body> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(tonic::body::Body::new(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

async fn http_echo(me: &Identity, peer: SocketAddr, req: Request<Incoming>) -> Response<tonic::body::Body> {
    let (parts, body) = req.into_parts();
    let size = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return json_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                &json!({"error": format!("request body exceeds {MAX_BODY} bytes")}),
            )
        }
        Err(e) => return json_response(StatusCode::BAD_REQUEST, &json!({"error": format!("reading body: {e}")})),
    };
    let answer = json!({
        "pod": me.pod,
        "namespace": me.namespace,
        "protocol": format!("{:?}", parts.version),
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "headers": headers_json(&parts.headers),
        "body_bytes": size,
        "peer": peer.to_string(),
    });
    json_response(StatusCode::OK, &answer)
}

fn is_grpc(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// Serves connections from `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, me: Identity) -> std::io::Result<()> {
    let grpc = EchoServer::new(GrpcEcho { me: me.clone() });
    let me = Arc::new(me);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = slots.clone().acquire_owned().await.expect("semaphore is never closed");
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            // Out of file descriptors and the like: back off instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; report them as IPv4.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let (me, grpc) = (me.clone(), grpc.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let (me, mut grpc) = (me.clone(), grpc.clone());
                async move {
                    if is_grpc(&req) {
                        let path = GrpcPath(req.uri().path().to_string());
                        req.extensions_mut().insert(Peer(peer));
                        req.extensions_mut().insert(path);
                        return Ok::<_, Infallible>(grpc.call(req).await.unwrap_or_else(|e| match e {}));
                    }
                    Ok(http_echo(&me, peer, req).await)
                }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
            let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
            drop(permit);
        });
    }
}
