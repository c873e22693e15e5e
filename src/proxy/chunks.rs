//! Byte streams read and written as owned chunks. The copy loop moves
//! `Bytes` from one side to the other, so a stream that already holds its
//! data in shared buffers (an HTTP/2 stream's DATA frames) hands them on
//! without copying them into the loop's buffer, and takes the loop's
//! chunks without copying them into buffers of its own.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream the copy loop can carry. The provided methods read into
/// and write from the loop's buffer, for streams that have no chunks of
/// their own (sockets, TLS).
pub trait Chunked: AsyncRead + AsyncWrite + Unpin {
    /// The next received bytes (empty at the end of the stream). Streams
    /// without chunks of their own read into `buf`, first making room for
    /// at least `want` bytes there (reusing its allocation once the last
    /// chunk taken from it has been dropped).
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<Bytes>> {
        if buf.capacity() - buf.len() < want {
            buf.reserve(want);
        }
        ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *self), cx, buf))?;
        Poll::Ready(Ok(buf.split().freeze()))
    }

    /// Sends bytes from the front of `chunk` (at least one, unless it is
    /// empty) and advances it past them.
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        if chunk.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let n = ready!(Pin::new(&mut *self).poll_write(cx, chunk))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        chunk.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// A reference or a box carries what it points to, its own way.
macro_rules! chunked_through_pointer {
    ($pointer:ty) => {
        impl<T: Chunked + ?Sized> Chunked for $pointer {
            fn poll_read_chunk(
                &mut self,
                cx: &mut Context<'_>,
                buf: &mut BytesMut,
                want: usize,
            ) -> Poll<io::Result<Bytes>> {
                (**self).poll_read_chunk(cx, buf, want)
            }

            fn poll_write_chunk(
                &mut self,
                cx: &mut Context<'_>,
                chunk: &mut Bytes,
            ) -> Poll<io::Result<()>> {
                (**self).poll_write_chunk(cx, chunk)
            }
        }
    };
}

chunked_through_pointer!(&mut T);
chunked_through_pointer!(Box<T>);

impl Chunked for tokio::net::TcpStream {}
impl<S: AsyncRead + AsyncWrite + Unpin> Chunked for tokio_rustls::client::TlsStream<S> {}
impl<S: AsyncRead + AsyncWrite + Unpin> Chunked for tokio_rustls::server::TlsStream<S> {}
impl Chunked for hyper_util::rt::TokioIo<hyper::upgrade::Upgraded> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn a_socket_reads_into_the_buffer_and_takes_its_allocation_back() {
        let (mut a, mut b) = socket_pair().await;
        let mut buf = BytesMut::new();
        a.write_all(b"first").await.unwrap();
        let chunk = poll_fn(|cx| b.poll_read_chunk(cx, &mut buf, 4096))
            .await
            .unwrap();
        assert_eq!(&chunk[..], b"first");
        let first_allocation = chunk.as_ptr();
        drop(chunk);
        a.write_all(b"second").await.unwrap();
        let chunk = poll_fn(|cx| b.poll_read_chunk(cx, &mut buf, 4096))
            .await
            .unwrap();
        assert_eq!(&chunk[..], b"second");
        assert_eq!(
            chunk.as_ptr(),
            first_allocation,
            "the buffer was not reused"
        );
        drop(a);
        let end = poll_fn(|cx| b.poll_read_chunk(cx, &mut buf, 4096))
            .await
            .unwrap();
        assert!(end.is_empty(), "end of stream is an empty chunk");
    }

    #[tokio::test]
    async fn a_write_advances_the_chunk() {
        let (mut a, mut b) = socket_pair().await;
        let mut chunk = Bytes::from_static(b"hello");
        while !chunk.is_empty() {
            poll_fn(|cx| a.poll_write_chunk(cx, &mut chunk))
                .await
                .unwrap();
        }
        drop(a);
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut b, &mut got)
            .await
            .unwrap();
        assert_eq!(got, b"hello");
    }
}
