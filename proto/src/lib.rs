//! Generated protobuf and gRPC types shared by every Trellis process.
//!
//! The `.proto` sources under `proto/` are Trellis's own, but keep Istio's package names, message
//! names and field numbers so that Istio's ztunnel and Trellis interoperate on the wire. Envoy's
//! xDS types come from the `envoy-types` crate and are re-exported as [`envoy`].

pub mod istio {
    // Generated code: a Workload is much larger than a Service inside `Address`, as in Istio.
    #[allow(clippy::large_enum_variant)]
    pub mod workload {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
    }
    pub mod security {
        include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    }
    pub mod v1 {
        pub mod auth {
            include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
        }
    }
}

pub mod trellis {
    pub mod node {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/trellis.node.v1.rs"));
        }
    }
    pub mod pod {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/trellis.pod.v1.rs"));
        }
    }
    pub mod echo {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/trellis.echo.v1.rs"));
        }
    }
}

pub use envoy_types::pb as envoy;

/// Type URL of `istio.workload.Address` resources in workload discovery.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of `istio.security.Authorization` resources in workload discovery.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
/// Type URL of `trellis.node.v1.Node` resources: Trellis's own, for the overlay.
pub const NODE_TYPE_URL: &str = "type.googleapis.com/trellis.node.v1.Node";
/// Type URL of `trellis.pod.v1.PodMembership` resources: Trellis's own, so the node agent can
/// capture a meshed pod before the pod has an IP.
pub const POD_MEMBERSHIP_TYPE_URL: &str = "type.googleapis.com/trellis.pod.v1.PodMembership";

/// Suffix of `system_version_info` on every delta response but the last when istiod-lite splits
/// one push of a type over several responses (each stays under gRPC's 4 MiB default message
/// limit). Delta xDS has no way to say "more follows", so without it a client would count its
/// first state of a type as complete at the first piece. A control plane that never splits
/// (Istio's) never sends it, so a client that honours it needs nothing else.
pub const PARTIAL_PUSH_SUFFIX: &str = "+partial";

/// Envoy xDS type URLs served to proxyless gRPC clients.
pub const LISTENER_TYPE_URL: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE_URL: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER_TYPE_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE_URL: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
