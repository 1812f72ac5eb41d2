//! ztunnel: Trellis's per-node L4 proxy.
//!
//! Layout follows the data flow: [`xds`] keeps [`state`] in step with istiod-lite; the proxy paths
//! (inbound 15008/15006, outbound 15001) read `state` and carry traffic over `hbone`.

pub mod identity;
pub mod state;
pub mod xds;
