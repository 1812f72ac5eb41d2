//! Root/intermediate handling and signing.
//!
//! `--ca-dir` layout, following Istio's plug-in CA convention so operators can reuse their files:
//! - operator-provided: `ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, optional `cert-chain.pem`
//!   (the signing certificate's chain up to, not including, the root);
//! - otherwise a self-generated root: `root-cert.pem` and `root-key.pem` (mode 0600), created on
//!   first start as ECDSA P-256 valid for 10 years.
//!
//! `root-cert.pem` is world-readable: it is what clients need to trust istiod-lite and the mesh.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::csr;

const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Accepts certificates that start "now" on a peer whose clock is slightly behind.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA dir {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("CA material in {path} is unusable: {reason}")]
    Material { path: PathBuf, reason: String },
    #[error("{0}")]
    BadCsr(String),
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("the CA's signing certificate expired at {0}; install a new one (ca-cert.pem and ca-key.pem)")]
    SignerExpired(OffsetDateTime),
}

pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// Certificates above the leaf: the signing certificate, any intermediates, then the root.
    chain: Vec<String>,
    root: String,
    signer_not_after: OffsetDateTime,
    pub trust_domain: String,
}

pub(crate) fn pem_der(pem: &str, label: &str) -> Result<Vec<u8>, String> {
    let p = ::pem::parse(pem).map_err(|e| format!("not PEM: {e}"))?;
    if p.tag() != label && !(label == "CERTIFICATE REQUEST" && p.tag() == "NEW CERTIFICATE REQUEST") {
        return Err(format!("expected a PEM {label}, found {}", p.tag()));
    }
    Ok(p.into_contents())
}

fn not_after_of(pem: &str) -> Result<OffsetDateTime, String> {
    let der = pem_der(pem, "CERTIFICATE")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| e.to_string())?;
    OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp()).map_err(|e| e.to_string())
}

fn name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn split_pems(text: &str) -> Vec<String> {
    ::pem::parse_many(text).map(|v| v.iter().map(::pem::encode).collect()).unwrap_or_default()
}

fn serial() -> SerialNumber {
    let mut b = *uuid::Uuid::new_v4().as_bytes();
    b[0] &= 0x7f; // keep the serial positive
    SerialNumber::from_slice(&b)
}

impl Authority {
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Authority, CaError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |err| CaError::Io { path, err }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let material = |path: &Path, reason: String| CaError::Material { path: path.to_path_buf(), reason };
        let (ca_cert, ca_key) = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"));
        let (root_cert, root_key) = (dir.join("root-cert.pem"), dir.join("root-key.pem"));
        // Half of a pair is an operator's mistake (a secret not mounted yet, a misnamed file).
        // Carrying on with a newly generated root would replace the mesh's trust anchor silently.
        let operator = ca_cert.exists() || ca_key.exists();
        for (have, missing) in [(&ca_cert, &ca_key), (&ca_key, &ca_cert)] {
            if have.exists() && !missing.exists() {
                let reason = format!(
                    "{} is present but {} is not; an operator-provided CA needs both",
                    name(have),
                    name(missing)
                );
                return Err(material(missing, reason));
            }
        }
        for (have, missing) in [(&root_cert, &root_key), (&root_key, &root_cert)] {
            if !operator && have.exists() && !missing.exists() {
                let reason = format!(
                    "{} is present but {} is not; refusing to create a new mesh root over it. Restore the file, \
                     or move {} away to start a new root (every workload certificate is then reissued)",
                    name(have),
                    name(missing),
                    name(have)
                );
                return Err(material(missing, reason));
            }
        }
        let (signer_pem, key, chain, root) = if operator {
            let signer = std::fs::read_to_string(&ca_cert).map_err(io(&ca_cert))?;
            let key = KeyPair::from_pem(&std::fs::read_to_string(&ca_key).map_err(io(&ca_key))?)
                .map_err(|e| material(&ca_key, e.to_string()))?;
            let root = std::fs::read_to_string(&root_cert)
                .map_err(|e| material(&root_cert, format!("an operator-provided CA needs root-cert.pem: {e}")))?;
            let mut chain = vec![signer.clone()];
            let chain_file = dir.join("cert-chain.pem");
            if chain_file.exists() {
                let text = std::fs::read_to_string(&chain_file).map_err(io(&chain_file))?;
                for c in split_pems(&text) {
                    if c.trim() != signer.trim() && c.trim() != root.trim() {
                        chain.push(c);
                    }
                }
            }
            if signer.trim() != root.trim() {
                chain.push(root.clone());
            }
            tracing::info!(dir = %dir.display(), "using operator-provided CA certificate");
            (signer, key, chain, root)
        } else if root_cert.exists() && root_key.exists() {
            let root = std::fs::read_to_string(&root_cert).map_err(io(&root_cert))?;
            let key = KeyPair::from_pem(&std::fs::read_to_string(&root_key).map_err(io(&root_key))?)
                .map_err(|e| material(&root_key, e.to_string()))?;
            (root.clone(), key, vec![root.clone()], root)
        } else {
            let key =
                KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Sign(e.to_string()))?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, trust_domain);
            dn.push(DnType::CommonName, "Trellis mesh root CA");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages =
                vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
            let now = OffsetDateTime::now_utc();
            params.not_before = now - BACKDATE;
            params.not_after = now + ROOT_VALIDITY;
            params.serial_number = Some(serial());
            let cert = params.self_signed(&key).map_err(|e| CaError::Sign(e.to_string()))?;
            crate::secrets::write_private(&root_key, key.serialize_pem().as_bytes()).map_err(io(&root_key))?;
            let pem = cert.pem();
            write_public(&root_cert, pem.as_bytes()).map_err(io(&root_cert))?;
            tracing::info!(dir = %dir.display(), "created a new mesh root CA (ECDSA P-256, 10 years)");
            (pem.clone(), key, vec![pem.clone()], pem)
        };
        for key_file in [&ca_key, &root_key] {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(key_file) {
                if m.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(file = %key_file.display(), "CA private key is readable by group or others; chmod 0600 it");
                }
            }
        }
        let signer_not_after = not_after_of(&signer_pem).map_err(|e| material(dir, e))?;
        if signer_not_after <= OffsetDateTime::now_utc() {
            return Err(CaError::SignerExpired(signer_not_after));
        }
        let issuer = Issuer::from_ca_cert_pem(&signer_pem, key).map_err(|e| material(dir, e.to_string()))?;
        Ok(Authority { issuer, chain, root, signer_not_after, trust_domain: trust_domain.to_string() })
    }

    pub fn root_pem(&self) -> &str {
        &self.root
    }

    /// Signs a workload certificate for `identity` from a CSR that must ask for exactly that URI.
    /// Returns the chain leaf first, ending with the root.
    pub fn sign_workload(&self, csr_pem: &str, identity: &str, ttl: Duration) -> Result<Vec<String>, CaError> {
        let checked = csr::check(csr_pem).map_err(CaError::BadCsr)?;
        if checked.uris != [identity] {
            return Err(CaError::BadCsr(format!(
                "CSR asks for {:?} but the request is for {identity:?}; a CSR must carry exactly the requested identity",
                checked.uris
            )));
        }
        self.finish(workload_params(identity)?, &checked.params.public_key, ttl)
    }

    /// Signs `identity` for a CSR from an admin of the config API: the identity is the server's
    /// choice, so the CSR may leave its URI SAN out; if it names one, it must be `identity`.
    pub fn sign_for_admin(&self, csr_pem: &str, identity: &str, ttl: Duration) -> Result<Vec<String>, CaError> {
        let checked = csr::check(csr_pem).map_err(CaError::BadCsr)?;
        if !checked.uris.is_empty() {
            return self.sign_workload(csr_pem, identity, ttl);
        }
        self.finish(workload_params(identity)?, &checked.params.public_key, ttl)
    }

    /// istiod-lite's own TLS certificate for :15012, issued by the mesh CA.
    pub fn issue_server_cert(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<(Vec<String>, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Sign(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "istiod-lite");
        params.distinguished_name = dn;
        for n in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(n.as_str().try_into().map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?));
        }
        params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let chain = self.finish(params, &key, ttl)?;
        Ok((chain, key.serialize_pem()))
    }

    fn finish(
        &self,
        mut params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let now = OffsetDateTime::now_utc();
        if self.signer_not_after <= now {
            return Err(CaError::SignerExpired(self.signer_not_after));
        }
        params.not_before = now - BACKDATE;
        // A leaf must not outlive its issuer: verifiers would reject the tail of its lifetime.
        params.not_after = (now + ttl).min(self.signer_not_after);
        params.serial_number = Some(serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer).map_err(|e| CaError::Sign(e.to_string()))?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain.iter().cloned());
        Ok(chain)
    }
}

/// A workload leaf: the SPIFFE URI SAN only, usable as client and server (mutual TLS).
fn workload_params(identity: &str) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names =
        vec![SanType::URI(identity.try_into().map_err(|e: rcgen::Error| CaError::BadCsr(e.to_string()))?)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

fn write_public(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::secrets::write_private(path, bytes)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
}
