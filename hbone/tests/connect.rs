//! HBONE CONNECT end to end over mutual TLS on loopback: tunnels carry bytes both ways (beyond the
//! flow-control windows), share one connection, carry the HBONE headers, and fail with the
//! right status codes.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Ca;
use hbone::client::{Baggage, Connection, HboneError, Keepalive, Tunnel};
use hbone::server::{serve, Inbound, Limits};
use hbone::tls::{client_config, peer_identity, server_config};
use hbone::Identity;
use http::StatusCode;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/echo";
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const DENIED_PORT: u16 = 1;
/// The handler holds a CONNECT to this port for SLOW_CONNECT, then answers 503.
const SLOW_PORT: u16 = 2;
const SLOW_CONNECT: Duration = Duration::from_millis(500);
/// The handler never answers a CONNECT to this port: a peer that has stopped responding.
const SILENT_PORT: u16 = 3;

/// Every tunnel request the server's handler saw, with the connection's peer identity.
type Seen = Arc<Mutex<Vec<(Inbound, Option<Identity>)>>>;

struct Harness {
    hbone: SocketAddr,
    echo: SocketAddr,
    ca: Ca,
    connections: Arc<AtomicUsize>,
    seen: Seen,
    live: Arc<Mutex<Vec<LiveConnection>>>,
    /// The most CONNECTs to SLOW_PORT the handler held at one time.
    slow_max: Arc<AtomicUsize>,
}

/// A server-side connection the test can drain (GOAWAY) or kill (drop without a word).
struct LiveConnection {
    drain: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::AbortHandle,
}

impl Harness {
    fn drain_connections(&self) {
        for c in self.live.lock().unwrap().iter_mut() {
            if let Some(d) = c.drain.take() {
                let _ = d.send(());
            }
        }
    }

    fn kill_connections(&self) {
        for c in self.live.lock().unwrap().drain(..) {
            c.task.abort();
        }
    }
}

/// A loopback TCP server that runs `serve_one` on each connection it accepts.
async fn upstream<F, Fut>(serve_one: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(serve_one(s));
        }
    });
    addr
}

async fn echo_upstream() -> SocketAddr {
    upstream(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// An HBONE endpoint whose handler denies DENIED_PORT with 401 and answers 503 when the upstream
/// cannot be reached — the decisions ztunnel's inbound path makes.
async fn harness() -> Harness {
    harness_with(Limits::default()).await
}

async fn harness_with(limits: Limits) -> Harness {
    let ca = Ca::new("mesh root");
    let acceptor = TlsAcceptor::from(Arc::new(server_config(ca.slot(SERVER), ca.roots(), "cluster.local").unwrap()));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hbone = l.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let seen: Seen = Arc::default();
    let live: Arc<Mutex<Vec<LiveConnection>>> = Arc::default();
    let (slow_now, slow_max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (c2, s2, l2, slow) = (connections.clone(), seen.clone(), live.clone(), (slow_now, slow_max.clone()));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            c2.fetch_add(1, Ordering::SeqCst);
            let (acceptor, seen, slow, limits) = (acceptor.clone(), s2.clone(), slow.clone(), limits.clone());
            let (drain, drained) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let peer = peer_identity(tls.get_ref().1);
                let drained = async move {
                    if drained.await.is_err() {
                        std::future::pending::<()>().await
                    }
                };
                let _ = serve(tls, peer, limits, drained, move |inbound: Inbound| {
                    let (seen, (slow_now, slow_max)) = (seen.clone(), slow.clone());
                    async move {
                        let target = inbound.authority;
                        let peer = inbound.peer.clone();
                        seen.lock().unwrap().push((inbound, peer));
                        if target.port() == DENIED_PORT {
                            return Err(StatusCode::UNAUTHORIZED);
                        }
                        if target.port() == SLOW_PORT {
                            slow_max.fetch_max(slow_now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                            tokio::time::sleep(SLOW_CONNECT).await;
                            slow_now.fetch_sub(1, Ordering::SeqCst);
                            return Err(StatusCode::SERVICE_UNAVAILABLE);
                        }
                        if target.port() == SILENT_PORT {
                            return std::future::pending().await;
                        }
                        TcpStream::connect(target).await.map_err(|_| StatusCode::SERVICE_UNAVAILABLE)
                    }
                })
                .await;
            });
            l2.lock().unwrap().push(LiveConnection { drain: Some(drain), task: task.abort_handle() });
        }
    });
    Harness { hbone, echo: echo_upstream().await, ca, connections, seen, live, slow_max }
}

async fn client(h: &Harness) -> Connection {
    Connection::handshake(dial_tls(h).await).await.unwrap()
}

/// TCP and mutual TLS to the harness's HBONE server, as the client identity.
async fn dial_tls(h: &Harness) -> tokio_rustls::client::TlsStream<TcpStream> {
    dial_tls_at(h, h.hbone).await
}

/// TCP and mutual TLS to `addr`, which must present the harness's server identity.
async fn dial_tls_at(h: &Harness, addr: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let cfg = client_config(h.ca.slot(CLIENT), h.ca.roots(), vec![Identity::parse(SERVER).unwrap()]).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(Arc::new(cfg)).connect(ServerName::IpAddress(addr.ip().into()), tcp).await.unwrap()
}

fn tunnel(to: SocketAddr) -> Tunnel {
    Tunnel {
        authority: to,
        source: "10.244.1.10:40000".parse().unwrap(),
        baggage: Baggage {
            cluster: "Kubernetes".into(),
            namespace: "demo".into(),
            workload_type: "pod".into(),
            workload_name: "client".into(),
            service_name: "client".into(),
            service_version: "v1".into(),
        },
    }
}

#[tokio::test]
async fn tunnel_carries_bytes_both_ways_with_hbone_headers() {
    let h = harness().await;
    let conn = client(&h).await;
    let stream = conn.open(&tunnel(h.echo)).await.unwrap();
    // 9 MiB each way: more than the 4 MiB stream window, so flow control must be released.
    let payload: Vec<u8> = (0..9 << 20).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(stream);
    let to_send = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&to_send).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "echoed bytes differ");

    let seen = h.seen.lock().unwrap();
    let (inbound, peer) = &seen[0];
    assert_eq!(inbound.authority, h.echo);
    assert_eq!(peer.as_ref().map(ToString::to_string).as_deref(), Some(CLIENT), "server sees the client's identity");
    let hdr = |k: &str| inbound.headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert_eq!(hdr("forwarded"), "for=\"10.244.1.10:40000\"");
    assert_eq!(
        hdr("baggage"),
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=demo,k8s.pod.name=client,service.name=client,service.version=v1"
    );
    let tp = hdr("traceparent");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!((parts.len(), parts[0], parts[1].len(), parts[2].len(), parts[3]), (4, "00", 32, 16, "01"), "{tp}");
}

/// A loopback socket for an app to connect to, and the task that splices the connection it
/// accepts into a tunnel to `to` on `conn`, as ztunnel's outbound path does.
async fn spliced_app(conn: Connection, to: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>) {
    let app_side = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app_side.local_addr().unwrap();
    let proxy = tokio::spawn(async move {
        let (pod_conn, _) = app_side.accept().await.unwrap();
        let stream = conn.open(&tunnel(to)).await.unwrap();
        hbone::splice(pod_conn, stream).await
    });
    (app_addr, proxy)
}

/// `hbone::splice`, as ztunnel's outbound path uses it: an app's socket spliced into a tunnel
/// (and, on the server, the tunnel spliced into the upstream socket). Bytes arrive intact beyond
/// the stream window and the read chunk, and a half-close travels through: the app shuts down
/// its write side while the echo is still sending and still reads everything back, then EOF.
#[tokio::test]
async fn spliced_tunnel_carries_bytes_both_ways_and_half_closes() {
    let h = harness().await;
    let conn = client(&h).await;
    let (app_addr, proxy) = spliced_app(conn, h.echo).await;
    let payload: Vec<u8> = (0..9 << 20).map(|i| (i % 253) as u8).collect();
    let app = TcpStream::connect(app_addr).await.unwrap();
    let (mut r, mut w) = app.into_split();
    let to_send = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&to_send).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    // A lost END_STREAM or shutdown would leave the app waiting for EOF forever.
    tokio::time::timeout(std::time::Duration::from_secs(30), r.read_to_end(&mut back))
        .await
        .expect("EOF reaches the app")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "echoed bytes differ");
    proxy.await.unwrap().expect("splice ends cleanly once both directions are done");
}

/// A socket whose connection can be revoked from outside, as ztunnel's policy re-check does.
struct Revocable {
    inner: TcpStream,
    revoked: Arc<(std::sync::atomic::AtomicBool, Mutex<Option<std::task::Waker>>)>,
}

impl hbone::Abort for Revocable {
    fn abort_on_close(&self) {
        self.inner.abort_on_close();
    }
    fn poll_revoked(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Error> {
        *self.revoked.1.lock().unwrap() = Some(cx.waker().clone());
        if self.revoked.0.load(Ordering::SeqCst) {
            return std::task::Poll::Ready(std::io::Error::other("revoked"));
        }
        std::task::Poll::Pending
    }
}

impl AsyncRead for Revocable {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Revocable {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A revocation ends a splice that only waits on its tunnel (the app half-closed, the far end is
/// idle), and the app sees a reset, not a clean close.
#[tokio::test]
async fn a_revoked_socket_ends_an_idle_half_closed_splice_with_a_reset() {
    let h = harness().await;
    let conn = client(&h).await;
    // Reads everything, then holds the connection open without a byte or a FIN.
    let idle = upstream(|mut s| async move {
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    let app_side = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app_side.local_addr().unwrap();
    let revoked = Arc::new((std::sync::atomic::AtomicBool::new(false), Mutex::new(None)));
    let proxy = tokio::spawn({
        let revoked = revoked.clone();
        async move {
            let (inner, _) = app_side.accept().await.unwrap();
            let stream = conn.open(&tunnel(idle)).await.unwrap();
            hbone::splice(Revocable { inner, revoked }, stream).await
        }
    });
    let mut app = TcpStream::connect(app_addr).await.unwrap();
    app.write_all(b"hello").await.unwrap();
    app.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!proxy.is_finished(), "the tunnel is idle, not done");

    revoked.0.store(true, Ordering::SeqCst);
    if let Some(w) = revoked.1.lock().unwrap().take() {
        w.wake();
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), proxy).await.expect("revocation ends the splice");
    assert!(ended.unwrap().is_err(), "an error, so both sides are reset");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), app.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(read.map_err(|e| e.kind()).err(), Some(std::io::ErrorKind::ConnectionReset), "{rest:?}");
}

/// How long `conn` took to close, if it did within `limit`.
async fn closed_within(conn: &Connection, limit: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    while conn.is_open() {
        if started.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(started.elapsed())
}

/// A CONNECT to `to` on a connection of its own, driven with h2 directly so the test can see
/// the send capacity the server's windows allow before any byte is sent.
async fn raw_tunnel(h: &Harness, to: SocketAddr) -> (h2::SendStream<bytes::Bytes>, tokio::task::JoinHandle<()>) {
    let tls = dial_tls(h).await;
    let mut builder = hbone::settings::client(hbone::settings::CONNECTION_WINDOW);
    // h2 caps what a stream may have buffered (400 KiB by default); here capacity must show the window.
    builder.max_send_buffer_size(64 << 20);
    let (send, conn) = builder.handshake::<_, bytes::Bytes>(tls).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder().method(http::Method::CONNECT).uri(to.to_string()).body(()).unwrap();
    let (response, stream) = send.ready().await.unwrap().send_request(req, false).unwrap();
    assert_eq!(response.await.unwrap().status(), StatusCode::OK);
    (stream, driver)
}

/// Waits (up to 2 s) for `stream`'s send capacity to reach `n`, as a WINDOW_UPDATE raising the
/// peer's window arrives; the capacity it ended with.
async fn send_window_reaches(stream: &mut h2::SendStream<bytes::Bytes>, n: usize) -> usize {
    stream.reserve_capacity(64 << 20);
    for _ in 0..100 {
        if stream.capacity() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stream.capacity()
}

/// What the server lets `stream` send before it reads anything: once the server's
/// WINDOW_UPDATE has arrived, the capacity stops growing.
async fn send_window(stream: &mut h2::SendStream<bytes::Bytes>) -> usize {
    stream.reserve_capacity(64 << 20);
    let mut last = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let now = stream.capacity();
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    last
}

#[tokio::test]
async fn connection_windows_are_drawn_from_the_servers_budget() {
    use hbone::window::{WindowBudget, MIN_WINDOW};
    let budget = WindowBudget::new(1 << 20);
    let h = harness_with(Limits { windows: Some(budget.clone()), ..Limits::default() }).await;
    let (mut first, first_conn) = raw_tunnel(&h, h.echo).await;
    assert_eq!(send_window(&mut first).await, 1 << 20, "the whole budget, below the 16 MiB window");
    let (mut second, _second_conn) = raw_tunnel(&h, h.echo).await;
    assert_eq!(send_window(&mut second).await, MIN_WINDOW as usize, "HTTP/2's initial window once it is spent");
    assert_eq!(budget.granted(), (1 << 20) + u64::from(MIN_WINDOW));
    // Without a budget, a connection gets the full window (its one stream: the 4 MiB stream window).
    let unbudgeted = harness().await;
    let (mut full, _full_conn) = raw_tunnel(&unbudgeted, unbudgeted.echo).await;
    assert_eq!(send_window(&mut full).await, hbone::settings::STREAM_WINDOW as usize);
    // A closed connection gives its window back, and the connection that came up short takes it:
    // its peer is told so with a WINDOW_UPDATE.
    drop(first);
    first_conn.abort();
    assert_eq!(send_window_reaches(&mut second, 1 << 20).await, 1 << 20, "the short window did not grow");
    assert_eq!(budget.granted(), 1 << 20, "the first connection's window went elsewhere");
}

/// A tunnel as [`window_probe`] sees it: the bytes the client sends, and the sending half.
type ProbedTunnel = (h2::RecvStream, h2::SendStream<bytes::Bytes>);

/// A bare HTTP/2 server presenting the harness's server identity, with HBONE's settings: it
/// answers every CONNECT with 200 and hands the test each tunnel, whose DATA frames show how the
/// client sent, and whose sending half's capacity shows the windows the client advertised.
async fn window_probe(h: &Harness) -> (SocketAddr, tokio::sync::mpsc::Receiver<ProbedTunnel>) {
    let acceptor =
        TlsAcceptor::from(Arc::new(server_config(h.ca.slot(SERVER), h.ca.roots(), "cluster.local").unwrap()));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let tls = acceptor.accept(tcp).await.unwrap();
                let mut builder = hbone::settings::server(hbone::settings::CONNECTION_WINDOW);
                // h2 caps what a stream may have buffered (400 KiB by default); capacity must show the window.
                builder.max_send_buffer_size(64 << 20);
                let mut conn = builder.handshake::<_, bytes::Bytes>(tls).await.unwrap();
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let send = respond.send_response(http::Response::new(()), false).unwrap();
                    let _ = tx.send((req.into_body(), send)).await;
                }
            });
        }
    });
    (addr, rx)
}

/// A client connection to `probe` whose window comes from `budget`, a tunnel on it, and the
/// probe's sending half of that tunnel.
async fn budgeted_tunnel(
    h: &Harness,
    probe: SocketAddr,
    budget: &Arc<hbone::window::WindowBudget>,
    tunnels: &mut tokio::sync::mpsc::Receiver<ProbedTunnel>,
) -> (Connection, hbone::H2Stream, h2::SendStream<bytes::Bytes>) {
    let tls = dial_tls_at(h, probe).await;
    let conn = Connection::handshake_with(tls, Keepalive::default(), Some(budget.grant())).await.unwrap();
    let stream = conn.open(&tunnel(h.echo)).await.unwrap();
    (conn, stream, tunnels.recv().await.unwrap().1)
}

/// The client's connection window comes from a budget as the server's does, and grows when
/// another connection returns its share.
#[tokio::test]
async fn client_connection_windows_are_drawn_from_a_budget_too() {
    use hbone::window::{WindowBudget, MIN_WINDOW};
    let h = harness().await;
    let (probe, mut tunnels) = window_probe(&h).await;
    let budget = WindowBudget::new(1 << 20);
    let (first, first_stream, mut first_sending) = budgeted_tunnel(&h, probe, &budget, &mut tunnels).await;
    assert_eq!(send_window(&mut first_sending).await, 1 << 20, "the whole budget, below the 16 MiB window");
    let (_second, _second_stream, mut second_sending) = budgeted_tunnel(&h, probe, &budget, &mut tunnels).await;
    assert_eq!(send_window(&mut second_sending).await, MIN_WINDOW as usize, "HTTP/2's initial window once it is spent");
    assert_eq!(budget.granted(), (1 << 20) + u64::from(MIN_WINDOW));
    // The first connection ends once its tunnel and its last handle are gone; its window goes to
    // the second.
    drop((first, first_stream, first_sending));
    assert_eq!(send_window_reaches(&mut second_sending, 1 << 20).await, 1 << 20, "the short window did not grow");
    assert_eq!(budget.granted(), 1 << 20);
}

/// `splice` sizes its reads to the traffic: a short write travels alone in a DATA frame of its own
/// size, and a bulk upload in frames that grow to `hbone::MAX_READ` (256 KiB less a frame header),
/// so that it costs fewer reads, TLS writes and wake-ups per byte.
#[tokio::test]
async fn spliced_bulk_data_travels_in_frames_up_to_the_largest_read() {
    let h = harness().await;
    let (probe, mut tunnels) = window_probe(&h).await;
    let conn = Connection::handshake(dial_tls_at(&h, probe).await).await.unwrap();
    let (app_addr, proxy) = spliced_app(conn, h.echo).await;
    let mut app = TcpStream::connect(app_addr).await.unwrap();
    app.write_all(b"hello").await.unwrap();
    let (mut body, _sending) = tunnels.recv().await.unwrap();
    let first = body.data().await.unwrap().unwrap();
    assert_eq!(&first[..], b"hello");
    body.flow_control().release_capacity(first.len()).unwrap();

    const BULK: usize = 16 << 20;
    let payload: Vec<u8> = (0..BULK).map(|i| (i % 251) as u8).collect();
    let writer = tokio::spawn(async move {
        app.write_all(&payload).await.unwrap();
        app.shutdown().await.unwrap();
        app
    });
    let (mut received, mut largest, mut frames) = (Vec::with_capacity(BULK), 0, 0);
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        largest = largest.max(chunk.len());
        frames += 1;
        received.extend_from_slice(&chunk);
        body.flow_control().release_capacity(chunk.len()).unwrap();
    }
    assert!(received.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8), "bytes arrive intact");
    assert_eq!(received.len(), BULK);
    assert_eq!(largest, hbone::MAX_READ, "the largest DATA frame of {frames}");
    assert!(frames < 2 * BULK / hbone::MAX_READ, "{frames} frames for {BULK} bytes");
    drop(writer.await.unwrap());
    proxy.abort();
}

/// The server closes a connection that has carried no tunnel for its idle timeout, and only
/// then: a long tunnel keeps it open however quiet it is.
#[tokio::test]
async fn the_server_closes_a_connection_idle_for_its_timeout() {
    let h = harness_with(Limits { idle_timeout: Duration::from_millis(300), ..Limits::default() }).await;
    let conn = client(&h).await;
    let mut held = conn.open(&tunnel(h.echo)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(conn.is_open(), "an open tunnel keeps the connection");
    held.write_all(b"still here").await.unwrap();
    let mut b = [0u8; 10];
    held.read_exact(&mut b).await.unwrap();
    drop(held);
    let waited = closed_within(&conn, Duration::from_secs(3)).await.expect("the server closed the idle connection");
    assert!(waited >= Duration::from_millis(200), "closed after {waited:?}, before the idle timeout");
}

/// An upstream that answers part of a response and then crashes (resets its socket).
async fn crashing_upstream() -> SocketAddr {
    upstream(|mut s| async move {
        s.write_all(b"partial").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        s.set_zero_linger().unwrap();
    })
    .await
}

/// A reset on one end of a tunnel arrives as a reset at the other (server socket → RST_STREAM →
/// client socket), not as a clean end of file that would make a cut-short response look whole.
#[tokio::test]
async fn an_upstream_reset_reaches_the_app_as_a_reset() {
    let h = harness().await;
    let conn = client(&h).await;
    let app_side = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app_side.local_addr().unwrap();
    let upstream = crashing_upstream().await;
    let proxy = tokio::spawn(async move {
        let (pod_conn, _) = app_side.accept().await.unwrap();
        let stream = conn.open(&tunnel(upstream)).await.unwrap();
        hbone::splice(pod_conn, stream).await
    });
    let mut app = TcpStream::connect(app_addr).await.unwrap();
    let mut got = Vec::new();
    let end = tokio::time::timeout(std::time::Duration::from_secs(10), app.read_to_end(&mut got))
        .await
        .expect("the app learns how the connection ended");
    assert_eq!(got, b"partial");
    assert_eq!(end.expect_err("a reset, not end of file").kind(), std::io::ErrorKind::ConnectionReset);
    assert!(proxy.await.unwrap().is_err(), "the splice reports the failure");
}

#[tokio::test]
async fn tunnels_share_one_connection() {
    let h = harness().await;
    let conn = client(&h).await;
    let mut tasks = Vec::new();
    for i in 0..20u8 {
        let (conn, to) = (conn.clone(), h.echo);
        tasks.push(tokio::spawn(async move {
            let mut s = conn.open(&tunnel(to)).await.unwrap();
            s.write_all(&[i; 100]).await.unwrap();
            s.shutdown().await.unwrap();
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, vec![i; 100]);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(h.connections.load(Ordering::SeqCst), 1, "20 tunnels multiplexed on one TCP connection");
}

#[tokio::test]
async fn refusals_carry_the_hbone_status_codes() {
    let h = harness().await;
    let conn = client(&h).await;
    let denied: SocketAddr = format!("127.0.0.1:{DENIED_PORT}").parse().unwrap();
    assert!(matches!(conn.open(&tunnel(denied)).await, Err(HboneError::Status(StatusCode::UNAUTHORIZED))));
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    assert!(matches!(conn.open(&tunnel(closed)).await, Err(HboneError::Status(StatusCode::SERVICE_UNAVAILABLE))));
}

#[tokio::test]
async fn non_connect_requests_and_bad_authorities_get_400() {
    let h = harness().await;
    let tls = dial_tls(&h).await;
    let (send, conn) =
        hbone::settings::client(hbone::settings::CONNECTION_WINDOW).handshake::<_, bytes::Bytes>(tls).await.unwrap();
    tokio::spawn(conn);
    let requests = [
        http::Request::builder().method("GET").uri(format!("https://{}/", h.echo)).body(()).unwrap(),
        http::Request::builder().method("CONNECT").uri("echo.demo:80").body(()).unwrap(),
        http::Request::builder().method("CONNECT").uri(format!("{}:0", h.echo.ip())).body(()).unwrap(),
    ];
    for req in requests {
        let mut s = send.clone().ready().await.unwrap();
        let (resp, _) = s.send_request(req, true).unwrap();
        assert_eq!(resp.await.unwrap().status(), StatusCode::BAD_REQUEST);
    }
    assert!(h.seen.lock().unwrap().is_empty(), "the handler never saw invalid requests");
}

mod pool {

    use hbone::pool::{Pool, PoolKey};

    use super::*;

    async fn dial(h: &Harness) -> Result<Connection, HboneError> {
        Ok(client(h).await)
    }

    fn key(h: &Harness, src: &str) -> PoolKey {
        PoolKey {
            source_identity: Identity::parse(src).unwrap(),
            destination_identities: vec![Identity::parse(SERVER).unwrap()],
            source_ip: "10.244.1.10".parse().unwrap(),
            destination: h.hbone,
        }
    }

    #[tokio::test]
    async fn at_most_100_streams_per_connection_and_keys_never_share() {
        let h = harness().await;
        let pool = Pool::new(100, Duration::from_secs(300));
        let k = key(&h, CLIENT);
        let mut open = Vec::new();
        for _ in 0..150 {
            open.push(pool.open(&k, &tunnel(h.echo), || dial(&h)).await.unwrap());
        }
        assert_eq!(pool.connections(), 2, "150 concurrent tunnels need two connections");
        assert_eq!(h.connections.load(Ordering::SeqCst), 2);
        let mut s = open.pop().unwrap();
        s.write_all(b"ok").await.unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ok");
        drop(open);
        drop(s);
        // Freed slots are reused: no new dial.
        let _again = pool.open(&k, &tunnel(h.echo), || dial(&h)).await.unwrap();
        assert_eq!(h.connections.load(Ordering::SeqCst), 2);
        // Another source identity gets its own connection.
        let other = key(&h, "spiffe://cluster.local/ns/demo/sa/other");
        let _o = pool.open(&other, &tunnel(h.echo), || dial(&h)).await.unwrap();
        assert_eq!(pool.connections(), 3);
    }

    #[tokio::test]
    async fn idle_connections_are_released_and_refusals_keep_the_connection() {
        let h = harness().await;
        let pool = Pool::new(100, Duration::from_millis(200));
        let k = key(&h, CLIENT);
        let denied: SocketAddr = format!("127.0.0.1:{DENIED_PORT}").parse().unwrap();
        assert!(pool.open(&k, &tunnel(denied), || dial(&h)).await.is_err());
        assert_eq!(pool.connections(), 1, "a 401 does not condemn the connection");
        drop(pool.open(&k, &tunnel(h.echo), || dial(&h)).await.unwrap());
        assert_eq!(h.connections.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(pool.connections(), 0, "idle connection released");
        let _s = pool.open(&k, &tunnel(h.echo), || dial(&h)).await.unwrap();
        assert_eq!(h.connections.load(Ordering::SeqCst), 2, "a new connection is dialled after release");
    }
    async fn echo_once(s: &mut (impl AsyncRead + AsyncWrite + Unpin), msg: &[u8]) {
        s.write_all(msg).await.unwrap();
        let mut b = vec![0u8; msg.len()];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(b, msg);
    }

    #[tokio::test]
    async fn short_tunnels_between_sweeps_keep_a_connection_from_idling_out() {
        let h = harness().await;
        let pool = Pool::new(100, Duration::from_millis(200));
        let k = key(&h, CLIENT);
        // Three idle timeouts of tunnels that each last a moment: a sweep (every 50 ms) almost
        // never sees one open, yet the connection was never idle for 200 ms.
        let until = std::time::Instant::now() + Duration::from_millis(600);
        while std::time::Instant::now() < until {
            let mut s = pool.open(&k, &tunnel(h.echo), || dial(&h)).await.unwrap();
            echo_once(&mut s, b"short").await;
            drop(s);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(h.connections.load(Ordering::SeqCst), 1, "a busy connection is never released as idle");
    }

    #[tokio::test]
    async fn tunnels_opened_together_share_one_dial_and_its_failure() {
        let h = Arc::new(harness().await);
        let pool = Pool::new(100, Duration::from_secs(300));
        let dials = Arc::new(AtomicUsize::new(0));
        let open_all = |fail: bool| {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..20 {
                let (pool, h, dials) = (pool.clone(), h.clone(), dials.clone());
                set.spawn(async move {
                    let dial = || async {
                        dials.fetch_add(1, Ordering::SeqCst);
                        // Slow enough that all twenty queue up behind the first dial.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if fail {
                            return Err(HboneError::Tls("peer certificate rejected".into()));
                        }
                        Ok(client(&h).await)
                    };
                    pool.open(&key(&h, CLIENT), &tunnel(h.echo), dial).await.map(drop)
                });
            }
            set.join_all()
        };
        let failed = open_all(true).await;
        assert_eq!(dials.load(Ordering::SeqCst), 1, "one dial for twenty tunnels");
        assert!(failed.iter().all(|r| r.is_err()), "every tunnel shares the dial's failure");
        assert_eq!(failed.iter().filter(|r| matches!(r, Err(HboneError::DialFailed { .. }))).count(), 19);
        // Those queued behind it fail as what it was, a TLS failure, not an unreachable peer.
        assert!(failed.iter().all(|r| r.as_ref().is_err_and(HboneError::is_tls)), "{failed:?}");
        let opened = open_all(false).await;
        assert!(opened.iter().all(|r| r.is_ok()), "{opened:?}");
        assert_eq!(dials.load(Ordering::SeqCst), 2, "a new round dials again, once");
        assert_eq!(h.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn tunnels_queued_behind_a_dial_connect_at_the_same_time() {
        let h = Arc::new(harness().await);
        let pool = Pool::new(100, Duration::from_secs(300));
        let slow: SocketAddr = format!("127.0.0.1:{SLOW_PORT}").parse().unwrap();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let (pool, h) = (pool.clone(), h.clone());
            set.spawn(async move {
                let dial = || async {
                    // Slow enough that all ten queue up behind the first dial.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok(client(&h).await)
                };
                pool.open(&key(&h, CLIENT), &tunnel(slow), dial).await.map(drop)
            });
        }
        let refused = set.join_all().await;
        assert!(
            refused.iter().all(|r| matches!(r, Err(HboneError::Status(StatusCode::SERVICE_UNAVAILABLE)))),
            "{refused:?}"
        );
        assert_eq!(h.connections.load(Ordering::SeqCst), 1, "one dial");
        // The gate serialises dials, not CONNECTs: a slow upstream for one tunnel delays none
        // of the others queued with it.
        assert_eq!(h.slow_max.load(Ordering::SeqCst), 10, "all ten CONNECTs were in flight together");
    }

    #[tokio::test]
    async fn a_connection_the_peer_dropped_is_replaced_not_handed_out() {
        let h = harness().await;
        let pool = Pool::new(100, Duration::from_secs(300));
        let k = key(&h, CLIENT);
        let mut s = pool.open(&k, &tunnel(h.echo), || dial(&h)).await.unwrap();
        echo_once(&mut s, b"before").await;
        drop(s);
        h.kill_connections();
        // Whether or not the client has seen the close yet, the next tunnel opens on a new one.
        let mut s = pool.open(&k, &tunnel(h.echo), || dial(&h)).await.unwrap();
        echo_once(&mut s, b"after").await;
        assert_eq!(h.connections.load(Ordering::SeqCst), 2);
        assert_eq!(pool.connections(), 1, "the dead connection left the pool");
    }

    #[tokio::test]
    async fn a_draining_peer_finishes_open_tunnels_while_new_ones_go_to_a_new_connection() {
        let h = harness().await;
        let pool = Pool::new(100, Duration::from_secs(300));
        let k = key(&h, CLIENT);
        let mut old = pool.open(&k, &tunnel(h.echo), || dial(&h)).await.unwrap();
        echo_once(&mut old, b"before the drain").await;
        h.drain_connections();
        // Time for the GOAWAY to arrive (a tunnel opened before then is, correctly, still
        // served). The pooled connection stays open for its tunnel, so this goes through the
        // retry on a new connection.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut new = pool.open(&k, &tunnel(h.echo), || dial(&h)).await.unwrap();
        echo_once(&mut new, b"new tunnel").await;
        assert_eq!(h.connections.load(Ordering::SeqCst), 2, "the draining connection took no new tunnel");
        echo_once(&mut old, b"the open tunnel keeps working").await;
        old.shutdown().await.unwrap();
        let mut rest = Vec::new();
        old.read_to_end(&mut rest).await.unwrap();
        drop(old);
        // With its last tunnel gone, the draining connection closes and leaves the pool.
        for _ in 0..100 {
            let _ = pool.open(&k, &tunnel(h.echo), || dial(&h)).await.unwrap();
            if pool.connections() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(pool.connections(), 1);
        assert_eq!(h.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_that_left_a_connect_unanswered_takes_no_new_tunnels() {
        let h = harness().await;
        let pool = Pool::new(100, Duration::from_secs(300));
        let k = key(&h, CLIENT);
        let impatient = || async { Ok(client(&h).await.with_response_timeout(Duration::from_millis(300))) };
        let mut old = pool.open(&k, &tunnel(h.echo), impatient).await.unwrap();
        echo_once(&mut old, b"before").await;
        let silent: SocketAddr = format!("127.0.0.1:{SILENT_PORT}").parse().unwrap();
        let unanswered = pool.open(&k, &tunnel(silent), impatient).await.map(drop);
        assert!(matches!(unanswered, Err(HboneError::Timeout(_))), "{unanswered:?}");
        let mut new = pool.open(&k, &tunnel(h.echo), impatient).await.unwrap();
        echo_once(&mut new, b"new tunnel").await;
        assert_eq!(h.connections.load(Ordering::SeqCst), 2, "the unresponsive connection took no new tunnel");
        assert_eq!(pool.connections(), 1);
        echo_once(&mut old, b"the open tunnel keeps working").await;
        // Not retried: the peer may have acted on a CONNECT it did not answer.
        let silent_seen = h.seen.lock().unwrap().iter().filter(|(i, _)| i.authority == silent).count();
        assert_eq!(silent_seen, 1);
        // Out of the pool, the connection closes once its last tunnel ends.
        drop(old);
        let first = h.live.lock().unwrap()[0].task.clone();
        for _ in 0..100 {
            if first.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(first.is_finished(), "the forgotten connection outlived its last tunnel");
    }

    /// A relay to `to` that, once `frozen` is set, stops forwarding in both directions but keeps
    /// both sockets open: what a peer whose node vanished looks like.
    async fn freezable_relay(to: SocketAddr) -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
        async fn pump(
            mut r: tokio::net::tcp::OwnedReadHalf,
            mut w: tokio::net::tcp::OwnedWriteHalf,
            frozen: Arc<std::sync::atomic::AtomicBool>,
        ) {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if frozen.load(Ordering::SeqCst) {
                    let _held = (r, w);
                    return std::future::pending().await;
                }
                if w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = frozen.clone();
        tokio::spawn(async move {
            let (client, _) = l.accept().await.unwrap();
            let server = TcpStream::connect(to).await.unwrap();
            let ((cr, cw), (sr, sw)) = (client.into_split(), server.into_split());
            tokio::spawn(pump(cr, sw, f.clone()));
            pump(sr, cw, f).await;
        });
        (addr, frozen)
    }

    /// A client connection to the harness through `relay`, with `keepalive`.
    async fn client_via(h: &Harness, relay: SocketAddr, keepalive: Keepalive) -> Connection {
        let cfg = client_config(h.ca.slot(CLIENT), h.ca.roots(), vec![Identity::parse(SERVER).unwrap()]).unwrap();
        let tcp = TcpStream::connect(relay).await.unwrap();
        let tls =
            TlsConnector::from(Arc::new(cfg)).connect(ServerName::IpAddress(relay.ip().into()), tcp).await.unwrap();
        Connection::handshake_with(tls, keepalive, None).await.unwrap()
    }

    #[tokio::test]
    async fn keepalive_closes_a_connection_whose_peer_went_silent() {
        let h = harness().await;
        let (relay, frozen) = freezable_relay(h.hbone).await;
        let keepalive = Keepalive { interval: Duration::from_millis(100), timeout: Duration::from_millis(300) };
        let conn = client_via(&h, relay, keepalive).await;
        let mut s = conn.open(&tunnel(h.echo)).await.unwrap();
        echo_once(&mut s, b"ping").await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(conn.is_open(), "a peer that answers PINGs keeps the connection");
        frozen.store(true, Ordering::SeqCst);
        closed_within(&conn, Duration::from_secs(3)).await.expect("an unanswered PING closes the connection");
        // Tunnels on it end rather than hang.
        let mut b = [0u8; 8];
        let ended = tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await;
        assert!(matches!(ended, Ok(Err(_)) | Ok(Ok(0))), "the tunnel must end with the connection: {ended:?}");
    }

    #[tokio::test]
    async fn the_server_closes_a_connection_whose_client_went_silent_and_resets_its_upstreams() {
        let keepalive = Keepalive { interval: Duration::from_millis(100), timeout: Duration::from_millis(300) };
        let h = harness_with(Limits { keepalive, ..Limits::default() }).await;
        // An upstream that reports how each of its connections ended.
        let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
        let watched = upstream(move |mut s| {
            let ended_tx = ended_tx.clone();
            async move {
                let mut b = [0u8; 64];
                let how = loop {
                    match s.read(&mut b).await {
                        Ok(0) => break "FIN",
                        Ok(_) => continue,
                        Err(_) => break "reset",
                    }
                };
                let _ = ended_tx.send(how);
            }
        })
        .await;
        let (relay, frozen) = freezable_relay(h.hbone).await;
        // The client itself would wait an hour: only the server's PINGs can notice.
        let patient = Keepalive { interval: Duration::from_secs(3600), timeout: Duration::from_secs(3600) };
        let conn = client_via(&h, relay, patient).await;
        let mut quiet = conn.open(&tunnel(watched)).await.unwrap();
        quiet.write_all(b"hello").await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(ended.try_recv().is_err(), "a client that answers PINGs keeps its quiet tunnel");
        frozen.store(true, Ordering::SeqCst);
        let how = tokio::time::timeout(Duration::from_secs(3), ended.recv())
            .await
            .expect("the server gave up on the silent client within 3 s");
        assert_eq!(how, Some("reset"), "the pod sees the tunnel fail, not finish");
    }
}
