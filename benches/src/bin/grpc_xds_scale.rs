//! Proxyless gRPC xDS benchmark (issue: proxyless gRPC, item 4).
//!
//! Starts the release `istiod-lite`, applies 50 Services with 4 endpoints each, and opens 200
//! state-of-the-world ADS streams that subscribe as a gRPC client of one Service does (LDS, RDS,
//! CDS and EDS for `echo…:7070`) and ACK every response. Then, 20 times, it adds one endpoint to
//! that Service and measures the time from the REST call to the moment the last of the 200
//! subscribers holds the new endpoint set. It reports the median and the worst of those, and
//! istiod-lite's CPU seconds and peak RSS over the run. Changes are 200 ms apart, so each is
//! measured on its own (a burst is coalesced into fewer pushes, which `bench-xds` covers).
//! Last line: `change_to_all_ms=<median> cpu_s=<x> rss_mb=<x>`.

use std::time::{Duration, Instant};

use anyhow::bail;
use hyper::Method;
use prost::Message;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use trellis_benches::{cpu_s, peak_rss_mb, Istiod};
use trellis_proto::envoy::envoy::config::core::v3::Node;
use trellis_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
use trellis_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use trellis_proto::envoy::envoy::service::discovery::v3::DiscoveryRequest;
use trellis_proto::{CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL};

const SUBSCRIBERS: usize = 200;
const SERVICES: usize = 50;
const ENDPOINTS_PER_SERVICE: usize = 4;
const CHANGES: usize = 20;
const HOST: &str = "echo.bench.svc.cluster.local";

fn service(name: &str) -> (String, serde_json::Value) {
    (
        format!("/api/v1/namespaces/bench/services/{name}"),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"name": "grpc", "port": 7070, "targetPort": 50051}]}}),
    )
}

fn endpoint(app: &str, i: usize) -> (String, serde_json::Value) {
    let name = format!("{app}-{i}");
    (
        format!("/apis/networking.istio.io/v1/namespaces/bench/workloadentries/{name}"),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": {"name": name},
            "spec": {"address": format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256), "labels": {"app": app}, "serviceAccount": app}}),
    )
}

/// One gRPC-client-like subscriber: reports the endpoint count of every EDS response it gets.
async fn subscriber(xds: u16, id: usize, report: mpsc::UnboundedSender<(usize, usize, Instant)>) -> anyhow::Result<()> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://127.0.0.1:{xds}")).await?;
    let (tx, rx) = mpsc::channel(16);
    let node = Node {
        id: format!("sidecar~10.250.0.{}~bench{id}.bench~bench.svc.cluster.local", id % 250),
        ..Default::default()
    };
    let cluster = format!("outbound|7070||{HOST}");
    let listener = format!("{HOST}:7070");
    for (t, name) in [
        (LISTENER_TYPE_URL, &listener),
        (ROUTE_TYPE_URL, &listener),
        (CLUSTER_TYPE_URL, &cluster),
        (ENDPOINT_TYPE_URL, &cluster),
    ] {
        tx.send(DiscoveryRequest {
            node: Some(node.clone()),
            type_url: t.into(),
            resource_names: vec![name.clone()],
            ..Default::default()
        })
        .await?;
    }
    let mut responses = client.stream_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
    while let Some(resp) = responses.next().await {
        let resp = resp?;
        let names = if resp.type_url == ENDPOINT_TYPE_URL || resp.type_url == CLUSTER_TYPE_URL {
            vec![cluster.clone()]
        } else {
            vec![listener.clone()]
        };
        if resp.type_url == ENDPOINT_TYPE_URL {
            let count = resp
                .resources
                .iter()
                .filter_map(|a| ClusterLoadAssignment::decode(a.value.as_slice()).ok())
                .map(|c| c.endpoints.iter().map(|l| l.lb_endpoints.len()).sum::<usize>())
                .sum();
            let _ = report.send((id, count, Instant::now()));
        }
        tx.send(DiscoveryRequest {
            type_url: resp.type_url.clone(),
            version_info: resp.version_info.clone(),
            response_nonce: resp.nonce.clone(),
            resource_names: names,
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
    client
        .ok(
            Method::PUT,
            "/api/v1/namespaces/bench",
            Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}})),
        )
        .await?;
    let mut n = 0;
    for s in 0..SERVICES {
        let app = if s == 0 { "echo".to_string() } else { format!("svc{s}") };
        let (path, body) = service(&app);
        client.ok(Method::PUT, &path, Some(&body)).await?;
        for _ in 0..ENDPOINTS_PER_SERVICE {
            let (path, body) = endpoint(&app, n);
            client.ok(Method::PUT, &path, Some(&body)).await?;
            n += 1;
        }
    }
    let cpu_start = cpu_s(pid);
    let (report_tx, mut reports) = mpsc::unbounded_channel();
    for id in 0..SUBSCRIBERS {
        let tx = report_tx.clone();
        tokio::spawn(async move {
            let closed = tx.clone();
            if let Err(e) = subscriber(xds, id, tx).await {
                // After the run, istiod-lite is stopped and every stream ends: not worth a line.
                if !closed.is_closed() {
                    eprintln!("subscriber {id}: {e:#}");
                }
            }
        });
    }
    let mut holding = vec![0usize; SUBSCRIBERS];
    let wait_all = |holding: &Vec<usize>, want: usize| holding.iter().all(|&c| c == want);
    let connect_deadline = Instant::now() + Duration::from_secs(60);
    while !wait_all(&holding, ENDPOINTS_PER_SERVICE) {
        let Ok(Some((id, count, _))) = tokio::time::timeout_at(connect_deadline.into(), reports.recv()).await else {
            bail!("subscribers did not all receive the initial endpoints");
        };
        holding[id] = count;
    }
    println!("{SUBSCRIBERS} state-of-the-world subscribers hold the initial {ENDPOINTS_PER_SERVICE} endpoints");
    let mut samples = Vec::new();
    for k in 0..CHANGES {
        // Changes are spaced past the server's 50 ms push coalescing window, so each sample is
        // the latency of one isolated change rather than of a burst.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (path, body) = endpoint("echo", 100_000 + k);
        let want = ENDPOINTS_PER_SERVICE + k + 1;
        let start = Instant::now();
        client.ok(Method::PUT, &path, Some(&body)).await?;
        let mut last = start;
        while !wait_all(&holding, want) {
            let Ok(Some((id, count, at))) = tokio::time::timeout(Duration::from_secs(30), reports.recv()).await else {
                bail!("change {k} did not reach every subscriber within 30 s");
            };
            holding[id] = count;
            if count == want {
                last = last.max(at);
            }
        }
        samples.push(last.duration_since(start).as_secs_f64() * 1000.0);
    }
    drop(report_tx);
    let cpu = cpu_s(pid) - cpu_start;
    samples.sort_by(|a, b| a.total_cmp(b));
    let median = samples[samples.len() / 2];
    let worst = samples[samples.len() - 1];
    let rss = peak_rss_mb(pid);
    println!(
        "endpoint change → all {SUBSCRIBERS} subscribers: median {median:.1} ms, worst {worst:.1} ms over {CHANGES} changes"
    );
    println!("istiod-lite: {cpu:.2} CPU s while serving the subscribers, peak RSS {rss:.1} MB");
    println!("change_to_all_ms={median:.1} cpu_s={cpu:.2} rss_mb={rss:.1}");
    Ok(())
}
