//! Workload certificates: one ECDSA P-256 key per identity, signed by istiod-lite's CA through
//! `ImpersonatedIdentity`, refreshed at half of the lifetime. On failure the manager backs off
//! exponentially (0.5 s to 150 s, PROTOCOLS.md) and keeps serving the still-valid certificate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hbone::tls::CertSlot;
use hbone::Identity;
use prost_types::{value::Kind, Struct, Value};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::RootCertStore;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use trellis_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use trellis_proto::istio::v1::auth::IstioCertificateRequest;

pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(150);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("CA at {0} unreachable: {1}")]
    Connect(String, tonic::transport::Error),
    #[error("CA refused {identity}: {status}")]
    Refused { identity: String, status: tonic::Status },
    #[error("CA answer for {0} is unusable: {1}")]
    BadResponse(String, String),
    #[error("key or CSR generation failed: {0}")]
    Local(String),
    #[error("CA request timed out")]
    Timeout,
    /// The outcome of a fetch another caller started for the same identity.
    #[error(transparent)]
    Shared(Arc<CertError>),
}

#[derive(Clone, Debug)]
pub struct CaConfig {
    /// `https://istiod:15012`
    pub address: String,
    pub root_pem: String,
    pub token: crate::token::NodeToken,
    /// Requested lifetime; the CA may cap it.
    pub ttl: Duration,
    /// What issued certificates must chain to before they are used: the mesh root peers trust.
    pub roots: Arc<RootCertStore>,
}

/// A certificate in use, with the validity the refresh schedule is computed from.
#[derive(Clone, Debug)]
pub struct Issued {
    pub slot: Arc<CertSlot>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub chain: Vec<CertificateDer<'static>>,
}

/// A first fetch in flight, whose outcome every caller asking for the identity meanwhile shares.
type FirstFetch = Arc<tokio::sync::OnceCell<Result<Issued, Arc<CertError>>>>;

pub struct CertManager {
    cfg: CaConfig,
    certs: Mutex<HashMap<Identity, Arc<Mutex<Issued>>>>,
    /// Pods of one new identity enrolling together send one CSR, not one each: every CSR costs
    /// the CA a signature and the node a key, and a burst of them (a Deployment scaling up) would
    /// otherwise multiply both by the replica count.
    first_fetches: Mutex<HashMap<Identity, FirstFetch>>,
}

fn timestamp(t: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.max(0) as u64)
}

impl CertManager {
    pub fn new(cfg: CaConfig) -> Arc<CertManager> {
        Arc::new(CertManager { cfg, certs: Mutex::default(), first_fetches: Mutex::default() })
    }

    async fn channel(&self) -> Result<Channel, CertError> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.cfg.root_pem))
            .domain_name("istiod.istio-system.svc");
        Endpoint::from_shared(self.cfg.address.clone())
            .map_err(|e| CertError::Local(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tls_config(tls)
            .map_err(|e| CertError::Connect(self.cfg.address.clone(), e))?
            .connect()
            .await
            .map_err(|e| CertError::Connect(self.cfg.address.clone(), e))
    }

    /// Generates a fresh key, asks the CA to sign it for `id`, and checks the answer.
    pub async fn fetch(
        &self,
        id: &Identity,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, SystemTime, SystemTime), CertError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| CertError::Local(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(id.to_string().try_into().map_err(|e: rcgen::Error| CertError::Local(e.to_string()))?)];
        let csr = params.serialize_request(&key).and_then(|c| c.pem()).map_err(|e| CertError::Local(e.to_string()))?;
        let mut fields = std::collections::BTreeMap::new();
        fields.insert("ImpersonatedIdentity".to_string(), Value { kind: Some(Kind::StringValue(id.to_string())) });
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: self.cfg.ttl.as_secs() as i64,
            metadata: Some(Struct { fields }),
        });
        let bearer = format!("Bearer {}", self.cfg.token.current().unwrap_or_default())
            .parse()
            .map_err(|_| CertError::Local("token is not a valid header value".into()))?;
        req.metadata_mut().insert("authorization", bearer);
        let mut client = IstioCertificateServiceClient::new(self.channel().await?);
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, client.create_certificate(req))
            .await
            .map_err(|_| CertError::Timeout)?
            .map_err(|status| CertError::Refused { identity: id.to_string(), status })?
            .into_inner();
        let bad = |why: String| CertError::BadResponse(id.to_string(), why);
        let chain: Vec<CertificateDer<'static>> = resp
            .cert_chain
            .iter()
            .map(|p| pem::parse(p).map(|p| CertificateDer::from(p.into_contents())).map_err(|e| bad(e.to_string())))
            .collect::<Result<_, _>>()?;
        let (nb, na) =
            check_issued(id, &chain, key.public_key_raw(), &self.cfg.roots, SystemTime::now()).map_err(bad)?;
        Ok((chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())), nb, na))
    }

    /// The certificate for `id` if one is already held.
    pub fn cached(&self, id: &Identity) -> Option<Issued> {
        let certs = self.certs.lock().unwrap_or_else(|e| e.into_inner());
        certs.get(id).map(|i| i.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// The certificate slot for `id`, fetching it on first use and starting its refresh task.
    /// Callers asking while the first fetch is in flight wait for it and share its outcome, error
    /// included; once it has finished, the next caller after a failure starts a new fetch.
    pub async fn get(self: &Arc<Self>, id: &Identity) -> Result<Issued, CertError> {
        if let Some(cur) = self.cached(id) {
            return Ok(cur);
        }
        let fetch = self.first_fetches.lock().unwrap_or_else(|e| e.into_inner()).entry(id.clone()).or_default().clone();
        // A caller dropped mid-fetch (an enrollment timing out) leaves the cell empty, and the
        // next waiter runs the fetch instead.
        let outcome = fetch.get_or_init(|| async { self.fetch_first(id).await.map_err(Arc::new) }).await.clone();
        let mut fetches = self.first_fetches.lock().unwrap_or_else(|e| e.into_inner());
        if fetches.get(id).is_some_and(|f| Arc::ptr_eq(f, &fetch)) {
            fetches.remove(id);
        }
        outcome.map_err(CertError::Shared)
    }

    async fn fetch_first(self: &Arc<Self>, id: &Identity) -> Result<Issued, CertError> {
        // Issued between the caller's look and the start of this fetch.
        if let Some(cur) = self.cached(id) {
            return Ok(cur);
        }
        let (chain, key, nb, na) = self.fetch(id).await?;
        let slot = Arc::new(CertSlot::new(chain.clone(), key).map_err(|e| CertError::Local(e.to_string()))?);
        let first = Issued { slot, not_before: nb, not_after: na, chain };
        let issued = Arc::new(Mutex::new(first.clone()));
        {
            let mut certs = self.certs.lock().unwrap_or_else(|e| e.into_inner());
            // A fetch that began after `release_unused` dropped this one's entry finished first:
            // use theirs, one refresher only.
            if let Some(cur) = certs.get(id) {
                return Ok(cur.lock().unwrap_or_else(|e| e.into_inner()).clone());
            }
            certs.insert(id.clone(), issued.clone());
        }
        let (me, id) = (Arc::downgrade(self), id.clone());
        tokio::spawn(async move { refresh_loop(me, id, issued).await });
        Ok(first)
    }

    /// Forgets the certificates of identities not in `in_use` (no enrolled pod has them any more),
    /// so they are no longer renewed: with service accounts coming and going, the set held and
    /// the load on the CA would otherwise only grow.
    pub fn release_unused(&self, in_use: &std::collections::HashSet<Identity>) {
        // Entries left by fetches whose callers all gave up; one in flight finishes regardless.
        self.first_fetches.lock().unwrap_or_else(|e| e.into_inner()).retain(|id, _| in_use.contains(id));
        self.certs.lock().unwrap_or_else(|e| e.into_inner()).retain(|id, _| {
            let keep = in_use.contains(id);
            if !keep {
                tracing::info!(identity = %id, "certificate released: no enrolled pod has this identity");
            }
            keep
        });
    }

    /// Whether `issued` is still the entry for `id`: its refresh task ends once it is not.
    fn holds(&self, id: &Identity, issued: &Arc<Mutex<Issued>>) -> bool {
        self.certs.lock().unwrap_or_else(|e| e.into_inner()).get(id).is_some_and(|i| Arc::ptr_eq(i, issued))
    }

    /// Identities and expiries currently held, for `/config_dump`.
    pub fn held(&self) -> Vec<(Identity, SystemTime)> {
        self.certs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, i)| (id.clone(), i.lock().unwrap_or_else(|e| e.into_inner()).not_after))
            .collect()
    }
}

/// How far ahead of this node's clock a certificate's not_before may be: second rounding and
/// small drift. Beyond it, peers with clocks like ours would refuse the certificate for now.
const CLOCK_SKEW: Duration = Duration::from_secs(5);

/// Checks a CA's answer before anything presents it (a renewal replaces a working certificate):
/// the leaf names exactly `id` and certifies `public_key` (the key this request generated), the
/// chain leads to the mesh root as peers will check it, and it is valid now. Returns the validity
/// the refresh schedule counts from.
fn check_issued(
    id: &Identity,
    chain: &[CertificateDer<'static>],
    public_key: &[u8],
    roots: &Arc<RootCertStore>,
    now: SystemTime,
) -> Result<(SystemTime, SystemTime), String> {
    let leaf = chain.first().ok_or("empty chain")?;
    if hbone::tls::spiffe_ids(leaf) != [id.clone()] {
        return Err(format!("leaf carries {:?}", hbone::tls::spiffe_ids(leaf)));
    }
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    if cert.public_key().subject_public_key.data.as_ref() != public_key {
        return Err("the leaf certifies a key other than the one this request generated".into());
    }
    let v = cert.validity();
    let not_before = timestamp(v.not_before.timestamp());
    if not_before > now + CLOCK_SKEW {
        let ahead = not_before.duration_since(now).unwrap_or_default();
        return Err(format!("the certificate only becomes valid in {ahead:?} (is the CA's clock ahead?)"));
    }
    // At not_before if that is still ahead within the skew, so the chain is judged, not the clock.
    hbone::tls::verify_chain(roots.clone(), chain, now.max(not_before))
        .map_err(|e| format!("the chain does not verify against the mesh root: {e}"))?;
    usable_validity(v.not_before.timestamp(), v.not_after.timestamp(), now)
        .ok_or_else(|| "the certificate has already expired".into())
}

/// The validity a refresh schedule counts from, or `None` for a certificate that has already
/// expired (which must not replace one that is still valid). CAs backdate not_before for clock
/// skew; the schedule counts from receipt, or a short-lived certificate would look half-expired
/// on arrival.
fn usable_validity(not_before: i64, not_after: i64, now: SystemTime) -> Option<(SystemTime, SystemTime)> {
    let nb = timestamp(not_before).max(now);
    let na = timestamp(not_after);
    (na > nb).then_some((nb, na))
}

/// When to renew: half of the lifetime after `not_before`, brought forward by up to a tenth of the
/// lifetime by `spread` (in [0, 1)), so that identities issued together are not all renewed at
/// the same instant; now if that has passed.
pub fn refresh_delay(not_before: SystemTime, not_after: SystemTime, now: SystemTime, spread: f64) -> Duration {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let at = not_before + lifetime / 2 - lifetime.mul_f64(spread.clamp(0.0, 1.0) / 10.0);
    at.duration_since(now).unwrap_or_default()
}

/// A fixed point in [0, 1) per identity, spreading renewals without a random source.
fn spread(id: &Identity) -> f64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.to_string().hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

async fn refresh_loop(mgr: std::sync::Weak<CertManager>, id: Identity, issued: Arc<Mutex<Issued>>) {
    let mut backoff = BACKOFF_MIN;
    let spread = spread(&id);
    let mut delay = {
        let i = issued.lock().unwrap_or_else(|e| e.into_inner());
        refresh_delay(i.not_before, i.not_after, SystemTime::now(), spread)
    };
    loop {
        tokio::time::sleep(delay).await;
        let Some(mgr) = mgr.upgrade() else { return };
        if !mgr.holds(&id, &issued) {
            return;
        }
        match mgr.fetch(&id).await {
            Ok((chain, key, nb, na)) => {
                let mut i = issued.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = i.slot.swap(chain.clone(), key) {
                    tracing::error!(identity = %id, error = %e, "renewed certificate unusable; keeping the current one");
                } else {
                    i.not_before = nb;
                    i.not_after = na;
                    i.chain = chain;
                    tracing::info!(identity = %id, "certificate renewed");
                }
                backoff = BACKOFF_MIN;
                delay =
                    refresh_delay(i.not_before, i.not_after, SystemTime::now(), spread).max(Duration::from_millis(100));
            }
            Err(e) => {
                tracing::warn!(identity = %id, error = %e, retry_in = ?backoff, "certificate renewal failed; keeping the still-valid certificate");
                delay = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_at_half_life() {
        let nb = UNIX_EPOCH + Duration::from_secs(1000);
        let na = nb + Duration::from_secs(100);
        assert_eq!(refresh_delay(nb, na, nb, 0.0), Duration::from_secs(50));
        assert_eq!(refresh_delay(nb, na, nb + Duration::from_secs(40), 0.0), Duration::from_secs(10));
        assert_eq!(refresh_delay(nb, na, na, 0.0), Duration::ZERO);
        // Spread brings renewal forward by up to a tenth of the lifetime, never past half-life.
        assert_eq!(refresh_delay(nb, na, nb, 0.5), Duration::from_secs(45));
        assert_eq!(refresh_delay(nb, na, nb, 7.0), Duration::from_secs(40));
    }

    #[test]
    fn an_expired_certificate_is_refused_and_a_backdated_one_counts_from_receipt() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(usable_validity(9_000, 9_999, now), None, "expired");
        assert_eq!(usable_validity(9_000, 10_000, now), None, "expires now");
        let (nb, na) = usable_validity(9_000, 10_100, now).expect("valid for 100 s more");
        assert_eq!((nb, na), (now, UNIX_EPOCH + Duration::from_secs(10_100)));
        assert_eq!(refresh_delay(nb, na, now, 0.0), Duration::from_secs(50), "half of what is left");
        let (nb, _) = usable_validity(10_050, 10_100, now).unwrap();
        assert_eq!(nb, UNIX_EPOCH + Duration::from_secs(10_050), "a future not_before is kept");
    }

    /// A mesh CA: its root store and issuer.
    fn ca() -> (Arc<RootCertStore>, rcgen::Issuer<'static, KeyPair>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = p.self_signed(&key).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(root.der().clone()).unwrap();
        (Arc::new(roots), rcgen::Issuer::new(p, key))
    }

    /// A leaf for `uri` certifying `key`, valid from `from_s` seconds after now for an hour.
    fn leaf(
        issuer: &rcgen::Issuer<'static, KeyPair>,
        uri: &str,
        key: &KeyPair,
        from_s: i64,
    ) -> CertificateDer<'static> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        p.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth, rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::seconds(from_s);
        p.not_after = now + time::Duration::seconds(from_s + 3600);
        p.signed_by(key, issuer).unwrap().der().clone()
    }

    #[test]
    fn an_answer_is_used_only_if_it_certifies_our_key_for_our_identity_under_the_mesh_root_now() {
        let id = Identity::parse("spiffe://cluster.local/ns/demo/sa/client").unwrap();
        let uri = id.to_string();
        let (roots, issuer) = ca();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let now = SystemTime::now();
        let check = |chain: &[CertificateDer<'static>], roots: &Arc<RootCertStore>| {
            check_issued(&id, chain, key.public_key_raw(), roots, now)
        };
        assert!(check(&[leaf(&issuer, &uri, &key, -60)], &roots).is_ok());
        assert!(check(&[leaf(&issuer, &uri, &key, 2)], &roots).is_ok(), "a second or two ahead is clock noise");

        let err = |r: Result<_, String>| r.expect_err("refused");
        let other_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let (other_roots, other_issuer) = ca();
        for (what, got, want) in [
            ("no certificate", err(check(&[], &roots)), "empty chain"),
            (
                "another identity",
                err(check(&[leaf(&issuer, "spiffe://cluster.local/ns/demo/sa/x", &key, -60)], &roots)),
                "leaf carries",
            ),
            ("another key", err(check(&[leaf(&issuer, &uri, &other_key, -60)], &roots)), "a key other than"),
            ("not valid for an hour", err(check(&[leaf(&issuer, &uri, &key, 3600)], &roots)), "only becomes valid in"),
            (
                "another root",
                err(check(&[leaf(&other_issuer, &uri, &key, -60)], &roots)),
                "does not verify against the mesh root",
            ),
            ("expired", err(check(&[leaf(&issuer, &uri, &key, -7200)], &roots)), "does not verify"),
        ] {
            assert!(got.contains(want), "{what}: {got}");
        }
        // The other CA's own root accepts its leaf: it is the root that differs, nothing else.
        assert!(check(&[leaf(&other_issuer, &uri, &key, -60)], &other_roots).is_ok());
    }

    #[test]
    fn identities_spread_their_renewals() {
        let ids: Vec<Identity> =
            (0..200).map(|i| Identity::parse(&format!("spiffe://cluster.local/ns/demo/sa/sa{i}")).unwrap()).collect();
        let spreads: Vec<f64> = ids.iter().map(spread).collect();
        assert!(spreads.iter().all(|s| (0.0..1.0).contains(s)));
        assert_eq!(spread(&ids[0]), spread(&ids[0]), "stable per identity");
        // Each tenth of the range gets some identities: renewals are not bunched.
        for decile in 0..10 {
            let n = spreads.iter().filter(|s| (**s * 10.0) as usize == decile).count();
            assert!(n > 0, "no identity in decile {decile}");
        }
    }
}
