//! meshctl commands against a real istiod-lite (the binary's main only maps Err to exit 1).

mod common;

use clap::Parser;
use common::Istiod;
use hyper::{Method, StatusCode};
use meshctl::commands::{run, Cli};

async fn meshctl(s: &Istiod, args: &[&str]) -> anyhow::Result<()> {
    let server = format!("http://{}", s.running.api_addr);
    let mut argv = vec!["meshctl", "--server", &server];
    argv.extend_from_slice(args);
    run(Cli::try_parse_from(argv)?).await
}

const GOOD: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: demo}\nstatus: {podIP: 10.0.0.1}\n";
const BAD: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec: {ports: [{port: 0}]}\n";

#[tokio::test]
async fn apply_validates_everything_before_writing_anything() {
    let s = Istiod::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
    std::fs::write(dir.path().join("b.yaml"), BAD).unwrap();
    let err = meshctl(&s, &["apply", "-f", dir.path().to_str().unwrap()]).await.unwrap_err().to_string();
    assert!(
        err.contains("b.yaml (document 1): Service demo/s: spec.ports[0].port: 0 is out of range 1-65535"),
        "{err}"
    );
    assert!(err.contains("nothing was applied"), "{err}");
    let api = s.api();
    assert_eq!(
        api.call(Method::GET, "/api/v1/namespaces/demo", None).await.unwrap().status,
        StatusCode::NOT_FOUND,
        "the valid file was not written either"
    );

    std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
    meshctl(&s, &["apply", "-f", dir.path().to_str().unwrap()]).await.unwrap();
    assert_eq!(
        api.ok(Method::GET, "/api/v1/namespaces/demo/pods/a", None).await.unwrap().body["status"]["podIP"],
        "10.0.0.1"
    );
    meshctl(&s, &["apply", "-f", dir.path().to_str().unwrap()]).await.expect("re-applying is unchanged, not an error");
}

#[tokio::test]
async fn label_sets_removes_and_refuses_silent_overwrite() {
    let s = Istiod::start().await;
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("a.yaml");
    std::fs::write(&f, GOOD).unwrap();
    meshctl(&s, &["apply", "-f", f.to_str().unwrap()]).await.unwrap();
    let labels = || async {
        s.api().ok(Method::GET, "/api/v1/namespaces/demo", None).await.unwrap().body["metadata"]["labels"].clone()
    };
    meshctl(&s, &["label", "namespace", "demo", "istio.io/dataplane-mode=ambient", "team=a"]).await.unwrap();
    assert_eq!(labels().await["istio.io/dataplane-mode"], "ambient");
    let err = meshctl(&s, &["label", "ns", "demo", "team=b"]).await.unwrap_err().to_string();
    assert!(err.contains("--overwrite"), "{err}");
    assert_eq!(labels().await["team"], "a");
    meshctl(&s, &["label", "ns", "demo", "team=b", "--overwrite"]).await.unwrap();
    assert_eq!(labels().await["team"], "b");
    meshctl(&s, &["label", "ns", "demo", "team-"]).await.unwrap();
    assert!(labels().await.get("team").is_none());
    assert!(meshctl(&s, &["label", "ns", "demo", "nonsense"]).await.is_err());
    assert!(meshctl(&s, &["label", "ns", "nope", "a=b"]).await.is_err());
}

#[tokio::test]
async fn get_and_delete_report_failures_as_errors() {
    let s = Istiod::start().await;
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("a.yaml");
    std::fs::write(&f, GOOD).unwrap();
    meshctl(&s, &["apply", "-f", f.to_str().unwrap()]).await.unwrap();
    for fmt in ["table", "json", "yaml"] {
        meshctl(&s, &["get", "pods", "-n", "demo", "-o", fmt]).await.unwrap();
    }
    meshctl(&s, &["get", "pod", "a", "-n", "demo"]).await.unwrap();
    meshctl(&s, &["get", "po", "-A"]).await.unwrap();
    assert!(meshctl(&s, &["get", "pod", "missing", "-n", "demo"]).await.is_err());
    assert!(meshctl(&s, &["get", "deployments"]).await.unwrap_err().to_string().contains("unknown resource type"));
    meshctl(&s, &["delete", "pod", "a", "-n", "demo"]).await.unwrap();
    assert!(meshctl(&s, &["delete", "pod", "a", "-n", "demo"]).await.is_err());
    meshctl(&s, &["delete", "pod", "a", "-n", "demo", "--ignore-not-found"]).await.unwrap();
    meshctl(&s, &["delete", "-f", f.to_str().unwrap(), "--ignore-not-found"]).await.unwrap();
    assert_eq!(s.api().call(Method::GET, "/api/v1/namespaces/demo", None).await.unwrap().status, StatusCode::NOT_FOUND);
    let unreachable = run(Cli::try_parse_from(["meshctl", "--server", "http://127.0.0.1:1", "get", "pods"]).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(unreachable.contains("cannot reach istiod-lite"), "{unreachable}");
}

#[tokio::test]
async fn create_token_accepts_only_node_tokens() {
    let s = Istiod::start().await;
    meshctl(&s, &["create", "token", "node", "node7"]).await.unwrap();
    assert!(meshctl(&s, &["create", "token", "user", "x"]).await.is_err());
}

#[tokio::test]
async fn grpc_bootstrap_writes_a_bootstrap_and_0600_secrets_and_refuses_bad_workloads() {
    use std::os::unix::fs::PermissionsExt;
    let s = Istiod::start().await;
    let dir = tempfile::tempdir().unwrap();
    let manifests = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: app, namespace: demo}\nspec: {serviceAccountName: app-sa}\nstatus: {podIP: 10.0.0.7}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: no-sa, namespace: demo}\nstatus: {podIP: 10.0.0.8}\n";
    std::fs::write(dir.path().join("m.yaml"), manifests).unwrap();
    meshctl(&s, &["apply", "-f", dir.path().join("m.yaml").to_str().unwrap()]).await.unwrap();
    let out = dir.path().join("boot");
    let out_s = out.to_str().unwrap();
    meshctl(&s, &["x", "grpc-bootstrap", "--workload", "demo/app", "--out", out_s, "--xds-address", "10.0.0.1:15010"])
        .await
        .unwrap();
    let b: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("bootstrap.json")).unwrap()).unwrap();
    assert_eq!(b["xds_servers"][0]["server_uri"], "10.0.0.1:15010");
    assert_eq!(b["xds_servers"][0]["channel_creds"][0]["type"], "insecure");
    assert_eq!(b["xds_servers"][0]["server_features"][0], "xds_v3");
    assert_eq!(b["node"]["id"], "sidecar~10.0.0.7~app.demo~demo.svc.cluster.local");
    assert!(b["node"]["locality"].is_object(), "grpc-js requires node.locality");
    assert_eq!(b["server_listener_resource_name_template"], "xds.istio.io/grpc/lds/inbound/%s");
    assert_eq!(b["certificate_providers"]["default"]["plugin_name"], "file_watcher");
    for f in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
        let mode = std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    // The certificate carries the workload's identity and chains to the mesh root.
    let chain = std::fs::read_to_string(out.join("cert-chain.pem")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let san = format!("{:?}", cert.subject_alternative_name().unwrap().unwrap().value);
    assert!(san.contains("spiffe://cluster.local/ns/demo/sa/app-sa"), "{san}");
    assert_eq!(std::fs::read_to_string(out.join("root-cert.pem")).unwrap(), s.root_pem());

    let err = meshctl(&s, &["x", "grpc-bootstrap", "--workload", "demo/ghost", "--out", out_s]).await.unwrap_err();
    assert!(err.to_string().contains("workload demo/ghost: no Pod or WorkloadEntry of that name"), "{err}");
    let err = meshctl(&s, &["x", "grpc-bootstrap", "--workload", "demo/no-sa", "--out", out_s]).await.unwrap_err();
    assert!(err.to_string().contains("Pod demo/no-sa has no spec.serviceAccountName"), "{err}");
    // meshctl refuses a zero lifetime itself; the API refuses it too rather than issue a
    // certificate that expires as it is issued.
    let zero = serde_json::json!({"name": "app", "csr": "unused", "ttlSeconds": 0});
    let err = s.api().ok(Method::POST, "/apis/trellis.dev/v1/namespaces/demo/workloadcertificates", Some(&zero)).await;
    let Err(err) = err else { panic!("a zero-lifetime certificate was issued") };
    let err = err.to_string();
    assert!(err.contains("ttlSeconds must be at least 1"), "{err}");
    let err = meshctl(&s, &["x", "grpc-bootstrap", "--workload", "justaname", "--out", out_s]).await.unwrap_err();
    assert!(err.to_string().contains("expected NAMESPACE/NAME"), "{err}");
}
