//! An HTTP/2 stream as a byte stream (`AsyncRead + AsyncWrite`), so a tunnel can be spliced with
//! `tokio::io::copy_bidirectional`. Received bytes release flow-control capacity as they are
//! consumed, which is what bounds memory per tunnel to the stream window.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct H2Stream {
    pub(crate) send: SendStream<Bytes>,
    pub(crate) recv: RecvStream,
    pending: Bytes,
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream { send, recv, pending: Bytes::new() }
    }
}

pub(crate) fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

impl AsMut<H2Stream> for H2Stream {
    fn as_mut(&mut self) -> &mut H2Stream {
        self
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        let chunk = self.pending.split_to(n);
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        match ready!(self.send.poll_capacity(cx)) {
            Some(Ok(n)) if n > 0 => {
                let n = n.min(buf.len());
                self.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(h2_io)?;
                Poll::Ready(Ok(n))
            }
            Some(Ok(_)) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(Err(e)) => Poll::Ready(Err(h2_io(e))),
            None => Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed"))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Half-close: END_STREAM tells the peer no more bytes follow (TCP FIN through the tunnel).
    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            // Sending END_STREAM on a stream that is already closed or reset is not a failure.
            Err(e) if !e.is_io() => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(h2_io(e))),
        }
    }
}
