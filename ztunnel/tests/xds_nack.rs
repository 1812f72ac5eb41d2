//! ztunnel's xDS client against a scripted control plane, for what istiod-lite cannot be made to
//! send: invalid resources (istiod-lite validates everything), where valid resources and removals
//! in the same response apply, an invalid workload keeps its last good state, an invalid policy
//! (or one with a field this ztunnel does not know) is enforced as a deny-all of its scope, and
//! the NACK names every reason; and a split push held
//! between its pieces, where the client is not synced until the last piece.

mod common;

use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use common::start_xds_client;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use trellis_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use trellis_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use trellis_proto::istio::security::{Action, Authorization, Rule, Scope};
use trellis_proto::istio::workload::{address, Address, Workload};
use trellis_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, NODE_TYPE_URL, POD_MEMBERSHIP_TYPE_URL};
use ztunnel::state::policy::{evaluate, Connection, Decision};

type Responses = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
type Sotw = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

/// Sends the first stream whatever the test pushes, and records the ACKs and NACKs that come back.
struct Scripted {
    pushes: Mutex<Option<mpsc::Receiver<DeltaDiscoveryResponse>>>,
    acks: mpsc::Sender<DeltaDiscoveryRequest>,
}

/// A scripted control plane on a free port: (its address, where to push, the replies).
async fn scripted(
) -> (std::net::SocketAddr, mpsc::Sender<DeltaDiscoveryResponse>, mpsc::Receiver<DeltaDiscoveryRequest>) {
    let (pushes_tx, pushes) = mpsc::channel(16);
    let (acks_tx, acks) = mpsc::channel(16);
    let server = Scripted { pushes: Mutex::new(Some(pushes)), acks: acks_tx };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (conns_tx, conns) = mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = conns_tx.send(Ok::<_, std::io::Error>(tcp)).await;
        }
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(server))
            .serve_with_incoming(ReceiverStream::new(conns)),
    );
    (addr, pushes_tx, acks)
}

async fn next_reply(acks: &mut mpsc::Receiver<DeltaDiscoveryRequest>) -> DeltaDiscoveryRequest {
    tokio::time::timeout(Duration::from_secs(10), acks.recv()).await.expect("an ACK or NACK").unwrap()
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Scripted {
    type StreamAggregatedResourcesStream = Sotw;
    type DeltaAggregatedResourcesStream = Responses;

    async fn stream_aggregated_resources(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Sotw>, Status> {
        Err(Status::unimplemented("delta only"))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Responses>, Status> {
        let pushes = self.pushes.lock().unwrap().take().ok_or_else(|| Status::unavailable("one stream only"))?;
        let acks = self.acks.clone();
        let mut inbound = req.into_inner();
        tokio::spawn(async move {
            while let Some(Ok(req)) = inbound.next().await {
                if !req.response_nonce.is_empty() {
                    let _ = acks.send(req).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(pushes).map(Ok))))
    }
}

fn resource(name: &str, version: &str, type_url: &str, body: Vec<u8>) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(trellis_proto::envoy::google::protobuf::Any { type_url: type_url.into(), value: body }),
        ..Default::default()
    }
}

fn workload(uid: &str, ns: &str, ip: [u8; 4]) -> Vec<u8> {
    let w = Workload { uid: uid.into(), namespace: ns.into(), addresses: vec![ip.to_vec()], ..Default::default() };
    Address { r#type: Some(address::Type::Workload(w)) }.encode_to_vec()
}

fn response(type_url: &str, nonce: &str, resources: Vec<Resource>, removed: Vec<&str>) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: nonce.into(),
        resources,
        removed_resources: removed.into_iter().map(String::from).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_resources_are_nacked_while_the_rest_applies_and_bad_policies_deny() {
    // A namespace-wide DENY whose port is out of range, next to a valid ALLOW in another namespace.
    let broken_deny = Authorization {
        name: "broken".into(),
        namespace: "shop".into(),
        scope: Scope::Namespace as i32,
        action: Action::Deny as i32,
        rules: vec![Rule {
            clauses: vec![trellis_proto::istio::security::Clause {
                matches: vec![trellis_proto::istio::security::Match {
                    destination_ports: vec![70000],
                    ..Default::default()
                }],
            }],
        }],
    };
    let allow = Authorization {
        name: "open".into(),
        namespace: "blog".into(),
        scope: Scope::Namespace as i32,
        action: Action::Allow as i32,
        rules: vec![Rule { clauses: vec![] }],
    };
    // An ALLOW from a newer control plane: its only condition is a Match field (11) this proto
    // lacks. prost would decode it as an empty Match; it must not admit anyone.
    let newer = {
        let len = |n: usize| u8::try_from(n).unwrap();
        let in_match = [0x58, 0x01];
        let clause = [&[0x12, len(in_match.len())][..], &in_match].concat();
        let rule = [&[0x0a, len(clause.len())][..], &clause].concat();
        let head = Authorization {
            name: "newer".into(),
            namespace: "news".into(),
            scope: Scope::Namespace as i32,
            action: Action::Allow as i32,
            rules: vec![],
        };
        [head.encode_to_vec(), vec![0x2a, len(rule.len())], rule].concat()
    };
    let responses = vec![
        response(
            AUTHORIZATION_TYPE_URL,
            "p1",
            vec![
                resource("shop/broken", "1", AUTHORIZATION_TYPE_URL, broken_deny.encode_to_vec()),
                resource("blog/open", "1", AUTHORIZATION_TYPE_URL, allow.encode_to_vec()),
                resource("news/newer", "1", AUTHORIZATION_TYPE_URL, newer),
            ],
            vec![],
        ),
        response(
            ADDRESS_TYPE_URL,
            "a1",
            vec![
                resource("shop-pod", "1", ADDRESS_TYPE_URL, workload("shop-pod", "shop", [10, 0, 0, 1])),
                resource("blog-pod", "1", ADDRESS_TYPE_URL, workload("blog-pod", "blog", [10, 0, 0, 2])),
                resource("gone", "1", ADDRESS_TYPE_URL, workload("gone", "blog", [10, 0, 0, 3])),
                resource("news-pod", "1", ADDRESS_TYPE_URL, workload("news-pod", "news", [10, 0, 0, 5])),
            ],
            vec![],
        ),
        // The next push: a valid update, a removal, and a broken update of a known workload.
        response(
            ADDRESS_TYPE_URL,
            "a2",
            vec![
                resource("blog-pod", "2", ADDRESS_TYPE_URL, workload("blog-pod", "blog", [10, 0, 0, 4])),
                resource("shop-pod", "2", ADDRESS_TYPE_URL, workload("other-uid", "shop", [10, 0, 0, 9])),
            ],
            vec!["gone"],
        ),
        response(NODE_TYPE_URL, "n1", vec![], vec![]),
        response(POD_MEMBERSHIP_TYPE_URL, "m1", vec![], vec![]),
    ];
    let (addr, pushes, mut acks) = scripted().await;
    for r in responses {
        pushes.send(r).await.unwrap();
    }
    let (state, mut synced, task) = start_xds_client(format!("http://{addr}"));
    let mut replies = std::collections::HashMap::new();
    while replies.len() < 5 {
        let r = next_reply(&mut acks).await;
        replies.insert(r.response_nonce.clone(), r.error_detail.map(|e| e.message));
    }
    tokio::time::timeout(Duration::from_secs(5), synced.wait_for(|s| *s)).await.expect("synced").unwrap();

    // NACKs name each bad resource and why; clean responses are ACKed.
    let policy_nack = replies["p1"].clone().expect("the policy response is NACKed");
    assert!(policy_nack.contains("shop/broken") && policy_nack.contains("port out of range"), "{policy_nack}");
    assert!(
        policy_nack.contains("news/newer: rules[0].clauses[0].matches[0] has field 11"),
        "the unknown field is named: {policy_nack}"
    );
    let address_nack = replies["a2"].clone().expect("the second address push is NACKed");
    assert!(address_nack.contains("shop-pod") && address_nack.contains("does not match"), "{address_nack}");
    for nonce in ["a1", "n1", "m1"] {
        assert_eq!(replies[nonce], None, "{nonce} is ACKed");
    }

    let s = state.read().unwrap();
    // The valid update and the removal in the NACKed push applied; the broken update did not.
    assert!(s.workload_by_ip("10.0.0.4".parse().unwrap()).is_some(), "valid update applied");
    assert!(s.workload_by_ip("10.0.0.3".parse().unwrap()).is_none(), "removal applied");
    let shop = s.workload_by_ip("10.0.0.1".parse().unwrap()).expect("last good shop-pod kept").clone();
    assert!(s.workload_by_ip("10.0.0.9".parse().unwrap()).is_none(), "the broken update is not applied");
    // The broken DENY denies everything in its namespace, and nothing outside it.
    let conn = |dst: &str| Connection {
        source: None,
        source_ip: "10.0.0.7".parse().unwrap(),
        destination: dst.parse().unwrap(),
    };
    assert_eq!(evaluate(&s, &shop, &conn("10.0.0.1:8080")), Decision::Deny("shop/broken".into()));
    let blog = s.workload_by_ip("10.0.0.4".parse().unwrap()).unwrap().clone();
    assert_eq!(evaluate(&s, &blog, &conn("10.0.0.4:8080")), Decision::Allow, "other namespaces are untouched");
    let news = s.workload_by_ip("10.0.0.5".parse().unwrap()).unwrap().clone();
    assert_eq!(evaluate(&s, &news, &conn("10.0.0.5:8080")), Decision::Deny("news/newer".into()), "fails closed");
    drop(s);
    task.abort();
}

/// Delta xDS cannot say "more follows", so istiod-lite marks every piece of a split push but the
/// last (`PARTIAL_PUSH_SUFFIX`). Until the last piece of each type's first push has arrived, pods
/// must not be enrolled, or they would run with, say, half of the policies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_is_synced_only_at_the_last_piece_of_a_split_push() {
    let policy = |name: &str| Authorization {
        name: name.into(),
        namespace: "shop".into(),
        scope: Scope::Namespace as i32,
        action: Action::Deny as i32,
        rules: vec![Rule { clauses: vec![] }],
    };
    let piece = |nonce: &str, name: &str, version: &str| DeltaDiscoveryResponse {
        system_version_info: version.into(),
        ..response(
            AUTHORIZATION_TYPE_URL,
            nonce,
            vec![resource(&format!("shop/{name}"), "1", AUTHORIZATION_TYPE_URL, policy(name).encode_to_vec())],
            vec![],
        )
    };
    let (addr, pushes, mut acks) = scripted().await;
    for r in [
        response(ADDRESS_TYPE_URL, "a1", vec![], vec![]),
        response(NODE_TYPE_URL, "n1", vec![], vec![]),
        response(POD_MEMBERSHIP_TYPE_URL, "m1", vec![], vec![]),
        piece("p1", "first", &format!("7{}", trellis_proto::PARTIAL_PUSH_SUFFIX)),
    ] {
        pushes.send(r).await.unwrap();
    }
    let (state, synced, task) = start_xds_client(format!("http://{addr}"));
    for _ in 0..4 {
        assert_eq!(next_reply(&mut acks).await.error_detail, None);
    }
    // The client marks itself synced right after it ACKs, so give a wrong one time to do so.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!*synced.borrow(), "not synced while a push is half delivered");
    assert!(state.read().unwrap().policy("shop/first").is_some(), "the first piece applies at once");

    pushes.send(piece("p2", "second", "7")).await.unwrap();
    assert_eq!(next_reply(&mut acks).await.response_nonce, "p2");
    let mut synced = synced;
    tokio::time::timeout(Duration::from_secs(5), synced.wait_for(|s| *s)).await.expect("synced").unwrap();
    assert!(state.read().unwrap().policy("shop/second").is_some());
    task.abort();
}
