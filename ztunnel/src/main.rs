use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use trellis_config::duration::parse_duration;
use ztunnel::app::{self, Config};
use ztunnel::capture::{ebpf, Capture};

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Overlay {
    /// One VXLAN device with a route, neighbour and FDB entry per remote node.
    Vxlan,
    /// Pod CIDRs are routed by something else (cloud routes, BGP, static routes).
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum CaptureMode {
    /// tc eBPF programs on each pod's interface (TCX links pinned under --bpf-pin-dir).
    Ebpf,
    /// nftables `redirect` rules in each pod's namespace.
    Nftables,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Trellis per-node L4 proxy: HBONE mTLS, L4 authorization, pod capture.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// This node's name, as Pods' spec.nodeName gives it.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// This node's underlay IP: the xDS node id and the overlay's VTEP address.
    #[arg(long, env = "NODE_IP", default_value = "0.0.0.0")]
    node_ip: String,
    #[arg(long, default_value = "Kubernetes")]
    cluster_id: String,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// istiod-lite's delta ADS: https://HOST:15012 (token required) or http://HOST:15010.
    #[arg(long, default_value = "https://istiod.istio-system.svc:15012")]
    xds_address: String,
    /// The CA; defaults to the xDS address (it must be https).
    #[arg(long)]
    ca_address: Option<String>,
    /// The mesh root certificate (istiod-lite's root-cert.pem).
    #[arg(long)]
    root_cert: PathBuf,
    /// The node token from `meshctl create token node NAME`. Read again for every xDS connection
    /// and certificate request: rotate by writing the new token here, no restart needed.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The node agent socket that enrolls pods.
    #[arg(long, default_value = "/var/run/trellis/ztunnel.sock")]
    agent_socket: PathBuf,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// Requested workload certificate lifetime (the CA may cap it).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_ttl: Duration,
    /// How long SIGTERM waits for open connections to finish.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// SO_MARK on ztunnel's own sockets, exempted from capture.
    #[arg(long, default_value = "0x539", value_parser = parse_mark)]
    mark: u32,
    /// Data-plane threads; defaults to the number of CPUs.
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Proxied connections in flight before new ones are reset.
    #[arg(long, default_value_t = 8192)]
    max_connections: usize,
    /// Of those, how many one client address (a local pod's outbound, a calling pod's inbound
    /// connections and tunnels) may hold; default half of --max-connections.
    #[arg(long)]
    max_connections_per_source: Option<usize>,
    /// Of those, how many plaintext callers on 15006 (outside the mesh, PERMISSIVE) may hold
    /// together, from however many addresses; default a quarter of --max-connections.
    #[arg(long)]
    max_plaintext_connections: Option<usize>,
    /// MiB of tunnel data HBONE peers may have in flight to this node's pods, across all inbound
    /// connections: each connection's HTTP/2 window (16 MiB) is drawn from it, and once it is
    /// spent a new connection gets 64 KiB, growing as others close. Bounds what pods that read
    /// slowly make ztunnel hold. At most 1 TiB (1048576), which no node has to spare anyway.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    max_inbound_buffer_mib: u64,
    /// The same for the replies to this node's pods, across all outbound (pooled) HBONE
    /// connections.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    max_outbound_buffer_mib: u64,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// How enrolled pods' traffic is steered to ztunnel.
    #[arg(long, value_enum, default_value = "ebpf")]
    capture: CaptureMode,
    /// If the eBPF programs cannot be loaded (an older kernel), use nftables instead of failing.
    #[arg(long)]
    capture_fallback_nftables: bool,
    /// bpffs directory for the capture's pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/trellis")]
    bpf_pin_dir: PathBuf,
    /// The pod registry survives restarts here (mode 0600); default: next to the agent socket
    /// (`ztunnel.sock` → `ztunnel.pods.json`). Empty for memory only.
    #[arg(long)]
    registry_file: Option<PathBuf>,
    /// How pod CIDRs of other nodes are reached. `vxlan` needs --node-ip.
    #[arg(long, value_enum, default_value = "vxlan")]
    overlay: Overlay,
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a mark like 0x539"))
}

/// glibc returns freed memory above 128 KiB to the kernel eagerly, and the splice buffers, TLS
/// records and HTTP/2 frames are exactly that size class: every proxied megabyte then pays page
/// faults to get the memory back (seen in `perf` under `make bench-l4`). Keep a bounded amount.
fn tune_allocator() {
    // SAFETY: mallopt only adjusts allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

/// Every proxied connection is two descriptors (and each pod's listeners three, six while they
/// can be handed over), so the common soft limit of 1024 would cap ztunnel long before
/// --max-connections. The hard limit is the administrator's; raise the soft one to it.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn main() -> anyhow::Result<()> {
    tune_allocator();
    raise_fd_limit();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt.json().flatten_event(true).init(),
    }
    if args.max_connections_per_source == Some(0) {
        anyhow::bail!("--max-connections-per-source must be at least 1");
    }
    let max_plaintext = args.max_plaintext_connections.unwrap_or((args.max_connections / 4).max(1));
    if max_plaintext == 0 || max_plaintext > args.max_connections {
        anyhow::bail!(
            "--max-plaintext-connections {max_plaintext} must be between 1 and --max-connections ({})",
            args.max_connections
        );
    }
    let ca_address = args.ca_address.unwrap_or_else(|| args.xds_address.clone());
    if !ca_address.starts_with("https://") {
        anyhow::bail!("--ca-address {ca_address:?} must be https:// (the CA is only served over TLS)");
    }
    let overlay = match args.overlay {
        Overlay::None => None,
        Overlay::Vxlan => match args.node_ip.parse::<std::net::Ipv4Addr>() {
            Ok(ip) if !ip.is_unspecified() => Some(ip),
            _ => anyhow::bail!(
                "--overlay vxlan needs --node-ip set to this node's IPv4 underlay address (got {:?}); or pass --overlay none",
                args.node_ip
            ),
        },
    };
    let capture = match args.capture {
        CaptureMode::Nftables => Capture::Nftables { mark: args.mark },
        CaptureMode::Ebpf => match ebpf::Programs::load(&args.bpf_pin_dir, args.mark) {
            Ok(p) => {
                // Loading parsed the kernel's BTF (megabytes, now freed); hand it back to the OS,
                // which the raised trim threshold would otherwise prevent.
                // SAFETY: malloc_trim only releases free heap memory.
                unsafe { libc::malloc_trim(0) };
                Capture::Ebpf(p)
            }
            Err(e) if args.capture_fallback_nftables => {
                tracing::warn!(error = %e, "eBPF capture unavailable; falling back to nftables as configured");
                Capture::Nftables { mark: args.mark }
            }
            Err(e) => anyhow::bail!(
                "--capture ebpf: {e}. Use a kernel with BPF and TCX (6.6+), or pass --capture nftables \
                 (or --capture-fallback-nftables)"
            ),
        },
    };
    app::run(Config {
        node_name: args.node_name,
        node_ip: args.node_ip,
        cluster_id: args.cluster_id,
        trust_domain: args.trust_domain,
        xds_address: args.xds_address,
        ca_address,
        root_cert: args.root_cert,
        token_file: args.token_file,
        agent_socket: args.agent_socket.clone(),
        admin_addr: args.admin_addr,
        metrics_addr: args.metrics_addr,
        readiness_addr: args.readiness_addr,
        cert_ttl: args.cert_ttl,
        drain_timeout: args.drain_timeout,
        mark: args.mark,
        worker_threads: args
            .worker_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        max_connections: args.max_connections,
        max_connections_per_source: args.max_connections_per_source.unwrap_or((args.max_connections / 2).max(1)),
        max_plaintext_connections: max_plaintext,
        max_inbound_buffer: args.max_inbound_buffer_mib << 20,
        max_outbound_buffer: args.max_outbound_buffer_mib << 20,
        overlay,
        capture,
        registry_file: match args.registry_file {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p),
            None => Some(args.agent_socket.with_extension("pods.json")),
        },
    })
}
