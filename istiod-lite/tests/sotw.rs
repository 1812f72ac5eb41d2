//! State-of-the-world ADS as gRPC clients use it: unknown names get a prompt empty answer ("does
//! not exist"), changes are pushed with all subscribed names, ACKs and NACKs are tracked, a
//! wildcard-address server listener is served for the node's IP, and delta clients can read the
//! same Envoy types.

mod common;

use std::time::Duration;

use common::Istiod;
use hyper::Method;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use trellis_proto::envoy::envoy::config::core::v3::Node;
use trellis_proto::envoy::envoy::config::listener::v3::Listener;
use trellis_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use trellis_proto::envoy::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse};
use trellis_proto::envoy::google::rpc::Status as RpcStatus;
use trellis_proto::{ENDPOINT_TYPE_URL, LISTENER_TYPE_URL};

const WAIT: Duration = Duration::from_secs(5);

struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl Sotw {
    async fn connect(istiod: &Istiod, node_id: &str) -> Sotw {
        Sotw::connect_as(istiod, Node { id: node_id.into(), ..Default::default() }).await
    }

    async fn connect_as(istiod: &Istiod, node: Node) -> Sotw {
        let mut c = AggregatedDiscoveryServiceClient::connect(format!("http://{}", istiod.running.xds_addr.unwrap()))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(8);
        tx.send(DiscoveryRequest { node: Some(node), ..Default::default() }).await.unwrap();
        let rx = c.stream_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
        Sotw { tx, rx }
    }

    async fn send(&self, type_url: &str, names: &[&str], ack: Option<&DiscoveryResponse>, nack: Option<&str>) {
        self.tx
            .send(DiscoveryRequest {
                type_url: type_url.into(),
                resource_names: names.iter().map(|s| s.to_string()).collect(),
                version_info: ack.map(|r| r.version_info.clone()).unwrap_or_default(),
                response_nonce: ack.map(|r| r.nonce.clone()).unwrap_or_default(),
                error_detail: nack.map(|m| RpcStatus { code: 3, message: m.into(), details: vec![] }),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.message()).await.expect("a response in time").unwrap().unwrap()
    }
}

async fn apply(istiod: &Istiod, path: &str, body: serde_json::Value) {
    istiod.api().ok(Method::PUT, path, Some(&body)).await.unwrap();
}

async fn setup(istiod: &Istiod) {
    apply(
        istiod,
        "/api/v1/namespaces/demo",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}),
    )
    .await;
    apply(
        istiod,
        "/api/v1/namespaces/demo/services/echo",
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
        "spec": {"selector": {"app": "echo"}, "ports": [{"name": "grpc", "port": 7070, "targetPort": 50051}]}}),
    )
    .await;
    endpoint(istiod, "a", "10.1.0.1").await;
}

async fn endpoint(istiod: &Istiod, name: &str, ip: &str) {
    apply(
        istiod,
        &format!("/apis/networking.istio.io/v1/namespaces/demo/workloadentries/{name}"),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": {"name": name},
            "spec": {"address": ip, "labels": {"app": "echo"}, "serviceAccount": "echo"}}),
    )
    .await;
}

#[tokio::test]
async fn unknown_names_get_an_empty_answer_and_known_ones_all_subscribed() {
    let istiod = Istiod::start().await;
    setup(&istiod).await;
    let mut c = Sotw::connect(&istiod, "sidecar~10.9.0.1~client.demo~demo.svc.cluster.local").await;
    c.send(LISTENER_TYPE_URL, &["nope.demo.svc.cluster.local:80"], None, None).await;
    let r = c.recv().await;
    assert_eq!(r.type_url, LISTENER_TYPE_URL);
    assert!(r.resources.is_empty(), "a name that does not exist is absent from the answer");
    c.send(LISTENER_TYPE_URL, &["nope.demo.svc.cluster.local:80", "echo.demo.svc.cluster.local:7070"], Some(&r), None)
        .await;
    let r = c.recv().await;
    assert_eq!(r.resources.len(), 1, "every existing subscribed name is in each LDS answer");
}

#[tokio::test]
async fn endpoint_changes_are_pushed_and_nacks_are_reported() {
    let istiod = Istiod::start().await;
    setup(&istiod).await;
    let mut c = Sotw::connect(&istiod, "sidecar~10.9.0.1~client.demo~demo.svc.cluster.local").await;
    let cluster = "outbound|7070||echo.demo.svc.cluster.local";
    c.send(ENDPOINT_TYPE_URL, &[cluster], None, None).await;
    let first = c.recv().await;
    assert_eq!(first.resources.len(), 1);
    c.send(ENDPOINT_TYPE_URL, &[cluster], Some(&first), None).await;
    endpoint(&istiod, "b", "10.1.0.2").await;
    let second = c.recv().await;
    assert_ne!(second.version_info, first.version_info);
    let cla = <trellis_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment as prost::Message>::decode(
        second.resources[0].value.as_slice(),
    )
    .unwrap();
    assert_eq!(cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum::<usize>(), 2);
    c.send(ENDPOINT_TYPE_URL, &[cluster], Some(&second), Some("endpoint rejected for the test")).await;
    let start = std::time::Instant::now();
    loop {
        let syncz = istiod.api().ok(Method::GET, "/debug/syncz", None).await.unwrap().body;
        let nack = &syncz[0]["types"][ENDPOINT_TYPE_URL]["last_nack"];
        if !nack.is_null() {
            assert_eq!(nack["error"], "endpoint rejected for the test");
            assert_eq!(nack["version"], second.version_info.as_str());
            assert_eq!(syncz[0]["types"][ENDPOINT_TYPE_URL]["acked_version"], first.version_info.as_str());
            break;
        }
        assert!(start.elapsed() < WAIT, "NACK not reported: {syncz}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_wildcard_server_listener_is_served_for_the_nodes_own_ip() {
    let istiod = Istiod::start().await;
    setup(&istiod).await;
    let mut c = Sotw::connect(&istiod, "sidecar~10.1.0.1~a.demo~demo.svc.cluster.local").await;
    let requested = "xds.istio.io/grpc/lds/inbound/0.0.0.0:50051";
    c.send(LISTENER_TYPE_URL, &[requested], None, None).await;
    let r = c.recv().await;
    assert_eq!(r.resources.len(), 1);
    let l = <Listener as prost::Message>::decode(r.resources[0].value.as_slice()).unwrap();
    assert_eq!(l.name, requested);
    // Another node has no workload at that port: nothing exists for it.
    let mut other = Sotw::connect(&istiod, "sidecar~10.1.0.99~x.demo~demo.svc.cluster.local").await;
    other.send(LISTENER_TYPE_URL, &[requested], None, None).await;
    assert!(other.recv().await.resources.is_empty());
}

#[tokio::test]
async fn delta_clients_can_subscribe_to_the_envoy_types() {
    let istiod = Istiod::start().await;
    setup(&istiod).await;
    let mut c = AggregatedDiscoveryServiceClient::connect(format!("http://{}", istiod.running.xds_addr.unwrap()))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node { id: "delta-client".into(), ..Default::default() }),
        type_url: ENDPOINT_TYPE_URL.into(),
        resource_names_subscribe: vec!["outbound|7070||echo.demo.svc.cluster.local".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rx = c.delta_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let r = tokio::time::timeout(WAIT, rx.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(r.resources.len(), 1);
    assert_eq!(r.resources[0].name, "outbound|7070||echo.demo.svc.cluster.local");
}

/// Pod memberships are scoped to the node a stream is for (its token's, or the `NODE_NAME` it
/// gives) over state-of-the-world ADS too, as over delta: a node sees only the pods it hosts.
#[tokio::test]
async fn a_nodes_state_of_the_world_stream_sees_only_its_own_pods_memberships() {
    use trellis_proto::envoy::google::protobuf::{value::Kind, Struct, Value};
    let istiod = Istiod::start().await;
    setup(&istiod).await;
    for (name, node) in [("a", "node1"), ("b", "node2")] {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {"nodeName": node}});
        apply(&istiod, &format!("/api/v1/namespaces/demo/pods/{name}"), pod).await;
    }
    let held = |r: &DiscoveryResponse| {
        use prost::Message;
        let mut uids: Vec<String> = r
            .resources
            .iter()
            .map(|a| trellis_proto::trellis::pod::v1::PodMembership::decode(a.value.as_slice()).unwrap().uid)
            .collect();
        uids.sort();
        uids
    };
    let named = |n: &str| Node {
        id: "ztunnel~172.30.0.11~ztunnel.istio-system~istio-system.svc.cluster.local".into(),
        metadata: Some(Struct {
            fields: [("NODE_NAME".to_string(), Value { kind: Some(Kind::StringValue(n.into())) })]
                .into_iter()
                .collect(),
        }),
        ..Default::default()
    };
    let mut node1 = Sotw::connect_as(&istiod, named("node1")).await;
    node1.send(trellis_proto::POD_MEMBERSHIP_TYPE_URL, &[], None, None).await;
    assert_eq!(held(&node1.recv().await), ["Kubernetes//v1/Pod/demo/a"]);
    // Named explicitly, another node's pod is still not served.
    node1.send(trellis_proto::POD_MEMBERSHIP_TYPE_URL, &["Kubernetes//v1/Pod/demo/b"], None, None).await;
    assert!(held(&node1.recv().await).is_empty());
    // A client that names no node (debugging, on the plaintext port) sees every pod.
    let mut anyone = Sotw::connect_as(&istiod, Node { id: "debug".into(), ..Default::default() }).await;
    anyone.send(trellis_proto::POD_MEMBERSHIP_TYPE_URL, &[], None, None).await;
    assert_eq!(held(&anyone.recv().await), ["Kubernetes//v1/Pod/demo/a", "Kubernetes//v1/Pod/demo/b"]);
}
