//! The certificate manager against istiod-lite's real CA over TLS: first issue, renewal at
//! half-life, keeping the valid certificate while the CA is down, and recovery after it returns.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{free_port, istiod, Ports};
use hbone::Identity;
use hyper::Method;
use serde_json::json;
use ztunnel::identity::{CaConfig, CertManager};

/// A manager asking the CA on `secure` for 4 s certificates with `token`.
fn manager(dir: &std::path::Path, secure: u16, token: String) -> std::sync::Arc<CertManager> {
    let root_pem = std::fs::read_to_string(dir.join("ca/root-cert.pem")).unwrap();
    manager_trusting(dir, secure, token, roots(&root_pem))
}

/// The same, but accepting only certificates that chain to `roots`.
fn manager_trusting(
    dir: &std::path::Path,
    secure: u16,
    token: String,
    roots: std::sync::Arc<rustls::RootCertStore>,
) -> std::sync::Arc<CertManager> {
    let root_pem = std::fs::read_to_string(dir.join("ca/root-cert.pem")).unwrap();
    CertManager::new(CaConfig {
        address: format!("https://127.0.0.1:{secure}"),
        root_pem,
        token: ztunnel::token::NodeToken::fixed(token),
        ttl: Duration::from_secs(4),
        roots,
    })
}

fn roots(pem: &str) -> std::sync::Arc<rustls::RootCertStore> {
    let mut r = rustls::RootCertStore::empty();
    for b in ::pem::parse_many(pem).unwrap() {
        r.add(b.into_contents().into()).unwrap();
    }
    std::sync::Arc::new(r)
}

const ID: &str = "spiffe://cluster.local/ns/demo/sa/client";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renews_at_half_life_and_keeps_the_valid_certificate_through_a_ca_outage() {
    let dir = tempfile::tempdir().unwrap();
    let (api, secure) = (free_port(), free_port());
    let running = istiod(dir.path(), &Ports { api, xds: None, secure }, Duration::from_secs(4)).await;
    schedule_client_on_node1(api).await;
    let token = running.tokens.issue("node1").unwrap();
    let mgr = manager(dir.path(), secure, token);
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
    let running = istiod(dir.path(), &Ports { api, xds: None, secure }, Duration::from_secs(4)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, not_after) = mgr.held()[0].clone();
        if not_after > during_outage && not_after > SystemTime::now() {
            break;
        }
        assert!(Instant::now() < deadline, "no renewal after the CA returned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Once no pod has the identity, its certificate is released and no longer renewed.
    mgr.release_unused(&std::collections::HashSet::new());
    assert!(mgr.held().is_empty());
    assert!(mgr.cached(&id).is_none());
    let again = mgr.get(&id).await.expect("a new certificate on next use");
    assert_eq!(hbone::tls::spiffe_ids(&again.chain[0]), vec![id.clone()]);
    running.shutdown().await;
}

#[tokio::test]
async fn a_refused_identity_is_an_error_not_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (api, secure) = (free_port(), free_port());
    let running = istiod(dir.path(), &Ports { api, xds: None, secure }, Duration::from_secs(4)).await;
    let token = running.tokens.issue("node2").unwrap();
    let mgr = manager(dir.path(), secure, token);
    let err = mgr.get(&Identity::parse(ID).unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("PermissionDenied") || err.to_string().contains("permission"), "{err}");
    assert!(mgr.held().is_empty());
    running.shutdown().await;
}

/// A CA whose root is not the one this node trusts (it was rotated, or the node was given the
/// wrong root): its certificates are refused before anything presents them, so peers never see
/// a certificate they would reject.
#[tokio::test]
async fn a_certificate_that_does_not_chain_to_the_trusted_root_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (api, secure) = (free_port(), free_port());
    let running = istiod(dir.path(), &Ports { api, xds: None, secure }, Duration::from_secs(4)).await;
    schedule_client_on_node1(api).await;
    let other = tempfile::tempdir().unwrap();
    let other_root = istiod_lite::ca::Authority::load_or_create(other.path(), "cluster.local").unwrap();
    let token = running.tokens.issue("node1").unwrap();
    let mgr = manager_trusting(dir.path(), secure, token.clone(), roots(other_root.root_pem()));
    let err = mgr.get(&Identity::parse(ID).unwrap()).await.unwrap_err().to_string();
    assert!(err.contains("does not verify against the mesh root"), "{err}");
    assert!(mgr.held().is_empty());
    // The same CA, trusted: issued.
    manager(dir.path(), secure, token).get(&Identity::parse(ID).unwrap()).await.expect("issued");
    running.shutdown().await;
}

/// Schedules a pod with the `client` service account on node1, so node1 may ask for its identity.
async fn schedule_client_on_node1(api: u16) {
    let client = meshctl::client::Client::new(&format!("http://127.0.0.1:{api}")).unwrap();
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"}, "spec": {"nodeName": "node1", "serviceAccountName": "client"}, "status": {"podIP": "10.244.1.5"}});
    client.ok(Method::PUT, "/api/v1/namespaces/demo/pods/client", Some(&pod)).await.unwrap();
}

/// `n` callers asking for `id` at once, each on a task of its own.
async fn concurrent_gets(
    mgr: &std::sync::Arc<CertManager>,
    id: &Identity,
    n: usize,
) -> Vec<Result<ztunnel::identity::Issued, ztunnel::identity::CertError>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (mgr, id) = (mgr.clone(), id.clone());
            tokio::spawn(async move { mgr.get(&id).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("get task"));
    }
    out
}

/// istiod-lite's count of certificate signing requests received.
async fn csrs_received(api: u16) -> u64 {
    let client = meshctl::client::Client::new(&format!("http://127.0.0.1:{api}")).unwrap();
    let reply = client.ok(Method::GET, "/metrics", None).await.unwrap();
    let text = reply.body.as_str().expect("metrics are text").to_string();
    text.lines()
        .find_map(|l| {
            l.strip_prefix("citadel_server_csr_count_total ").or_else(|| l.strip_prefix("citadel_server_csr_count "))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no citadel_server_csr_count in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_one_new_identity_enrolling_together_send_one_csr() {
    let dir = tempfile::tempdir().unwrap();
    let (api, secure) = (free_port(), free_port());
    let running = istiod(dir.path(), &Ports { api, xds: None, secure }, Duration::from_secs(60)).await;
    schedule_client_on_node1(api).await;
    let mgr = manager(dir.path(), secure, running.tokens.issue("node1").unwrap());
    let id = Identity::parse(ID).unwrap();

    let gets = concurrent_gets(&mgr, &id, 8).await;
    let leaves: Vec<_> = gets.into_iter().map(|g| g.expect("certificate").chain[0].clone()).collect();
    assert!(leaves.iter().all(|l| *l == leaves[0]), "all eight callers share one certificate");
    assert_eq!(csrs_received(api).await, 1, "one CSR for eight concurrent callers");
    assert_eq!(mgr.held().len(), 1, "one entry, so one refresher");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_waiting_on_a_failed_fetch_share_its_error_and_the_next_caller_tries_again() {
    let dir = tempfile::tempdir().unwrap();
    let (api, secure) = (free_port(), free_port());
    let running = istiod(dir.path(), &Ports { api, xds: None, secure }, Duration::from_secs(60)).await;
    // No pod with this identity is scheduled on node1, so the CA refuses it.
    let mgr = manager(dir.path(), secure, running.tokens.issue("node1").unwrap());
    let id = Identity::parse(ID).unwrap();

    let gets = concurrent_gets(&mgr, &id, 4).await;
    for g in gets {
        let err = g.expect_err("refused");
        assert!(err.to_string().contains("client"), "the error names the identity: {err}");
    }
    assert_eq!(csrs_received(api).await, 1, "waiters shared the one refused request");

    // A failure is not cached: once the pod is scheduled here, the next caller gets a certificate.
    schedule_client_on_node1(api).await;
    mgr.get(&id).await.expect("a new fetch after the failed one");
    assert_eq!(csrs_received(api).await, 2);
    running.shutdown().await;
}
