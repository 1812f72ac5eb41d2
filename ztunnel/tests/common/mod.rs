//! Runs a real istiod-lite in-process on fixed loopback ports, so a test can stop it and start it
//! again on the same state dir and ports (as a restart would).
#![allow(dead_code)]

use std::time::Duration;

use istiod_lite::server::{self, Config, Running};
use istiod_lite::xds::translate::Settings;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Ports {
    pub api: u16,
    pub xds: Option<u16>,
    pub secure: u16,
}

pub async fn istiod(dir: &std::path::Path, ports: &Ports, max_cert_ttl: Duration) -> Running {
    server::start(Config {
        state_dir: dir.join("state"),
        ca_dir: dir.join("ca"),
        config_dir: None,
        api_addr: format!("127.0.0.1:{}", ports.api).parse().unwrap(),
        xds_addr: ports.xds.map(|p| format!("127.0.0.1:{p}").parse().unwrap()),
        secure_addr: format!("127.0.0.1:{}", ports.secure).parse().unwrap(),
        settings: Settings::default(),
        max_cert_ttl,
        tls_sans: vec![],
        xds_send_timeout: Duration::from_secs(30),
        serving_cert_ttl: Duration::from_secs(365 * 24 * 3600),
    })
    .await
    .expect("istiod-lite starts")
}

/// Starts ztunnel's xDS client for node1 over plaintext against `address`: its state, its
/// synced signal and its task.
pub fn start_xds_client(address: String) -> XdsClient {
    start_xds_client_with(address, None, ztunnel::token::NodeToken::none())
}

pub type XdsClient = (
    std::sync::Arc<std::sync::RwLock<ztunnel::state::State>>,
    tokio::sync::watch::Receiver<bool>,
    tokio::task::JoinHandle<()>,
);

/// The same, over TLS trusting `root_pem` and presenting `token`.
pub fn start_xds_client_with(address: String, root_pem: Option<String>, token: ztunnel::token::NodeToken) -> XdsClient {
    let state = std::sync::Arc::new(std::sync::RwLock::new(ztunnel::state::State::default()));
    let cfg = ztunnel::xds::Config {
        address,
        root_pem,
        token,
        node_id: "ztunnel~10.0.0.1~ztunnel-node1.istio-system~istio-system.svc.cluster.local".into(),
        node_name: "node1".into(),
    };
    let (client, synced) = ztunnel::xds::Client::new(cfg, state.clone());
    (state, synced, tokio::spawn(client.run()))
}
