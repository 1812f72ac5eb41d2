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
//! grants flow-control capacity, so at most one read buffer (at most [`MAX_READ`]) is in flight;
//! from the tunnel, capacity is released only once the bytes are written to the socket, so the
//! peer can have at most one stream window outstanding.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::stream::{h2_io, H2Stream};

/// An HTTP/2 frame header. Reads are sized a multiple of 16 KiB less one header, so that a full
/// read becomes one DATA frame filling whole 16 KiB TLS records instead of whole records and a
/// 9-byte straggler (which costs its own record, write and TCP segment).
pub(crate) const FRAME_HEADER: usize = 9;
/// The smallest read: what a quiet or request/response connection holds.
const MIN_READ: usize = (16 << 10) - FRAME_HEADER;
/// The largest read, reached by doubling from [`MIN_READ`].
pub const MAX_READ: usize = (256 << 10) - FRAME_HEADER;
const MAX_DOUBLINGS: u8 = 4;

/// A socket whose close can be made abortive. A failure on one side of a proxied connection
/// must reach the other side as a failure: closed with a FIN instead, a response cut short by a
/// crashed server would look complete to a client that reads until end of file.
pub trait Abort {
    /// Makes the coming close send a reset (RST) instead of a FIN.
    fn abort_on_close(&self);

    /// Ready with the reason once the connection must end at once (its authorization was revoked,
    /// say), whatever either direction is doing: [`splice`] checks it first on every wake-up, so
    /// an idle or half-closed connection ends too. Never, by default.
    fn poll_revoked(&self, _cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Pending
    }
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
        if let Poll::Ready(e) = io.poll_revoked(cx) {
            return Poll::Ready(Err(e));
        }
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

/// How much the next socket read may take: sized to the traffic, as hyper sizes its reads.
///
/// A bulk transfer pays per read, not per byte, for the syscall, the DATA frame, the TLS write
/// and waking the peer, so reads that fill the buffer double it, up to [`MAX_READ`] (on the
/// two-node bench, 256 KiB reads carry about 10% more than 64 KiB ones). A connection whose reads
/// stay small (requests and responses) keeps [`MIN_READ`], so it holds little memory; after two
/// reads in a row that would have fit in half the size, the size halves again.
#[derive(Debug, Default)]
struct ReadSize {
    doublings: u8,
    small_reads: u8,
}

/// The read size after `doublings` doublings of [`MIN_READ`], frame header kept out.
fn doubled(doublings: u8) -> usize {
    ((MIN_READ + FRAME_HEADER) << doublings) - FRAME_HEADER
}

impl ReadSize {
    fn get(&self) -> usize {
        doubled(self.doublings)
    }

    /// Takes note of a read of `n` bytes; true when the size shrank, so that a buffer sized for
    /// the old one can go.
    fn record(&mut self, n: usize) -> bool {
        if n >= self.get() {
            self.doublings = (self.doublings + 1).min(MAX_DOUBLINGS);
            self.small_reads = 0;
            return false;
        }
        if self.doublings == 0 || n > doubled(self.doublings - 1) {
            self.small_reads = 0;
            return false;
        }
        self.small_reads += 1;
        if self.small_reads < 2 {
            return false;
        }
        *self = ReadSize { doublings: self.doublings - 1, small_reads: 0 };
        true
    }
}

/// Socket to tunnel.
#[derive(Default)]
struct ToTunnel {
    buf: BytesMut,
    read_size: ReadSize,
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
            let size = self.read_size.get();
            self.buf.reserve(size);
            let n = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, &mut (&mut self.buf).limit(size)))?;
            if n == 0 {
                self.eof = true;
            } else {
                self.unsent = self.buf.split().freeze();
                if self.read_size.record(n) {
                    // Freed once h2 drops the chunks still borrowing it.
                    self.buf = BytesMut::new();
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_that_fill_the_buffer_double_it_up_to_the_largest_size() {
        let mut size = ReadSize::default();
        assert_eq!(size.get(), MIN_READ);
        let mut seen = vec![size.get()];
        for _ in 0..6 {
            size.record(size.get());
            seen.push(size.get());
        }
        let k = 1 << 10;
        assert_eq!(seen, [16 * k - 9, 32 * k - 9, 64 * k - 9, 128 * k - 9, MAX_READ, MAX_READ, MAX_READ]);
        // Every size is whole 16 KiB TLS records once the DATA frame header is added.
        assert!(seen.iter().all(|s| (s + FRAME_HEADER).is_multiple_of(16 * k)));
    }

    #[test]
    fn two_small_reads_in_a_row_halve_the_size_and_one_does_not() {
        let mut size = ReadSize { doublings: MAX_DOUBLINGS, small_reads: 0 };
        let half = (128 << 10) - 9;
        // One small read between full ones (a sender that paused) changes nothing.
        assert!(!size.record(100));
        assert!(!size.record(MAX_READ));
        assert!(!size.record(half + 1), "more than half the size is not small");
        assert!(!size.record(100));
        assert_eq!(size.get(), MAX_READ);
        assert!(size.record(half), "the second small read in a row shrinks");
        assert_eq!(size.get(), half);
        // Down to the smallest size, and never below it.
        for _ in 0..10 {
            size.record(1);
        }
        assert_eq!(size.get(), MIN_READ);
        assert!(!size.record(1) && !size.record(1));
        assert_eq!(size.get(), MIN_READ);
    }
}
