//! Checks on a certificate signing request before anything is signed: it parses, its signature
//! verifies, its key is strong enough, and it asks for exactly one identity.

use rcgen::{CertificateSigningRequestParams, SanType};
use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;

pub(crate) struct CheckedCsr {
    pub params: CertificateSigningRequestParams,
    /// The URI SANs the CSR asks for.
    pub uris: Vec<String>,
}

const P256: &str = "1.2.840.10045.3.1.7";
const P384: &str = "1.3.132.0.34";

pub(crate) fn check(pem: &str) -> Result<CheckedCsr, String> {
    let der = super::authority::pem_der(pem, "CERTIFICATE REQUEST")?;
    let (_, csr) = X509CertificationRequest::from_der(&der).map_err(|e| format!("CSR does not parse: {e}"))?;
    csr.verify_signature().map_err(|_| "CSR signature does not verify".to_string())?;
    let spki = &csr.certification_request_info.subject_pki;
    match spki.parsed().map_err(|e| format!("CSR public key does not parse: {e}"))? {
        PublicKey::EC(_) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            if curve != P256 && curve != P384 {
                return Err(format!("CSR key uses curve {curve:?}; only P-256 and P-384 are accepted"));
            }
        }
        PublicKey::RSA(rsa) => {
            if rsa.key_size() < 2048 {
                return Err(format!("CSR RSA key is {} bits; at least 2048 are required", rsa.key_size()));
            }
        }
        _ => return Err("CSR key type is not accepted; use ECDSA P-256".to_string()),
    }
    let params = CertificateSigningRequestParams::from_der(&der.as_slice().into())
        .map_err(|e| format!("CSR is not acceptable: {e}"))?;
    let mut uris = Vec::new();
    for san in &params.params.subject_alt_names {
        match san {
            SanType::URI(u) => uris.push(u.to_string()),
            other => return Err(format!("CSR asks for a non-URI subject alternative name {other:?}")),
        }
    }
    Ok(CheckedCsr { params, uris })
}
