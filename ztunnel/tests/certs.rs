//! The certificate manager against istiod-lite's real CA over TLS: first issue, renewal at
//! half-life, keeping the valid certificate while the CA is down, and recovery after it returns.

use std::time::{Duration, Instant, SystemTime};

use hbone::Identity;
use hyper::Method;
use istiod_lite::server::{self, Config, Running};
use istiod_lite::xds::translate::Settings;
use serde_json::json;
use ztunnel::identity::{CaConfig, CertManager};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn istiod(dir: &std::path::Path, api: u16, secure: u16) -> Running {
    server::start(Config {
        state_dir: dir.join("state"),
        ca_dir: dir.join("ca"),
        config_dir: None,
        api_addr: format!("127.0.0.1:{api}").parse().unwrap(),
        xds_addr: None,
        secure_addr: format!("127.0.0.1:{secure}").parse().unwrap(),
        settings: Settings::default(),
        max_cert_ttl: Duration::from_secs(4),
        tls_sans: vec![],
        xds_send_timeout: Duration::from_secs(30),
    })
    .await
    .expect("istiod-lite starts")
}

const ID: &str = "spiffe://cluster.local/ns/demo/sa/client";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renews_at_half_life_and_keeps_the_valid_certificate_through_a_ca_outage() {
    let dir = tempfile::tempdir().unwrap();
    let (api, secure) = (free_port(), free_port());
    let running = istiod(dir.path(), api, secure).await;
    let client = meshctl::client::Client::new(&format!("http://127.0.0.1:{api}")).unwrap();
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"}, "spec": {"nodeName": "node1", "serviceAccountName": "client"}, "status": {"podIP": "10.244.1.5"}});
    client.ok(Method::PUT, "/api/v1/namespaces/demo/pods/client", Some(&pod)).await.unwrap();
    let token = running.tokens.issue("node1").unwrap();
    let root = std::fs::read_to_string(dir.path().join("ca/root-cert.pem")).unwrap();
    let mgr = CertManager::new(CaConfig {
        address: format!("https://127.0.0.1:{secure}"),
        root_pem: root,
        token,
        ttl: Duration::from_secs(4),
    });
    let id = Identity::parse(ID).unwrap();

    let first = mgr.get(&id).await.expect("first certificate");
    assert_eq!(hbone::tls::spiffe_ids(&first.chain[0]), vec![id.clone()]);
    assert!(first.chain.len() >= 2, "leaf and root");

    // Renewal at half-life (~2 s of a 4 s certificate).
    let deadline = Instant::now() + Duration::from_secs(6);
    let renewed = loop {
        let (_, not_after) = mgr.held()[0].clone();
        if not_after > first.not_after {
            break not_after;
        }
        assert!(Instant::now() < deadline, "no renewal at half-life");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // CA down: renewals fail, the last certificate stays in place.
    running.shutdown().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, during_outage) = mgr.held()[0].clone();
    assert!(during_outage >= renewed, "still-valid certificate kept while the CA is down");

    // CA back: renewals resume (the backoff is still short).
    let running = istiod(dir.path(), api, secure).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, not_after) = mgr.held()[0].clone();
        if not_after > during_outage && not_after > SystemTime::now() {
            break;
        }
        assert!(Instant::now() < deadline, "no renewal after the CA returned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.shutdown().await;
}

#[tokio::test]
async fn a_refused_identity_is_an_error_not_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (api, secure) = (free_port(), free_port());
    let running = istiod(dir.path(), api, secure).await;
    let token = running.tokens.issue("node2").unwrap();
    let root = std::fs::read_to_string(dir.path().join("ca/root-cert.pem")).unwrap();
    let mgr = CertManager::new(CaConfig {
        address: format!("https://127.0.0.1:{secure}"),
        root_pem: root,
        token,
        ttl: Duration::from_secs(4),
    });
    let err = mgr.get(&Identity::parse(ID).unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("PermissionDenied") || err.to_string().contains("permission"), "{err}");
    assert!(mgr.held().is_empty());
    running.shutdown().await;
}
