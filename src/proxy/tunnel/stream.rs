//! One HTTP/2 stream as a byte stream: what the rest of the data path
//! (splice, HTTP detection, the per-request server) reads and writes, so a
//! connection carried in a tunnel is served exactly like a direct one.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::Chunked;

/// The most one write hands to HTTP/2 at once: a frame's worth of data
/// keeps a fast writer from queueing more than flow control lets out.
const MAX_WRITE: usize = 256 * 1024;

/// A tunnelled connection: the stream's DATA frames each way. Shutting down
/// the write side sends END_STREAM (a half-close). Dropping it ends the
/// stream the way closing a TCP socket ends a connection: what was written
/// is delivered, then the end of stream (a reset, which HTTP/2 would let
/// overtake the queued data, is never the first thing sent).
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet read.
    pending: Bytes,
    /// END_STREAM was sent.
    write_closed: bool,
    /// Where written bytes are copied before HTTP/2 takes them: reused once
    /// HTTP/2 has sent (and dropped) the previous chunk, so a bulk stream
    /// does not allocate and fault in a fresh buffer for every write.
    out: BytesMut,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
            out: BytesMut::new(),
        }
    }
}

/// An HTTP/2 error as an I/O error; a stream the peer ended with NO_ERROR
/// or CANCEL after its data is a reset connection to the app.
fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::ErrorKind::Other.into());
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl H2Stream {
    /// Waits for the next DATA frame into `pending` (left empty at the end
    /// of the stream).
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => break,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                Some(Ok(data)) => {
                    // The window reopens as soon as the bytes are ours; the
                    // reader's own buffer is the back-pressure.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Waits until HTTP/2 lets at least one of `len` bytes out; how many.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let want = len.min(MAX_WRITE);
        self.send.reserve_capacity(want);
        while self.send.capacity() == 0 {
            match ready!(self.send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                Some(Ok(_)) => {}
            }
        }
        Poll::Ready(Ok(self.send.capacity().min(want)))
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        if !self.write_closed {
            self.write_closed = true;
            let _ = self.send.send_data(Bytes::new(), true);
        }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(this.poll_room(cx, buf.len()))?;
        // `reserve` takes the old allocation back when HTTP/2 is done with it.
        this.out.reserve(n);
        this.out.extend_from_slice(&buf[..n]);
        let chunk = this.out.split().freeze();
        this.send.send_data(chunk, false).map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes frames out as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.write_closed = true;
            this.send.reserve_capacity(0);
            this.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// The stream's DATA frames pass through the copy loop as they are: a
/// received frame is handed on, and a chunk to send becomes a frame (split
/// where flow control says), with no copy either way.
impl Chunked for H2Stream {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        _buf: &mut BytesMut,
        _want: usize,
    ) -> Poll<io::Result<Bytes>> {
        if self.pending.is_empty() {
            ready!(self.poll_pending(cx))?;
        }
        Poll::Ready(Ok(std::mem::take(&mut self.pending)))
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        if chunk.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let n = ready!(self.poll_room(cx, chunk.len()))?;
        let frame = chunk.split_to(n);
        self.send.send_data(frame, false).map_err(io_error)?;
        Poll::Ready(Ok(()))
    }
}
