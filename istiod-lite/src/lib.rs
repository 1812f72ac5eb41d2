//! istiod-lite: Trellis's control plane.
//!
//! The pipeline is visible in the module tree: [`store`] holds validated config, [`api`] is the
//! kube-style REST door into it, [`xds`] translates the store into Istio workload-discovery
//! resources and serves them, and [`ca`] issues SPIFFE certificates. [`server`] wires them up.

pub mod api;
pub mod ca;
pub mod metrics;
pub mod secrets;
pub mod server;
pub mod serving;
pub mod store;
pub mod xds;
