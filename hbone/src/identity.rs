//! SPIFFE identities of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn parse(s: &str) -> Result<Identity, String> {
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| format!("{s:?} is not a spiffe:// URI"))?;
        match rest.split('/').collect::<Vec<_>>().as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => Ok(Identity {
                trust_domain: td.to_string(),
                namespace: ns.to_string(),
                service_account: sa.to_string(),
            }),
            _ => Err(format!("{s:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_workload_identities() {
        let id = Identity::parse("spiffe://cluster.local/ns/demo/sa/client").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/client");
        for bad in [
            "spiffe://cluster.local/ns/demo",
            "http://x/ns/a/sa/b",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/a/sa/b/extra",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad}");
        }
    }
}
