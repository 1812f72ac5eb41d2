//! The sample application `lab up --sample` deploys.

/// What runs in a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum App {
    /// `trellis-echo` on port 8080.
    Echo,
    /// Nothing but a placeholder process: a pod to run commands in.
    Idle,
}

pub struct PodSpec {
    pub namespace: &'static str,
    pub name: &'static str,
    /// 1-based node index.
    pub node: u8,
    pub service_account: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
    pub app: App,
}

pub const OBJECTS: &str = include_str!("sample.yaml");

pub const PODS: &[PodSpec] = &[
    PodSpec {
        namespace: "demo",
        name: "client",
        node: 1,
        service_account: "client",
        labels: &[("app", "client")],
        app: App::Idle,
    },
    PodSpec {
        namespace: "demo",
        name: "echo-v1",
        node: 1,
        service_account: "echo",
        labels: &[("app", "echo"), ("version", "v1")],
        app: App::Echo,
    },
    PodSpec {
        namespace: "demo",
        name: "echo-v2",
        node: 2,
        service_account: "echo",
        labels: &[("app", "echo"), ("version", "v2")],
        app: App::Echo,
    },
];

pub const ECHO_PORT: u16 = 8080;
