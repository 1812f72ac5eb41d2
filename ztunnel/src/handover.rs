//! Upgrading ztunnel in place: a newer ztunnel started next to the running one takes its pods
//! over ([`take_over`]), and the running one takes them back if the newer one goes away before
//! or after moving in ([`take_back_when_abandoned`]).
//!
//! Who may act is decided by the start lock ([`agent::lock_start`]): a starting ztunnel holds it
//! from before it binds anything until its agent socket is in place, and a take-back holds it
//! while it looks and acts. The kernel drops the lock with the process that held it, so "the path
//! is still the old one's and nobody holds the lock" means the newer ztunnel is gone without
//! having moved in. The wire side (the `handover` request and its answer lines) is in
//! [`agent`].

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::agent::{self, Agent, Bound, HandedListener, Inherited, Request, Response};
use crate::lock;
use crate::log_budget::warn_limited;

/// What a starting ztunnel reads from the running one at most: far above any node's pods.
const MAX_HANDOVER_BYTES: usize = 16 << 20;
const MAX_HANDOVER_LISTENERS: usize = 3 * 16384;

/// How long a starting ztunnel waits for the running one to hand over.
pub(crate) const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Where the ztunnel that handed over answered: the agent socket, or beside it.
    pub from: std::path::PathBuf,
    pub pods: Vec<Inherited>,
    /// The node ports asked for, each with its listening socket (not yet checked, see
    /// [`crate::node_ports::adopt`]).
    pub node: Vec<(SocketAddr, OwnedFd)>,
}

/// Asks the ztunnel listening on `path`, if any, to hand its pods over, and the node ports at
/// `ports` (which this one could not bind). Call before loading the registry, so that it holds
/// the running one's final state.
///
/// If nothing answers at `path` (the ztunnel that moved in there died), the one it took over
/// from may still run, handed over, listening at [`agent::handed_path`]: that one is asked.
pub async fn take_over(path: &Path, ports: &[SocketAddr]) -> TakeOver {
    let gone = |e: &std::io::Error| matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused);
    let handed = agent::handed_path(path);
    let (mut s, path) = match UnixStream::connect(path).await {
        Ok(s) => (s, path),
        Err(e) if gone(&e) => match UnixStream::connect(&handed).await {
            Ok(s) => (s, handed.as_path()),
            Err(e) if gone(&e) => return TakeOver::NoneRunning,
            Err(e) => return TakeOver::Refused(format!("{}: {e}", handed.display())),
        },
        Err(e) => return TakeOver::Refused(format!("{}: {e}", path.display())),
    };
    match tokio::time::timeout(HANDOVER_TIMEOUT, ask_handover(&mut s, ports)).await {
        Ok(Ok(handed)) => TakeOver::HandedOver(Handed { from: path.to_path_buf(), ..handed }),
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

/// How often a ztunnel that handed its pods over checks that the newer one is still there.
const TAKE_BACK_CHECK: Duration = Duration::from_secs(2);
/// How many checks in a row must find the newer one's socket refusing connections: one refusal
/// can be a restart of its accept loop, never a reason to rename over a live process's socket.
const REFUSALS_TO_TAKE_BACK: u32 = 2;

/// After a hand-over, takes the pods back if the newer ztunnel is gone. Otherwise no ztunnel
/// would manage the node's pods: new pods could not start, and label changes would wait. Gone
/// means: the agent socket's path is still this one's and the start lock is free (the newer one
/// exited before moving in), or the newer one moved in and its socket refuses connections. While
/// the newer one holds the start lock it is alive and still starting, so this one waits, however
/// long that takes: taking back under it would leave two ztunnels managing the pods.
///
/// `bound` is this ztunnel's socket; it is replaced when the path has to be bound again. The
/// node ports handed over are served again on this one's copies of their sockets, so nothing
/// waiting in their queues is lost.
pub async fn take_back_when_abandoned(
    agent: Arc<Agent>,
    bound: Arc<Mutex<Bound>>,
    changes: tokio::sync::watch::Receiver<u64>,
) {
    let pods = &agent.pods;
    let path = lock(&bound).path().to_path_buf();
    let (mut refusals, mut starting_since) = (0, None);
    loop {
        tokio::time::sleep(TAKE_BACK_CHECK).await;
        if !pods.handed_over() {
            (refusals, starting_since) = (0, None);
            continue;
        }
        let ours = lock(&bound).is_current();
        if !ours {
            // It moved in. Looking needs no lock, so that a later ztunnel's start never collides
            // with this check; acting does.
            if !refuses(&path).await {
                refusals = 0;
                continue;
            }
            refusals += 1;
            if refusals < REFUSALS_TO_TAKE_BACK {
                continue;
            }
        }
        // Nobody else starts or takes back while this one acts, until the pods and ports are back.
        let mut start_lock = match agent::lock_start(&path) {
            Ok(l) => l,
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                let since = *starting_since.get_or_insert_with(tokio::time::Instant::now);
                warn_limited!("a newer ztunnel is still starting; the pods stay handed over", waiting = ?since.elapsed());
                continue;
            }
            Err(e) => {
                warn_limited!("cannot take the start lock to check on the newer ztunnel", error = %e);
                continue;
            }
        };
        starting_since = None;
        if !ours {
            // A ztunnel may have moved in between the last look and taking the lock: look once
            // more before binding over it.
            if !refuses(&path).await {
                refusals = 0;
                continue;
            }
            match agent::bind(&path, start_lock).and_then(agent::Unpublished::publish) {
                Ok((listener, b, l)) => {
                    start_lock = l;
                    // The socket replaced stops accepting as it drops.
                    *lock(&bound) = agent::serve_on(&agent, listener, b);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot bind the agent socket to take the pods back; retrying");
                    continue;
                }
            }
        } else if !lock(&bound).is_current() {
            // A newer ztunnel moved in between the look and taking the lock; it is checked on
            // from the next round. Otherwise the path is still this one's and nobody is starting:
            // the newer one exited before moving in.
            continue;
        }
        tracing::warn!(path = %path.display(), moved_in = !ours, "the ztunnel that took the pods over is gone; taking them back");
        pods.take_back().await;
        tokio::spawn(pods.clone().run(changes.clone()));
        agent.ports.resume();
        agent.stop_listening_as_handed();
        drop(start_lock);
        refusals = 0;
    }
}

/// Whether the socket at `path` refuses connections (nothing listens there, or nothing is
/// there). One that answers, or is too busy to within a second, has a live process behind it.
async fn refuses(path: &Path) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(path)).await,
        Ok(Err(e)) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::UnixListener;

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
                agent::send_line(&mut w, line.as_bytes(), &fds).await.unwrap();
            }
            asked
        })
    }

    fn listener() -> OwnedFd {
        OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
    }

    fn port_of(fd: &OwnedFd) -> u16 {
        socket2::SockRef::from(fd).local_addr().unwrap().as_socket().unwrap().port()
    }

    #[tokio::test]
    async fn take_over_asks_the_running_ztunnel_and_receives_its_listeners() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        assert!(matches!(take_over(&path, &[]).await, TakeOver::NoneRunning), "no socket");
        drop(UnixListener::bind(&path).unwrap());
        assert!(matches!(take_over(&path, &[]).await, TakeOver::NoneRunning), "a stale socket nobody listens on");

        // The stale socket is a newer ztunnel that died after moving in; the one it took over
        // from still runs, handed over, and answers beside the path.
        let last = r#"{"ok":true,"listeners":[{"netns":"/n/b","port":15008}]}"#;
        let asked = answering(&agent::handed_path(&path), vec![(format!("{last}\n"), vec![listener()])]).await;
        let TakeOver::HandedOver(Handed { pods: got, .. }) = take_over(&path, &[]).await else {
            panic!("the ztunnel that handed over was not asked")
        };
        assert_eq!(asked.await.unwrap(), "{\"op\":\"handover\"}\n");
        assert_eq!(got.len(), 1);
        std::fs::remove_file(agent::handed_path(&path)).unwrap();
        std::fs::remove_file(&path).unwrap();

        // Two lines: the first says more follow; the sockets come in the order named.
        let first =
            r#"{"ok":true,"listeners":[{"netns":"/n/a","port":15001},{"netns":"/n/a","port":15006}],"more":true}"#;
        let last = r#"{"ok":true,"listeners":[{"netns":"/n/b","port":15008}]}"#;
        let (a1, a6, b8) = (listener(), listener(), listener());
        let ports: Vec<u16> = [&a1, &a6, &b8].map(port_of).to_vec();
        let asked = answering(&path, vec![(format!("{first}\n"), vec![a1, a6]), (format!("{last}\n"), vec![b8])]).await;
        let TakeOver::HandedOver(Handed { pods: got, .. }) = take_over(&path, &[]).await else {
            panic!("not handed over")
        };
        assert_eq!(asked.await.unwrap(), "{\"op\":\"handover\"}\n");
        let named: Vec<_> = got.iter().map(|i| (i.listener.netns.display().to_string(), i.listener.port)).collect();
        assert_eq!(named, [("/n/a".into(), 15001), ("/n/a".into(), 15006), ("/n/b".to_string(), 15008)]);
        let passed: Vec<u16> = got.iter().map(|i| port_of(&i.fd)).collect();
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
        let node_port = port_of(&n);
        let asked = answering(&path, vec![(format!("{node}\n"), vec![n]), (format!("{last}\n"), vec![b8])]).await;
        let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
        let TakeOver::HandedOver(got) = take_over(&path, &[admin]).await else { panic!("not handed over") };
        assert_eq!(asked.await.unwrap(), "{\"op\":\"handover\",\"ports\":[\"127.0.0.1:15000\"]}\n");
        assert_eq!(got.pods.len(), 1);
        assert_eq!(got.pods[0].listener.port, 15008);
        let passed: Vec<_> = got.node.iter().map(|(a, fd)| (*a, port_of(fd))).collect();
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
}
