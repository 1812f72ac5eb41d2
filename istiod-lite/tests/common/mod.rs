//! Starts a real istiod-lite in-process on ephemeral loopback ports, with its own state dir.
#![allow(dead_code)]

use std::time::Duration;

use istiod_lite::server::{self, Config, Running};
use istiod_lite::xds::translate::Settings;

pub struct Istiod {
    pub running: Running,
    pub dir: tempfile::TempDir,
}

impl Istiod {
    pub async fn start() -> Istiod {
        Self::start_in(tempfile::tempdir().expect("tempdir")).await
    }

    pub async fn start_in(dir: tempfile::TempDir) -> Istiod {
        Self::start_with(dir, Duration::from_secs(30)).await
    }

    pub async fn start_with(dir: tempfile::TempDir, xds_send_timeout: Duration) -> Istiod {
        Self::start_full(dir, xds_send_timeout, Duration::from_secs(3600)).await
    }

    pub async fn start_full(dir: tempfile::TempDir, xds_send_timeout: Duration, max_cert_ttl: Duration) -> Istiod {
        Self::start_config(dir, |c| {
            c.xds_send_timeout = xds_send_timeout;
            c.max_cert_ttl = max_cert_ttl;
        })
        .await
    }

    /// Starts with the test defaults as changed by `edit`.
    pub async fn start_config(dir: tempfile::TempDir, edit: impl FnOnce(&mut Config)) -> Istiod {
        let mut cfg = Config {
            state_dir: dir.path().join("state"),
            ca_dir: dir.path().join("ca"),
            config_dir: None,
            api_addr: "127.0.0.1:0".parse().unwrap(),
            xds_addr: Some("127.0.0.1:0".parse().unwrap()),
            secure_addr: "127.0.0.1:0".parse().unwrap(),
            settings: Settings::default(),
            max_cert_ttl: Duration::from_secs(3600),
            tls_sans: vec![],
            xds_send_timeout: Duration::from_secs(30),
            serving_cert_ttl: Duration::from_secs(365 * 24 * 3600),
        };
        edit(&mut cfg);
        let running = server::start(cfg).await.expect("istiod-lite starts");
        Istiod { running, dir }
    }

    /// A TLS channel to :15012 that trusts the mesh root, as a ztunnel would have it.
    pub async fn secure_channel(&self) -> tonic::transport::Channel {
        use tonic::transport::{Certificate, Channel, ClientTlsConfig};
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.root_pem()))
            .domain_name("istiod.istio-system.svc");
        Channel::from_shared(format!("https://{}", self.running.secure_addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub fn root_pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ca/root-cert.pem")).unwrap()
    }

    pub fn api(&self) -> meshctl::client::Client {
        meshctl::client::Client::new(&format!("http://{}", self.running.api_addr)).unwrap()
    }
}
