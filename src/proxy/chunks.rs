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
    /// without chunks of their own read into `buf`, with room for `want`
    /// bytes: its allocation again once the last chunk taken from it has
    /// been dropped, else a new one of exactly `want`. A read that fills at
    /// least half of that room is handed on as it is; a smaller one is
    /// copied out, so a queue of small chunks (HTTP/2 holds them until they
    /// are sent) never pins a large buffer each.
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<Bytes>> {
        if buf.capacity() < want && !buf.try_reclaim(want) {
            *buf = BytesMut::with_capacity(want);
        }
        let room = buf.capacity();
        let n = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *self), cx, buf))?;
        if n * 2 >= room {
            return Poll::Ready(Ok(buf.split().freeze()));
        }
        let chunk = Bytes::copy_from_slice(buf);
        buf.clear();
        Poll::Ready(Ok(chunk))
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
impl Chunked for tokio::io::DuplexStream {}

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

    /// Reads one chunk from `s` into `buf` with room for `want`.
    async fn chunk(s: &mut TcpStream, buf: &mut BytesMut, want: usize) -> Bytes {
        poll_fn(|cx| s.poll_read_chunk(cx, buf, want))
            .await
            .unwrap()
    }

    /// Where `buf`'s allocation starts (its length is 0 between reads).
    fn base(buf: &mut BytesMut) -> usize {
        buf.spare_capacity_mut().as_ptr() as usize
    }

    #[tokio::test]
    async fn a_full_read_is_handed_on_and_its_buffer_comes_back_once_dropped() {
        let (mut a, mut b) = socket_pair().await;
        let mut buf = BytesMut::new();
        a.write_all(&[7u8; 4096]).await.unwrap();
        // One write of 4 KiB arrives in one piece on loopback.
        let got = chunk(&mut b, &mut buf, 4096).await;
        assert!(got.len() * 2 >= 4096, "loopback split a 4 KiB write");
        let first = got.as_ptr() as usize;
        assert!(got.iter().all(|&x| x == 7));
        drop(got);
        a.write_all(&[8u8; 4096]).await.unwrap();
        let got = chunk(&mut b, &mut buf, 4096).await;
        assert!(got.len() * 2 >= 4096, "loopback split a 4 KiB write");
        assert_eq!(got.as_ptr() as usize, first, "the buffer was not reused");
        drop(a);
        drop(got);
        let end = chunk(&mut b, &mut buf, 4096).await;
        assert!(end.is_empty(), "end of stream is an empty chunk");
    }

    #[tokio::test]
    async fn small_reads_are_copied_out_and_the_buffer_stays() {
        let (mut a, mut b) = socket_pair().await;
        let mut buf = BytesMut::new();
        let mut held = Vec::new();
        let mut start = None;
        for i in 0..100u8 {
            a.write_all(&[i; 10]).await.unwrap();
            let got = chunk(&mut b, &mut buf, 64 * 1024).await;
            assert_eq!(&got[..], &[i; 10]);
            let now = base(&mut buf);
            let first = *start.get_or_insert(now);
            assert_eq!(now, first, "a new buffer for a small read");
            let at = got.as_ptr() as usize;
            assert!(
                !(first..first + 64 * 1024).contains(&at),
                "a small chunk pins the buffer"
            );
            held.push(got);
        }
        assert_eq!(buf.capacity(), 64 * 1024);
    }

    #[tokio::test]
    async fn a_larger_want_gets_exactly_that_much_room() {
        let (mut a, mut b) = socket_pair().await;
        let mut buf = BytesMut::new();
        for want in [4096, 16 * 1024, 64 * 1024] {
            a.write_all(b"x").await.unwrap();
            chunk(&mut b, &mut buf, want).await;
            assert_eq!(buf.capacity(), want);
        }
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
