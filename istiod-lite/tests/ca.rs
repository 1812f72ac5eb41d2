//! The CA over TLS on the secure port, with a node token: issues for the node's own workloads,
//! denies others, rejects malformed CSRs.

mod common;

use std::time::Duration;

use common::Istiod;
use hyper::Method;
use prost_types::{value::Kind, Struct, Value as PValue};
use rcgen::{CertificateParams, KeyPair, SanType};
use serde_json::json;
use tonic::transport::Channel;
use tonic::Code;
use trellis_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use trellis_proto::istio::v1::auth::IstioCertificateRequest;
use x509_parser::prelude::*;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";

async fn setup() -> (Istiod, IstioCertificateServiceClient<Channel>, String) {
    setup_with(Istiod::start().await).await
}

async fn setup_with(s: Istiod) -> (Istiod, IstioCertificateServiceClient<Channel>, String) {
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"}, "spec": {"nodeName": "node1", "serviceAccountName": "client"}, "status": {"podIP": "10.244.1.5"}});
    s.api().ok(Method::PUT, "/api/v1/namespaces/demo/pods/client", Some(&pod)).await.unwrap();
    let root = s.root_pem();
    let channel = s.secure_channel().await;
    (s, IstioCertificateServiceClient::new(channel), root)
}

fn csr(identity: &str, key: &KeyPair) -> String {
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(identity.try_into().unwrap())];
    p.serialize_request(key).unwrap().pem().unwrap()
}

fn request(
    csr: String,
    impersonate: Option<&str>,
    ttl: i64,
    token: Option<&str>,
) -> tonic::Request<IstioCertificateRequest> {
    let mut fields = std::collections::BTreeMap::new();
    if let Some(id) = impersonate {
        fields.insert("ImpersonatedIdentity".to_string(), PValue { kind: Some(Kind::StringValue(id.into())) });
    }
    let mut r =
        tonic::Request::new(IstioCertificateRequest { csr, validity_duration: ttl, metadata: Some(Struct { fields }) });
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

/// node1 requests CLIENT_ID with `ttl` seconds; returns the response chain.
async fn issue_client(
    s: &Istiod,
    ca: &mut IstioCertificateServiceClient<Channel>,
    key: &KeyPair,
    ttl: i64,
) -> Vec<String> {
    let token = s.running.tokens.issue("node1").unwrap();
    ca.create_certificate(request(csr(CLIENT_ID, key), Some(CLIENT_ID), ttl, Some(&token)))
        .await
        .unwrap()
        .into_inner()
        .cert_chain
}

/// Seconds between the leaf's not_before and not_after.
fn lifetime(leaf_pem: &str) -> i64 {
    let d = der(leaf_pem);
    let (_, leaf) = X509Certificate::from_der(&d).unwrap();
    leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp()
}

fn der(pem_text: &str) -> Vec<u8> {
    ::pem::parse(pem_text).unwrap().into_contents()
}

#[tokio::test]
async fn issues_for_a_workload_on_the_callers_node() {
    let (s, mut ca, root) = setup().await;
    let key = KeyPair::generate().unwrap();
    let chain = issue_client(&s, &mut ca, &key, 600).await;
    assert_eq!(chain.len(), 2, "leaf then root");
    assert_eq!(chain[1].trim(), root.trim());
    let leaf_der = der(&chain[0]);
    let root_der = der(&root);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let (_, root_cert) = X509Certificate::from_der(&root_der).unwrap();
    leaf.verify_signature(Some(root_cert.public_key())).expect("leaf is signed by the mesh root");
    let sans: Vec<String> =
        leaf.subject_alternative_name().unwrap().unwrap().value.general_names.iter().map(|g| g.to_string()).collect();
    assert_eq!(sans, vec![format!("URI({CLIENT_ID})")]);
    assert_eq!(leaf.public_key().subject_public_key.data.as_ref(), key.public_key_raw());
    let life = lifetime(&chain[0]);
    assert!((600..=700).contains(&life), "requested TTL honoured (+60s backdate): {life}");

    // A request beyond the configured cap gets the cap.
    let life = lifetime(&issue_client(&s, &mut ca, &key, 30 * 24 * 3600).await[0]);
    assert!(life <= 3600 + 60, "TTL capped by --max-cert-ttl: {life}");
}

#[tokio::test]
async fn denies_other_nodes_workloads_and_unauthenticated_callers() {
    let (s, mut ca, _) = setup().await;
    let other = s.running.tokens.issue("node2").unwrap();
    let key = KeyPair::generate().unwrap();
    let cases: Vec<(&str, tonic::Request<IstioCertificateRequest>, Code)> = vec![
        (
            "workload on another node",
            request(csr(CLIENT_ID, &key), Some(CLIENT_ID), 0, Some(&other)),
            Code::PermissionDenied,
        ),
        ("no token", request(csr(CLIENT_ID, &key), Some(CLIENT_ID), 0, None), Code::Unauthenticated),
        (
            "forged token",
            request(csr(CLIENT_ID, &key), Some(CLIENT_ID), 0, Some("node1.Zm9yZ2Vk")),
            Code::Unauthenticated,
        ),
        ("no impersonation", request(csr(CLIENT_ID, &key), None, 0, Some(&other)), Code::PermissionDenied),
        (
            "foreign trust domain",
            request(
                csr("spiffe://evil.org/ns/demo/sa/client", &key),
                Some("spiffe://evil.org/ns/demo/sa/client"),
                0,
                Some(&other),
            ),
            Code::PermissionDenied,
        ),
    ];
    for (name, req, want) in cases {
        let err = ca.create_certificate(req).await.expect_err(name);
        assert_eq!(err.code(), want, "{name}: {}", err.message());
    }
    let metrics =
        s.api().call(Method::GET, "/metrics", None).await.unwrap().body.as_str().unwrap_or_default().to_string();
    assert!(metrics.contains("citadel_server_csr_denied_total{reason=\"not_on_node\"} 1"), "{metrics}");
}

#[tokio::test]
async fn rejects_malformed_or_mismatched_csrs() {
    let (s, mut ca, _) = setup().await;
    let token = s.running.tokens.issue("node1").unwrap();
    let key = KeyPair::generate().unwrap();
    let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let good = csr(CLIENT_ID, &key);
    let mut tampered = der(&good);
    let n = tampered.len();
    tampered[n - 5] ^= 0xff;
    let tampered = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", tampered));
    let cases = vec![
        ("garbage", "not a csr".to_string()),
        ("tampered signature", tampered),
        ("identity mismatch", csr("spiffe://cluster.local/ns/demo/sa/other", &key)),
        ("weak key type", csr(CLIENT_ID, &ed)),
    ];
    for (name, body) in cases {
        let err = ca.create_certificate(request(body, Some(CLIENT_ID), 0, Some(&token))).await.expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {}", err.message());
    }
}

#[test]
fn generated_root_is_p256_ten_years_with_a_private_key_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let _a = istiod_lite::ca::Authority::load_or_create(dir.path(), "cluster.local").unwrap();
    let mode = std::fs::metadata(dir.path().join("root-key.pem")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let cert_mode = std::fs::metadata(dir.path().join("root-cert.pem")).unwrap().permissions().mode();
    assert_eq!(cert_mode & 0o777, 0o644, "clients can read the root");
    let root = std::fs::read_to_string(dir.path().join("root-cert.pem")).unwrap();
    let d = der(&root);
    let (_, cert) = X509Certificate::from_der(&d).unwrap();
    let years = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / (365 * 24 * 3600);
    assert_eq!(years, 10);
    assert!(cert.is_ca());
    assert_eq!(
        cert.public_key().algorithm.parameters.as_ref().unwrap().as_oid().unwrap().to_id_string(),
        "1.2.840.10045.3.1.7"
    );
    // Reloading keeps the same root.
    let _b = istiod_lite::ca::Authority::load_or_create(dir.path(), "cluster.local").unwrap();
    assert_eq!(std::fs::read_to_string(dir.path().join("root-cert.pem")).unwrap(), root);
}

/// An operator's CA: an intermediate valid until `until_s` seconds from now, its key, and the
/// root that signed it.
fn operator_ca(until_s: i64) -> (rcgen::Certificate, KeyPair, rcgen::Certificate) {
    let root_key = KeyPair::generate().unwrap();
    let mut rp = CertificateParams::default();
    rp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = rp.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&rp, &root_key);
    let int_key = KeyPair::generate().unwrap();
    let mut ip = CertificateParams::default();
    ip.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ip.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    ip.not_after = ::time::OffsetDateTime::now_utc() + ::time::Duration::seconds(until_s);
    let int = ip.signed_by(&int_key, &issuer).unwrap();
    (int, int_key, root)
}

fn install(dir: &std::path::Path, int: &rcgen::Certificate, key: &KeyPair, root: &rcgen::Certificate) {
    std::fs::write(dir.join("ca-cert.pem"), int.pem()).unwrap();
    std::fs::write(dir.join("ca-key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("root-cert.pem"), root.pem()).unwrap();
}

#[test]
fn operator_provided_intermediate_is_used_and_chained_to_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let (int, int_key, root) = operator_ca(3600);
    install(dir.path(), &int, &int_key, &root);
    let a = istiod_lite::ca::Authority::load_or_create(dir.path(), "cluster.local").unwrap();
    let key = KeyPair::generate().unwrap();
    let chain = a.sign_workload(&csr(CLIENT_ID, &key), CLIENT_ID, Duration::from_secs(60)).unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(chain[2].trim(), root.pem().trim());
    let (leaf_der, int_der) = (der(&chain[0]), der(&chain[1]));
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let (_, intc) = X509Certificate::from_der(&int_der).unwrap();
    leaf.verify_signature(Some(intc.public_key())).expect("signed by the intermediate");
}

#[test]
fn half_of_a_ca_key_pair_stops_startup_and_never_replaces_the_root() {
    use istiod_lite::ca::Authority;
    // The operator's intermediate without its key (a secret not mounted yet).
    let dir = tempfile::tempdir().unwrap();
    let (int, int_key, root) = operator_ca(3600);
    install(dir.path(), &int, &int_key, &root);
    std::fs::remove_file(dir.path().join("ca-key.pem")).unwrap();
    let err = Authority::load_or_create(dir.path(), "cluster.local").err().expect("refused").to_string();
    assert!(err.contains("ca-cert.pem is present but ca-key.pem is not"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.path().join("root-cert.pem")).unwrap(), root.pem());
    assert!(!dir.path().join("root-key.pem").exists(), "no root was generated");

    // A generated root whose key was lost.
    let dir = tempfile::tempdir().unwrap();
    Authority::load_or_create(dir.path(), "cluster.local").unwrap();
    let before = std::fs::read_to_string(dir.path().join("root-cert.pem")).unwrap();
    std::fs::remove_file(dir.path().join("root-key.pem")).unwrap();
    let err = Authority::load_or_create(dir.path(), "cluster.local").err().expect("refused").to_string();
    assert!(
        err.contains("root-cert.pem is present but root-key.pem is not; refusing to create a new mesh root"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(dir.path().join("root-cert.pem")).unwrap(), before, "the root is untouched");
}

#[test]
fn an_expired_signer_is_refused_at_start_and_once_it_expires() {
    use istiod_lite::ca::{Authority, CaError};
    let dir = tempfile::tempdir().unwrap();
    let (int, int_key, root) = operator_ca(-60);
    install(dir.path(), &int, &int_key, &root);
    let err = Authority::load_or_create(dir.path(), "cluster.local").err().expect("refused");
    assert!(matches!(err, CaError::SignerExpired(_)), "{err}");

    // Valid at start, expired two seconds later: no certificate whose validity ends before it starts.
    let (int, int_key, root) = operator_ca(2);
    install(dir.path(), &int, &int_key, &root);
    let a = Authority::load_or_create(dir.path(), "cluster.local").unwrap();
    let key = KeyPair::generate().unwrap();
    assert!(a.sign_workload(&csr(CLIENT_ID, &key), CLIENT_ID, Duration::from_secs(60)).is_ok());
    std::thread::sleep(Duration::from_millis(2500));
    let err = a.sign_workload(&csr(CLIENT_ID, &key), CLIENT_ID, Duration::from_secs(60)).unwrap_err();
    assert!(matches!(err, CaError::SignerExpired(_)), "{err}");
    assert!(err.to_string().contains("signing certificate expired"), "{err}");
}

#[tokio::test]
async fn unspecified_validity_gets_the_24h_default() {
    let s =
        Istiod::start_full(tempfile::tempdir().unwrap(), Duration::from_secs(30), Duration::from_secs(7 * 24 * 3600))
            .await;
    let (s, mut ca, _) = setup_with(s).await;
    let chain = issue_client(&s, &mut ca, &KeyPair::generate().unwrap(), 0).await;
    assert_eq!(lifetime(&chain[0]), 24 * 3600 + 60, "24 h plus the 60 s backdate");
}
