//! Process wiring: two runtimes, the control plane clients, the data plane, and shutdown.
//!
//! The data plane (listeners and proxied connections) runs on a multi-threaded runtime of its
//! own; xDS, certificates, the node agent socket and the admin endpoints run on a separate
//! single-threaded runtime, so a burst of control work never steals the data plane's threads and
//! a saturated data plane never starves readiness or config updates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::RootCertStore;
use tokio::sync::watch;

use crate::admin::{self, Admin};
use crate::handover::{self, TakeOver};
use crate::identity::{CaConfig, CertManager};
use crate::metrics::Metrics;
use crate::node_ports::{self, NodePorts, Serve};
use crate::pods::Pods;
use crate::proxy::{self, Proxy};
use crate::state::State;
use crate::token::NodeToken;
use crate::{agent, overlay, xds};

#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    pub node_ip: String,
    pub cluster_id: String,
    pub trust_domain: String,
    pub xds_address: String,
    pub ca_address: String,
    pub root_cert: PathBuf,
    pub token_file: Option<PathBuf>,
    pub agent_socket: PathBuf,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub cert_ttl: Duration,
    pub drain_timeout: Duration,
    pub mark: u32,
    pub worker_threads: usize,
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    pub max_plaintext_connections: usize,
    /// Bytes of HTTP/2 window all inbound HBONE connections share.
    pub max_inbound_buffer: u64,
    /// The same for outbound HBONE connections.
    pub max_outbound_buffer: u64,
    /// With `--overlay vxlan`: this node's VTEP (underlay) address.
    pub overlay: Option<std::net::Ipv4Addr>,
    pub capture: crate::capture::Capture,
    /// Where the pod registry is persisted across restarts (`None`: memory only).
    pub registry_file: Option<PathBuf>,
}

fn load_roots(pem: &str) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for block in ::pem::parse_many(pem).context("parsing the root certificate")? {
        roots.add(block.into_contents().into()).context("adding a root certificate")?;
    }
    anyhow::ensure!(!roots.is_empty(), "no certificate in the root file");
    Ok(roots)
}

/// Runs ztunnel until SIGTERM or SIGINT, then drains.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    let root_pem = std::fs::read_to_string(&cfg.root_cert)
        .with_context(|| format!("reading --root-cert {}", cfg.root_cert.display()))?;
    let roots = Arc::new(load_roots(&root_pem).with_context(|| format!("--root-cert {}", cfg.root_cert.display()))?);
    let token = match &cfg.token_file {
        Some(p) => NodeToken::from_file(p).map_err(anyhow::Error::msg)?,
        None => NodeToken::none(),
    };

    let control = tokio::runtime::Builder::new_current_thread().enable_all().thread_name("ztunnel-control").build()?;
    let data = DataPlane::start(cfg.worker_threads)?;
    let state = Arc::new(RwLock::new(State::default()));
    let metrics = Arc::new(Metrics::new());
    let certs = CertManager::new(CaConfig {
        address: cfg.ca_address.clone(),
        root_pem: root_pem.clone(),
        token: token.clone(),
        ttl: cfg.cert_ttl,
        roots: roots.clone(),
    });
    let (drain_tx, draining) = watch::channel(false);
    let proxy = {
        let _in_data = data.handle.enter();
        Proxy::new(
            state.clone(),
            certs.clone(),
            roots,
            metrics.clone(),
            proxy::Settings {
                mark: cfg.mark,
                trust_domain: cfg.trust_domain.clone(),
                max_connections: cfg.max_connections,
                max_connections_per_source: cfg.max_connections_per_source,
                max_plaintext_connections: cfg.max_plaintext_connections,
                max_inbound_buffer: cfg.max_inbound_buffer,
                max_outbound_buffer: cfg.max_outbound_buffer,
            },
            control.handle().clone(),
            draining,
        )
    };
    let (xds_client, synced) = xds::Client::new(
        xds::Config {
            address: cfg.xds_address.clone(),
            root_pem: cfg.xds_address.starts_with("https").then(|| root_pem.clone()),
            token,
            node_id: format!(
                "ztunnel~{}~ztunnel-{}.istio-system~istio-system.svc.cluster.local",
                cfg.node_ip, cfg.node_name
            ),
            node_name: cfg.node_name.clone(),
        },
        state.clone(),
    );
    let pods = Arc::new(Pods::new(
        proxy.clone(),
        state.clone(),
        certs.clone(),
        data.handle.clone(),
        cfg.cluster_id.clone(),
        cfg.capture.clone(),
        cfg.registry_file.clone(),
        synced.clone(),
    ));
    let pod_changes = xds_client.changes();
    let revalidation = proxy.clone().revalidate_on_changes(xds_client.changes());
    let overlay = cfg.overlay.map(|node_ip| {
        let c = overlay::Config { node_name: cfg.node_name.clone(), node_ip };
        overlay::run(c, state.clone(), xds_client.changes())
    });
    let serving = proxy.clone();
    let pods_for_drain = pods.clone();
    let admin = Admin {
        node: cfg.node_name.clone(),
        state,
        certs,
        metrics: metrics.clone(),
        pods: pods.clone(),
        proxy,
        synced,
    };

    let agent_socket = control.block_on(async move {
        // Bind everything first: a port conflict is a startup error, not a log line later. A port
        // in use may be held by the ztunnel this one takes over from, which then passes it on.
        let servers: [(&'static str, SocketAddr, Serve); 3] = [
            ("admin", cfg.admin_addr, admin_server(admin.clone(), admin::serve_admin)),
            ("metrics", cfg.metrics_addr, admin_server(admin.clone(), admin::serve_metrics)),
            ("readiness", cfg.readiness_addr, admin_server(admin, admin::serve_readiness)),
        ];
        // Before anything is bound, so that two ztunnels starting at once cannot each take some
        // of the ports; held until the agent socket is in place.
        let start_lock = agent::lock_start_waiting(&cfg.agent_socket, agent::START_LOCK_WAIT).await?;
        let (mut bound, mut in_use) = (Vec::new(), Vec::new());
        for (what, addr, serve) in servers {
            match node_ports::bind(addr) {
                Ok(l) => bound.push((what, l, serve)),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => in_use.push((what, addr, serve, e)),
                Err(e) => return Err(e).with_context(|| format!("binding {what} on {addr}")),
            }
        }
        let agent_l = agent::bind(&cfg.agent_socket, start_lock)
            .with_context(|| format!("binding the agent socket {}", cfg.agent_socket.display()))?;
        // Only once nothing else is likely to fail: the running ztunnel stops managing pods when
        // asked, and cannot take them back.
        let take_over = match pods.has_registry() {
            true => handover::take_over(&cfg.agent_socket, &in_use.iter().map(|p| p.1).collect::<Vec<_>>()).await,
            // Without one, the pods handed over would be unknown here, and so never served again.
            false => TakeOver::Refused("not asking: this ztunnel runs without a pod registry".into()),
        };
        let (mut passed_ports, mut handed_over) = (Vec::new(), false);
        match take_over {
            TakeOver::HandedOver(handed) => {
                handed_over = true;
                tracing::info!(listeners = handed.pods.len(), from = %handed.from.display(), "took the pods over from the running ztunnel");
                pods.inherit(handed.pods);
                passed_ports = handed.node;
            }
            TakeOver::Broken(why) => anyhow::bail!(
                "the hand-over from the running ztunnel broke off: {why}; exiting, so that it takes the pods back"
            ),
            TakeOver::Refused(why) if !in_use.is_empty() => {
                let (what, addr, _, e) = &in_use[0];
                anyhow::bail!("binding {what} on {addr}: {e}, and the running ztunnel did not hand it over: {why}");
            }
            TakeOver::NoneRunning => {}
            TakeOver::Refused(why) => tracing::warn!(
                why,
                "the running ztunnel did not hand its pods over; pods it serves are enrolled here once it exits"
            ),
        }
        for (what, addr, serve, e) in in_use {
            let Some(i) = passed_ports.iter().position(|(a, _)| *a == addr) else {
                if handed_over {
                    anyhow::bail!(
                        "the running ztunnel handed over but did not pass {what} on {addr}; exiting, so that it takes the pods back"
                    );
                }
                return Err(e).with_context(|| format!("binding {what} on {addr}"));
            };
            let l = node_ports::adopt(passed_ports.swap_remove(i).1, addr)
                .with_context(|| format!("adopting {what} on {addr} from the running ztunnel"))?;
            bound.push((what, l, serve));
        }
        let node_ports = Arc::new(NodePorts::default());
        for (what, l, serve) in bound {
            node_ports.start(what, l, serve).with_context(|| format!("serving {what}"))?;
        }
        pods.restore();
        let (agent_l, agent_socket, start_lock) = agent_l
            .publish()
            .with_context(|| format!("moving the agent socket into place at {}", cfg.agent_socket.display()))?;
        drop(start_lock);
        let agent = Arc::new(agent::Agent::new(pods, node_ports, cfg.agent_socket.clone()));
        let agent_socket = Arc::new(std::sync::Mutex::new(agent::serve_on(&agent, agent_l, agent_socket)));
        let take_back =
            tokio::spawn(handover::take_back_when_abandoned(agent.clone(), agent_socket.clone(), pod_changes.clone()));
        tokio::spawn(xds_client.run());
        if let Some(overlay) = overlay {
            tokio::spawn(overlay);
        }
        tokio::spawn(agent.pods.clone().run(pod_changes));
        tokio::spawn(revalidation);
        tokio::spawn(crate::log_budget::report_suppressed_every_window());
        tracing::info!(node = cfg.node_name, xds = cfg.xds_address, agent = %cfg.agent_socket.display(), "ztunnel started");
        shutdown_signal().await;
        // A draining ztunnel takes nothing back: its pods' listeners are closing.
        take_back.abort();
        agent.stop_listening_as_handed();
        // Nor keeps the node ports it handed over: a ztunnel restarted meanwhile must bind them.
        agent.ports.release_handed();
        tracing::info!(deadline = ?cfg.drain_timeout, "draining: no new connections");
        drain_tx.send_replace(true);
        pods_for_drain.close_listeners();
        let deadline = Instant::now() + cfg.drain_timeout;
        // Connections still being set up count too: exiting under one resets it.
        while serving.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(remaining = serving.in_flight(), "drained; exiting");
        anyhow::Ok(agent_socket)
    })?;
    crate::lock(&agent_socket).remove_if_ours();
    drop(data);
    Ok(())
}

/// The data-plane runtime. With one worker it is a current-thread runtime driven by its own
/// thread: on a small node that avoids the work-stealing scheduler's extra wake-ups, which
/// `make bench-l4` showed cost latency.
struct DataPlane {
    handle: tokio::runtime::Handle,
    _multi: Option<tokio::runtime::Runtime>,
    _stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl DataPlane {
    fn start(workers: usize) -> std::io::Result<DataPlane> {
        if workers > 1 {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name("ztunnel-data")
                .enable_all()
                .build()?;
            return Ok(DataPlane { handle: rt.handle().clone(), _multi: Some(rt), _stop: None });
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new().name("ztunnel-data".into()).spawn(move || {
            let _ = rt.block_on(stopped);
            rt.shutdown_timeout(Duration::from_millis(100));
        })?;
        Ok(DataPlane { handle, _multi: None, _stop: Some(stop) })
    }
}

/// One of the admin servers as a node port can run it, again after a take-back.
fn admin_server<F>(a: Admin, serve: fn(tokio::net::TcpListener, Admin, node_ports::Stop) -> F) -> Serve
where
    F: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    Arc::new(move |l, stop| Box::pin(serve(l, a.clone(), stop)))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers the process can still be killed; run until then.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
