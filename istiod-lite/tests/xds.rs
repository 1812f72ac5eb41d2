//! A real tonic delta-xDS client against istiod-lite: snapshot, one-pod change, delete,
//! ACK/NACK tracking, and reconnect with initial_resource_versions.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::Istiod;
use hyper::Method;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use trellis_proto::envoy::envoy::config::core::v3::Node;
use trellis_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use trellis_proto::envoy::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use trellis_proto::envoy::google::rpc::Status as RpcStatus;
use trellis_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, PARTIAL_PUSH_SUFFIX, POD_MEMBERSHIP_TYPE_URL};

struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

fn node() -> Option<Node> {
    Some(Node {
        id: "ztunnel~10.0.0.1~ztunnel-x.istio-system~istio-system.svc.cluster.local".into(),
        ..Default::default()
    })
}

impl Client {
    async fn connect(addr: std::net::SocketAddr, initial: &HashMap<&'static str, HashMap<String, String>>) -> Client {
        let mut c = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await.unwrap();
        let (tx, rx) = mpsc::channel(16);
        for t in [AUTHORIZATION_TYPE_URL, ADDRESS_TYPE_URL] {
            tx.send(DeltaDiscoveryRequest {
                node: node(),
                type_url: t.into(),
                initial_resource_versions: initial.get(t).cloned().unwrap_or_default(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let rx = c.delta_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
        Client { tx, rx }
    }

    async fn next(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("response in time")
            .unwrap()
            .expect("stream open")
    }

    async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// Reads responses (ACKing each) until `done` holds for the accumulated state.
    async fn sync(
        &mut self,
        state: &mut HashMap<&'static str, HashMap<String, String>>,
        done: impl Fn(&HashMap<&'static str, HashMap<String, String>>) -> bool,
    ) {
        while !done(state) {
            let r = self.next().await;
            apply(state, &r);
            self.ack(&r).await;
        }
    }
}

fn apply(state: &mut HashMap<&'static str, HashMap<String, String>>, r: &DeltaDiscoveryResponse) {
    let t = if r.type_url == ADDRESS_TYPE_URL { ADDRESS_TYPE_URL } else { AUTHORIZATION_TYPE_URL };
    let m = state.entry(t).or_default();
    for res in &r.resources {
        m.insert(res.name.clone(), res.version.clone());
    }
    for n in &r.removed_resources {
        m.remove(n);
    }
}

fn pod(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "echo"}}, "spec": {"nodeName": "node1"}, "status": {"podIP": ip}})
}

async fn seed(s: &Istiod) {
    let c = s.api();
    c.ok(Method::PUT, "/api/v1/namespaces/demo", Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}}}))).await.unwrap();
    for (n, ip) in [("a", "10.244.1.2"), ("b", "10.244.1.3")] {
        c.ok(Method::PUT, &format!("/api/v1/namespaces/demo/pods/{n}"), Some(&pod(n, ip))).await.unwrap();
    }
    c.ok(Method::PUT, "/api/v1/namespaces/demo/services/echo", Some(&json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"}, "spec": {"selector": {"app": "echo"}, "clusterIP": "10.96.0.9", "ports": [{"port": 80}]}}))).await.unwrap();
    c.ok(Method::PUT, "/apis/security.istio.io/v1/namespaces/demo/authorizationpolicies/p", Some(&json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "p"}, "spec": {"selector": {"matchLabels": {"app": "echo"}}, "rules": [{}]}}))).await.unwrap();
}

const A: &str = "Kubernetes//v1/Pod/demo/a";
const B: &str = "Kubernetes//v1/Pod/demo/b";

#[tokio::test]
async fn delta_client_sees_snapshot_single_changes_deletes_and_resyncs_by_difference() {
    let s = Istiod::start().await;
    seed(&s).await;
    let addr = s.running.xds_addr.unwrap();
    let mut state = HashMap::new();
    let mut c = Client::connect(addr, &state).await;
    c.sync(&mut state, |st| {
        st.get(ADDRESS_TYPE_URL).is_some_and(|m| m.len() == 3)
            && st.get(AUTHORIZATION_TYPE_URL).is_some_and(|m| m.len() == 2)
    })
    .await;
    let addrs: Vec<_> = {
        let mut v: Vec<_> = state[ADDRESS_TYPE_URL].keys().cloned().collect();
        v.sort();
        v
    };
    assert_eq!(addrs, vec![A.to_string(), B.to_string(), "demo/echo.demo.svc.cluster.local".into()]);
    assert!(state[AUTHORIZATION_TYPE_URL].contains_key("demo/p"));
    let served = s.api().ok(Method::GET, "/debug/xdsz", None).await.unwrap().body;
    assert_eq!(served[ADDRESS_TYPE_URL].as_array().unwrap().len(), 3);
    assert_eq!(served[ADDRESS_TYPE_URL][0]["name"], A);
    assert_eq!(served[ADDRESS_TYPE_URL][0]["version"], state[ADDRESS_TYPE_URL][A].as_str());

    // One pod changes: exactly one resource arrives.
    s.api().ok(Method::PUT, "/api/v1/namespaces/demo/pods/a", Some(&pod("a", "10.244.1.9"))).await.unwrap();
    let r = c.next().await;
    assert_eq!(r.type_url, ADDRESS_TYPE_URL);
    assert_eq!(r.resources.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(), vec![A]);
    assert!(r.removed_resources.is_empty());
    apply(&mut state, &r);
    c.ack(&r).await;

    // A delete arrives as removed_resources.
    s.api().ok(Method::DELETE, "/api/v1/namespaces/demo/pods/b", None).await.unwrap();
    let r = c.next().await;
    assert_eq!(r.removed_resources, vec![B.to_string()]);
    assert!(r.resources.is_empty());
    apply(&mut state, &r);

    // NACK it: the reason is visible at /debug/syncz.
    c.tx.send(DeltaDiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        error_detail: Some(RpcStatus { code: 3, message: "test rejects this".into(), details: vec![] }),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut seen = false;
    for _ in 0..50 {
        let sync = s.api().ok(Method::GET, "/debug/syncz", None).await.unwrap().body;
        let nack = &sync[0]["types"][ADDRESS_TYPE_URL]["last_nack"];
        if nack["error"] == "test rejects this" {
            assert_eq!(nack["nonce"], r.nonce.as_str());
            assert_eq!(sync[0]["node_id"], node().unwrap().id.as_str());
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen, "NACK recorded");
    drop(c);

    // While disconnected, one pod changes. Reconnecting with what we hold sends only that.
    s.api().ok(Method::PUT, "/api/v1/namespaces/demo/pods/a", Some(&pod("a", "10.244.1.10"))).await.unwrap();
    let mut c = Client::connect(addr, &state).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let r = c.next().await;
        got.extend(r.resources.iter().map(|x| (r.type_url.clone(), x.name.clone())));
        assert!(r.removed_resources.is_empty());
    }
    assert_eq!(got, vec![(ADDRESS_TYPE_URL.to_string(), A.to_string())], "only the difference is sent");
}

type Requests = mpsc::Sender<DeltaDiscoveryRequest>;

/// A delta ADS request for addresses, presenting `token` (if any) as the bearer. The request
/// stream stays open while the returned sender lives.
fn secure_request(
    node: Option<Node>,
    token: Option<&str>,
) -> (Requests, tonic::Request<ReceiverStream<DeltaDiscoveryRequest>>) {
    let (tx, rx) = mpsc::channel(4);
    tx.try_send(DeltaDiscoveryRequest { node, type_url: ADDRESS_TYPE_URL.into(), ..Default::default() }).unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    (tx, req)
}

#[tokio::test]
async fn tls_port_requires_a_node_token() {
    let s = Istiod::start().await;
    let mut c = AggregatedDiscoveryServiceClient::new(s.secure_channel().await);
    let err = c.delta_aggregated_resources(secure_request(node(), None).1).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let token = s.running.tokens.issue("node1").unwrap();
    let (_open, req) = secure_request(node(), Some(&token));
    let mut stream = c.delta_aggregated_resources(req).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.type_url, ADDRESS_TYPE_URL);

    // A valid token does not let a client pose as another node through NODE_NAME.
    let mut claims_node2 = node().unwrap();
    let name = string_value("node2");
    claims_node2.metadata = Some(trellis_proto::envoy::google::protobuf::Struct {
        fields: [("NODE_NAME".to_string(), name)].into_iter().collect(),
    });
    let (_open, req) = secure_request(Some(claims_node2), Some(&token));
    let mut stream = c.delta_aggregated_resources(req).await.unwrap().into_inner();
    let err = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
}

#[tokio::test]
async fn a_stream_ends_when_its_node_token_is_rotated() {
    let s = Istiod::start().await;
    let mut c = AggregatedDiscoveryServiceClient::new(s.secure_channel().await);
    let old = s.running.tokens.issue("node1").unwrap();
    let (_open, req) = secure_request(node(), Some(&old));
    let mut stream = c.delta_aggregated_resources(req).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.type_url, ADDRESS_TYPE_URL);

    // Another node's rotation leaves this stream alone.
    s.running.tokens.issue("node2").unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(300), stream.message()).await.is_err(), "still open");

    let new = s.running.tokens.issue("node1").unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    assert!(err.message().contains("node1") && err.message().contains("rotated"), "{err}");

    // The old token cannot reconnect; the new one can.
    let refused = c.delta_aggregated_resources(secure_request(node(), Some(&old)).1).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let (_open, req) = secure_request(node(), Some(&new));
    let mut stream = c.delta_aggregated_resources(req).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.type_url, ADDRESS_TYPE_URL);
}

/// The leaf certificate :15012 presents to a new connection.
async fn serving_leaf(s: &Istiod) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut s.root_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(s.running.secure_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("istiod.istio-system.svc").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn not_after(der: &[u8]) -> i64 {
    x509_parser::parse_x509_certificate(der).unwrap().1.validity().not_after.timestamp()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_certificate_is_renewed_and_open_streams_outlive_the_old_one() {
    let s = Istiod::start_config(tempfile::tempdir().unwrap(), |c| c.serving_cert_ttl = Duration::from_secs(4)).await;
    let first = serving_leaf(&s).await;
    let token = s.running.tokens.issue("node1").unwrap();
    let mut c = AggregatedDiscoveryServiceClient::new(s.secure_channel().await);
    let (_open, req) = secure_request(node(), Some(&token));
    let mut stream = c.delta_aggregated_resources(req).await.unwrap().into_inner();
    tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap().unwrap();

    // Renewed at half of its 4 s: new connections get a later certificate.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = serving_leaf(&s).await;
    assert_ne!(first, second, "renewed");
    assert!(not_after(&second) > not_after(&first));

    // Once the first certificate has expired, the stream opened under it still gets updates.
    let wait = not_after(&first) + 1 - time::OffsetDateTime::now_utc().unix_timestamp();
    tokio::time::sleep(Duration::from_secs(wait.max(0) as u64)).await;
    seed(&s).await;
    let update = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap().unwrap();
    assert!(update.resources.iter().any(|r| r.name == "Kubernetes//v1/Pod/demo/a"), "{:?}", update.resources);
    // And a new client still connects: it is handed the current certificate.
    assert_ne!(serving_leaf(&s).await, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_capped_per_address_and_hold_up_no_one_else() {
    use tokio::io::AsyncReadExt;
    let s = Istiod::start().await;
    let mut silent = Vec::new();
    for _ in 0..24 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        silent.push(socket.connect(s.running.secure_addr).await.unwrap());
    }
    // 16 handshakes may be in progress from one address; the connections beyond are closed.
    let mut closed = 0;
    for c in &mut silent {
        let mut b = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(200), c.read(&mut b)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 8);
    // Another address still gets its handshake at once.
    tokio::time::timeout(Duration::from_secs(2), serving_leaf(&s)).await.expect("not held up");
}

fn string_value(s: &str) -> trellis_proto::envoy::google::protobuf::Value {
    use trellis_proto::envoy::google::protobuf::value::Kind;
    trellis_proto::envoy::google::protobuf::Value { kind: Some(Kind::StringValue(s.into())) }
}

/// Adds 200 pods whose Address resources are nearly 1 KB each (round < 150).
async fn bulk_pods(c: &meshctl::client::Client, round: usize) {
    let puts = (0..200).map(|i| {
        // ~200-character names: each appears in name, uid and canonical name.
        let name = format!("bulk-{round}-{i}-{}", "x".repeat(190));
        let body = pod(&name, &format!("10.{}.{}.{}", 100 + round, i / 250, i % 250 + 1));
        async move { c.ok(Method::PUT, &format!("/api/v1/namespaces/demo/pods/{name}"), Some(&body)).await.unwrap() }
    });
    futures::future::join_all(puts).await;
}

#[tokio::test]
async fn a_client_that_never_reads_is_cut_off_without_stalling_others() {
    let s = Istiod::start_with(tempfile::tempdir().unwrap(), Duration::from_secs(1)).await;
    seed(&s).await;
    let addr = s.running.xds_addr.unwrap();
    // The stuck client subscribes and then never reads its responses.
    let stuck = Client::connect(addr, &HashMap::new()).await;
    let mut good = Client::connect(addr, &HashMap::new()).await;
    let mut state = HashMap::new();
    good.sync(&mut state, |st| st.get(ADDRESS_TYPE_URL).is_some_and(|m| m.len() == 3)).await;
    // Thousands of new workloads: the stuck client's h2 window, send buffer and queue fill up.
    let c = s.api();
    for round in 0..25 {
        bulk_pods(&c, round).await;
        // The healthy client keeps receiving everything.
        let want = 3 + (round + 1) * 200;
        good.sync(&mut state, |st| st.get(ADDRESS_TYPE_URL).is_some_and(|m| m.len() >= want)).await;
    }
    let mut cut = false;
    for _ in 0..100 {
        let proxies = c.ok(Method::GET, "/debug/syncz", None).await.unwrap().body;
        if proxies.as_array().unwrap().len() == 1 {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !cut {
        eprintln!("SYNCZ {}", c.ok(Method::GET, "/debug/syncz", None).await.unwrap().body);
    }
    assert!(cut, "the non-reading stream was closed after the send timeout");
    drop(stuck);
}

/// A membership stream as a ztunnel on `node` opens it (`None`: a client that names no node).
async fn memberships(addr: std::net::SocketAddr, node: Option<&str>) -> Client {
    let mut c = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let mut n = self::node().unwrap();
    if let Some(name) = node {
        n.metadata = Some(trellis_proto::envoy::google::protobuf::Struct {
            fields: [("NODE_NAME".to_string(), string_value(name))].into_iter().collect(),
        });
    }
    let (tx, rx) = mpsc::channel(16);
    tx.send(DeltaDiscoveryRequest { node: Some(n), type_url: POD_MEMBERSHIP_TYPE_URL.into(), ..Default::default() })
        .await
        .unwrap();
    let rx = c.delta_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
    Client { tx, rx }
}

/// The membership names a client holds after its next response.
async fn held_after_next(c: &mut Client, held: &mut std::collections::BTreeSet<String>) {
    let r = c.next().await;
    assert_eq!(r.type_url, POD_MEMBERSHIP_TYPE_URL);
    held.extend(r.resources.iter().map(|x| x.name.clone()));
    for n in &r.removed_resources {
        held.remove(n);
    }
    c.ack(&r).await;
}

#[tokio::test]
async fn each_node_agent_gets_only_its_own_pods_memberships() {
    let s = Istiod::start().await;
    seed(&s).await; // a and b on node1
    let api = s.api();
    let on_node2 = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "c"}, "spec": {"nodeName": "node2"}});
    api.ok(Method::PUT, "/api/v1/namespaces/demo/pods/c", Some(&on_node2)).await.unwrap();
    const C: &str = "Kubernetes//v1/Pod/demo/c";
    let addr = s.running.xds_addr.unwrap();
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<std::collections::BTreeSet<_>>();

    let (mut n1, mut n2, mut all) =
        (memberships(addr, Some("node1")).await, memberships(addr, Some("node2")).await, memberships(addr, None).await);
    let (mut h1, mut h2, mut h_all) = Default::default();
    held_after_next(&mut n1, &mut h1).await;
    held_after_next(&mut n2, &mut h2).await;
    held_after_next(&mut all, &mut h_all).await;
    assert_eq!((&h1, &h2), (&names(&[A, B]), &names(&[C])), "each node's pods only");
    assert_eq!(h_all, names(&[A, B, C]), "a client naming no node sees every pod");

    // Pod b is recreated on node2: it leaves node1's scope (removed there) and enters node2's.
    let b_on_node2 =
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "b"}, "spec": {"nodeName": "node2"}});
    api.ok(Method::DELETE, "/api/v1/namespaces/demo/pods/b", None).await.unwrap();
    api.ok(Method::PUT, "/api/v1/namespaces/demo/pods/b", Some(&b_on_node2)).await.unwrap();
    while h1 != names(&[A]) {
        held_after_next(&mut n1, &mut h1).await;
    }
    while h2 != names(&[B, C]) {
        held_after_next(&mut n2, &mut h2).await;
    }
    // An update in place that moves it (the file store allows it) is handled the same way.
    api.ok(Method::PUT, "/api/v1/namespaces/demo/pods/b", Some(&pod("b", "10.244.1.3"))).await.unwrap();
    while h2 != names(&[C]) {
        held_after_next(&mut n2, &mut h2).await;
    }
    while h1 != names(&[A, B]) {
        held_after_next(&mut n1, &mut h1).await;
    }
}

/// A push larger than one response is split. Delta xDS cannot say "more follows", so every piece
/// but the last is marked partial, and a client can tell when its first state is complete.
#[tokio::test]
async fn a_snapshot_split_over_several_responses_marks_every_piece_but_the_last() {
    let s = Istiod::start().await;
    seed(&s).await;
    // 2,000 resources of nearly 1 KB: more than one 1 MiB response.
    for round in 0..10 {
        bulk_pods(&s.api(), round).await;
    }
    let total = 3 + 2000;
    for _ in 0..100 {
        let served = s.api().ok(Method::GET, "/debug/xdsz", None).await.unwrap().body;
        if served[ADDRESS_TYPE_URL].as_array().is_some_and(|a| a.len() == total) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = Client::connect(s.running.xds_addr.unwrap(), &HashMap::new()).await;
    let (mut versions, mut names) = (Vec::new(), std::collections::HashSet::new());
    loop {
        let r = c.next().await;
        c.ack(&r).await;
        if r.type_url != ADDRESS_TYPE_URL {
            continue;
        }
        names.extend(r.resources.iter().map(|x| x.name.clone()));
        versions.push(r.system_version_info.clone());
        if !r.system_version_info.ends_with(PARTIAL_PUSH_SUFFIX) {
            break;
        }
    }
    assert!(versions.len() >= 2, "split into pieces: {versions:?}, {} names", names.len());
    assert_eq!(names.len(), total, "the pieces together are the whole snapshot");
    let (last, pieces) = versions.split_last().unwrap();
    for v in pieces {
        assert_eq!(v, &format!("{last}{PARTIAL_PUSH_SUFFIX}"), "every piece but the last is marked, with one version");
    }
}
