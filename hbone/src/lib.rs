//! HBONE building blocks shared by ztunnel and the waypoint.
//!
//! This first slice owns identity and transport security: [`Identity`] (SPIFFE IDs),
//! [`tls`] (TLS 1.3-only configs with the two HBONE suites and ALPN `h2`, SPIFFE verifiers, and a
//! certificate slot that can be swapped without dropping connections). The HTTP/2 CONNECT client,
//! server and pool build on these.

pub mod identity;
pub mod tls;

pub use identity::Identity;
