use std::net::{Ipv6Addr, SocketAddr};

use clap::Parser;

/// An HTTP/1.1, h2c and gRPC echo server: answers with its pod, the request and the peer it saw.
#[derive(Parser, Debug)]
#[command(name = "trellis-echo", version)]
struct Args {
    /// Ports to listen on (all addresses, IPv4 and IPv6).
    #[arg(long = "port", default_value = "8080")]
    ports: Vec<u16>,
    /// The pod name to report (Kubernetes' downward API convention: POD_NAME).
    #[arg(long, env = "POD_NAME", default_value = "unknown")]
    pod: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let me = trellis_echo::Identity { pod: args.pod, namespace: args.namespace };
    let mut servers = tokio::task::JoinSet::new();
    for port in args.ports {
        let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let listener = match bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("trellis-echo: cannot listen on port {port}: {e}");
                std::process::exit(1);
            }
        };
        eprintln!("trellis-echo: {}/{} listening on port {port}", me.namespace, me.pod);
        servers.spawn(trellis_echo::serve(listener, me.clone()));
    }
    tokio::select! {
        _ = servers.join_next() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm() => {}
    }
}

/// A dual-stack listener, falling back to IPv4 where IPv6 is disabled.
fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .or_else(|_| std::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], addr.port()))))?;
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
