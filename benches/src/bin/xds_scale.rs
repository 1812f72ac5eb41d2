//! xDS scale benchmark (issue: istiod-lite core, item 10).
//!
//! Starts the release `istiod-lite`, connects N delta-ADS subscribers, applies 10,000 pods,
//! 1,000 services and 1,000 policies through the REST API, and measures:
//! (a) apply start → every subscriber holds the full snapshot;
//! (b) one-pod change → delivered to a subscriber, p99 over all (change, subscriber) pairs;
//! (c) istiod-lite peak RSS (VmHWM).
//! Last line: `snapshot_s=<x> change_p99_ms=<x> rss_mb=<x>`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hyper::Method;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trellis_benches::{cpu_s, peak_rss_mb, Istiod};
use trellis_proto::envoy::envoy::config::core::v3::Node;
use trellis_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use trellis_proto::envoy::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use trellis_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

const NAMESPACES: usize = 100;
const PODS: usize = 10_000;
const SERVICES: usize = 1_000;
const POLICIES: usize = 1_000;
const DEFAULT_SUBSCRIBERS: usize = 100;
const CHANGES: usize = 50;
const IN_FLIGHT: usize = 64;

fn objects() -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for n in 0..NAMESPACES {
        let ns = format!("ns{n}");
        out.push((format!("/api/v1/namespaces/{ns}"), json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"istio.io/dataplane-mode": "ambient"}}})));
    }
    for i in 0..SERVICES {
        let ns = format!("ns{}", i % NAMESPACES);
        let app = format!("app{}", i / NAMESPACES);
        out.push((format!("/api/v1/namespaces/{ns}/services/svc{i}"), json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("svc{i}")},
            "spec": {"selector": {"app": app}, "clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1), "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})));
    }
    for i in 0..POLICIES {
        let ns = format!("ns{}", i % NAMESPACES);
        let app = format!("app{}", i / NAMESPACES);
        out.push((format!("/apis/security.istio.io/v1/namespaces/{ns}/authorizationpolicies/ap{i}"), json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": format!("ap{i}")},
            "spec": {"selector": {"matchLabels": {"app": app}}, "rules": [{"from": [{"source": {"principals": [format!("cluster.local/ns/{ns}/sa/client")]}}], "to": [{"operation": {"ports": ["8080"]}}]}]}})));
    }
    for i in 0..PODS {
        out.push(pod(i, 0));
    }
    out
}

fn pod(i: usize, generation: usize) -> (String, serde_json::Value) {
    let ns = format!("ns{}", i % NAMESPACES);
    let app = format!("app{}", (i / NAMESPACES) % (SERVICES / NAMESPACES));
    let ip = format!("10.{}.{}.{}", 100 + generation % 100, i / 250, i % 250 + 1);
    (
        format!("/api/v1/namespaces/{ns}/pods/pod{i}"),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("pod{i}"), "labels": {"app": app}},
        "spec": {"nodeName": format!("node{}", i % 10), "serviceAccountName": "workload"}, "status": {"podIP": ip, "phase": "Running"}}),
    )
}

fn uid(i: usize) -> String {
    format!("Kubernetes//v1/Pod/ns{}/pod{i}", i % NAMESPACES)
}

/// One wildcard delta subscriber: keeps its resource counts current, ACKs everything, and
/// reports when a probe resource arrives.
async fn subscriber(
    id: usize,
    addr: String,
    held: Arc<Vec<AtomicUsize>>,
    probe: mpsc::UnboundedSender<(usize, String, Instant)>,
) -> anyhow::Result<()> {
    let mut client = AggregatedDiscoveryServiceClient::connect(addr).await?.max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(64);
    for t in [AUTHORIZATION_TYPE_URL, ADDRESS_TYPE_URL] {
        tx.send(DeltaDiscoveryRequest {
            node: Some(Node { id: format!("bench~{id}"), ..Default::default() }),
            type_url: t.into(),
            ..Default::default()
        })
        .await?;
    }
    let mut stream = client.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
    let mut sets: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    while let Some(r) = stream.message().await? {
        let now = Instant::now();
        let set = sets.entry(r.type_url.clone()).or_default();
        for res in &r.resources {
            set.insert(res.name.clone());
            if res.name.starts_with("Kubernetes//v1/Pod/") && r.resources.len() == 1 {
                let _ = probe.send((id, res.name.clone(), now));
            }
        }
        for n in &r.removed_resources {
            set.remove(n);
        }
        held[id].store(sets.values().map(|s| s.len()).sum(), Ordering::Relaxed);
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bin = std::env::args().nth(1).unwrap_or_else(|| "target/release/istiod-lite".into());
    let (istiod, client) = Istiod::start(&bin).await?;
    run(client, istiod.xds, istiod.pid()).await
}

async fn run(client: meshctl::client::Client, xds: u16, pid: u32) -> anyhow::Result<()> {
    // BENCH_SUBSCRIBERS lets a developer separate apply cost from push cost; the reported run uses 100.
    let subscribers: usize =
        std::env::var("BENCH_SUBSCRIBERS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_SUBSCRIBERS);
    let client = Arc::new(client);
    let held: Arc<Vec<AtomicUsize>> = Arc::new((0..subscribers).map(|_| AtomicUsize::new(0)).collect());
    let (probe_tx, mut probe_rx) = mpsc::unbounded_channel();
    for id in 0..subscribers {
        let (held, probe) = (held.clone(), probe_tx.clone());
        let addr = format!("http://127.0.0.1:{xds}");
        tokio::spawn(async move {
            // Errors after the run are the server being stopped; during it they surface as a
            // snapshot that never completes.
            let _ = subscriber(id, addr, held, probe).await;
        });
    }
    // Wait for every subscriber to hold the initial (static) resource.
    while held.iter().any(|h| h.load(Ordering::Relaxed) < 1) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let expected = PODS + SERVICES + POLICIES + 1;
    println!("applying {} objects ({PODS} pods, {SERVICES} services, {POLICIES} policies) with {subscribers} subscribers connected", objects().len());
    let objs = objects();
    let cpu0 = cpu_s(pid);
    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut puts = Vec::with_capacity(objs.len());
    for (path, body) in objs {
        let (client, permit) = (client.clone(), sem.clone().acquire_owned().await?);
        puts.push(tokio::spawn(async move {
            let r = client.ok(Method::PUT, &path, Some(&body)).await;
            drop(permit);
            r.map(|_| ())
        }));
    }
    for p in puts {
        p.await??;
    }
    let applied = t0.elapsed();
    while held.iter().any(|h| h.load(Ordering::Relaxed) < expected) {
        if t0.elapsed() > Duration::from_secs(300) {
            let min = held.iter().map(|h| h.load(Ordering::Relaxed)).min().unwrap_or(0);
            bail!("snapshot not delivered within 300 s (slowest subscriber holds {min} of {expected})");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let snapshot = t0.elapsed();
    println!("apply acknowledged in {:.2} s; full snapshot at all {subscribers} subscribers in {:.2} s; istiod-lite used {:.2} CPU-s of it", applied.as_secs_f64(), snapshot.as_secs_f64(), cpu_s(pid) - cpu0);

    while probe_rx.try_recv().is_ok() {}
    let mut samples = Vec::new();
    for c in 0..CHANGES {
        let i = (c * 197) % PODS;
        let (path, body) = pod(i, c + 1);
        let name = uid(i);
        // Changes are isolated events, 100 ms apart: each measures one change reaching everyone,
        // not a burst (bursts are coalesced by design, see MIN_PUSH_INTERVAL in istiod-lite).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        client.ok(Method::PUT, &path, Some(&body)).await?;
        let mut seen = 0;
        while seen < subscribers {
            let (_, got, at) = tokio::time::timeout(Duration::from_secs(10), probe_rx.recv())
                .await
                .context("change not delivered within 10 s")?
                .context("subscribers ended")?;
            if got == name {
                samples.push(at.duration_since(t));
                seen += 1;
            }
        }
    }
    samples.sort();
    let p = |q: f64| {
        samples[((samples.len() as f64 * q).ceil() as usize).saturating_sub(1).min(samples.len() - 1)].as_secs_f64()
            * 1000.0
    };
    let rss = peak_rss_mb(pid);
    println!("one-pod change to each of {subscribers} subscribers over {CHANGES} changes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms", p(0.5), p(0.99), p(1.0));
    println!("istiod-lite peak RSS {rss:.1} MB");
    println!(
        "vs targets: snapshot {:.2}x of 3 s, change p99 {:.2}x of 100 ms, RSS {:.2}x of 300 MB",
        snapshot.as_secs_f64() / 3.0,
        p(0.99) / 100.0,
        rss / 300.0
    );
    println!("snapshot_s={:.2} change_p99_ms={:.1} rss_mb={:.0}", snapshot.as_secs_f64(), p(0.99), rss);
    Ok(())
}
