//! HBONE building blocks shared by ztunnel and the waypoint.
//!
//! Identity and transport security: [`Identity`] (SPIFFE IDs),
//! [`tls`] (TLS 1.3-only configs with the two HBONE suites and ALPN `h2`, SPIFFE verifiers, and a
//! certificate slot that can be swapped without dropping connections), and the HTTP/2 CONNECT
//! [`client`] and [`server`] with HBONE's [`settings`] and PING [`Keepalive`], the connection
//! [`pool`], and [`splice`], which joins a socket to a tunnel without copying payload in user space.
//!
//! Bounds for what network peers can make a process hold: connection slots per process and per
//! source ([`admission`]), and HTTP/2 window budgets ([`window`]).

pub mod admission;
pub mod client;
pub mod identity;
mod keepalive;
pub mod pool;
pub mod server;
pub mod settings;
mod splice;
mod stream;
pub mod tls;
mod usage;
pub mod window;

pub use identity::Identity;
pub use keepalive::Keepalive;
pub use splice::{splice, Abort, MAX_READ};
pub use stream::H2Stream;
