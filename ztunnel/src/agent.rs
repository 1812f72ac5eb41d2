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
//! `handover` is how a new ztunnel takes over from the one running ([`take_over`]) before it
//! binds the socket: the old one persists its registry, stops managing pods and answers with its
//! pods' listening sockets (`{"ok":true,"listeners":[{netns,port}],"more":…}` lines, each with
//! the sockets attached, see [`crate::fdpass`]). `ports` names the node ports (admin, metrics,
//! readiness) the new one could not bind because the old one holds them: they are passed first
//! (`"node_listeners":[addr]`), and the old one stops serving them ([`NodePorts::hand_over`]). If
//! it does not hold one of them it hands nothing over. From then on it answers `add` and `remove`
//! that still reach it with an error, so the CNI plugin retries them against the new one.

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

use crate::log_budget::warn_limited;
use crate::node_ports::NodePorts;
use crate::pods::{PodInfo, Pods};

/// What the agent socket acts on: the node's pods, and its own ports (passed on in a hand-over).
pub struct Agent {
    pub pods: Arc<Pods>,
    pub ports: Arc<NodePorts>,
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
    /// Sent by a newer ztunnel starting on this node; see [`take_over`].
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
/// What a starting ztunnel reads from the running one at most: far above any node's pods.
const MAX_HANDOVER_BYTES: usize = 16 << 20;
const MAX_HANDOVER_LISTENERS: usize = 3 * 16384;

/// How long a starting ztunnel waits for the running one to hand over.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`take_over`] found at the socket path.
#[derive(Debug)]
pub enum TakeOver {
    /// Nothing answers there: no ztunnel is running (or it died).
    NoneRunning,
    /// The running ztunnel persisted its registry, stopped managing pods, and passed the
    /// listening sockets of the pods it serves and of the node ports asked for.
    HandedOver(Handed),
    /// A ztunnel answers but did not hand over (an older version, or it failed): the pods it
    /// serves keep its listeners, and are enrolled here once it exits.
    Refused(String),
    /// The hand-over may have happened, but its answer was lost (a timeout, a broken or
    /// malformed answer): the running one may have stopped managing the pods without this one
    /// holding their listeners. This one must exit, so that the running one takes the pods back
    /// ([`take_back_when_abandoned`]) and a later start asks again.
    Broken(String),
}

/// What a hand-over passed.
#[derive(Debug, Default)]
pub struct Handed {
    pub pods: Vec<Inherited>,
    /// The node ports asked for, each with its listening socket (not yet checked, see
    /// [`crate::node_ports::adopt`]).
    pub node: Vec<(SocketAddr, OwnedFd)>,
}

/// Asks the ztunnel listening on `path`, if any, to hand its pods over, and the node ports at
/// `ports` (which this one could not bind). Call before loading the registry, so that it holds
/// the running one's final state.
pub async fn take_over(path: &Path, ports: &[SocketAddr]) -> TakeOver {
    let mut s = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            return TakeOver::NoneRunning
        }
        Err(e) => return TakeOver::Refused(format!("{}: {e}", path.display())),
    };
    match tokio::time::timeout(HANDOVER_TIMEOUT, ask_handover(&mut s, ports)).await {
        Ok(Ok(handed)) => TakeOver::HandedOver(handed),
        Ok(Err(Failed::Refused(why))) => TakeOver::Refused(format!("{}: {why}", path.display())),
        Ok(Err(Failed::Broken(e))) => TakeOver::Broken(format!("{}: {e}", path.display())),
        Err(_) => TakeOver::Broken(format!("no complete answer from {} within {HANDOVER_TIMEOUT:?}", path.display())),
    }
}

/// How asking for a hand-over failed.
enum Failed {
    /// The running ztunnel said no before handing anything over.
    Refused(String),
    /// Anything else: whether it handed over is unknown.
    Broken(std::io::Error),
}

impl From<std::io::Error> for Failed {
    fn from(e: std::io::Error) -> Failed {
        Failed::Broken(e)
    }
}

/// A socket's name in a hand-over answer.
enum Named {
    Node(SocketAddr),
    Pod(HandedListener),
}

async fn ask_handover(s: &mut UnixStream, ports: &[SocketAddr]) -> Result<Handed, Failed> {
    use std::os::fd::AsFd;
    let mut ask = serde_json::to_vec(&Request::Handover { ports: ports.to_vec() }).map_err(std::io::Error::other)?;
    ask.push(b'\n');
    s.write_all(&ask).await?;
    let (mut bytes, mut fds, mut listeners) = (Vec::new(), Vec::new(), Vec::new());
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // Complete lines first: the last one says whether more follow.
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = bytes.drain(..=end).collect();
            let r: Response = serde_json::from_slice(&line).map_err(|e| {
                std::io::Error::other(format!("unreadable answer {:?}: {e}", String::from_utf8_lossy(&line).trim()))
            })?;
            if !r.ok {
                let why = r.error.unwrap_or_else(|| "refused".into());
                return Err(match listeners.is_empty() && fds.is_empty() {
                    true => Failed::Refused(why),
                    false => Failed::Broken(std::io::Error::other(format!("refused part-way: {why}"))),
                });
            }
            listeners.extend(r.node_listeners.unwrap_or_default().into_iter().map(Named::Node));
            listeners.extend(r.listeners.unwrap_or_default().into_iter().map(Named::Pod));
            if !r.more {
                if listeners.len() != fds.len() {
                    let msg = format!("{} listeners named but {} sockets passed", listeners.len(), fds.len());
                    return Err(std::io::Error::other(msg).into());
                }
                let mut handed = Handed::default();
                for (name, fd) in listeners.into_iter().zip(fds) {
                    match name {
                        Named::Node(addr) => handed.node.push((addr, fd)),
                        Named::Pod(listener) => handed.pods.push(Inherited { listener, fd }),
                    }
                }
                return Ok(handed);
            }
        }
        s.readable().await?;
        let n = match s.try_io(tokio::io::Interest::READABLE, || crate::fdpass::recv(s.as_fd(), &mut buf, &mut fds)) {
            Ok(0) => return Err(std::io::Error::other("the running ztunnel closed the connection mid-answer").into()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        bytes.extend_from_slice(&buf[..n]);
        if bytes.len() > MAX_HANDOVER_BYTES || fds.len() > MAX_HANDOVER_LISTENERS {
            return Err(std::io::Error::other("hand-over answer too large").into());
        }
    }
}

/// Sends one answer line with `fds` attached (all of them go with its first bytes).
async fn send_line(w: &mut tokio::net::unix::OwnedWriteHalf, line: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
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
}

impl Bound {
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

/// How often a ztunnel that handed its pods over checks that the newer one is still there.
const TAKE_BACK_CHECK: Duration = Duration::from_secs(2);
/// How long a newer ztunnel may take from the hand-over to binding the agent socket's path.
const PUBLISH_GRACE: Duration = Duration::from_secs(30);

/// After a hand-over, takes the pods back if the newer ztunnel is gone: its socket no longer
/// answers (it died), or it never bound the path. Otherwise no ztunnel would manage the node's
/// pods: new pods could not start, and label changes would wait. `bound` is this ztunnel's
/// socket; it is replaced when the path has to be bound again. The node ports handed over are
/// bound again too, retried at each check while one is still held.
pub async fn take_back_when_abandoned(
    agent: Arc<Agent>,
    bound: Arc<std::sync::Mutex<Bound>>,
    changes: tokio::sync::watch::Receiver<u64>,
) {
    let pods = &agent.pods;
    let mut handed_at = None;
    loop {
        tokio::time::sleep(TAKE_BACK_CHECK).await;
        if !pods.handed_over() {
            handed_at = None;
            if let Err(e) = agent.ports.reopen() {
                warn_limited!("node ports still held after taking the pods back; retrying", error = %e);
            }
            continue;
        }
        let since = *handed_at.get_or_insert_with(tokio::time::Instant::now);
        let (path, ours) = {
            let b = bound.lock().unwrap_or_else(|e| e.into_inner());
            (b.path.clone(), b.is_current())
        };
        let abandoned = if ours {
            since.elapsed() >= PUBLISH_GRACE
        } else {
            !matches!(tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(&path)).await, Ok(Ok(_)))
        };
        if !abandoned {
            continue;
        }
        if !ours {
            let rebound = bind(&path).and_then(Unpublished::publish);
            match rebound {
                Ok((listener, b)) => {
                    *bound.lock().unwrap_or_else(|e| e.into_inner()) = b;
                    tokio::spawn(serve(listener, agent.clone()));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot bind the agent socket to take the pods back; retrying");
                    continue;
                }
            }
        }
        tracing::warn!(path = %path.display(), "the ztunnel that took the pods over is gone; taking them back");
        pods.take_back().await;
        tokio::spawn(pods.clone().run(changes.clone()));
        if let Err(e) = agent.ports.reopen() {
            warn_limited!("node ports still held after taking the pods back; retrying", error = %e);
        }
        handed_at = None;
    }
}

/// A socket bound beside the agent socket's path, not yet in its place.
pub struct Unpublished {
    listener: UnixListener,
    tmp: PathBuf,
    path: PathBuf,
    /// Held from binding until the socket is in place, so that two ztunnels starting at once do
    /// not bind, ask and publish over each other.
    _starting: std::fs::File,
}

/// `path` with `suffix` appended.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Binds the socket beside `path`: everything that can fail about it fails here, before a running
/// ztunnel is asked to hand over. Fails if another ztunnel is starting with the same path.
pub fn bind(path: &Path) -> std::io::Result<Unpublished> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let lock_path = beside(path, ".lock");
    let starting = std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&lock_path)?;
    // SAFETY: flock on a file we hold open; the lock goes with the descriptor.
    if unsafe { libc::flock(starting.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == ErrorKind::WouldBlock {
            let msg = format!("another ztunnel is starting with this agent socket (it holds {})", lock_path.display());
            return Err(std::io::Error::new(ErrorKind::AddrInUse, msg));
        }
        return Err(e);
    }
    let tmp = beside(path, ".new");
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    Ok(Unpublished { listener, tmp, path: path.to_path_buf(), _starting: starting })
}

impl Unpublished {
    /// Moves the socket to its path, replacing a stale one or that of a ztunnel that handed over.
    pub fn publish(self) -> std::io::Result<(UnixListener, Bound)> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(&self.tmp)?;
        std::fs::rename(&self.tmp, &self.path)?;
        Ok((self.listener, Bound { path: self.path, dev_ino: (m.dev(), m.ino()) }))
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
            handle(&line, &agent).await
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

async fn handle(line: &str, agent: &Agent) -> Answer {
    let pods = &agent.pods;
    let one = |r: Response| vec![(r, vec![])];
    let fail = |e: String| one(Response { error: Some(e), ..Default::default() });
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return fail(format!("invalid request: {e}")),
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
        Request::Handover { ports } => {
            // The ports first: if one cannot be handed over, neither are the pods.
            let node = match agent.ports.hand_over(&ports) {
                Ok(node) => node,
                Err(e) => return fail(format!("no hand-over: {e}")),
            };
            let handed = pods.hand_over();
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

    /// Whatever listens at `path`, standing in for the running ztunnel: reads one request and
    /// answers with `lines`, each with the sockets to attach.
    async fn answering(path: &Path, lines: Vec<(String, Vec<OwnedFd>)>) -> tokio::task::JoinHandle<String> {
        let l = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut asked = String::new();
            BufReader::new(r).read_line(&mut asked).await.unwrap();
            for (line, fds) in lines {
                send_line(&mut w, line.as_bytes(), &fds).await.unwrap();
            }
            asked
        })
    }

    fn listener() -> OwnedFd {
        OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
    }

    #[tokio::test]
    async fn take_over_asks_the_running_ztunnel_and_receives_its_listeners() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        assert!(matches!(take_over(&path, &[]).await, TakeOver::NoneRunning), "no socket");
        drop(UnixListener::bind(&path).unwrap());
        assert!(matches!(take_over(&path, &[]).await, TakeOver::NoneRunning), "a stale socket nobody listens on");
        std::fs::remove_file(&path).unwrap();

        // Two lines: the first says more follow; the sockets come in the order named.
        let first =
            r#"{"ok":true,"listeners":[{"netns":"/n/a","port":15001},{"netns":"/n/a","port":15006}],"more":true}"#;
        let last = r#"{"ok":true,"listeners":[{"netns":"/n/b","port":15008}]}"#;
        let (a1, a6, b8) = (listener(), listener(), listener());
        let ports: Vec<u16> = [&a1, &a6, &b8]
            .iter()
            .map(|f| socket2::SockRef::from(f).local_addr().unwrap().as_socket().unwrap().port())
            .collect();
        let asked = answering(&path, vec![(format!("{first}\n"), vec![a1, a6]), (format!("{last}\n"), vec![b8])]).await;
        let TakeOver::HandedOver(Handed { pods: got, .. }) = take_over(&path, &[]).await else {
            panic!("not handed over")
        };
        assert_eq!(asked.await.unwrap(), "{\"op\":\"handover\"}\n");
        let named: Vec<_> = got.iter().map(|i| (i.listener.netns.display().to_string(), i.listener.port)).collect();
        assert_eq!(named, [("/n/a".into(), 15001), ("/n/a".into(), 15006), ("/n/b".to_string(), 15008)]);
        let passed: Vec<u16> = got
            .iter()
            .map(|i| socket2::SockRef::from(&i.fd).local_addr().unwrap().as_socket().unwrap().port())
            .collect();
        assert_eq!(passed, ports, "each socket is the one named at its place");
        std::fs::remove_file(&path).unwrap();

        // Names without sockets are not zipped short; whether the running one let go is then
        // unknown, so the starting one must not go on as if it had been refused.
        let _short = answering(&path, vec![(format!("{last}\n"), vec![])]).await;
        match take_over(&path, &[]).await {
            TakeOver::Broken(why) => assert!(why.contains("1 listeners named but 0 sockets passed"), "{why}"),
            other => panic!("{other:?}"),
        }
        std::fs::remove_file(&path).unwrap();
        // Likewise an answer cut off, or turned into a refusal, after a first line that handed over.
        for (cut, expect) in [
            (vec![(format!("{first}\n"), vec![listener(), listener()])], "closed the connection mid-answer"),
            (
                vec![
                    (format!("{first}\n"), vec![listener(), listener()]),
                    ("{\"ok\":false,\"error\":\"oops\"}\n".to_string(), vec![]),
                ],
                "refused part-way: oops",
            ),
        ] {
            let _cut = answering(&path, cut).await;
            match take_over(&path, &[]).await {
                TakeOver::Broken(why) => assert!(why.contains(expect), "{why}"),
                other => panic!("{other:?}"),
            }
            std::fs::remove_file(&path).unwrap();
        }

        // Node ports asked for come first, on a line of their own, and are told apart from pods'.
        let node = r#"{"ok":true,"node_listeners":["127.0.0.1:15000"],"more":true}"#;
        let (n, b8) = (listener(), listener());
        let node_port = socket2::SockRef::from(&n).local_addr().unwrap().as_socket().unwrap().port();
        let asked = answering(&path, vec![(format!("{node}\n"), vec![n]), (format!("{last}\n"), vec![b8])]).await;
        let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
        let TakeOver::HandedOver(got) = take_over(&path, &[admin]).await else { panic!("not handed over") };
        assert_eq!(asked.await.unwrap(), "{\"op\":\"handover\",\"ports\":[\"127.0.0.1:15000\"]}\n");
        assert_eq!(got.pods.len(), 1);
        assert_eq!(got.pods[0].listener.port, 15008);
        let passed: Vec<_> = got
            .node
            .iter()
            .map(|(a, fd)| (*a, socket2::SockRef::from(fd).local_addr().unwrap().as_socket().unwrap().port()))
            .collect();
        assert_eq!(passed, [(admin, node_port)]);
        std::fs::remove_file(&path).unwrap();

        // A ztunnel from before hand-overs existed rejects the request.
        let older = r#"{"ok":false,"error":"invalid request: unknown variant `handover`"}"#;
        let _older = answering(&path, vec![(format!("{older}\n"), vec![])]).await;
        match take_over(&path, &[]).await {
            TakeOver::Refused(why) => assert!(why.contains("unknown variant"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn two_ztunnels_cannot_start_on_one_socket_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _in_rt = rt.enter();
        let first = bind(&path).unwrap();
        let e = bind(&path).err().expect("a second start while the first has not published");
        assert_eq!(e.kind(), ErrorKind::AddrInUse);
        assert!(e.to_string().contains("another ztunnel is starting"), "{e}");
        let _published = first.publish().unwrap();
        let _second = bind(&path).expect("once the first has published, the next may start");
    }

    #[test]
    fn an_exiting_ztunnel_removes_only_its_own_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _in_rt = rt.enter();
        let (_old, old_bound) = bind(&path).unwrap().publish().unwrap();
        let (_new, new_bound) = bind(&path).unwrap().publish().unwrap();
        old_bound.remove_if_ours();
        assert!(path.exists(), "the newer ztunnel's socket must stay");
        new_bound.remove_if_ours();
        assert!(!path.exists());
    }
}
