//! `meshctl lab down`: removes whatever a lab left, from its state file and from the names it
//! uses, so it also works after a crash or a partial `up`, and a second run finds nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::state::{self, Lab};
use super::sys;

/// What `down` removed, for its report and for tests.
#[derive(Default, Debug)]
pub struct Removed {
    pub processes: usize,
    pub netns: Vec<String>,
    pub links: Vec<String>,
    pub mounts: Vec<PathBuf>,
    pub state_dir: bool,
}

impl Removed {
    pub fn is_empty(&self) -> bool {
        self.processes == 0
            && self.netns.is_empty()
            && self.links.is_empty()
            && self.mounts.is_empty()
            && !self.state_dir
    }
}

/// Tears down the lab recorded in `lab`, or (with no state file) whatever uses `prefix`'s names.
pub fn down(state_dir: &Path, lab: Option<Lab>, prefix: &str) -> Removed {
    let mut removed = Removed::default();
    // The names are derived from the prefix, so a lab without a state file is still found.
    let probe = lab.clone().unwrap_or_else(|| Lab {
        prefix: prefix.to_string(),
        state_dir: state_dir.to_path_buf(),
        underlay: std::net::Ipv4Addr::UNSPECIFIED,
        pod_net: [0, 0],
        api: ([127, 0, 0, 1], 0).into(),
        bin_dir: PathBuf::new(),
        istiod: None,
        nodes: Vec::new(),
        pods: Vec::new(),
        complete: false,
    });
    if let Some(lab) = &lab {
        // Apps first, the control plane last: nothing reconnects to what is already gone.
        let procs = lab
            .pods
            .iter()
            .filter_map(|p| p.app.as_ref())
            .chain(lab.nodes.iter().filter_map(|n| n.ztunnel.as_ref()))
            .chain(lab.istiod.as_ref());
        for p in procs {
            if sys::stop(p, Duration::from_secs(3)) {
                removed.processes += 1;
            }
        }
    }
    let mut owned: Vec<String> = sys::netns_list().into_iter().filter(|n| probe.owns_netns(n)).collect();
    // Pods, then nodes, then the underlay.
    owned.sort_by_key(|n| {
        if n.contains("-pod-") {
            0
        } else if n.ends_with("-underlay") {
            2
        } else {
            1
        }
    });
    for ns in &owned {
        removed.processes += sys::kill_netns_pids(ns);
    }
    for ns in owned {
        if sys::ip(&["netns", "del", &ns]).is_ok() {
            removed.netns.push(ns.clone());
        }
        if ns.contains("-pod-") {
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&ns));
        }
    }
    // Pod /etc/netns entries whose netns was already gone.
    if let Ok(dir) = std::fs::read_dir("/etc/netns") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if probe.owns_netns(&name) && name.contains("-pod-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let link = probe.host_link();
    if sys::link_exists(&link) && sys::ip(&["link", "del", &link]).is_ok() {
        removed.links.push(link);
    }
    if sys::umount(&probe.bpffs()) {
        removed.mounts.push(probe.bpffs());
    }
    if state_dir.join(state::STATE_FILE).exists() {
        removed.state_dir = std::fs::remove_dir_all(state_dir).is_ok();
    }
    if state::owner(prefix).is_some_and(|o| o == state_dir) || lab.is_some() {
        let _ = std::fs::remove_file(state::owner_file(prefix));
    }
    removed
}
