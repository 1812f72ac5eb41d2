//! A throwaway mesh CA for tests.
#![allow(dead_code)]

use std::sync::Arc;

use hbone::tls::CertSlot;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::RootCertStore;

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = p.self_signed(&key).unwrap();
        Ca { root: root.der().clone(), issuer: Issuer::new(p, key) }
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        let mut r = RootCertStore::empty();
        r.add(self.root.clone()).unwrap();
        Arc::new(r)
    }

    pub fn slot(&self, id: &str) -> Arc<CertSlot> {
        let (chain, key) = self.leaf(id);
        Arc::new(CertSlot::new(chain, key).unwrap())
    }

    pub fn leaf(&self, id: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (
            vec![cert.der().clone(), self.root.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}
