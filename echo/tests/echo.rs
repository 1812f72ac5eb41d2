//! trellis-echo over real sockets: HTTP/1.1, h2c and gRPC on one port.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use trellis_echo::{serve, Identity, MAX_BODY};
use trellis_proto::trellis::echo::v1::echo_client::EchoClient;
use trellis_proto::trellis::echo::v1::EchoRequest;

async fn start() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve(l, Identity { pod: "echo-v1".into(), namespace: "demo".into() }));
    addr
}

async fn get(http2: bool, addr: std::net::SocketAddr, body: Vec<u8>) -> (u16, Value) {
    let client = Client::builder(TokioExecutor::new()).http2_only(http2).build_http::<Full<Bytes>>();
    let req = http::Request::post(format!("http://{addr}/hello?x=1"))
        .header("x-probe", "a")
        .header("x-probe", "b")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn http1_and_h2c_echo_the_request_and_the_peer() {
    let addr = start().await;
    for (http2, proto) in [(false, "HTTP/1.1"), (true, "HTTP/2.0")] {
        let (status, v) = get(http2, addr, b"12345".to_vec()).await;
        assert_eq!(status, 200);
        assert_eq!(v["pod"], "echo-v1");
        assert_eq!(v["namespace"], "demo");
        assert_eq!(v["protocol"], proto);
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/hello?x=1");
        assert_eq!(v["headers"]["x-probe"], "a, b");
        assert_eq!(v["body_bytes"], 5);
        let peer = v["peer"].as_str().unwrap();
        assert!(peer.starts_with("127.0.0.1:"), "{peer}");
    }
}

#[tokio::test]
async fn an_oversized_body_is_refused() {
    let addr = start().await;
    let (status, v) = get(false, addr, vec![0; MAX_BODY + 1]).await;
    assert_eq!(status, 413);
    assert!(v["error"].as_str().unwrap().contains("exceeds"), "{v}");
}

#[tokio::test]
async fn grpc_echo_answers_the_same_facts() {
    let addr = start().await;
    let mut client = EchoClient::connect(format!("http://{addr}")).await.unwrap();
    let mut req = tonic::Request::new(EchoRequest { message: "ping".into() });
    req.metadata_mut().insert("x-probe", "c".parse().unwrap());
    let r = client.echo(req).await.unwrap().into_inner();
    assert_eq!(r.message, "ping");
    assert_eq!((r.pod.as_str(), r.namespace.as_str()), ("echo-v1", "demo"));
    assert_eq!(r.method, "/trellis.echo.v1.Echo/Echo");
    assert_eq!(r.headers.get("x-probe").map(String::as_str), Some("c"));
    assert!(r.peer.starts_with("127.0.0.1:"), "{}", r.peer);
}
