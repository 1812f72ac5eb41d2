//! The node agent's Unix socket: how the CNI plugin (or an operator) registers pods.
//!
//! One JSON object per line, one answer per line:
//!
//! ```text
//! {"op":"add","namespace":"demo","name":"client","netns":"/var/run/netns/client","ip":"10.244.1.5"}
//! {"op":"remove","namespace":"demo","name":"client"}
//! {"op":"list"}
//! {"op":"handover","ports":["127.0.0.1:15000"]}
//! → {"ok":true,"pods":[{uid,netns,enrolled,reason}]} | {"ok":false,"error":"…"}
//! ```
//!
//! `add` registers the pod; whether it is meshed follows its labels (see [`crate::pods`]), and
//! the answer says which. When ztunnel cannot tell yet (the control plane does not know the pod,
//! or enrolling it failed), the answer is an error, so the pod does not start uncaptured. `ip`
//! (optional) is the address the CNI plugin assigned, which the control plane learns only later.
//! The socket is created with mode 0600: registering a pod changes its traffic, so only root may.
//!
//! `handover` is how a new ztunnel takes over from the one running ([`crate::handover`]) before
//! it moves its own socket into place: the old one persists its registry, stops managing pods and
//! answers with its pods' listening sockets (`{"ok":true,"listeners":[{netns,port}],"more":…}`
//! lines, each with the sockets attached, see [`crate::fdpass`]). `ports` names the node ports
//! (admin, metrics, readiness) the new one could not bind because the old one holds them: they
//! are passed first (`"node_listeners":[addr]`), and the old one stops serving them
//! ([`NodePorts::hand_over`]). If it does not hold one of them it hands nothing over. From then
//! on it answers `add` and `remove` that still reach it with an error, so the CNI plugin retries
//! them against the new one.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::lock;
use crate::log_budget::warn_limited;
use crate::node_ports::NodePorts;
use crate::peer_process::PeerProcess;
use crate::pods::{PodInfo, Pods};

/// What the agent socket acts on: the node's pods, and its own ports (passed on in a hand-over).
pub struct Agent {
    pub pods: Arc<Pods>,
    pub ports: Arc<NodePorts>,
    /// The agent socket's path.
    pub path: PathBuf,
    /// While handed over, a second socket at `<path>.handed`, where a ztunnel restarted after
    /// the newer one died finds this one when the path has nobody behind it.
    handed: std::sync::Mutex<Option<Bound>>,
    /// The process this one last handed over to: while it runs, nobody else gets the pods from
    /// here.
    taker: std::sync::Mutex<Option<Arc<PeerProcess>>>,
}

impl Agent {
    pub fn new(pods: Arc<Pods>, ports: Arc<NodePorts>, path: PathBuf) -> Agent {
        Agent { pods, ports, path, handed: std::sync::Mutex::new(None), taker: std::sync::Mutex::new(None) }
    }

    /// The process the pods are handed over to, if it still runs and is not `asking`: a ztunnel
    /// whose agent socket vanished while it runs must not get a rival. When the kernel cannot
    /// say (before Linux 6.5, across PID namespaces), nobody is in the way.
    fn running_taker(&self, asking: &PeerProcess) -> Option<Arc<PeerProcess>> {
        let taker = lock(&self.taker).clone()?;
        (self.pods.handed_over() && !taker.is(asking) && taker.runs() == Some(true)).then_some(taker)
    }

    /// Listens at `<path>.handed` too, once this ztunnel has handed over.
    fn listen_as_handed(self: &Arc<Self>) {
        let mut handed = lock(&self.handed);
        if handed.as_ref().is_some_and(Bound::is_current) {
            return;
        }
        let path = handed_path(&self.path);
        match bind_private(&path) {
            Ok((listener, b)) => *handed = Some(serve_on(self, listener, b)),
            Err(e) => tracing::warn!(path = %path.display(), error = %e,
                "cannot listen where a restarted ztunnel would look for this one; it will not find it"),
        }
    }

    /// Stops listening at `<path>.handed` (the pods are taken back, or this ztunnel exits).
    pub fn stop_listening_as_handed(&self) {
        if let Some(b) = lock(&self.handed).take() {
            b.remove_if_ours();
        }
    }
}

/// Where a ztunnel that handed over also listens ([`Agent`]).
pub fn handed_path(path: &Path) -> PathBuf {
    beside(path, ".handed")
}

const MAX_LINE: usize = 4096;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Deserialize, Serialize, Debug)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Add {
        namespace: String,
        name: String,
        netns: PathBuf,
        #[serde(default)]
        ip: Option<std::net::Ipv4Addr>,
        /// The sandbox (CNI_CONTAINERID), so that a late remove for an older one is told apart.
        #[serde(default)]
        container: Option<String>,
    },
    Remove {
        namespace: String,
        name: String,
        #[serde(default)]
        container: Option<String>,
    },
    /// A struct variant, so that `deny_unknown_fields` applies to it too: a unit variant of an
    /// internally tagged enum accepts any extra field.
    List {},
    /// Sent by a newer ztunnel starting on this node; see [`crate::handover::take_over`].
    Handover {
        /// Node ports the newer ztunnel needs from this one. Left out when none, so that a
        /// ztunnel from before node ports were passed can still hand over.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ports: Vec<SocketAddr>,
    },
}

#[derive(Deserialize, Serialize, Debug, Default)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<Vec<PodInfo>>,
    /// `handover`: the node ports whose sockets are attached to this line first, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_listeners: Option<Vec<SocketAddr>>,
    /// `handover`: the pods' listening sockets attached to this line (after any node ports), in
    /// order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listeners: Option<Vec<HandedListener>>,
    /// `handover`: more lines with listeners follow.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

/// Which pod and port a socket passed in a hand-over listens for.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
pub struct HandedListener {
    pub netns: PathBuf,
    pub port: u16,
}

/// A listening socket received in a hand-over, not yet checked (see [`crate::fdpass::check_listener`]).
#[derive(Debug)]
pub struct Inherited {
    pub listener: HandedListener,
    pub fd: OwnedFd,
}

/// Listeners per hand-over line: three pods' worth below the kernel's per-message limit.
const LISTENERS_PER_LINE: usize = crate::fdpass::MAX_FDS_PER_MESSAGE / 3 * 3;
/// Sends one answer line with `fds` attached (all of them go with its first bytes).
pub(crate) async fn send_line(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    line: &[u8],
    fds: &[OwnedFd],
) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    if fds.is_empty() {
        return w.write_all(line).await;
    }
    let s: &UnixStream = w.as_ref();
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let sent = loop {
        s.writable().await?;
        match s.try_io(tokio::io::Interest::WRITABLE, || crate::fdpass::send(s.as_fd(), line, &borrowed)) {
            Ok(n) => break n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    w.write_all(&line[sent..]).await
}

/// The bound socket's path, and which file it was, so that exiting removes it only if no newer
/// ztunnel has bound the path since.
pub struct Bound {
    path: PathBuf,
    dev_ino: (u64, u64),
    /// The loop accepting on it, stopped when a take-back binds the path again.
    serving: Option<tokio::task::AbortHandle>,
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Some(s) = self.serving.take() {
            s.abort();
        }
    }
}

impl Bound {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path still names this socket (no newer ztunnel has bound it since).
    pub fn is_current(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.dev_ino)
    }

    pub fn remove_if_ours(&self) {
        if self.is_current() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Starts accepting on `listener`, in place as `bound`; the loop stops when `bound` drops (a
/// take-back that binds the path again replaces it).
pub fn serve_on(agent: &Arc<Agent>, listener: UnixListener, mut bound: Bound) -> Bound {
    bound.serving = Some(tokio::spawn(serve(listener, agent.clone())).abort_handle());
    bound
}

/// A socket bound beside the agent socket's path, not yet in its place.
pub struct Unpublished {
    listener: UnixListener,
    tmp: Beside,
    path: PathBuf,
    starting: StartLock,
}

/// The socket file beside the path, removed if a start fails before moving it into place.
struct Beside(Bound);

impl Drop for Beside {
    fn drop(&mut self) {
        self.0.remove_if_ours();
    }
}

/// Held by a ztunnel from before it binds anything until its agent socket is in place, and by
/// a take-back while it acts, so that two of them never bind, ask and publish over each other.
/// The kernel releases it with the process, however that ends.
pub struct StartLock(std::fs::File);

impl Drop for StartLock {
    /// Unlocks rather than only closing: a child forked meanwhile (`nft`, say) shares the open
    /// file until it execs, and the lock would stay held until then.
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// Takes the start lock for the agent socket at `path` (`<path>.lock`), or fails at once with
/// [`ErrorKind::AddrInUse`] naming it if another ztunnel holds it.
pub fn lock_start(path: &Path) -> std::io::Result<StartLock> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let lock_path = beside(path, ".lock");
    // Not through a symlink, and only a file of this user's: anyone else able to create or hold
    // it could keep every ztunnel from starting.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&lock_path)?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let m = file.metadata()?;
    if !m.file_type().is_file() {
        return Err(std::io::Error::other(format!("{} is not a regular file", lock_path.display())));
    }
    if m.uid() != me {
        return Err(std::io::Error::new(
            ErrorKind::PermissionDenied,
            format!("{} belongs to another user", lock_path.display()),
        ));
    }
    match file.try_lock() {
        Ok(()) => Ok(StartLock(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(std::io::Error::new(
            ErrorKind::AddrInUse,
            format!(
                "another ztunnel is starting, or taking its pods back, with this agent socket (it holds {})",
                lock_path.display()
            ),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// How long a starting ztunnel waits for the start lock. A take-back holds it for well under a
/// second; another start holds it through its hand-over, which may take up to
/// [`crate::handover::HANDOVER_TIMEOUT`] (a slow old ztunnel), so this outlasts one of those.
/// Failing at once would put a supervised ztunnel into back-off.
pub const START_LOCK_WAIT: Duration = Duration::from_secs(30);

/// [`lock_start`], waiting up to `max` while another ztunnel holds the lock.
pub async fn lock_start_waiting(path: &Path, max: Duration) -> std::io::Result<StartLock> {
    let deadline = tokio::time::Instant::now() + max;
    let mut said = false;
    loop {
        match lock_start(path) {
            Err(e) if e.kind() == ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline => {
                if !std::mem::replace(&mut said, true) {
                    tracing::info!(error = %e, max = ?max, "waiting for the start lock");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                return Err(std::io::Error::new(e.kind(), format!("{e}, for more than {max:?}")));
            }
            r => return r,
        }
    }
}

/// `path` with `suffix` appended.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Binds the socket beside `path`: everything that can fail about it fails here, before a running
/// ztunnel is asked to hand over. The start lock is held until [`Unpublished::publish`].
pub fn bind(path: &Path, starting: StartLock) -> std::io::Result<Unpublished> {
    let (listener, tmp) = bind_private(&beside(path, ".new"))?;
    Ok(Unpublished { listener, tmp: Beside(tmp), path: path.to_path_buf(), starting })
}

/// Binds a Unix socket at `path` (replacing a stale file there) that only root may use, and
/// names the file it made. If it cannot be made private, it is removed again.
fn bind_private(path: &Path) -> std::io::Result<(UnixListener, Bound)> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    let m = std::fs::symlink_metadata(path)?;
    let bound = Bound { path: path.to_path_buf(), dev_ino: (m.dev(), m.ino()), serving: None };
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        bound.remove_if_ours();
        return Err(e);
    }
    Ok((listener, bound))
}

impl Unpublished {
    /// Moves the socket to its path, replacing a stale one or that of a ztunnel that handed over.
    /// The start lock comes back, for the caller to hold as long as it is still acting.
    pub fn publish(self) -> std::io::Result<(UnixListener, Bound, StartLock)> {
        std::fs::rename(&self.tmp.0.path, &self.path)?;
        let bound = Bound { path: self.path, dev_ino: self.tmp.0.dev_ino, serving: None };
        Ok((self.listener, bound, self.starting))
    }
}

pub async fn serve(listener: UnixListener, agent: Arc<Agent>) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let agent = agent.clone();
                tokio::spawn(async move { session(s, agent).await });
            }
            Err(e) => {
                tracing::warn!(error = %e, "agent socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn session(stream: UnixStream, agent: Arc<Agent>) {
    // Only this user (root) may register pods or take them over, whatever the socket file's mode
    // (it is 0600 only once created).
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let peer = match stream.peer_cred() {
        Ok(c) if c.uid() == me => Arc::new(PeerProcess::of(&stream, c.pid())),
        Ok(c) => return warn_limited!("agent socket: refusing a peer of another user", uid = c.uid(), pid = ?c.pid()),
        Err(e) => return tracing::warn!(error = %e, "agent socket: cannot tell who the peer is"),
    };
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(MAX_LINE as u64 * 64)).lines();
    loop {
        let line = match tokio::time::timeout(IDLE_TIMEOUT, lines.next_line()).await {
            Ok(Ok(Some(l))) => l,
            _ => return,
        };
        let answer = if line.len() > MAX_LINE {
            vec![(
                Response { error: Some(format!("request longer than {MAX_LINE} bytes")), ..Default::default() },
                vec![],
            )]
        } else {
            handle(&line, &agent, &peer).await
        };
        for (resp, fds) in answer {
            let mut out = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
            out.push(b'\n');
            if let Err(e) = send_line(&mut w, &out, &fds).await {
                if !fds.is_empty() {
                    tracing::warn!(error = %e, "passing the listeners to the newer ztunnel failed");
                }
                return;
            }
        }
    }
}

/// The answer to one request: one line, or several for a hand-over, each with the sockets it
/// carries.
type Answer = Vec<(Response, Vec<OwnedFd>)>;

async fn handle(line: &str, agent: &Arc<Agent>, peer: &Arc<PeerProcess>) -> Answer {
    let pods = &agent.pods;
    let one = |r: Response| vec![(r, vec![])];
    let fail = |e: String| one(Response { error: Some(e), ..Default::default() });
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return fail(format!("invalid request: {e}")),
    };
    let running_taker = match req {
        Request::Handover { .. } => agent.running_taker(peer),
        _ => None,
    };
    match req {
        Request::Add { .. } | Request::Remove { .. } if pods.handed_over() => {
            fail("this ztunnel handed its pods over to a newer one; try again".into())
        }
        Request::Add { namespace, name, netns, ip, container } => {
            match pods.add(&namespace, &name, &netns, ip, container).await {
                Ok(p) => one(Response { ok: true, pods: Some(vec![p]), ..Default::default() }),
                Err(e) => {
                    tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "registration refused");
                    fail(e)
                }
            }
        }
        Request::Remove { namespace, name, container } => {
            pods.remove(&namespace, &name, container.as_deref()).await;
            one(Response { ok: true, ..Default::default() })
        }
        Request::List {} => one(Response { ok: true, pods: Some(pods.list()), ..Default::default() }),
        Request::Handover { .. } if !pods.has_registry() => {
            fail("this ztunnel runs without a pod registry, so it has nothing to hand over".into())
        }
        Request::Handover { .. } if running_taker.is_some() => {
            let taker = running_taker.map_or_else(String::new, |t| t.to_string());
            fail(format!("this ztunnel handed its pods over to {taker}, which still runs"))
        }
        Request::Handover { ports } => {
            // If one of the ports is not this one's, nothing is handed over. They stop accepting
            // here only once the registry is written, so that they are answered meanwhile.
            if let Err(e) = agent.ports.check(&ports) {
                return fail(format!("no hand-over: {e}"));
            }
            let handed = pods.hand_over();
            let node = match agent.ports.hand_over(&ports) {
                Ok(node) => node,
                Err(e) => return fail(format!("the ports went while handing over: {e}")),
            };
            agent.listen_as_handed();
            *lock(&agent.taker) = Some(peer.clone());
            let mut chunks: Answer = Vec::new();
            if !node.is_empty() {
                let (addrs, fds) = node.into_iter().unzip();
                let r = Response { ok: true, node_listeners: Some(addrs), more: true, ..Default::default() };
                chunks.push((r, fds));
            }
            let mut rest = handed.into_iter().peekable();
            loop {
                let (listeners, fds): (Vec<_>, Vec<_>) = rest.by_ref().take(LISTENERS_PER_LINE).unzip();
                let more = rest.peek().is_some();
                chunks.push((Response { ok: true, listeners: Some(listeners), more, ..Default::default() }, fds));
                if !more {
                    return chunks;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        let add = r#"{"op":"add","namespace":"demo","name":"client","netns":"/var/run/netns/c","ip":"10.244.1.5"}"#;
        match serde_json::from_str::<Request>(add) {
            Ok(Request::Add { ip, .. }) => assert_eq!(ip, Some([10, 244, 1, 5].into())),
            other => panic!("{other:?}"),
        }
        let no_ip = r#"{"op":"add","namespace":"demo","name":"client","netns":"/var/run/netns/c"}"#;
        assert!(matches!(serde_json::from_str::<Request>(no_ip), Ok(Request::Add { ip: None, .. })));
        let bad_ip = r#"{"op":"add","namespace":"demo","name":"client","netns":"/n","ip":"10.244.1"}"#;
        assert!(serde_json::from_str::<Request>(bad_ip).unwrap_err().to_string().contains("invalid IPv4 address"));
        assert!(matches!(serde_json::from_str::<Request>(r#"{"op":"list"}"#), Ok(Request::List {})));
        assert!(matches!(serde_json::from_str::<Request>(r#"{"op":"handover"}"#), Ok(Request::Handover { .. })));
        for unknown in [
            r#"{"op":"list","verbose":true}"#,
            r#"{"op":"remove","namespace":"d","name":"c","force":1}"#,
            r#"{"op":"handover","pods":[]}"#,
        ] {
            let r = serde_json::from_str::<Request>(unknown);
            assert!(r.as_ref().is_err_and(|e| e.to_string().contains("unknown field")), "{unknown}: {r:?}");
        }
    }

    /// A directory for an agent socket, and a runtime to bind it in.
    fn socket_dir() -> (tempfile::TempDir, PathBuf, tokio::runtime::Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        (dir, path, tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
    }

    #[test]
    fn two_ztunnels_cannot_start_on_one_socket_at_once() {
        let (dir, path, rt) = socket_dir();
        let _in_rt = rt.enter();
        use std::os::unix::fs::OpenOptionsExt;
        let first = bind(&path, lock_start(&path).unwrap()).unwrap();
        let e = lock_start(&path).err().expect("a second start while the first has not published");
        assert_eq!(e.kind(), ErrorKind::AddrInUse);
        assert!(e.to_string().contains("another ztunnel is starting"), "{e}");
        let (_listener, _bound, lock) = first.publish().unwrap();
        drop(lock);
        let second = lock_start(&path).expect("once the first has published, the next may start");
        // A start that fails before publishing leaves no socket beside the path.
        drop(bind(&path, second).unwrap());
        assert!(!dir.path().join("agent.sock.new").exists());

        // The lock file is never followed through a symlink.
        let lock = dir.path().join("agent.sock.lock");
        std::fs::remove_file(&lock).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &lock).unwrap();
        assert!(lock_start(&path).is_err(), "a symlinked lock file");
        assert!(!dir.path().join("elsewhere").exists());
        // Nor anything but a regular file: a FIFO (with a reader, so that it opens for writing)
        // opens, but is no lock.
        std::fs::remove_file(&lock).unwrap();
        let c_lock = std::ffi::CString::new(lock.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c_lock.as_ptr(), 0o600) }, 0);
        let _reader = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&lock).unwrap();
        let e = lock_start(&path).err().expect("a FIFO as the lock file");
        assert!(e.to_string().contains("is not a regular file"), "{e}");
    }

    #[test]
    fn a_start_waits_a_while_for_the_lock() {
        let (_dir, path, rt) = socket_dir();
        let held = lock_start(&path).unwrap();
        let e = rt.block_on(lock_start_waiting(&path, Duration::from_millis(300))).err().expect("held throughout");
        assert_eq!(e.kind(), ErrorKind::AddrInUse);
        assert!(e.to_string().contains("taking its pods back") && e.to_string().contains("for more than 300ms"), "{e}");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        rt.block_on(lock_start_waiting(&path, Duration::from_secs(10))).expect("taken once the holder lets go");
        release.join().unwrap();
    }

    #[test]
    fn an_exiting_ztunnel_removes_only_its_own_socket() {
        let (_dir, path, rt) = socket_dir();
        let _in_rt = rt.enter();
        let (_old, old_bound, _) = bind(&path, lock_start(&path).unwrap()).unwrap().publish().unwrap();
        let (_new, new_bound, _) = bind(&path, lock_start(&path).unwrap()).unwrap().publish().unwrap();
        old_bound.remove_if_ours();
        assert!(path.exists(), "the newer ztunnel's socket must stay");
        new_bound.remove_if_ours();
        assert!(!path.exists());
    }
}
