//! The process at the other end of the agent socket, held by a pidfd.
//!
//! A ztunnel that handed its pods over must know whether the one it handed over to still runs
//! ([`crate::agent`]). A pid cannot say so in a DaemonSet: each ztunnel pod has its own PID
//! namespace, where the kernel reports the peer's pid as 0, and a pid may be reused. A pidfd
//! (`SO_PEERPIDFD`, Linux 6.5) names the process itself, in any namespace, and becomes readable
//! when it exits. On an older kernel the pid is all there is, and only within one PID namespace.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// pidfs's `f_type` (Linux 6.9): there a pidfd's inode number names one process for good on a
/// 64-bit kernel (a 32-bit one pairs it with a generation, which this does not read).
const PIDFS_MAGIC: libc::c_long = 0x5049_4446;

#[derive(Debug)]
pub struct PeerProcess {
    /// As the kernel reports it in this PID namespace: `None` (0) when the peer is outside it.
    pid: Option<i32>,
    pidfd: Option<OwnedFd>,
}

impl PeerProcess {
    /// The process that connected `sock`, with `pid` from its credentials.
    pub fn of(sock: &impl AsFd, pid: Option<i32>) -> PeerProcess {
        PeerProcess { pid: pid.filter(|p| *p > 0), pidfd: peer_pidfd(sock) }
    }

    /// Whether it still runs. One that exited but was not reaped yet (a killed ztunnel whose
    /// supervisor has not collected it) counts as gone. `None`: the kernel cannot say.
    pub fn runs(&self) -> Option<bool> {
        match (&self.pidfd, self.pid) {
            (Some(fd), _) => Some(!exited(fd)),
            (None, Some(pid)) => Some(pid_runs(pid)),
            (None, None) => None,
        }
    }

    /// Whether `other` is this same process, as far as the kernel can tell.
    pub fn is(&self, other: &PeerProcess) -> bool {
        if let (Some(a), Some(b)) = (self.pid, other.pid) {
            return a == b;
        }
        match (&self.pidfd, &other.pidfd) {
            (Some(a), Some(b)) => pidfs_inode(a).is_some_and(|i| Some(i) == pidfs_inode(b)),
            _ => false,
        }
    }
}

impl std::fmt::Display for PeerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "the ztunnel with pid {pid}"),
            None => f.write_str("a ztunnel in another PID namespace"),
        }
    }
}

fn peer_pidfd(sock: &impl AsFd) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    // SAFETY: on success the kernel installed a new descriptor that nothing else owns.
    (r == 0 && fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pidfd polls readable once its process has exited.
fn exited(pidfd: &OwnedFd) -> bool {
    let mut p = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLIN | libc::POLLHUP) != 0
}

fn pidfs_inode(pidfd: &OwnedFd) -> Option<u64> {
    // SAFETY: fstatfs and fstat fill the zeroed structs they are given.
    unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(pidfd.as_raw_fd(), &mut fs) != 0 || fs.f_type as libc::c_long != PIDFS_MAGIC {
            return None;
        }
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(pidfd.as_raw_fd(), &mut st) == 0).then_some(st.st_ino)
    }
}

/// Whether process `pid` runs: it exists and is not a zombie waiting to be reaped.
fn pid_runs(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command name, which is in parentheses and may contain anything.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z" | "X" | "x"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    use std::process::{Command, Stdio};

    /// A child that connects to `path` and then waits until its stdin closes.
    fn connect_from_child(path: &std::path::Path) -> std::process::Child {
        Command::new("python3")
            .args([
                "-c",
                "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); sys.stdin.read()",
            ])
            .arg(path)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Whether the running kernel is at least `major.minor`: what it lacks is checked to fall
    /// back, what it has is checked to be used.
    fn kernel_at_least(major: u32, minor: u32) -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut parts = release.split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
    }

    fn wait_zombie(pid: u32) {
        while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z")) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn a_peer_runs_until_it_exits_even_if_nobody_reaped_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let mut child = connect_from_child(&path);
        let (sock, _) = listener.accept().unwrap();
        let pid = Some(child.id() as i32);
        let seen = PeerProcess::of(&sock, pid);
        assert_eq!(seen.pidfd.is_some(), kernel_at_least(6, 5), "Linux 6.5+ names the peer by a pidfd");
        // What a ztunnel in another PID namespace sees: no pid, only the pidfd (if any).
        let hidden = PeerProcess { pid: None, pidfd: seen.pidfd.as_ref().map(|f| f.try_clone().unwrap()) };
        // And on a kernel without SO_PEERPIDFD, only the pid.
        let by_pid = PeerProcess { pid, pidfd: None };
        let known = if hidden.pidfd.is_some() { Some(true) } else { None };
        assert_eq!((seen.runs(), hidden.runs(), by_pid.runs()), (Some(true), known, Some(true)));
        assert_eq!(hidden.is(&seen), kernel_at_least(6, 9), "pidfs (6.9+) names the process by inode");
        assert_eq!(hidden.to_string(), "a ztunnel in another PID namespace");

        drop(child.stdin.take());
        let mut sink = Vec::new();
        let _ = (&sock).read_to_end(&mut sink);
        wait_zombie(child.id());
        let gone = known.map(|_| false);
        assert_eq!((seen.runs(), hidden.runs(), by_pid.runs()), (Some(false), gone, Some(false)), "a zombie is gone");
        child.wait().unwrap();
        assert_eq!(by_pid.runs(), Some(false), "a reaped process is gone");
        assert_eq!(PeerProcess { pid: None, pidfd: None }.runs(), None);
    }

    #[test]
    fn two_peers_are_told_apart_without_their_pids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let (mut a, mut b) = (connect_from_child(&path), connect_from_child(&path));
        let (sa, _) = listener.accept().unwrap();
        let (sb, _) = listener.accept().unwrap();
        let pa = PeerProcess::of(&sa, None);
        let pb = PeerProcess::of(&sb, None);
        assert_eq!(pa.is(&pa), kernel_at_least(6, 9), "pidfs (6.9+) names the process by inode");
        assert!(!pa.is(&pb));
        assert!(!PeerProcess { pid: None, pidfd: None }.is(&PeerProcess { pid: None, pidfd: None }));
        for c in [&mut a, &mut b] {
            drop(c.stdin.take());
            c.wait().unwrap();
        }
    }
}
