//! Work inside a pod's network namespace from ztunnel's own (node) namespace.
//!
//! A socket belongs to the namespace it was created in, whatever thread later uses it. So each
//! enrolled pod gets one small thread that enters the pod's namespace once and then only creates
//! sockets (and spawns `nft`) on request; the proxy itself runs on the ordinary runtime threads.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// A handle on a network namespace. Dropping it ends its worker thread.
pub struct Netns {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netns").field("path", &self.path).finish()
    }
}

/// Opens `path` only if it is a network namespace file. Non-blocking, so a FIFO or a device
/// given as a pod's netns (the agent socket takes any path) fails at once instead of hanging the
/// enrollment that opens it.
pub fn open_namespace_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(err)?;
    // SAFETY: fstatfs on an open fd, writing into a zeroed statfs we own.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // NS_GET_NSTYPE (linux/nsfs.h): which kind of namespace an nsfs file is.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an argument-less ioctl on an open fd, asked only of nsfs files.
    let is_net =
        fs.f_type == libc::NSFS_MAGIC && unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) } == libc::CLONE_NEWNET;
    if !is_net {
        let msg = format!("{} is not a network namespace (a bind mount of /proc/<pid>/ns/net)", path.display());
        return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    }
    Ok(file)
}

impl Netns {
    /// Opens the namespace at `path` (e.g. `/var/run/netns/x` or `/proc/<pid>/ns/net`) and starts
    /// its worker. Fails if the path is not a network namespace.
    pub fn open(path: &Path) -> io::Result<Netns> {
        let file = open_namespace_file(path)?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        std::thread::Builder::new().name("netns".into()).stack_size(256 << 10).spawn(move || {
            // SAFETY: setns on a valid, open namespace fd affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            let entered = if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            drop(file);
            if ok {
                while let Ok(job) = rx.recv() {
                    job();
                }
            }
        })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Netns { path: path.to_path_buf(), jobs }),
            Ok(Err(e)) => Err(io::Error::new(
                e.kind(),
                format!("{} is not a network namespace we can enter: {e}", path.display()),
            )),
            Err(_) => Err(io::Error::other("netns worker died")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` inside the namespace and returns its result.
    pub async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("netns worker stopped"))?;
        rx.await.map_err(|_| io::Error::other("netns worker stopped"))?
    }

    /// Like [`run`](Self::run), for callers outside a runtime.
    pub fn run_blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("netns worker stopped"))?;
        rx.recv().map_err(|_| io::Error::other("netns worker stopped"))?
    }
}
