//! Mutual TLS for HBONE (PROTOCOLS.md): TLS 1.3 only, AES-128-GCM-SHA256 and AES-256-GCM-SHA384,
//! ALPN `h2`, no SNI from the client.
//!
//! - The client verifies the chain to the mesh root and requires the server's URI SAN to be one of
//!   the expected identities (the destination workload's, plus a Service's `subject_alt_names`).
//! - The server verifies the chain and the trust domain; which identity may connect is decided
//!   later by AuthorizationPolicy, using [`peer_identity`].
//! - Both present their certificate through a [`CertSlot`], so a renewed certificate is used by
//!   new handshakes while established connections keep running.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::Identity;

pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate or key is unusable: {0}")]
    BadCertificate(String),
    #[error("TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
}

/// The crypto provider HBONE uses: ring, restricted to the two TLS 1.3 suites.
///
/// AES-128-GCM comes first: it is TLS 1.3's mandatory suite and what Go and BoringSSL prefer, and
/// with four fewer AES rounds per block it takes 10-15% less CPU than AES-256-GCM (VAES, 16 KiB
/// records) on every byte a tunnel carries, in both ztunnels. A peer that lists AES-256-GCM first
/// still gets it: rustls servers follow the client's order.
pub fn provider() -> Arc<CryptoProvider> {
    let base = rustls::crypto::ring::default_provider();
    let suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(CryptoProvider { cipher_suites: suites, ..base })
}

/// A swappable certificate and key. Handshakes read the current one; swapping never touches
/// established connections.
pub struct CertSlot {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertSlot")
    }
}

impl CertSlot {
    /// `chain` is leaf first (as the CA returns it); the key is PKCS#8 or SEC1.
    pub fn new(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<CertSlot, TlsError> {
        Ok(CertSlot { current: RwLock::new(certified(chain, key)?) })
    }

    pub fn swap(&self, chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<(), TlsError> {
        let next = certified(chain, key)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn certified(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Arc<CertifiedKey>, TlsError> {
    if chain.is_empty() {
        return Err(TlsError::BadCertificate("empty certificate chain".into()));
    }
    let key = provider().key_provider.load_private_key(key).map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(chain, key)))
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl ResolvesClientCert for CertSlot {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The SPIFFE URI SANs of a DER certificate.
pub fn spiffe_ids(cert: &CertificateDer<'_>) -> Vec<Identity> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else { return vec![] };
    let Ok(Some(san)) = parsed.subject_alternative_name() else { return vec![] };
    san.value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Identity::parse(u).ok(),
            _ => None,
        })
        .collect()
}

/// The verified peer identity of an established connection.
pub fn peer_identity(conn: &CommonState) -> Option<Identity> {
    conn.peer_certificates()?.first().and_then(|c| spiffe_ids(c).into_iter().next())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// Client side: chain to the mesh root, and the server's URI SAN must be an expected identity.
#[derive(Debug)]
struct ExpectedServer {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
}

impl ServerCertVerifier for ExpectedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            algorithms().all,
        )?;
        let ids = spiffe_ids(end_entity);
        if ids.iter().any(|id| self.expected.contains(id)) {
            Ok(ServerCertVerified::assertion())
        } else {
            let want: Vec<String> = self.expected.iter().map(ToString::to_string).collect();
            let got: Vec<String> = ids.iter().map(ToString::to_string).collect();
            Err(rustls::Error::General(format!("server identity {got:?} is not one of the expected {want:?}")))
        }
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("HBONE requires TLS 1.3".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Server side: a client certificate is mandatory, chains to the mesh root, and carries a SPIFFE
/// identity in our trust domain.
#[derive(Debug)]
struct TrustDomainClient {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        match spiffe_ids(end_entity).first() {
            Some(id) if id.trust_domain == self.trust_domain => Ok(ClientCertVerified::assertion()),
            Some(id) => Err(rustls::Error::General(format!(
                "client identity {id} is outside trust domain {}",
                self.trust_domain
            ))),
            None => Err(rustls::Error::General("client certificate has no SPIFFE identity".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Chain and client-usage checks against the mesh root: what 15008 asks of every peer.
fn webpki_client_verifier(roots: Arc<RootCertStore>) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
    WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))
}

/// Whether `chain` (leaf first) is one peers will accept from this mesh at time `at`: it chains to
/// `roots` and the leaf may authenticate a TLS client, as 15008 requires (workload leaves serve as
/// client and server alike). For checking a certificate before presenting it.
pub fn verify_chain(
    roots: Arc<RootCertStore>,
    chain: &[CertificateDer<'static>],
    at: SystemTime,
) -> Result<(), rustls::Error> {
    let (leaf, intermediates) = chain.split_first().ok_or(rustls::Error::NoCertificatesPresented)?;
    let verifier = webpki_client_verifier(roots)?;
    let at = UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
    verifier.verify_client_cert(leaf, intermediates, at).map(|_| ())
}

/// The largest HTTP/2 DATA frame a splice sends: one read of [`crate::MAX_READ`] and its header.
pub const LARGEST_FRAME: usize = crate::splice::MAX_READ + crate::splice::FRAME_HEADER;
/// A full TLS 1.3 record's payload, and what the record adds to it: header, content type, tag.
const RECORD: usize = 16 << 10;
const RECORD_OVERHEAD: usize = 5 + 1 + 16;

/// The TLS bytes a tunnel connection may queue in user space before a write waits for the
/// socket: two of the largest frames, sealed (rustls counts the records, not the plaintext).
///
/// rustls queues at most 64 KiB by default, so one [`crate::MAX_READ`] read left in five
/// `writev`s, each paying for a TCP push, the forwarding path and a wake-up of the peer. In a bulk
/// transfer the sending ztunnel is the busiest process, and with one write per read `make
/// bench-l4` carried about 10% more. The queue fills only while the socket's own send buffer is
/// full (the peer reads slower than we send), so it is memory per connection stalled that way:
/// 8192 of them (ztunnel's default cap) could hold 4 GiB, next to the kernel's send buffers,
/// which can hold several MiB each.
pub const SEND_BUFFER: usize = 2 * (LARGEST_FRAME + LARGEST_FRAME.div_ceil(RECORD) * RECORD_OVERHEAD);

/// Sizes a tunnel connection's send buffer to [`SEND_BUFFER`]; for `connect_with`/`accept_with`.
pub fn size_send_buffer<Data>(conn: &mut rustls::ConnectionCommon<Data>) {
    conn.set_buffer_limit(Some(SEND_BUFFER));
}

/// The inbound (15008) TLS config.
pub fn server_config(
    cert: Arc<CertSlot>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
) -> Result<ServerConfig, TlsError> {
    let inner = webpki_client_verifier(roots).map_err(TlsError::Config)?;
    let verifier = Arc::new(TrustDomainClient { inner, trust_domain: trust_domain.to_string() });
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every connection verifies the peer's current certificate, so a rotated or
    // re-issued identity is what authorization sees. HBONE connections are pooled and long-lived,
    // so full handshakes are rare.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// An outbound TLS config that accepts only servers holding one of `expected`.
pub fn client_config(
    cert: Arc<CertSlot>,
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
) -> Result<ClientConfig, TlsError> {
    let verifier = Arc::new(ExpectedServer { roots, expected });
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(cert);
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // HBONE clients send no SNI; identity is checked from the URI SAN instead.
    cfg.enable_sni = false;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}
