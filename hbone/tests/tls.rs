//! Real TLS handshakes over loopback: HBONE's version, suites and ALPN, SPIFFE verification on
//! both sides, and certificate swap without dropping an established connection.

use std::sync::Arc;

mod common;

use common::Ca;
use hbone::tls::{client_config, peer_identity, server_config};
use hbone::Identity;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/echo";
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";

fn id(s: &str) -> Identity {
    Identity::parse(s).unwrap()
}

/// Accepts one connection, reports the peer identity, then echoes until EOF.
async fn echo_server(
    acceptor: TlsAcceptor,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Receiver<Result<Option<Identity>, String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match acceptor.accept(tcp).await {
            Ok(mut tls) => {
                let _ = tx.send(Ok(peer_identity(tls.get_ref().1)));
                let mut buf = [0u8; 1024];
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tls.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
            }
        }
    });
    (addr, rx)
}

async fn connect(
    addr: std::net::SocketAddr,
    cfg: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(cfg)).connect(ServerName::IpAddress(addr.ip().into()), tcp).await
}

#[tokio::test]
async fn mutual_tls13_with_hbone_suites_alpn_and_identities() {
    let ca = Ca::new("mesh root");
    let server = server_config(ca.slot(SERVER), ca.roots(), "cluster.local").unwrap();
    let (addr, peer) = echo_server(TlsAcceptor::from(Arc::new(server))).await;
    let mut tls = connect(addr, client_config(ca.slot(CLIENT), ca.roots(), vec![id(SERVER)]).unwrap()).await.unwrap();
    let conn = tls.get_ref().1;
    assert_eq!(conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
    // Both HBONE suites are offered; two Trellis ends agree on the cheaper one.
    let offered: Vec<_> = hbone::tls::provider().cipher_suites.iter().map(|s| s.suite()).collect();
    assert_eq!(offered, [rustls::CipherSuite::TLS13_AES_128_GCM_SHA256, rustls::CipherSuite::TLS13_AES_256_GCM_SHA384]);
    assert_eq!(conn.negotiated_cipher_suite().unwrap().suite(), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    assert_eq!(peer_identity(conn), Some(id(SERVER)), "client sees the server identity");
    assert_eq!(peer.await.unwrap().unwrap(), Some(id(CLIENT)), "server exposes the client identity");
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

/// Checks the server's chain to the mesh root and nothing else, so that a test client can be
/// built with a provider of its own choosing.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::RootCertStore>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        let algorithms = hbone::tls::provider().signature_verification_algorithms.all;
        rustls::client::verify_server_cert_signed_by_trust_anchor(&parsed, &self.0, intermediates, now, algorithms)?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &rustls::pki_types::CertificateDer<'_>,
        _d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &hbone::tls::provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        hbone::tls::provider().signature_verification_algorithms.supported_schemes()
    }
}

/// Trellis prefers AES-128-GCM, but a peer that prefers AES-256-GCM (Istio's ztunnel lists it
/// first) gets it: our server follows the client's order.
#[tokio::test]
async fn a_client_preferring_aes_256_gcm_gets_it() {
    let ca = Ca::new("mesh root");
    let server = server_config(ca.slot(SERVER), ca.roots(), "cluster.local").unwrap();
    let (addr, peer) = echo_server(TlsAcceptor::from(Arc::new(server))).await;
    let mut provider = (*hbone::tls::provider()).clone();
    provider.cipher_suites.reverse();
    assert_eq!(provider.cipher_suites[0].suite(), rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(ca.roots())))
        .with_client_cert_resolver(ca.slot(CLIENT));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let mut tls = connect(addr, cfg).await.unwrap();
    assert_eq!(
        tls.get_ref().1.negotiated_cipher_suite().unwrap().suite(),
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
    );
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    assert_eq!(peer.await.unwrap(), Ok(Some(id(CLIENT))), "the server verified the client as usual");
}

#[tokio::test]
async fn client_refuses_a_server_with_an_unexpected_identity() {
    let ca = Ca::new("mesh root");
    let server =
        server_config(ca.slot("spiffe://cluster.local/ns/demo/sa/impostor"), ca.roots(), "cluster.local").unwrap();
    let (addr, _) = echo_server(TlsAcceptor::from(Arc::new(server))).await;
    let err = connect(addr, client_config(ca.slot(CLIENT), ca.roots(), vec![id(SERVER)]).unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("not one of the expected"), "{err}");
}

#[tokio::test]
async fn server_refuses_foreign_trust_domains_and_foreign_roots() {
    let ca = Ca::new("mesh root");
    let other = Ca::new("another mesh root");
    let cases = [
        ("foreign trust domain", ca.slot("spiffe://evil.org/ns/demo/sa/client"), "outside trust domain"),
        ("untrusted root", other.slot(CLIENT), "UnknownIssuer"),
    ];
    for (name, client_slot, want) in cases {
        let server = server_config(ca.slot(SERVER), ca.roots(), "cluster.local").unwrap();
        let (addr, peer) = echo_server(TlsAcceptor::from(Arc::new(server))).await;
        // TLS 1.3 finishes the client side before the server judges the client certificate; the
        // server's verdict is what matters.
        let _ = connect(addr, client_config(client_slot, ca.roots(), vec![id(SERVER)]).unwrap()).await;
        let verdict = peer.await.unwrap();
        assert!(verdict.as_ref().is_err_and(|e| e.contains(want)), "{name}: {verdict:?}");
    }
}

#[tokio::test]
async fn server_refuses_a_client_without_a_certificate() {
    let ca = Ca::new("mesh root");
    let server = server_config(ca.slot(SERVER), ca.roots(), "cluster.local").unwrap();
    let (addr, peer) = echo_server(TlsAcceptor::from(Arc::new(server))).await;
    let mut cfg = rustls::ClientConfig::builder_with_provider(hbone::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let _ = TlsConnector::from(Arc::new(cfg)).connect(ServerName::IpAddress(addr.ip().into()), tcp).await;
    assert!(peer.await.unwrap().is_err(), "mTLS is mandatory");
}

#[tokio::test]
async fn swapping_the_certificate_keeps_established_connections() {
    let ca = Ca::new("mesh root");
    let slot = ca.slot(SERVER);
    let server = Arc::new(server_config(slot.clone(), ca.roots(), "cluster.local").unwrap());
    let (addr, _) = echo_server(TlsAcceptor::from(server.clone())).await;
    let client = client_config(ca.slot(CLIENT), ca.roots(), vec![id(SERVER)]).unwrap();
    let mut tls = connect(addr, client.clone()).await.unwrap();
    let first_cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();

    let (chain, key) = ca.leaf(SERVER);
    slot.swap(chain.clone(), key).unwrap();

    // The established connection is untouched.
    tls.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    // New handshakes present the new certificate.
    let (addr2, _) = echo_server(TlsAcceptor::from(server)).await;
    let tls2 = connect(addr2, client).await.unwrap();
    let second_cert = tls2.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(first_cert, second_cert);
    assert_eq!(second_cert, chain[0]);
}

/// A TCP stream that counts the writes that reach the socket.
struct CountWrites {
    tcp: TcpStream,
    writes: Arc<std::sync::atomic::AtomicUsize>,
}

impl CountWrites {
    fn count(&self, r: &std::task::Poll<std::io::Result<usize>>) {
        if let std::task::Poll::Ready(Ok(n)) = r {
            if *n > 0 {
                self.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

impl tokio::io::AsyncRead for CountWrites {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CountWrites {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.count(&r);
        r
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.count(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// A listener whose connections have a send buffer that holds a whole DATA frame, so that the
/// kernel never splits a write: a count of writes is then rustls's doing alone.
fn roomy_listener() -> tokio::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    make_roomy(&socket);
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    socket.listen(1).unwrap()
}

/// A 4 MiB send buffer: `SO_SNDBUFFORCE` as root, past `net.core.wmem_max` (212992 by default);
/// otherwise `SO_SNDBUF`, which that maximum caps.
fn make_roomy(socket: &tokio::net::TcpSocket) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 4 << 20;
    // SAFETY: setsockopt on an open socket with a c_int option value of the size given.
    let forced = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        socket.set_send_buffer_size(4 << 20).unwrap();
    }
}

/// Socket writes on each side for one DATA frame of the largest splice read, there and back.
async fn writes_for_the_largest_frame(size_send_buffer: bool) -> (usize, usize) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (header, payload) = (vec![0u8; 9], vec![7u8; hbone::tls::LARGEST_FRAME - 9]);
    let frame = [header.as_slice(), payload.as_slice()].concat();
    let ca = Ca::new("mesh root");
    let server = server_config(ca.slot(SERVER), ca.roots(), "cluster.local").unwrap();
    let client = client_config(ca.slot(CLIENT), ca.roots(), vec![id(SERVER)]).unwrap();
    let listener = roomy_listener();
    let addr = listener.local_addr().unwrap();
    let server_writes = Arc::new(AtomicUsize::new(0));
    let served = tokio::spawn({
        let (writes, frame) = (server_writes.clone(), frame.clone());
        async move {
            let tcp = CountWrites { tcp: listener.accept().await.unwrap().0, writes: writes.clone() };
            let mut tls = TlsAcceptor::from(Arc::new(server))
                .accept_with(tcp, |c| {
                    if size_send_buffer {
                        hbone::tls::size_send_buffer(c)
                    }
                })
                .await
                .unwrap();
            let mut got = vec![0u8; frame.len()];
            tls.read_exact(&mut got).await.unwrap();
            writes.store(0, Ordering::Relaxed);
            tls.write_all(&frame).await.unwrap();
            tls.flush().await.unwrap();
            writes.load(Ordering::Relaxed)
        }
    });
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    make_roomy(&socket);
    // The count means something only if a frame fits.
    let room = socket.send_buffer_size().unwrap() as usize;
    assert!(room > 2 * frame.len(), "a send buffer of {room} bytes cannot take a whole frame at once");
    let client_writes = Arc::new(AtomicUsize::new(0));
    let tcp = CountWrites { tcp: socket.connect(addr).await.unwrap(), writes: client_writes.clone() };
    let mut tls = TlsConnector::from(Arc::new(client))
        .connect_with(ServerName::IpAddress(addr.ip().into()), tcp, |c| {
            if size_send_buffer {
                hbone::tls::size_send_buffer(c)
            }
        })
        .await
        .unwrap();
    client_writes.store(0, Ordering::Relaxed);
    // As h2 writes a DATA frame: its header and the payload, in one vectored write.
    let slices = [std::io::IoSlice::new(&header), std::io::IoSlice::new(&payload)];
    let mut written = tls.write_vectored(&slices).await.unwrap();
    while written < frame.len() {
        written += tls.write(&frame[written..]).await.unwrap();
    }
    tls.flush().await.unwrap();
    let client_writes = client_writes.load(Ordering::Relaxed);
    let mut back = vec![0u8; frame.len()];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(back, frame);
    (client_writes, served.await.unwrap())
}

#[tokio::test]
async fn the_largest_splice_read_leaves_in_one_socket_write_each_way() {
    assert_eq!(writes_for_the_largest_frame(true).await, (1, 1));
    // What the sizing is for: rustls's default queue splits the frame into several writes.
    let (client, server) = writes_for_the_largest_frame(false).await;
    assert!(client >= 4 && server >= 4, "without the sizing: {client} and {server} writes");
}
