//! The node's own TCP ports: admin, metrics and readiness.
//!
//! A newer ztunnel started next to the running one with the same flags cannot bind these while
//! the running one holds them. So a hand-over passes them on together with the pods' listeners
//! ([`NodePorts::hand_over`]): the running one stops accepting on its copy and the newer one
//! serves the same socket, so a probe or scrape waiting in its queue is answered, by the newer
//! one. If the newer one dies, the old one binds them again ([`NodePorts::reopen`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::oneshot;

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
    /// Set while this process accepts on the port.
    open: Option<Open>,
}

struct Open {
    /// A copy of the listening socket, to pass on.
    fd: OwnedFd,
    stop: oneshot::Sender<()>,
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
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

impl NodePorts {
    /// Starts serving `what` on `listener` (bound here or adopted), and keeps what it takes to
    /// hand the port over or bind it again.
    pub fn start(&self, what: &'static str, listener: TcpListener, serve: Serve) -> io::Result<()> {
        let addr = listener.local_addr()?;
        let open = Self::spawn(what, listener, &serve)?;
        let mut ports = lock(&self.ports);
        ports.retain(|p| p.addr != addr);
        ports.push(Port { what, addr, serve, open: Some(open) });
        Ok(())
    }

    fn spawn(what: &'static str, listener: TcpListener, serve: &Serve) -> io::Result<Open> {
        let fd = listener.as_fd().try_clone_to_owned()?;
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
        Ok(Open { fd, stop })
    }

    /// Gives up the ports at `addrs` for a newer ztunnel: each stops accepting here, and its socket
    /// is returned, to be passed on. Either all are handed over or, if one is not served here,
    /// none is and the error names it.
    pub fn hand_over(&self, addrs: &[SocketAddr]) -> Result<Vec<(SocketAddr, OwnedFd)>, String> {
        let mut ports = lock(&self.ports);
        for addr in addrs {
            if !ports.iter().any(|p| p.addr == *addr && p.open.is_some()) {
                let served: Vec<String> =
                    ports.iter().filter(|p| p.open.is_some()).map(|p| format!("{} on {}", p.what, p.addr)).collect();
                return Err(format!("this ztunnel does not listen on {addr} (it serves {})", served.join(", ")));
            }
        }
        let mut handed = Vec::new();
        for p in ports.iter_mut().filter(|p| addrs.contains(&p.addr)) {
            if let Some(open) = p.open.take() {
                let _ = open.stop.send(());
                tracing::info!(server = p.what, addr = %p.addr, "handed the port over to the newer ztunnel");
                handed.push((p.addr, open.fd));
            }
        }
        Ok(handed)
    }

    /// Binds again the ports this ztunnel handed over, after the newer one is gone. A port still
    /// held (the newer one hangs rather than died) stays closed; the error names it, and the
    /// next call tries again.
    pub fn reopen(&self) -> Result<(), String> {
        let mut ports = lock(&self.ports);
        let mut failed = Vec::new();
        for p in ports.iter_mut().filter(|p| p.open.is_none()) {
            match bind(p.addr).and_then(|l| Self::spawn(p.what, l, &p.serve)) {
                Ok(open) => {
                    tracing::info!(server = p.what, addr = %p.addr, "listening again after taking the pods back");
                    p.open = Some(open);
                }
                Err(e) => failed.push(format!("{} on {}: {e}", p.what, p.addr)),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(format!("cannot listen again: {}", failed.join("; ")))
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
    async fn a_port_is_handed_over_whole_or_not_at_all_and_can_be_opened_again() {
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
        let new = NodePorts::default();
        new.start("admin", adopt(handed.pop().unwrap().1, addr).unwrap(), replying("new")).unwrap();
        for _ in 0..5 {
            assert_eq!(ask(addr).await, "new");
        }
        assert!(old.hand_over(&[addr]).is_err(), "handed over once only");

        // While the newer one holds it, the old one cannot listen again; once it is gone, it can.
        assert!(old.reopen().unwrap_err().contains(&format!("admin on {addr}")));
        drop(new);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        old.reopen().unwrap();
        assert_eq!(ask(addr).await, "old");
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
