//! The node's own TCP ports: admin, metrics and readiness.
//!
//! A newer ztunnel started next to the running one with the same flags cannot bind these while
//! the running one holds them. So a hand-over passes them on together with the pods' listeners
//! ([`NodePorts::hand_over`]): the running one stops accepting on its copy and the newer one
//! serves the same socket, so a probe or scrape waiting in its queue is answered, by the newer
//! one. The running one keeps its copy (without accepting on it) until it exits: if the newer one
//! goes away, the old one serves the same socket again ([`NodePorts::resume`]), so the port is
//! never closed, nothing waiting in its queue is lost, and nobody else can take it in between.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::lock;

/// Serves one port until its listener fails or `stop` fires, then finishes the requests under
/// way.
pub type Serve = Arc<dyn Fn(TcpListener, Stop) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send>> + Send + Sync>;

/// Fires when the port is handed over.
pub type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

#[derive(Default)]
pub struct NodePorts {
    ports: Mutex<Vec<Port>>,
}

struct Port {
    what: &'static str,
    addr: SocketAddr,
    serve: Serve,
    /// This process's copy of the listening socket, kept while a newer ztunnel serves it.
    socket: OwnedFd,
    /// Set while this process accepts on it.
    stop: Option<oneshot::Sender<()>>,
}

/// Binds `addr` the way every node port is bound (address reuse, so that connections of an
/// earlier process still in TIME_WAIT do not block a restart).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Checks that a socket passed in a hand-over is a TCP listener on `addr` in this process's
/// network namespace, and makes it one this process can serve.
pub fn adopt(fd: OwnedFd, addr: SocketAddr) -> io::Result<TcpListener> {
    let local = crate::fdpass::check_listener(fd.as_fd(), std::path::Path::new("/proc/self/ns/net"), addr.port())?;
    if local != addr {
        return Err(io::Error::other(format!("bound to {local}, not {addr}")));
    }
    serve_socket(fd)
}

/// A listening socket's descriptor as a listener this process's runtime can accept on.
fn serve_socket(fd: OwnedFd) -> io::Result<TcpListener> {
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

impl NodePorts {
    /// Starts serving `what` on `listener` (bound here or adopted), and keeps a copy of its
    /// socket to hand over or serve again.
    pub fn start(&self, what: &'static str, listener: TcpListener, serve: Serve) -> io::Result<()> {
        let addr = listener.local_addr()?;
        let socket = listener.as_fd().try_clone_to_owned()?;
        let stop = Some(Self::spawn(what, listener, &serve));
        let mut ports = lock(&self.ports);
        ports.retain(|p| p.addr != addr);
        ports.push(Port { what, addr, serve, socket, stop });
        Ok(())
    }

    fn spawn(what: &'static str, listener: TcpListener, serve: &Serve) -> oneshot::Sender<()> {
        let (stop, stopped) = oneshot::channel::<()>();
        let stopped: Stop = Box::pin(async move {
            let _ = stopped.await;
        });
        let f = serve(listener, stopped);
        tokio::spawn(async move {
            if let Err(e) = f.await {
                tracing::error!(server = what, error = %e, "server stopped");
            }
        });
        stop
    }

    /// Whether every port at `addrs` is one of this ztunnel's (served here, or handed over
    /// before and kept); if not, the error names the first that is not, and what is.
    pub fn check(&self, addrs: &[SocketAddr]) -> Result<(), String> {
        check_in(&lock(&self.ports), addrs)
    }

    /// Gives up the ports at `addrs` for a newer ztunnel: each stops accepting here, and a copy
    /// of its socket is returned, to be passed on. A port handed over before (to a ztunnel that
    /// then went away before this one took it back) is passed again. Either all are handed over
    /// or none is.
    pub fn hand_over(&self, addrs: &[SocketAddr]) -> Result<Vec<(SocketAddr, OwnedFd)>, String> {
        let mut ports = lock(&self.ports);
        check_in(&ports, addrs)?;
        let mut handed = Vec::new();
        for p in ports.iter().filter(|p| addrs.contains(&p.addr)) {
            handed.push((p.addr, p.socket.try_clone().map_err(|e| format!("{} on {}: {e}", p.what, p.addr))?));
        }
        for p in ports.iter_mut().filter(|p| addrs.contains(&p.addr)) {
            if let Some(stop) = p.stop.take() {
                let _ = stop.send(());
                tracing::info!(server = p.what, addr = %p.addr, "handed the port over to the newer ztunnel");
            }
        }
        Ok(handed)
    }

    /// Lets go of this process's copies of the ports it handed over (it is draining, and will not
    /// take them back).
    pub fn release_handed(&self) {
        lock(&self.ports).retain(|p| p.stop.is_some());
    }

    /// Serves again, on this process's copies of their sockets, the ports it handed over, after
    /// the newer ztunnel is gone. A port that cannot be served (out of descriptors) is logged and
    /// tried again at the next call.
    pub fn resume(&self) {
        let mut ports = lock(&self.ports);
        for p in ports.iter_mut().filter(|p| p.stop.is_none()) {
            match p.socket.try_clone().and_then(serve_socket) {
                Ok(l) => {
                    tracing::info!(server = p.what, addr = %p.addr, "serving the port again after taking the pods back");
                    p.stop = Some(Self::spawn(p.what, l, &p.serve));
                }
                Err(e) => tracing::error!(server = p.what, addr = %p.addr, error = %e, "cannot serve the port again"),
            }
        }
    }
}

fn check_in(ports: &[Port], addrs: &[SocketAddr]) -> Result<(), String> {
    match addrs.iter().find(|a| !ports.iter().any(|p| p.addr == **a)) {
        None => Ok(()),
        Some(addr) => {
            let ours: Vec<String> = ports.iter().map(|p| format!("{} on {}", p.what, p.addr)).collect();
            Err(format!("this ztunnel does not listen on {addr} (it has {})", ours.join(", ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers each connection with `reply` and closes it.
    fn replying(reply: &'static str) -> Serve {
        Arc::new(move |l: TcpListener, stop: Stop| {
            Box::pin(async move {
                tokio::pin!(stop);
                loop {
                    tokio::select! {
                        _ = &mut stop => return Ok(()),
                        a = l.accept() => { let (mut s, _) = a?; s.write_all(reply.as_bytes()).await?; }
                    }
                }
            })
        })
    }

    async fn ask(addr: SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn a_port_is_handed_over_whole_or_not_at_all_and_served_again_on_the_same_socket() {
        let old = NodePorts::default();
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        old.start("admin", l, replying("old")).unwrap();
        assert_eq!(ask(addr).await, "old");

        // One address it does not serve: nothing is handed over, and the error says what it serves.
        let elsewhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let e = old.hand_over(&[addr, elsewhere]).unwrap_err();
        assert!(e.contains("127.0.0.1:1") && e.contains(&format!("admin on {addr}")), "{e}");
        assert_eq!(ask(addr).await, "old", "still served here");

        // The newer one adopts the very socket; the old one no longer accepts on it.
        let mut handed = old.hand_over(&[addr]).unwrap();
        assert_eq!(handed.len(), 1);
        // Asked again (the first taker went away before moving in), it passes its kept copy.
        assert_eq!(old.hand_over(&[addr]).unwrap().len(), 1);
        let new = NodePorts::default();
        new.start("admin", adopt(handed.pop().unwrap().1, addr).unwrap(), replying("new")).unwrap();
        for _ in 0..5 {
            assert_eq!(ask(addr).await, "new");
        }

        // The newer one goes: the port stays open (the old one's copy), a connection made
        // meanwhile waits in its queue, and is answered once the old one serves it again.
        drop(new);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let waiting = tokio::spawn(ask(addr));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiting.is_finished());
        assert!(bind(addr).is_err(), "nobody else can take the port meanwhile");
        old.resume();
        assert_eq!(waiting.await.unwrap(), "old");
        assert_eq!(ask(addr).await, "old");
        old.check(&[addr]).unwrap();
    }

    #[test]
    fn only_a_listener_on_the_named_address_is_adopted() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _in = rt.enter();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let other: SocketAddr = format!("127.0.0.2:{}", addr.port()).parse().unwrap();
        let e = adopt(OwnedFd::from(l.try_clone().unwrap()), other).unwrap_err();
        assert!(e.to_string().contains("not 127.0.0.2"), "{e}");
        let stream = std::net::TcpStream::connect(addr).unwrap();
        assert!(adopt(OwnedFd::from(stream), addr).is_err(), "a connected socket is not a listener");
        adopt(OwnedFd::from(l), addr).unwrap();
    }
}
