//! istiod-lite's own TLS on :15012: a certificate from the mesh CA, renewed at half its lifetime,
//! and the accept loop that terminates TLS for the gRPC server.
//!
//! A renewal swaps the certificate new handshakes get; connections already open keep theirs, so
//! long-lived xDS streams are not dropped. Handshakes run concurrently with a deadline and a cap,
//! so a slow or silent client holds up neither the accept loop nor other clients.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use hbone::admission::Admission;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::ca::{Authority, CaError};

/// A TLS handshake that takes longer is abandoned.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; connections beyond it are closed at accept.
const MAX_HANDSHAKES: usize = 256;
/// Handshakes in progress from one address, so that one client cannot take everyone's slots.
const MAX_HANDSHAKES_PER_SOURCE: usize = 16;
/// Retry delay after a failed renewal.
const RETRY: Duration = Duration::from_secs(60);
/// Longest single wait for a renewal: the schedule is recomputed from the wall clock at least
/// this often, so a suspended host or a stepped clock cannot carry a renewal past expiry.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// The certificate :15012 presents, and what it takes to issue the next one.
pub struct ServingCert {
    authority: Arc<Authority>,
    dns_names: Vec<String>,
    ips: Vec<IpAddr>,
    ttl: Duration,
    current: RwLock<Current>,
}

#[derive(Clone)]
struct Current {
    key: Arc<CertifiedKey>,
    /// When it was issued. The renewal schedule counts from here, not from `not_before`, which
    /// the CA backdates for clock skew.
    issued: SystemTime,
    not_after: SystemTime,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.current();
        f.debug_struct("ServingCert").field("issued", &c.issued).field("not_after", &c.not_after).finish()
    }
}

impl ServingCert {
    /// Issues the first certificate: istiod-lite does not start without one.
    pub fn issue(
        authority: Arc<Authority>,
        dns_names: Vec<String>,
        ips: Vec<IpAddr>,
        ttl: Duration,
    ) -> Result<Arc<ServingCert>, CaError> {
        let current = issue(&authority, &dns_names, &ips, ttl)?;
        Ok(Arc::new(ServingCert { authority, dns_names, ips, ttl, current: RwLock::new(current) }))
    }

    fn current(&self) -> Current {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Renews the certificate at half its lifetime until `shutdown` turns true.
    pub async fn renew(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let c = self.current();
            let half = c.not_after.duration_since(c.issued).unwrap_or_default() / 2;
            let due = (c.issued + half).duration_since(SystemTime::now()).unwrap_or_default();
            let wait = if !due.is_zero() {
                due.min(MAX_SLEEP)
            } else {
                match issue(&self.authority, &self.dns_names, &self.ips, self.ttl) {
                    Ok(next) if next.not_after > c.not_after => {
                        tracing::info!(not_after = ?next.not_after, "renewed the :15012 serving certificate");
                        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
                        continue;
                    }
                    // Capped at the CA signer's expiry: renewing again cannot extend it.
                    Ok(_) => {
                        tracing::warn!(not_after = ?c.not_after,
                            "the :15012 serving certificate cannot outlive the CA's signing certificate; \
                             replace the CA before then");
                        MAX_SLEEP
                    }
                    Err(e) => {
                        tracing::error!(error = %e, not_after = ?c.not_after, retry_in = ?RETRY,
                            "cannot renew the :15012 serving certificate");
                        RETRY
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current().key)
    }
}

fn issue(authority: &Authority, dns_names: &[String], ips: &[IpAddr], ttl: Duration) -> Result<Current, CaError> {
    let issued = SystemTime::now();
    let (chain_pem, key_pem) = authority.issue_server_cert(dns_names, ips, ttl)?;
    let bad = |what: &str| CaError::Sign(format!("the serving certificate just issued has {what}"));
    let all = chain_pem.concat();
    let chain: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut all.as_bytes()).collect::<Result<_, _>>().map_err(|_| bad("an unreadable chain"))?;
    let leaf = chain.first().ok_or_else(|| bad("an empty chain"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|_| bad("an unreadable leaf"))?;
    let at = |t: x509_parser::time::ASN1Time| SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64);
    let not_after = at(parsed.validity().not_after);
    let key =
        rustls_pemfile::private_key(&mut key_pem.as_bytes()).ok().flatten().ok_or_else(|| bad("an unreadable key"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|_| bad("an unsupported key"))?;
    Ok(Current { key: Arc::new(CertifiedKey::new(chain, signer)), issued, not_after })
}

/// TLS 1.2 and 1.3 with ALPN h2, presenting `cert`. No client certificate: callers authenticate
/// with their node token.
pub fn server_config(cert: Arc<ServingCert>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts on `listener` and yields connections whose TLS handshake completed, until `shutdown`
/// turns true or the consumer drops the stream; the task then closes the listener.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
) -> (impl tokio_stream::Stream<Item = std::io::Result<TlsStream<TcpStream>>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Admission::new(MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors, say: back off instead of spinning on the error.
                        tracing::warn!(error = %e, "accept on :15012 failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
            };
            let slot = match handshakes.admit(peer.ip()) {
                Ok(slot) => slot,
                Err(refused) => {
                    tracing::debug!(%peer, ?refused, "too many TLS handshakes in progress; connection closed");
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(tls).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake on :15012 failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake on :15012 timed out"),
                }
            });
        }
    });
    (tokio_stream::StreamExt::map(ReceiverStream::new(rx), Ok), task)
}
