//! Durability: SIGKILL istiod-lite while concurrent writers apply objects; after a restart every
//! acknowledged object is present, exactly as acknowledged.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::json;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn spawn(state: &std::path::Path) -> (Proc, meshctl::client::Client) {
    let (api, xds, sec) = (free_port(), free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_istiod-lite"))
        .args(["--state-dir", state.to_str().unwrap()])
        .args([
            "--api-addr",
            &format!("127.0.0.1:{api}"),
            "--xds-addr",
            &format!("127.0.0.1:{xds}"),
            "--secure-addr",
            &format!("127.0.0.1:{sec}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("istiod-lite binary runs");
    let client = meshctl::client::Client::new(&format!("http://127.0.0.1:{api}")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.call(Method::GET, "/ready", None).await.map(|r| !r.status.is_success()).unwrap_or(true) {
        assert!(Instant::now() < deadline, "istiod-lite did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (Proc(child), client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (mut proc, client) = spawn(&state).await;
    let client = Arc::new(client);
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..8 {
        let (client, acked) = (client.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let name = format!("w{w}-{i}");
                let ip = format!("10.{w}.{}.{}", i / 250, i % 250 + 1);
                let pod =
                    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "status": {"podIP": ip}});
                match client.call(Method::PUT, &format!("/api/v1/namespaces/crash/pods/{name}"), Some(&pod)).await {
                    Ok(r) if r.status.is_success() => {
                        acked.lock().unwrap().insert(name, ip);
                    }
                    _ => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    proc.0.kill().expect("SIGKILL"); // Child::kill is SIGKILL on Unix
    let _ = proc.0.wait();
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "the writers made progress before the kill ({} acked)", acked.len());

    let (_proc, client) = spawn(&state).await;
    let list = client.ok(Method::GET, "/api/v1/namespaces/crash/pods", None).await.unwrap();
    let stored: BTreeMap<String, String> = list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (o["metadata"]["name"].as_str().unwrap().to_string(), o["status"]["podIP"].as_str().unwrap().to_string())
        })
        .collect();
    let missing: Vec<_> = acked.iter().filter(|(n, ip)| stored.get(*n) != Some(ip)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
    // And the store still accepts writes after recovery.
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "after"}});
    client.ok(Method::PUT, "/api/v1/namespaces/crash/pods/after", Some(&pod)).await.unwrap();
}
