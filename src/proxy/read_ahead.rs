//! The socket under a mesh TLS session, read in large chunks. rustls asks
//! its transport for at most a few KiB at a time, so a bulk stream would cost
//! a `recv` per TLS record; one read of up to [`CHUNK`] serves many records.
//! The buffer exists only while it holds bytes or the socket keeps having
//! more, so an idle connection costs nothing extra.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

/// The most one `recv` takes from the socket.
const CHUNK: usize = 64 * 1024;

/// `inner`, read ahead in chunks of up to [`CHUNK`] bytes.
pub struct ReadAhead<S> {
    inner: S,
    /// The unread bytes. Capacity is reserved (not zeroed) on the first
    /// small read and given back when the socket runs dry.
    buf: BytesMut,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: BytesMut::new(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl ReadAhead<TcpStream> {
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            if out.remaining() >= CHUNK {
                // A reader this large needs no help.
                this.buf = BytesMut::new();
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            // Takes the allocation back from the front when it has one.
            this.buf.clear();
            this.buf.reserve(CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing buffered and nothing coming yet: do not hold
                    // the memory while the connection waits.
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

write_through!(ReadAhead);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Bytes arrive whole and in order through small reads, across many
    /// chunks, and end of stream is passed on.
    #[tokio::test]
    async fn small_reads_see_every_byte_in_order() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let data: Vec<u8> = (0..(3 * CHUNK + 777))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(&sent).await.unwrap();
            s.shutdown().await.unwrap();
        });
        let mut r = ReadAhead::new(TcpStream::connect(addr).await.unwrap());
        let mut got = Vec::new();
        let mut small = [0u8; 4096 + 3];
        loop {
            let n = r.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        writer.await.unwrap();
        assert_eq!(got, data);
        assert!(r.buf.is_empty());
    }

    /// Writes go straight through, and a large reader bypasses the buffer.
    #[tokio::test]
    async fn writes_pass_through_and_large_reads_bypass() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let echo = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut b = vec![0u8; 5];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(&b).await.unwrap();
        });
        let mut r = ReadAhead::new(TcpStream::connect(addr).await.unwrap());
        r.write_all(b"hello").await.unwrap();
        let mut big = vec![0u8; 2 * CHUNK];
        let mut got = 0;
        while got < 5 {
            got += r.read(&mut big[got..]).await.unwrap();
        }
        assert_eq!(&big[..5], b"hello");
        assert_eq!(
            r.buf.capacity(),
            0,
            "a large read must not allocate the buffer"
        );
        echo.await.unwrap();
    }
}
