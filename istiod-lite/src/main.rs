use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use istiod_lite::server::{self, Config};
use istiod_lite::xds::translate::Settings;
use trellis_config::duration::parse_duration;

/// Trellis control plane: config store and REST API, SPIFFE CA, workload xDS.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Where config is persisted (write-ahead log + snapshots) and node tokens are kept.
    #[arg(long, default_value = "./state")]
    state_dir: PathBuf,
    /// CA material; defaults to <state-dir>/ca. Holds root-cert.pem for clients.
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Manifests (file or directory) applied at startup; all must be valid or nothing is applied.
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// Config REST API, /metrics and /ready. Admin access: keep it on loopback unless protected.
    #[arg(long, default_value = "127.0.0.1:15014")]
    api_addr: SocketAddr,
    /// Plaintext delta ADS; "off" disables it.
    #[arg(long, default_value = "0.0.0.0:15010")]
    xds_addr: String,
    /// TLS delta ADS and CA.
    #[arg(long, default_value = "0.0.0.0:15012")]
    secure_addr: SocketAddr,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, default_value = "Kubernetes")]
    cluster_id: String,
    /// Longest workload certificate lifetime granted, e.g. 24h, 90m, 30s.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    max_cert_ttl: Duration,
    /// Lifetime of istiod-lite's own :15012 certificate, renewed at half of it.
    #[arg(long, default_value = "8760h", value_parser = parse_duration)]
    serving_cert_ttl: Duration,
    /// Extra DNS name or IP for the :15012 certificate (repeatable).
    #[arg(long = "tls-san")]
    tls_sans: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let xds_addr = match args.xds_addr.as_str() {
        "off" | "" => None,
        a => Some(a.parse().map_err(|_| anyhow::anyhow!("--xds-addr {a:?} is not host:port or \"off\""))?),
    };
    let cfg = Config {
        ca_dir: args.ca_dir.unwrap_or_else(|| args.state_dir.join("ca")),
        state_dir: args.state_dir,
        config_dir: args.config_dir,
        api_addr: args.api_addr,
        xds_addr,
        secure_addr: args.secure_addr,
        settings: Settings {
            trust_domain: args.trust_domain.clone(),
            cluster_id: args.cluster_id,
            ..Settings::default()
        },
        max_cert_ttl: args.max_cert_ttl,
        tls_sans: args.tls_sans,
        serving_cert_ttl: args.serving_cert_ttl,
        xds_send_timeout: istiod_lite::xds::server::SEND_TIMEOUT,
    };
    let running = server::start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}
