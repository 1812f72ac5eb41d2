//! What a lab is made of, persisted as `<state-dir>/lab.json` after every step of `lab up`, so
//! that `status`, `exec` and `down` (also after a crash or a partial `up`) know what exists.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "lab.json";
/// Where each prefix records the state dir that owns it, so a second lab cannot take the same
/// names from another state dir.
pub const OWNERS_DIR: &str = "/run/trellis/labs";

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Lab {
    /// Names of everything the lab creates start with this.
    pub prefix: String,
    pub state_dir: PathBuf,
    /// The underlay /24: the host's end is `.1` (istiod-lite), node i is `.(10+i)`.
    pub underlay: Ipv4Addr,
    /// Pod CIDRs are `<pod_net>.<i>.0/24`, `pod_net` being the first two octets.
    pub pod_net: [u8; 2],
    pub api: SocketAddr,
    pub bin_dir: PathBuf,
    pub istiod: Option<Proc>,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// `up` finished: everything listed was created and was healthy.
    pub complete: bool,
}

/// A process the lab started.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Proc {
    pub pid: u32,
    /// What `/proc/<pid>/exe` must point at; guards against a recycled pid.
    pub exe: PathBuf,
    pub log: PathBuf,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Node {
    pub name: String,
    pub index: u8,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: String,
    pub ztunnel: Option<Proc>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub netns: String,
    pub ip: Option<Ipv4Addr>,
    pub app: Option<Proc>,
}

impl Lab {
    pub fn host_ip(&self) -> Ipv4Addr {
        let o = self.underlay.octets();
        Ipv4Addr::new(o[0], o[1], o[2], 1)
    }

    pub fn node_ip(&self, i: u8) -> Ipv4Addr {
        let o = self.underlay.octets();
        Ipv4Addr::new(o[0], o[1], o[2], 10 + i)
    }

    pub fn underlay_netns(&self) -> String {
        format!("{}-underlay", self.prefix)
    }

    pub fn node_netns(&self, i: u8) -> String {
        format!("{}-node{i}", self.prefix)
    }

    pub fn pod_netns(&self, namespace: &str, name: &str) -> String {
        format!("{}-pod-{namespace}-{name}", self.prefix)
    }

    /// The host's end of the underlay.
    pub fn host_link(&self) -> String {
        format!("{}-lab", self.prefix)
    }

    pub fn bpffs(&self) -> PathBuf {
        self.state_dir.join("bpf")
    }

    pub fn node_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }

    pub fn agent_socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("agent.sock")
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.namespace == namespace && p.name == name)
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Whether a netns name is one this lab creates (and so one `down` may delete).
    pub fn owns_netns(&self, netns: &str) -> bool {
        let Some(rest) = netns.strip_prefix(&self.prefix).and_then(|r| r.strip_prefix('-')) else { return false };
        rest == "underlay"
            || rest.strip_prefix("node").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            || rest.starts_with("pod-")
    }

    pub fn load(state_dir: &Path) -> anyhow::Result<Option<Lab>> {
        let path = state_dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).with_context(|| {
                format!("{} is not a lab state file; remove it or use another --state-dir", path.display())
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the state atomically (write then rename), so a crash never leaves half a file.
    pub fn save(&self) -> anyhow::Result<()> {
        let path = self.state_dir.join(STATE_FILE);
        let tmp = self.state_dir.join(".lab.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }
}

pub fn owner_file(prefix: &str) -> PathBuf {
    Path::new(OWNERS_DIR).join(prefix)
}

/// The state dir that owns `prefix`, if a lab with that prefix exists.
pub fn owner(prefix: &str) -> Option<PathBuf> {
    std::fs::read_to_string(owner_file(prefix)).ok().map(|s| PathBuf::from(s.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_only_touches_names_the_lab_makes() {
        let lab: Lab = serde_json::from_value(serde_json::json!({
            "prefix": "trellis", "state_dir": "/run/x", "underlay": "172.29.0.0", "pod_net": [10, 245],
            "api": "127.0.0.1:15014", "bin_dir": "/b", "istiod": null, "nodes": [], "pods": [], "complete": false,
        }))
        .unwrap();
        for ours in ["trellis-underlay", "trellis-node1", "trellis-node12", "trellis-pod-demo-client"] {
            assert!(lab.owns_netns(ours), "{ours}");
        }
        for theirs in [
            "trellis",
            "trellis-nodes",
            "trellis-node",
            "trellis-underlay2",
            "trellisx-node1",
            "other-node1",
            "trellis-cni",
        ] {
            assert!(!lab.owns_netns(theirs), "{theirs}");
        }
        assert_eq!(lab.node_ip(2).to_string(), "172.29.0.12");
        assert_eq!(lab.host_link(), "trellis-lab");
    }
}
