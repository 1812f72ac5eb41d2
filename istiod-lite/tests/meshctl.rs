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
