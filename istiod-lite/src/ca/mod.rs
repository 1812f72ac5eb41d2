//! The mesh certificate authority: SPIFFE workload certificates over Istio's
//! `IstioCertificateService`, and istiod-lite's own serving certificate.

mod authority;
mod csr;
pub mod service;
pub mod tokens;

pub use authority::{Authority, CaError};
pub use hbone::Identity;
