//! ztunnel's xDS client against a real istiod-lite: initial sync, updates and deletes, serving the
//! last state while istiod-lite is down, and resync after it returns.

mod common;

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use common::{free_port, istiod, start_xds_client, start_xds_client_with, Ports};
use hyper::Method;
use serde_json::json;
use ztunnel::state::State;

fn pod(name: &str, ip: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "echo"}}, "spec": {"nodeName": "node1"}, "status": {"podIP": ip}})
}

async fn eventually(what: &str, state: &Arc<RwLock<State>>, cond: impl Fn(&State) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond(&state.read().unwrap()) {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct Mesh {
    dir: tempfile::TempDir,
    ports: Ports,
    running: istiod_lite::server::Running,
    api: meshctl::client::Client,
}

/// istiod-lite on free ports, with the ambient namespace `demo`.
async fn mesh_with_demo_namespace() -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports { api: free_port(), xds: Some(free_port()), secure: free_port() };
    let running = istiod(dir.path(), &ports, Duration::from_secs(3600)).await;
    let api = meshctl::client::Client::new(&format!("http://127.0.0.1:{}", ports.api)).unwrap();
    api.ok(Method::PUT, "/api/v1/namespaces/demo", Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}}}))).await.unwrap();
    Mesh { dir, ports, running, api }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncs_follows_changes_survives_an_outage_and_resyncs() {
    let Mesh { dir, ports, running, api } = mesh_with_demo_namespace().await;
    let xds_port = ports.xds.unwrap();
    api.ok(Method::PUT, "/api/v1/namespaces/demo/pods/a", Some(&pod("a", "10.244.1.2"))).await.unwrap();
    api.ok(Method::PUT, "/api/v1/namespaces/demo/services/echo", Some(&json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"}, "spec": {"selector": {"app": "echo"}, "clusterIP": "10.96.0.9", "ports": [{"port": 80, "targetPort": 8080}]}}))).await.unwrap();
    api.ok(Method::PUT, "/apis/security.istio.io/v1/namespaces/demo/authorizationpolicies/p", Some(&json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "p"}, "spec": {"selector": {"matchLabels": {"app": "echo"}}, "rules": [{}]}}))).await.unwrap();

    let (state, mut synced, task) = start_xds_client(format!("http://127.0.0.1:{xds_port}"));
    tokio::time::timeout(Duration::from_secs(10), synced.wait_for(|s| *s)).await.expect("synced").unwrap();
    // istiod-lite translates writes asynchronously, so the first snapshot may predate them.
    eventually("the pod", &state, |s| {
        s.workload_by_ip(ip("10.244.1.2")).is_some()
            && s.service_by_vip(ip("10.96.0.9")).is_some()
            && s.policy("demo/p").is_some()
    })
    .await;
    {
        let s = state.read().unwrap();
        let w = s.workload_by_ip(ip("10.244.1.2")).expect("pod indexed by IP");
        assert_eq!(w.uid, "Kubernetes//v1/Pod/demo/a");
        assert_eq!(w.authorization_policies, vec!["demo/p".to_string()]);
        assert_eq!(s.service_by_vip(ip("10.96.0.9")).unwrap().hostname, "echo.demo.svc.cluster.local");
        assert!(s.policy("demo/p").is_some());
        assert!(s.workload_by_uid("Kubernetes//v1/Pod/demo/a").is_some());
    }

    api.ok(Method::PUT, "/api/v1/namespaces/demo/pods/a", Some(&pod("a", "10.244.1.3"))).await.unwrap();
    eventually("the pod's new IP", &state, |s| {
        s.workload_by_ip(ip("10.244.1.3")).is_some() && s.workload_by_ip(ip("10.244.1.2")).is_none()
    })
    .await;

    // istiod-lite goes away: the last state keeps serving.
    running.shutdown().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        state.read().unwrap().workload_by_ip(ip("10.244.1.3")).is_some(),
        "last good state kept while istiod-lite is down"
    );

    // It returns (same state dir and port) and changes made then arrive.
    let running = istiod(dir.path(), &ports, Duration::from_secs(3600)).await;
    api.ok(Method::PUT, "/api/v1/namespaces/demo/pods/b", Some(&pod("b", "10.244.1.4"))).await.unwrap();
    api.ok(Method::DELETE, "/api/v1/namespaces/demo/pods/a", None).await.unwrap();
    eventually("resync after restart", &state, |s| {
        s.workload_by_ip(ip("10.244.1.4")).is_some() && s.workload_by_uid("Kubernetes//v1/Pod/demo/a").is_none()
    })
    .await;
    let (w, svc, pol) = state.read().unwrap().counts();
    assert_eq!((w, svc, pol), (1, 1, 2), "b, echo, demo/p and the static strict policy");
    task.abort();
    running.shutdown().await;
}

/// A node token is rotated by writing the new token to `--token-file`: istiod-lite ends the
/// stream opened with the old token, and the reconnect presents the new one. No restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_is_read_from_the_token_file_on_reconnect() {
    let Mesh { dir, ports, running, api } = mesh_with_demo_namespace().await;
    let token_file = dir.path().join("node1.token");
    std::fs::write(&token_file, running.tokens.issue("node1").unwrap()).unwrap();
    let root_pem = std::fs::read_to_string(dir.path().join("ca/root-cert.pem")).unwrap();
    let token = ztunnel::token::NodeToken::from_file(&token_file).unwrap();
    let (state, mut synced, task) =
        start_xds_client_with(format!("https://127.0.0.1:{}", ports.secure), Some(root_pem), token);
    tokio::time::timeout(Duration::from_secs(10), synced.wait_for(|s| *s)).await.expect("synced").unwrap();
    api.ok(Method::PUT, "/api/v1/namespaces/demo/pods/a", Some(&pod("a", "10.244.1.2"))).await.unwrap();
    eventually("pod a", &state, |s| s.workload_by_ip(ip("10.244.1.2")).is_some()).await;

    // As `meshctl create token node node1 > FILE` does.
    std::fs::write(&token_file, running.tokens.issue("node1").unwrap()).unwrap();
    api.ok(Method::PUT, "/api/v1/namespaces/demo/pods/b", Some(&pod("b", "10.244.1.3"))).await.unwrap();
    eventually("pod b, over the stream opened with the new token", &state, |s| {
        s.workload_by_ip(ip("10.244.1.3")).is_some()
    })
    .await;

    // A rotation the file never learns of cuts the node off: later changes no longer arrive.
    running.tokens.issue("node1").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.ok(Method::PUT, "/api/v1/namespaces/demo/pods/c", Some(&pod("c", "10.244.1.4"))).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    {
        let s = state.read().unwrap();
        assert!(s.workload_by_ip(ip("10.244.1.4")).is_none(), "a revoked token gets no updates");
        assert!(s.workload_by_ip(ip("10.244.1.3")).is_some(), "the last good state is kept");
    }
    task.abort();
    running.shutdown().await;
}

/// Kubernetes reuses a deleted pod's IP. The old pod may still be listed, and even updated, after
/// the new pod has it; removing the old pod must leave the IP with the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_pod_ip_stays_with_the_new_pod() {
    let Mesh { dir: _dir, ports, running, api } = mesh_with_demo_namespace().await;
    let xds_port = ports.xds.unwrap();
    api.ok(Method::PUT, "/api/v1/namespaces/demo/pods/old", Some(&pod("old", "10.244.1.2"))).await.unwrap();
    let (state, mut synced, task) = start_xds_client(format!("http://127.0.0.1:{xds_port}"));
    tokio::time::timeout(Duration::from_secs(10), synced.wait_for(|s| *s)).await.expect("synced").unwrap();
    let (old, new) = ("Kubernetes//v1/Pod/demo/old", "Kubernetes//v1/Pod/demo/new");
    let owner = |s: &State| s.workload_by_ip(ip("10.244.1.2")).map(|w| w.uid.clone());
    eventually("the old pod", &state, |s| owner(s).as_deref() == Some(old)).await;

    api.ok(Method::PUT, "/api/v1/namespaces/demo/pods/new", Some(&pod("new", "10.244.1.2"))).await.unwrap();
    eventually("the new pod", &state, |s| s.workload_by_uid(new).is_some()).await;
    assert_eq!(owner(&state.read().unwrap()).as_deref(), Some(new));

    let mut renamed = pod("old", "10.244.1.2");
    renamed["spec"]["serviceAccountName"] = json!("renamed");
    api.ok(Method::PUT, "/api/v1/namespaces/demo/pods/old", Some(&renamed)).await.unwrap();
    eventually("the old pod's update", &state, |s| {
        s.workload_by_uid(old).is_some_and(|w| w.service_account == "renamed")
    })
    .await;
    assert_eq!(owner(&state.read().unwrap()).as_deref(), Some(new), "an update does not take the IP back");

    api.ok(Method::DELETE, "/api/v1/namespaces/demo/pods/old", None).await.unwrap();
    eventually("the old pod's removal", &state, |s| s.workload_by_uid(old).is_none()).await;
    assert_eq!(owner(&state.read().unwrap()).as_deref(), Some(new), "the IP stays with the new pod");
    task.abort();
    running.shutdown().await;
}

/// Every restart of istiod-lite costs one short reconnect: a session that synced resets the
/// backoff, so it does not keep doubling across restarts (0.5 s, 1 s, 2 s, 4 s, 8 s, ...).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_of_many_istiod_restarts_is_followed_by_a_prompt_resync() {
    let Mesh { dir, ports, mut running, api } = mesh_with_demo_namespace().await;
    let (state, mut synced, task) = start_xds_client(format!("http://127.0.0.1:{}", ports.xds.unwrap()));
    tokio::time::timeout(Duration::from_secs(10), synced.wait_for(|s| *s)).await.expect("synced").unwrap();
    for restart in 0..6 {
        running.shutdown().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        running = istiod(dir.path(), &ports, Duration::from_secs(3600)).await;
        let name = format!("after-restart-{restart}");
        api.ok(
            Method::PUT,
            &format!("/api/v1/namespaces/demo/pods/{name}"),
            Some(&pod(&name, &format!("10.244.2.{}", restart + 1))),
        )
        .await
        .unwrap();
        let uid = format!("Kubernetes//v1/Pod/demo/{name}");
        // Backoff that kept doubling would wait 8 s before the fifth reconnect.
        let deadline = Instant::now() + Duration::from_secs(4);
        while state.read().unwrap().workload_by_uid(&uid).is_none() {
            assert!(Instant::now() < deadline, "restart {restart}: no resync within 4 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    task.abort();
    running.shutdown().await;
}
