//! Splicing a byte stream (a pod's TCP connection) with an HBONE tunnel, without copying payload
//! in user space.
//!
//! [`H2Stream`]'s `AsyncRead`/`AsyncWrite` impls need an intermediate buffer in each direction:
//! bytes are copied into it from the socket and out of it into a fresh h2 `Bytes`, and received
//! DATA is copied into it before the socket write. Here each read lands in a `BytesMut` that is
//! frozen and handed to h2 as is, and each received DATA frame is written to the socket straight
//! from h2's buffer. On a bulk transfer that removes one memcpy per byte on each side of the tunnel.
//!
//! Memory stays bounded as with the byte-stream path: toward the tunnel, data is only sent once h2
//! grants flow-control capacity, so at most one read buffer is in flight; from the tunnel, capacity
//! is released only once the bytes are written to the socket, so the peer can have at most one
//! stream window outstanding.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::stream::{h2_io, H2Stream};

/// The most read from the socket at once: 64 KiB less an HTTP/2 frame header, so that a full read
/// becomes one DATA frame filling exactly four 16 KiB TLS records instead of four records and a
/// 9-byte straggler (which costs its own record, write and TCP segment).
const READ_CHUNK: usize = (64 << 10) - 9;

/// A socket whose close can be made abortive. A failure on one side of a proxied connection
/// must reach the other side as a failure: closed with a FIN instead, a response cut short by a
/// crashed server would look complete to a client that reads until end of file.
pub trait Abort {
    /// Makes the coming close send a reset (RST) instead of a FIN.
    fn abort_on_close(&self);
}

impl Abort for tokio::net::TcpStream {
    fn abort_on_close(&self) {
        // Zero linger never blocks: the close discards unsent data and sends RST at once.
        let _ = self.set_zero_linger();
    }
}

/// Copies `io` into `tunnel` and `tunnel` into `io` until both directions have finished: end of
/// file from `io` becomes END_STREAM, and END_STREAM from the peer becomes a write shutdown of
/// `io`. The first error ends both directions: `io` is reset and dropping the tunnel resets the
/// stream, so each end sees the failure as one.
pub async fn splice<S, T>(mut io: S, mut tunnel: T) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Abort,
    T: AsMut<H2Stream>,
{
    let tunnel = tunnel.as_mut();
    let (mut up, mut down) = (ToTunnel::default(), FromTunnel::default());
    let done = poll_fn(|cx| {
        let up_done = up.poll(cx, &mut io, &mut tunnel.send)?.is_ready();
        let down_done = down.poll(cx, &mut io, &mut tunnel.recv)?.is_ready();
        if up_done && down_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    if done.is_err() {
        io.abort_on_close();
    }
    done
}

/// Socket to tunnel.
#[derive(Default)]
struct ToTunnel {
    buf: BytesMut,
    /// Read but not yet granted flow-control capacity.
    unsent: Bytes,
    eof: bool,
    done: bool,
}

impl ToTunnel {
    fn poll<S: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut S,
        send: &mut SendStream<Bytes>,
    ) -> Poll<io::Result<()>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !self.unsent.is_empty() {
                send.reserve_capacity(self.unsent.len());
                match ready!(send.poll_capacity(cx)) {
                    // Capacity granted and taken again before we looked: ask once more, which
                    // registers for the next grant.
                    Some(Ok(0)) => continue,
                    Some(Ok(n)) => {
                        let part = self.unsent.split_to(n.min(self.unsent.len()));
                        send.send_data(part, false).map_err(h2_io)?;
                    }
                    Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                    None => return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed"))),
                }
                continue;
            }
            if self.eof {
                self.done = true;
                return Poll::Ready(match send.send_data(Bytes::new(), true) {
                    // END_STREAM on a stream the peer already closed or reset is not a failure.
                    Err(e) if e.is_io() => Err(h2_io(e)),
                    _ => Ok(()),
                });
            }
            // Reuses the allocation once h2 has written and dropped every chunk split from it.
            self.buf.reserve(READ_CHUNK);
            let n =
                ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, &mut (&mut self.buf).limit(READ_CHUNK)))?;
            if n == 0 {
                self.eof = true;
            } else {
                self.unsent = self.buf.split().freeze();
            }
        }
    }
}

/// Tunnel to socket.
#[derive(Default)]
struct FromTunnel {
    /// Received but not yet written to the socket; its flow-control capacity is still held.
    unwritten: Bytes,
    unflushed: bool,
    eof: bool,
    done: bool,
}

impl FromTunnel {
    fn poll<S: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut S,
        recv: &mut RecvStream,
    ) -> Poll<io::Result<()>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !self.unwritten.is_empty() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.unwritten))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.unwritten.advance(n);
                // Returned to the peer only now, so a slow reader holds back the sender.
                let _ = recv.flow_control().release_capacity(n);
                self.unflushed = true;
                continue;
            }
            if self.eof {
                ready!(Pin::new(&mut *io).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            match recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => self.unwritten = data,
                Poll::Ready(Some(Err(e))) if e.reason() == Some(h2::Reason::NO_ERROR) => self.eof = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_io(e))),
                Poll::Ready(None) => self.eof = true,
                Poll::Pending => {
                    if self.unflushed {
                        ready!(Pin::new(&mut *io).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}
