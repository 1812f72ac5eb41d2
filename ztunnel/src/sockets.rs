//! Socket set-up shared by every proxy path: transparent listeners, marked upstream sockets, and
//! the original destination of a captured connection.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::netns::Netns;

/// Istio's mark for proxy-originated traffic; capture rules let it through untouched.
pub const DEFAULT_MARK: u32 = 0x539;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
// A peer's HBONE pool takes a CONNECT left unanswered for its response timeout as a sign that
// this node is gone; a pod that is slow to accept must get its 503 well before that.
const _: () = assert!(CONNECT_TIMEOUT.as_secs() * 2 <= hbone::client::RESPONSE_TIMEOUT.as_secs());
const BACKLOG: i32 = 1024;
/// TCP keepalive on every proxied socket: an idle peer that vanished without a FIN or reset (a
/// lost node, an expired NAT entry) is found after about 7.5 minutes, and its connection gives
/// back its slot, sockets and buffers. (A peer gone while data waits for it is found by TCP's own
/// retransmission limit; a user timeout would also cut off a receiver that is merely slow.)
/// HBONE connections also ping at the HTTP/2 level.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(180);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_PROBES: u32 = 9;

fn keepalive(s: SockRef<'_>) -> io::Result<()> {
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    s.set_tcp_keepalive(&ka)
}

fn domain(addr: &SocketAddr) -> Domain {
    if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

/// A listener with `IP_TRANSPARENT`, so it can also accept connections steered to it by TPROXY or
/// `bpf_sk_assign` for addresses that are not local. Created inside `ns`.
///
/// Never `SO_REUSEPORT`: any process of the same user in the pod (often root) could then join
/// the group and take a share of the pod's captured connections, past mTLS and policy. A
/// hand-over passes the socket itself instead (see [`crate::fdpass`]).
pub async fn listen(ns: &Netns, addr: SocketAddr, mark: u32) -> io::Result<TcpListener> {
    let std = ns
        .run(move || {
            let s = Socket::new(domain(&addr), Type::STREAM, Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            if addr.is_ipv4() {
                s.set_ip_transparent_v4(true)?;
            } else {
                s.set_only_v6(true)?;
                s.set_ip_transparent_v6(true)?;
            }
            s.set_mark(mark)?;
            // Accepted sockets inherit it.
            keepalive(SockRef::from(&s))?;
            s.set_nonblocking(true)?;
            s.bind(&addr.into())?;
            s.listen(BACKLOG)?;
            Ok(std::net::TcpListener::from(s))
        })
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("listen on {addr} in {}: {e}", ns.path().display())))?;
    TcpListener::from_std(std)
}

/// Connects to `dst` from inside `ns`, with the proxy mark so capture does not loop it back.
///
/// With a `source`, the connection leaves from that address (`IP_TRANSPARENT`, any port), so an
/// inbound connection reaches the pod from the client's own address, as it would without a
/// mesh. Capture routes the pod's replies back to this socket.
pub async fn connect(ns: &Netns, source: Option<IpAddr>, dst: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let std = ns
        .run(move || {
            let s = Socket::new(domain(&dst), Type::STREAM, Some(Protocol::TCP))?;
            s.set_mark(mark)?;
            s.set_nonblocking(true)?;
            s.set_tcp_nodelay(true)?;
            keepalive(SockRef::from(&s))?;
            if let Some(ip) = source.filter(|ip| ip.is_ipv4() == dst.is_ipv4() && !ip.is_unspecified()) {
                bind_transparent(&s, ip).map_err(|e| io::Error::new(e.kind(), format!("binding to {ip}: {e}")))?;
            }
            Ok(std::net::TcpStream::from(s))
        })
        .await?;
    let socket = TcpSocket::from_std_stream(std);
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {dst} timed out"))),
    }
}

fn bind_transparent(s: &Socket, ip: IpAddr) -> io::Result<()> {
    if ip.is_ipv4() {
        s.set_ip_transparent_v4(true)?;
        // Pick the port at connect time, from the whole 4-tuple: many connections from one
        // client address to different destinations then share ports, as they would anyway.
        set_bind_address_no_port(s)?;
    } else {
        s.set_ip_transparent_v6(true)?;
    }
    s.bind(&SocketAddr::new(ip, 0).into())
}

fn set_bind_address_no_port(s: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the advertised size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Where the client meant to go: the pre-NAT destination when a redirect rewrote it, else the
/// local address the connection was accepted on (TPROXY and `bpf_sk_assign` keep it intact).
pub fn original_destination(s: &TcpStream) -> io::Result<SocketAddr> {
    let local = s.local_addr()?;
    let sock = SockRef::from(s);
    let orig = if local.is_ipv4() { sock.original_dst_v4() } else { sock.original_dst_v6() };
    match orig.ok().and_then(|a| a.as_socket()) {
        Some(a) => Ok(a),
        None => Ok(local),
    }
}

/// Closes with a RST rather than a FIN, so a refused client sees a reset at once.
pub fn reset(s: TcpStream) {
    hbone::Abort::abort_on_close(&s);
}
