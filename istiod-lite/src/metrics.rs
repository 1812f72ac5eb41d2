//! Prometheus metrics for istiod-lite, named as Istio's istiod names them where an equivalent
//! exists so that existing dashboards keep working.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub kind: String,
    pub op: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub config_writes: Family<WriteLabels, Counter>,
    pub xds_connections: Gauge,
    pub xds_pushes: Family<TypeLabel, Counter>,
    pub xds_rejects: Family<TypeLabel, Counter>,
    pub csr_count: Counter,
    pub certs_issued: Counter,
    pub csr_denied: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            config_writes: Family::default(),
            xds_connections: Gauge::default(),
            xds_pushes: Family::default(),
            xds_rejects: Family::default(),
            csr_count: Counter::default(),
            certs_issued: Counter::default(),
            csr_denied: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "trellis_config_writes",
            "Config writes by kind, operation and result",
            m.config_writes.clone(),
        );
        registry.register("pilot_xds", "Connected xDS clients", m.xds_connections.clone());
        registry.register("pilot_xds_pushes", "xDS responses sent, by type", m.xds_pushes.clone());
        registry.register(
            "pilot_total_xds_rejects",
            "xDS responses rejected (NACKed) by clients, by type",
            m.xds_rejects.clone(),
        );
        registry.register("citadel_server_csr_count", "Certificate signing requests received", m.csr_count.clone());
        registry.register("citadel_server_success_cert_issuance_count", "Certificates issued", m.certs_issued.clone());
        registry.register(
            "citadel_server_csr_denied",
            "Certificate signing requests denied, by reason",
            m.csr_denied.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String only fails on fmt errors, which String does not produce.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn type_label(type_url: &str) -> TypeLabel {
        TypeLabel { r#type: type_url.rsplit('/').next().unwrap_or(type_url).to_string() }
    }
}
