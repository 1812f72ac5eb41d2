//! Persistent IPAM: one file per allocated address under `<dataDir>/<network>/`, holding the
//! container id and interface, so allocations survive restarts and DEL/GC find their owner. A
//! `flock` on `lock` serialises concurrent plugin invocations (the runtime runs them in parallel).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

use crate::error::{io, CniError, IPAM_EXHAUSTED};

pub struct Ipam {
    dir: PathBuf,
    cidr: Ipv4Net,
}

/// Held while the store is being read or changed.
struct Lock(File);

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: unlocking a lock we hold on an open fd.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn owner(container: &str, ifname: &str) -> String {
    format!("{container}\n{ifname}\n")
}

impl Ipam {
    pub fn new(data_dir: &Path, network: &str, cidr: Ipv4Net) -> Ipam {
        Ipam { dir: data_dir.join(network), cidr }
    }

    fn lock(&self) -> Result<Lock, CniError> {
        fs::create_dir_all(&self.dir).map_err(|e| io(&format!("creating {}", self.dir.display()), e))?;
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("lock"))
            .map_err(|e| io("opening the IPAM lock", e))?;
        // SAFETY: flock on an fd we own; blocks until the other invocation finishes.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io("locking IPAM", io::Error::last_os_error()));
        }
        Ok(Lock(f))
    }

    /// (address, owner text) of every allocation.
    fn allocations(&self) -> Result<Vec<(Ipv4Addr, String)>, CniError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| io("reading the IPAM store", e))? {
            let entry = entry.map_err(|e| io("reading the IPAM store", e))?;
            let Some(ip) = entry.file_name().to_str().and_then(|n| n.parse::<Ipv4Addr>().ok()) else { continue };
            let text = fs::read_to_string(entry.path()).unwrap_or_default();
            out.push((ip, text));
        }
        Ok(out)
    }

    /// The address held by this attachment, if any.
    pub fn find(&self, container: &str, ifname: &str) -> Result<Option<Ipv4Addr>, CniError> {
        let _l = self.lock()?;
        let me = owner(container, ifname);
        Ok(self.allocations()?.into_iter().find(|(_, o)| *o == me).map(|(ip, _)| ip))
    }

    /// Allocates an address for the attachment (the same one again if it already holds one).
    /// The first host is the gateway and is never handed out.
    pub fn allocate(&self, container: &str, ifname: &str) -> Result<Ipv4Addr, CniError> {
        let _l = self.lock()?;
        let me = owner(container, ifname);
        let taken = self.allocations()?;
        if let Some((ip, _)) = taken.iter().find(|(_, o)| *o == me) {
            return Ok(*ip);
        }
        let last =
            fs::read_to_string(self.dir.join("last_reserved")).ok().and_then(|s| s.trim().parse::<Ipv4Addr>().ok());
        let hosts: Vec<Ipv4Addr> = self.cidr.hosts().skip(1).collect();
        // Continue after the last address handed out, so a just-released address is not reused
        // at once (a late packet for the old pod must not reach the new one).
        let start = last.and_then(|l| hosts.iter().position(|h| *h == l)).map_or(0, |i| i + 1);
        for ip in hosts.iter().cycle().skip(start).take(hosts.len()) {
            if taken.iter().any(|(t, _)| t == ip) {
                continue;
            }
            let path = self.dir.join(ip.to_string());
            let mut f = match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io("recording an allocation", e)),
            };
            f.write_all(me.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| io("recording an allocation", e))?;
            let _ = fs::write(self.dir.join("last_reserved"), ip.to_string());
            return Ok(*ip);
        }
        Err(CniError::new(IPAM_EXHAUSTED, format!("podCIDR {}: no free address ({} in use)", self.cidr, taken.len())))
    }

    /// Releases the attachment's address; releasing nothing is not an error.
    pub fn release(&self, container: &str, ifname: &str) -> Result<Option<Ipv4Addr>, CniError> {
        let _l = self.lock()?;
        let me = owner(container, ifname);
        let Some((ip, _)) = self.allocations()?.into_iter().find(|(_, o)| *o == me) else { return Ok(None) };
        fs::remove_file(self.dir.join(ip.to_string())).map_err(|e| io("releasing an allocation", e))?;
        Ok(Some(ip))
    }

    /// Releases every allocation whose attachment is not in `valid`; returns what it released.
    pub fn gc(&self, valid: &[(String, String)]) -> Result<Vec<Ipv4Addr>, CniError> {
        let _l = self.lock()?;
        let keep: Vec<String> = valid.iter().map(|(c, i)| owner(c, i)).collect();
        let mut released = Vec::new();
        for (ip, o) in self.allocations()? {
            if !keep.contains(&o) {
                fs::remove_file(self.dir.join(ip.to_string())).map_err(|e| io("releasing an allocation", e))?;
                released.push(ip);
            }
        }
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam(dir: &Path, cidr: &str) -> Ipam {
        Ipam::new(dir, "trellis", cidr.parse().unwrap())
    }

    #[test]
    fn allocate_is_idempotent_skips_the_gateway_and_does_not_reuse_at_once() {
        let d = tempfile::tempdir().unwrap();
        let i = ipam(d.path(), "10.0.0.0/29");
        let a = i.allocate("c1", "eth0").unwrap();
        assert_eq!(a.to_string(), "10.0.0.2");
        assert_eq!(i.allocate("c1", "eth0").unwrap(), a, "a retried ADD gets the same address");
        assert_eq!(i.allocate("c2", "eth0").unwrap().to_string(), "10.0.0.3");
        assert_eq!(i.release("c1", "eth0").unwrap(), Some(a));
        assert_eq!(i.release("c1", "eth0").unwrap(), None, "release is idempotent");
        assert_eq!(i.allocate("c3", "eth0").unwrap().to_string(), "10.0.0.4");
        assert_eq!(
            ipam(d.path(), "10.0.0.0/29").find("c2", "eth0").unwrap().map(|a| a.to_string()),
            Some("10.0.0.3".into())
        );
    }

    #[test]
    fn exhaustion_names_the_cidr() {
        let d = tempfile::tempdir().unwrap();
        let i = ipam(d.path(), "10.0.0.0/30");
        i.allocate("c1", "eth0").unwrap();
        let e = i.allocate("c2", "eth0").unwrap_err();
        assert_eq!(e.code, IPAM_EXHAUSTED);
        assert!(e.msg.contains("10.0.0.0/30"), "{}", e.msg);
    }

    #[test]
    fn gc_keeps_valid_attachments_only() {
        let d = tempfile::tempdir().unwrap();
        let i = ipam(d.path(), "10.0.0.0/24");
        for c in ["a", "b", "c"] {
            i.allocate(c, "eth0").unwrap();
        }
        let released = i.gc(&[("b".into(), "eth0".into())]).unwrap();
        assert_eq!(released.len(), 2);
        assert!(i.find("b", "eth0").unwrap().is_some());
        assert!(i.find("a", "eth0").unwrap().is_none());
    }

    #[test]
    fn concurrent_allocations_never_collide() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        let handles: Vec<_> = (0..16)
            .map(|n| {
                let dir = dir.clone();
                std::thread::spawn(move || ipam(&dir, "10.0.0.0/24").allocate(&format!("c{n}"), "eth0").unwrap())
            })
            .collect();
        let mut ips: Vec<Ipv4Addr> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 16);
    }
}
