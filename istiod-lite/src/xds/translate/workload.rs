//! Pods, WorkloadEntries and Services → `istio.workload.Address`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use trellis_config::object::{Pod, Service, WorkloadEntry};
use trellis_config::selector;
use trellis_config::types::IntOrString;
use trellis_config::{Kind, Object, ObjectKey, ObjectMeta};
use trellis_proto::istio::workload as wl;

use super::world::World;
use super::{policy, Settings};

pub use trellis_config::mesh::DATAPLANE_MODE;

/// What a Pod or a WorkloadEntry contributes to a Workload (and to proxyless gRPC endpoints).
pub(crate) struct Source<'a> {
    pub labels: &'a BTreeMap<String, String>,
    pub service_account: &'a str,
    pub node: &'a str,
    pub addresses: Vec<IpAddr>,
    pub hostname: String,
    pub healthy: bool,
    pub named_port: NamedPort<'a>,
    pub network: &'a str,
    /// `region/zone/subzone`, any part possibly empty.
    pub locality: &'a str,
    /// Relative load-balancing weight (WorkloadEntry `weight`), at least 1.
    pub weight: u32,
}

/// A named `targetPort`'s number, by name and protocol.
pub type NamedPort<'a> = Box<dyn Fn(&str, &str) -> Option<u32> + 'a>;

/// The addressable view of a Pod or WorkloadEntry; `None` for other kinds or when it has no IP.
pub(crate) fn source(obj: &Object) -> Option<Source<'_>> {
    match obj {
        Object::Pod(p) => pod_source(p),
        Object::WorkloadEntry(w) => Some(entry_source(w)),
        _ => None,
    }
}

/// Resolves a Service port's target port for one endpoint; `None` when a named port is unknown.
pub(crate) fn target_port(p: &trellis_config::types::ServicePort, src: &Source<'_>) -> Option<u32> {
    match &p.target_port {
        None => Some(p.port as u32),
        Some(IntOrString::Int(t)) => Some(*t as u32),
        Some(IntOrString::String(n)) => (src.named_port)(n, p.protocol.as_deref().unwrap_or("TCP")),
    }
}

/// Resource name (and uid) of a workload, e.g. `Kubernetes//v1/Pod/demo/client`.
pub fn uid(settings: &Settings, key: &ObjectKey) -> String {
    match key.kind {
        Kind::Pod => format!("{}//v1/Pod/{}/{}", settings.cluster_id, key.namespace, key.name),
        _ => format!("{}/networking.istio.io/WorkloadEntry/{}/{}", settings.cluster_id, key.namespace, key.name),
    }
}

pub fn service_hostname(settings: &Settings, namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}.svc.{}", settings.domain_suffix)
}

/// Resource name of a Service: `<namespace>/<hostname>`.
pub fn service_name(settings: &Settings, key: &ObjectKey) -> String {
    format!("{}/{}", key.namespace, service_hostname(settings, &key.namespace, &key.name))
}

/// Ambient enrollment: the workload's own label wins (`none` opts out), else the namespace label.
pub fn enrolled(labels: &BTreeMap<String, String>, namespace_labels: &BTreeMap<String, String>) -> bool {
    trellis_config::mesh::enrollment("", labels, namespace_labels).enrolled
}

fn canonical(labels: &BTreeMap<String, String>, keys: &[&str], fallback: &str) -> String {
    keys.iter().find_map(|k| labels.get(*k)).cloned().unwrap_or_else(|| fallback.to_string())
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// A named `targetPort` as Kubernetes resolves it: the port of that name and protocol in the
/// pod's containers, then in its native sidecars (init containers that restart `Always`, which
/// run beside the others). A plain init container has exited by the time the pod serves.
fn container_port(pod: &Pod, name: &str, protocol: &str) -> Option<u32> {
    let sidecars = pod.spec.other.get("initContainers").and_then(|v| v.as_array()).into_iter().flatten();
    let sidecars = sidecars.filter(|c| c.get("restartPolicy").and_then(|r| r.as_str()) == Some("Always"));
    let ports = pod.spec.containers.iter().chain(sidecars).flat_map(|c| c.get("ports").and_then(|p| p.as_array()));
    ports.flatten().find_map(|p| {
        let named = p.get("name")?.as_str()? == name;
        let same_protocol = p.get("protocol").and_then(|v| v.as_str()).unwrap_or("TCP") == protocol;
        (named && same_protocol).then(|| p.get("containerPort")?.as_u64()).flatten().map(|v| v as u32)
    })
}

/// Builds the Address for a Pod or WorkloadEntry, or `None` when it has nothing addressable.
pub fn workload(world: &World, settings: &Settings, obj: &Object) -> Option<wl::Workload> {
    let key = obj.key();
    let src = source(obj)?;
    let ns_labels = world.namespace_labels(&key.namespace);
    let tunnel = if enrolled(src.labels, &ns_labels) { wl::TunnelProtocol::Hbone } else { wl::TunnelProtocol::None };
    let mut services = std::collections::HashMap::new();
    for svc in world.in_namespace(Kind::Service, &key.namespace) {
        let Object::Service(s) = svc.as_ref() else { continue };
        let Some(sel) = &s.spec.selector else { continue };
        if sel.is_empty() || !selector::matches(sel, src.labels) {
            continue;
        }
        let ports = s
            .spec
            .ports
            .iter()
            .filter_map(|p| Some(wl::Port { service_port: p.port as u32, target_port: target_port(p, &src)? }))
            .collect();
        services.insert(service_name(settings, &svc.key()), wl::PortList { ports });
    }
    let name = key.name.clone();
    let (workload_name, workload_type) = match obj {
        Object::Pod(p) => owning_workload(&p.metadata),
        _ => (name.clone(), wl::WorkloadType::Pod),
    };
    Some(wl::Workload {
        uid: uid(settings, &key),
        name: name.clone(),
        namespace: key.namespace.clone(),
        addresses: src.addresses.iter().map(ip_bytes).collect(),
        hostname: src.hostname,
        network: src.network.to_string(),
        tunnel_protocol: tunnel as i32,
        trust_domain: settings.trust_domain.clone(),
        service_account: src.service_account.to_string(),
        node: src.node.to_string(),
        canonical_name: canonical(
            src.labels,
            &["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"],
            &workload_name,
        ),
        canonical_revision: canonical(
            src.labels,
            &["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"],
            "latest",
        ),
        workload_type: workload_type as i32,
        workload_name,
        cluster_id: settings.cluster_id.clone(),
        status: if src.healthy { wl::WorkloadStatus::Healthy } else { wl::WorkloadStatus::Unhealthy } as i32,
        services,
        authorization_policies: policy::selected_policies(world, settings, &key.namespace, src.labels),
        ..Default::default()
    })
}

/// The workload a Pod belongs to, as telemetry names it (Istio's convention): its controller,
/// traced back through the object Kubernetes generated for it (a Deployment's ReplicaSet carries
/// the pod-template-hash as a suffix, a CronJob's Job the scheduled minute), else the Pod itself.
/// Pods of one Deployment thus share a name, and metric series do not multiply with rollouts.
pub fn owning_workload(meta: &ObjectMeta) -> (String, wl::WorkloadType) {
    use wl::WorkloadType as T;
    let Some(owner) = meta.controller() else { return (meta.name.clone(), T::Pod) };
    let name = owner.name.clone();
    match owner.kind.as_str() {
        "ReplicaSet" => {
            let hash = meta.labels.get("pod-template-hash").map(String::as_str).unwrap_or_default();
            match name.strip_suffix(hash).and_then(|n| n.strip_suffix('-')) {
                Some(deployment) if !hash.is_empty() && !deployment.is_empty() => {
                    (deployment.to_string(), T::Deployment)
                }
                _ => (name, T::Pod),
            }
        }
        "Job" => match cron_job_of(&name) {
            Some(cron) => (cron.to_string(), T::Cronjob),
            None => (name, T::Job),
        },
        "Deployment" => (name, T::Deployment),
        "CronJob" => (name, T::Cronjob),
        // StatefulSet, DaemonSet, ...: the proto has no type for them; the name still groups.
        _ => (name, T::Pod),
    }
}

/// A Job a CronJob creates is named `<cronjob>-<scheduled time in minutes since the epoch>`.
fn cron_job_of(job: &str) -> Option<&str> {
    let (cron, minutes) = job.rsplit_once('-')?;
    let stamp = (8..=10).contains(&minutes.len()) && minutes.bytes().all(|b| b.is_ascii_digit());
    (stamp && !cron.is_empty()).then_some(cron)
}

/// Whether the mesh may ever capture this pod: not finished, and not on the host's network.
pub fn capturable(p: &Pod) -> bool {
    let finished = matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"));
    !finished && p.spec.host_network != Some(true)
}

fn pod_source(p: &Pod) -> Option<Source<'_>> {
    let status = p.status.as_ref()?;
    if !capturable(p) {
        return None;
    }
    let mut addresses: Vec<IpAddr> = status.pod_ips.iter().filter_map(|a| a.ip.parse().ok()).collect();
    if addresses.is_empty() {
        addresses.extend(status.pod_ip.as_deref().and_then(|a| a.parse::<IpAddr>().ok()));
    }
    if addresses.is_empty() {
        return None;
    }
    Some(Source {
        labels: &p.metadata.labels,
        service_account: p.spec.service_account(),
        node: p.spec.node_name.as_deref().unwrap_or_default(),
        addresses,
        hostname: String::new(),
        healthy: matches!(status.phase.as_deref(), None | Some("Running")),
        named_port: Box::new(move |n, protocol| container_port(p, n, protocol)),
        network: "",
        locality: "",
        weight: 1,
    })
}

fn entry_source(w: &WorkloadEntry) -> Source<'_> {
    let (addresses, hostname) = match w.spec.address.parse::<IpAddr>() {
        Ok(ip) => (vec![ip], String::new()),
        Err(_) => (vec![], w.spec.address.clone()),
    };
    // A WorkloadEntry carries its labels in spec; metadata labels are for the object itself.
    let labels = if w.spec.labels.is_empty() { &w.metadata.labels } else { &w.spec.labels };
    Source {
        labels,
        service_account: w.spec.service_account.as_deref().unwrap_or("default"),
        node: "",
        addresses,
        hostname,
        healthy: true,
        named_port: Box::new(move |n, _| w.spec.ports.get(n).map(|p| *p as u32)),
        network: w.spec.network.as_deref().unwrap_or_default(),
        locality: w.spec.locality.as_deref().unwrap_or_default(),
        weight: w.spec.weight.map(|v| v.clamp(1, u32::MAX as i64) as u32).unwrap_or(1),
    }
}

pub fn service(settings: &Settings, svc: &Service) -> wl::Service {
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let mut vips: Vec<&str> = svc.spec.cluster_ips.iter().map(String::as_str).collect();
    if let Some(ip) = svc.spec.cluster_ip.as_deref() {
        if !vips.contains(&ip) {
            vips.insert(0, ip);
        }
    }
    let addresses = vips
        .into_iter()
        .filter_map(|v| v.parse::<IpAddr>().ok())
        .map(|ip| wl::NetworkAddress { network: String::new(), address: ip_bytes(&ip) })
        .collect();
    let ports = svc
        .spec
        .ports
        .iter()
        .map(|p| wl::Port {
            service_port: p.port as u32,
            target_port: match &p.target_port {
                None => p.port as u32,
                Some(IntOrString::Int(t)) => *t as u32,
                // Named target ports resolve per endpoint (in each Workload's `services` map).
                Some(IntOrString::String(_)) => 0,
            },
        })
        .collect();
    wl::Service {
        name: svc.metadata.name.clone(),
        namespace: ns.clone(),
        hostname: service_hostname(settings, &ns, &svc.metadata.name),
        addresses,
        ports,
        ..Default::default()
    }
}
