//! Istio-standard TCP metrics, served on :15020, plus ztunnel's own rejection counters.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are Istio's spelling
pub enum Reporter {
    source,
    destination,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    mutual_tls,
    unknown,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub connection_security_policy: SecurityPolicy,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// `inbound` (15008), `inbound_plaintext` (15006) or `outbound` (15001)
    pub direction: &'static str,
    /// `policy`, `bad_request`, `tls`, `no_endpoint`, `upstream`, `overload`, `unknown_source`
    pub reason: &'static str,
}

pub struct Metrics {
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    pub sent: Family<TcpLabels, Counter>,
    pub received: Family<TcpLabels, Counter>,
    pub rejected: Family<RejectLabels, Counter>,
    pub active: Gauge,
    /// Per-connection detail for the admin endpoint; the counters above are the aggregate.
    pub connections: crate::proxy::conn::Table,
    pub registry: Registry,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            rejected: Family::default(),
            active: Gauge::default(),
            connections: Default::default(),
            registry: Registry::default(),
        };
        registry.register("istio_tcp_connections_opened", "TCP connections opened", m.opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", m.closed.clone());
        registry.register("istio_tcp_sent_bytes", "Bytes sent back to the client (response direction)", m.sent.clone());
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client (request direction)",
            m.received.clone(),
        );
        registry.register(
            "trellis_connections_rejected",
            "Connections refused before reaching a workload, by direction and reason",
            m.rejected.clone(),
        );
        registry.register("trellis_connections_active", "Proxied connections in flight", m.active.clone());
        Metrics { registry, ..m }
    }

    pub fn reject(&self, direction: &'static str, reason: &'static str) {
        self.rejected.get_or_create(&RejectLabels { direction, reason }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
