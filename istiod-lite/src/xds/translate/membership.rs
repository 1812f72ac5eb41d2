//! Pods → `trellis.pod.v1.PodMembership`: which scheduled pods the mesh captures, and as whom.
//!
//! A Workload needs an address, and a pod has none until its CNI ADD has run, so the node agent
//! would learn too late that a new pod is meshed: the pod would start uncaptured. Membership is
//! known as soon as the pod is scheduled (`spec.nodeName`), so it is published then.

use trellis_config::object::Pod;
use trellis_config::ObjectKey;
use trellis_proto::trellis::pod::v1 as pb;

use super::workload::{capturable, enrolled, uid};
use super::{Settings, World};

/// `None` for a pod not yet scheduled, finished, or on the host network (never captured).
pub fn membership(world: &World, settings: &Settings, key: &ObjectKey, pod: &Pod) -> Option<pb::PodMembership> {
    let node = pod.spec.node_name.as_deref().filter(|n| !n.is_empty())?;
    if !capturable(pod) {
        return None;
    }
    Some(pb::PodMembership {
        uid: uid(settings, key),
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        node: node.to_string(),
        service_account: pod.spec.service_account().to_string(),
        trust_domain: settings.trust_domain.clone(),
        meshed: enrolled(&pod.metadata.labels, &world.namespace_labels(&key.namespace)),
    })
}
