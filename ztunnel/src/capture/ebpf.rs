//! eBPF capture (`--capture ebpf`, the default): `bpf/capture.c`'s two tc programs on each
//! enrolled pod's interface, attached with TCX links from inside the pod's namespace.
//!
//! Everything persistent lives under the pin directory (`/sys/fs/bpf/trellis`): the statistics
//! map, and one pinned link per pod and direction (`links/<namespace>_<pod>~{ingress,egress}`).
//! Pinned links outlive the ztunnel process, so a restarting ztunnel leaves enrolled pods
//! captured: while nothing listens, their new connections are dropped (fail closed); when it is
//! back, the same links are pointed at the freshly loaded programs atomically.
//!
//! Per pod, besides the links: a policy route (fwmark [`STEER_MARK`] → `local 0.0.0.0/0 dev lo`)
//! so steered packets for foreign addresses are delivered locally, and `accept_local` on the
//! interface, because steered packets arrive with the pod's own address as their source.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aya::programs::links::{FdLink, LinkOrder, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};

use super::local_route;
use super::probes::PROBE_SOURCE;
use crate::netns::Netns;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capture.o"));

pub use super::local_route::STEER_MARK;
const PROGRAMS: [(&str, TcAttachType, &str); 2] =
    [("trellis_ingress", TcAttachType::Ingress, "ingress"), ("trellis_egress", TcAttachType::Egress, "egress")];
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
/// The pinned statistics map, and its number of counters (`STAT_MAX` in `bpf/capture.c`).
const STATS_MAP: &str = "trellis_stats";
const STATS_ENTRIES: u32 = 7;

pub struct Programs {
    bpf: Mutex<Ebpf>,
    pin_dir: PathBuf,
}

impl std::fmt::Debug for Programs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Programs").field("pin_dir", &self.pin_dir).finish()
    }
}

fn err(what: impl std::fmt::Display) -> impl FnOnce(String) -> io::Error {
    let what = what.to_string();
    move |e| io::Error::other(format!("{what}: {e}"))
}

/// Mounts bpffs at `/sys/fs/bpf` unless something already is.
fn ensure_bpffs() -> io::Result<()> {
    let path = c"/sys/fs/bpf";
    // SAFETY: statfs writes into the zeroed struct we own; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf")?;
    // SAFETY: plain mount(2) with static, NUL-terminated arguments.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), path.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(io::Error::other(format!("mounting bpffs at /sys/fs/bpf: {}", io::Error::last_os_error())));
    }
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// A statistics map pinned by an older ztunnel, with fewer counters, would be reused as it is
/// (the loader takes a pinned map by name without comparing its shape), and the counters added
/// since would never count. It is unpinned, so that this load pins a fresh one; programs still
/// attached keep the old one until their links are pointed at this process's programs.
fn unpin_outgrown_stats(pin_dir: &Path) -> io::Result<()> {
    let path = pin_dir.join(STATS_MAP);
    match aya::maps::MapInfo::from_pin(&path) {
        Ok(old) if old.max_entries() < STATS_ENTRIES => match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), counters = old.max_entries(), now = STATS_ENTRIES,
                    "replacing the statistics map an older ztunnel pinned");
                Ok(())
            }
            // Another ztunnel starting on this node unpinned it first.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            // Counters are not worth failing the start over: they just stay at zero.
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot replace an outgrown statistics map");
                Ok(())
            }
        },
        _ => Ok(()),
    }
}

impl Programs {
    /// Loads and verifies the programs. Fails with the kernel's reason on an unsupported kernel.
    pub fn load(pin_dir: &Path, proxy_mark: u32) -> io::Result<Arc<Programs>> {
        ensure_bpffs()?;
        std::fs::create_dir_all(pin_dir.join("links"))?;
        unpin_outgrown_stats(pin_dir)?;
        let mut bpf = EbpfLoader::new()
            .override_global("PROXY_MARK", &proxy_mark, true)
            .override_global("STEER_MARK", &STEER_MARK, true)
            .override_global("PROBE_SOURCE", &u32::from_ne_bytes(PROBE_SOURCE.octets()), true)
            .default_map_pin_directory(pin_dir)
            .load(OBJECT)
            .map_err(|e| err("loading the eBPF capture object")(e.to_string()))?;
        for (name, _, _) in PROGRAMS {
            let p: &mut SchedClassifier = bpf
                .program_mut(name)
                .ok_or_else(|| io::Error::other(format!("program {name} missing from the object")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| err(name)(e.to_string()))?;
            p.load()
                .map_err(|e| err(format!("loading {name} (kernel with TCX, 6.6 or newer, required)"))(e.to_string()))?;
        }
        tracing::info!(pin_dir = %pin_dir.display(), "eBPF capture programs loaded");
        Ok(Arc::new(Programs { bpf: Mutex::new(bpf), pin_dir: pin_dir.to_path_buf() }))
    }

    /// bpffs rejects '.' in names (it marks its own special files); Kubernetes names never
    /// contain '~', so the substitution stays unique.
    fn pin(&self, key: &str, dir: &str) -> PathBuf {
        self.pin_dir.join("links").join(format!("{}~{dir}", key.replace('.', "~")))
    }

    /// Attaches both programs to the pod's interface, or re-points existing pinned links at the
    /// programs of this process. Runs on the namespace's thread; returns new links to pin.
    fn attach_here(&self, key: &str) -> io::Result<Vec<(FdLink, PathBuf)>> {
        let iface = default_route_interface()?;
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{iface}/accept_local"), "1")?;
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{iface}/rp_filter"), "0")?;
        local_route::install()?;
        let mut bpf = self.bpf.lock().unwrap_or_else(|e| e.into_inner());
        let mut to_pin = Vec::new();
        for (name, attach, dir) in PROGRAMS {
            let prog: &mut SchedClassifier = bpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or_else(|| io::Error::other(format!("program {name} not loaded")))?;
            let pin = self.pin(key, dir);
            let existing = match PinnedLink::from_pin(&pin) {
                Ok(l) => SchedClassifierLink::try_from(FdLink::from(l)).ok(),
                Err(_) => None,
            };
            let replaced = existing.is_some();
            let id = match existing {
                Some(link) => prog
                    .attach_to_link(link)
                    .map_err(|e| err(format!("re-attaching {name} on {iface}"))(e.to_string()))?,
                None => prog
                    .attach_with_options(&iface, attach, TcAttachOptions::TcxOrder(LinkOrder::default()))
                    .map_err(|e| err(format!("attaching {name} to {iface}"))(e.to_string()))?,
            };
            // Keep only the pin as a reference, so the link outlives this process.
            let link = prog.take_link(id).map_err(|e| err(name)(e.to_string()))?;
            if !replaced {
                to_pin.push((FdLink::try_from(link).map_err(|e| err(name)(e.to_string()))?, pin));
            }
        }
        Ok(to_pin)
    }

    pub fn install(self: &Arc<Self>, ns: &Netns, key: &str) -> io::Result<()> {
        let (me, k) = (self.clone(), key.to_string());
        for (link, pin) in ns.run_blocking(move || me.attach_here(&k))? {
            let _ = std::fs::remove_file(&pin); // a stale pin that no longer names a TCX link
            let pinned = link.pin(&pin).map_err(|e| err(format!("pinning {}", pin.display()))(format!("{e:?}")))?;
            drop(pinned);
        }
        Ok(())
    }

    /// Detaches by unpinning: the last reference goes, and so does the link. Works whether or
    /// not the pod's namespace still exists.
    pub fn remove(&self, ns: Option<&Netns>, key: &str) -> io::Result<()> {
        for (_, _, dir) in PROGRAMS {
            let pin = self.pin(key, dir);
            match PinnedLink::from_pin(&pin) {
                Ok(link) => drop(link.unpin()?),
                Err(_) if !pin.exists() => {}
                Err(_) => std::fs::remove_file(&pin)?,
            }
        }
        if let Some(ns) = ns {
            // The route and rule only matter to steered packets, which no longer exist; remove
            // them anyway so an unenrolled pod's namespace is as we found it.
            let _ = ns.run_blocking(local_route::remove);
        }
        Ok(())
    }
}

/// The interface of the namespace's default route (the pod's `CNI_IFNAME`).
fn default_route_interface() -> io::Result<String> {
    // thread-self: this thread is in the pod's namespace; the process is not.
    let table = std::fs::read_to_string("/proc/thread-self/net/route")?;
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?, f.next()?))
        })
        .find(|(_, dst)| *dst == "00000000")
        .map(|(iface, _)| iface.to_string())
        .ok_or_else(|| io::Error::other("the pod has no default route, so no interface to capture on"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya::maps::MapInfo;

    /// Removes a test's pin directory, whatever the test's outcome.
    struct PinDir(PathBuf);

    impl Drop for PinDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Needs root and a kernel that loads the programs, as ztunnel itself does.
    #[test]
    fn a_statistics_map_pinned_with_fewer_counters_is_replaced() {
        ensure_bpffs().unwrap();
        let dir = PinDir(Path::new("/sys/fs/bpf").join(format!("trellis-test-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        // What an older ztunnel left behind: the map, pinned with four counters.
        let older = EbpfLoader::new().map_max_entries(STATS_MAP, 4).default_map_pin_directory(&dir.0).load(OBJECT);
        drop(older.unwrap());
        let pinned = || MapInfo::from_pin(dir.0.join(STATS_MAP)).unwrap().max_entries();
        assert_eq!(pinned(), 4);
        let _programs = Programs::load(&dir.0, 0x539).unwrap();
        // Pinned afresh from the object, which has as many counters as STATS_ENTRIES says.
        assert_eq!(pinned(), STATS_ENTRIES);
    }
}
