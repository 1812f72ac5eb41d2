//! Wires istiod-lite together: store, CA, translation, and the three listeners.
//!
//! - :15014 (default 127.0.0.1) config REST API, `/metrics`, `/ready`, `/debug` — admin access;
//! - :15010 plaintext delta ADS, for labs and tests (Istio's convention);
//! - :15012 TLS with a certificate from the mesh CA: delta ADS and the CA, node token required.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use trellis_proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer;

use crate::api::{self, ApiState};
use crate::ca::service::CaService;
use crate::ca::tokens::NodeTokens;
use crate::ca::Authority;
use crate::metrics::Metrics;
use crate::serving::ServingCert;
use crate::store::file::FileStore;
use crate::store::{Store, Write};
use crate::xds::cache::Cache;
use crate::xds::server::AdsServer;
use crate::xds::status::Registry;
use crate::xds::translate::Settings;

/// Largest gRPC message accepted from a client (requests are small; this bounds abuse).
const MAX_GRPC_REQUEST: usize = 4 << 20;

#[derive(Clone, Debug)]
pub struct Config {
    pub state_dir: PathBuf,
    pub ca_dir: PathBuf,
    pub config_dir: Option<PathBuf>,
    pub api_addr: SocketAddr,
    pub xds_addr: Option<SocketAddr>,
    pub secure_addr: SocketAddr,
    pub settings: Settings,
    pub max_cert_ttl: Duration,
    /// Extra DNS names / IPs for the :15012 serving certificate.
    pub tls_sans: Vec<String>,
    /// Lifetime of the :15012 serving certificate (capped at the CA signer's); it is renewed
    /// at half of it.
    pub serving_cert_ttl: Duration,
    /// How long a push waits on an xDS client that does not read before its stream is closed.
    pub xds_send_timeout: Duration,
}

/// A running istiod-lite; dropping the shutdown sender stops it.
pub struct Running {
    pub api_addr: SocketAddr,
    pub xds_addr: Option<SocketAddr>,
    pub secure_addr: SocketAddr,
    pub store: Arc<dyn Store>,
    pub cache: Arc<Cache>,
    pub tokens: Arc<NodeTokens>,
    pub authority: Arc<Authority>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

async fn apply_config_dir(store: &dyn Store, dir: &std::path::Path) -> anyhow::Result<()> {
    let objects = trellis_config::load::load_path(&dir.display().to_string(), "default").map_err(|errs| {
        anyhow::anyhow!(
            "{} is invalid; nothing was applied:\n{}",
            dir.display(),
            errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")
        )
    })?;
    let mut objects: Vec<_> = objects.into_iter().map(|l| l.object).collect();
    objects.sort_by_key(|o| o.kind());
    let count = objects.len();
    let writes = objects.into_iter().map(|o| store.write(Write::Put(o)));
    for r in futures::future::join_all(writes).await {
        r.context("applying --config-dir")?;
    }
    tracing::info!(dir = %dir.display(), objects = count, "applied startup config");
    Ok(())
}

pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let store: Arc<dyn Store> = Arc::new(FileStore::open(&cfg.state_dir)?);
    if let Some(dir) = &cfg.config_dir {
        apply_config_dir(store.as_ref(), dir).await?;
    }
    let authority = Arc::new(Authority::load_or_create(&cfg.ca_dir, &cfg.settings.trust_domain)?);
    let tokens = Arc::new(NodeTokens::open(cfg.state_dir.join("node-tokens.json"))?);
    let metrics = Arc::new(Metrics::default());
    let registry = Arc::new(Registry::default());
    let cache = Arc::new(Cache::default());
    let ready = Arc::new(AtomicBool::new(false));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let sync = crate::xds::sync::run(store.clone(), cache.clone(), cfg.settings.clone());
    let mut rx = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        tokio::select! {
            _ = sync => {}
            _ = rx.wait_for(|s| *s) => {}
        }
    }));

    let api_listener =
        TcpListener::bind(cfg.api_addr).await.with_context(|| format!("binding the config API on {}", cfg.api_addr))?;
    let api_addr = api_listener.local_addr()?;
    let router = api::router(ApiState {
        store: store.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        proxies: registry.clone(),
        tokens: tokens.clone(),
        cache: cache.clone(),
        authority: authority.clone(),
        max_cert_ttl: cfg.max_cert_ttl,
    });
    let mut rx = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(api_listener, router).with_graceful_shutdown(stop).await {
            tracing::error!(error = %e, "config API server failed");
        }
    }));

    let ads = |tokens: Option<Arc<NodeTokens>>| {
        AggregatedDiscoveryServiceServer::new(AdsServer {
            cache: cache.clone(),
            registry: registry.clone(),
            metrics: metrics.clone(),
            tokens,
            send_timeout: cfg.xds_send_timeout,
            shutdown: shutdown_rx.clone(),
        })
        .max_decoding_message_size(MAX_GRPC_REQUEST)
    };

    let mut xds_addr = None;
    if let Some(addr) = cfg.xds_addr {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("binding plaintext xDS on {addr}"))?;
        xds_addr = Some(listener.local_addr()?);
        let svc = ads(None);
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let r = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "plaintext xDS server failed");
            }
        }));
    }

    let mut dns = vec![
        "istiod.istio-system.svc".to_string(),
        "istiod-lite.istio-system.svc".to_string(),
        "localhost".to_string(),
    ];
    let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1])];
    for san in &cfg.tls_sans {
        match san.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => dns.push(san.clone()),
        }
    }
    if !cfg.secure_addr.ip().is_unspecified() {
        ips.push(cfg.secure_addr.ip());
    }
    let serving_cert = ServingCert::issue(authority.clone(), dns, ips, cfg.serving_cert_ttl)?;
    tasks.push(tokio::spawn(serving_cert.clone().renew(shutdown_rx.clone())));
    let tls = crate::serving::server_config(serving_cert.clone()).context("TLS config for :15012")?;
    let secure_listener = TcpListener::bind(cfg.secure_addr)
        .await
        .with_context(|| format!("binding TLS xDS/CA on {}", cfg.secure_addr))?;
    let secure_addr = secure_listener.local_addr()?;
    let ca = IstioCertificateServiceServer::new(CaService {
        authority: authority.clone(),
        tokens: tokens.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        max_ttl: cfg.max_cert_ttl,
    })
    .max_decoding_message_size(MAX_GRPC_REQUEST);
    let secure_ads = ads(Some(tokens.clone()));
    let mut rx = shutdown_rx.clone();
    let (incoming, accepting) = crate::serving::incoming(secure_listener, tls, shutdown_rx.clone());
    tasks.push(accepting);
    tasks.push(tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .timeout(Duration::from_secs(3600))
            .add_service(ca)
            .add_service(secure_ads)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "TLS xDS/CA server failed");
        }
    }));

    ready.store(true, Ordering::Release);
    tracing::info!(%api_addr, ?xds_addr, %secure_addr, trust_domain = cfg.settings.trust_domain, "istiod-lite ready");
    Ok(Running { api_addr, xds_addr, secure_addr, store, cache, tokens, authority, shutdown, tasks })
}
