//! ztunnel: Trellis's per-node L4 proxy.
//!
//! Layout follows the data flow: [`xds`] keeps [`state`] in step with istiod-lite and
//! [`identity`] keeps workload certificates fresh; the node [`agent`] enrolls [`pods`] (and [`handover`] passes
//! them and their listeners, through [`fdpass`], to a newer ztunnel, known by its
//! [`peer_process`]), each of
//! which gets [`proxy`] listeners inside its network namespace ([`netns`], [`sockets`]) and the
//! [`capture`] rules that steer its traffic to them; [`overlay`] routes pod CIDRs of other nodes
//! over VXLAN. [`admin`] and [`metrics`] are for operators, and [`log_budget`] keeps what
//! outsiders can make ztunnel log bounded; [`node_ports`] are its own ports (passed on in a
//! hand-over too);
//! [`app`] wires the process together.

pub mod admin;
pub mod agent;
pub mod app;
pub mod capture;
pub mod fdpass;
pub mod handover;
pub mod identity;
pub mod log_budget;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod node_ports;
pub mod overlay;
pub mod peer_process;
pub mod pods;
pub mod proxy;
pub mod sockets;
pub mod state;
pub mod token;
pub mod xds;

/// Locks `m`, carrying on past a panic elsewhere: every guarded value here stays valid between
/// statements, so a poisoned lock only tells of a panic, which is reported where it happened.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
