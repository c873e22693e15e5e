//! What the HTTP path measures beyond requests: the bytes of each accepted
//! connection (headers, bodies, HTTP/2 framing, and an upgraded
//! connection's bytes after the upgrade) and the body size of each request
//! and response.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus::Histogram;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use crate::proxy::{ConnGuard, Traffic};

/// An accepted connection that counts every byte read from and written to
/// the peer, and keeps the connection counted as open for as long as it
/// lives. hyper hands the stream to an upgrade (WebSocket) when it stops
/// serving HTTP on it, so the upgraded connection stays counted until the
/// tunnel ends, not only until the `101`.
pub struct Metered<S> {
    inner: S,
    traffic: Traffic,
    _guard: ConnGuard,
}

impl<S> Metered<S> {
    pub fn new(inner: S, traffic: Traffic, guard: ConnGuard) -> Self {
        Metered {
            inner,
            traffic,
            _guard: guard,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        if n > 0 {
            this.traffic.received.inc_by(n as u64);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.traffic.sent.inc_by(n as u64);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        this.traffic.sent.inc_by(n as u64);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Body bytes seen so far, observed into a size histogram once, when the
/// body is dropped (it ended, or the request or connection went away).
struct BodySize {
    bytes: u64,
    histogram: Histogram,
}

impl BodySize {
    fn new(histogram: Histogram) -> Self {
        BodySize {
            bytes: 0,
            histogram,
        }
    }

    fn count<E>(&mut self, polled: &Poll<Option<Result<Frame<Bytes>, E>>>) {
        if let Poll::Ready(Some(Ok(frame))) = polled {
            if let Some(data) = frame.data_ref() {
                self.bytes += data.len() as u64;
            }
        }
    }
}

impl Drop for BodySize {
    fn drop(&mut self) {
        self.histogram.observe(self.bytes as f64);
    }
}

/// A request body passed on without its trailers. Request trailers are
/// headers sent after the body, which no rule saw (the decision is made on
/// the head) and which apps often merge into the headers: forged
/// `x-forwarded-client-cert` or denied values would ride in them. No
/// common protocol needs them (gRPC sends trailers only in responses,
/// which pass unchanged), so they are dropped. Its size goes to
/// `portcullis_http_request_size_bytes`.
pub struct NoTrailers {
    body: Incoming,
    size: BodySize,
}

impl NoTrailers {
    pub fn new(body: Incoming, histogram: Histogram) -> Self {
        NoTrailers {
            body,
            size: BodySize::new(histogram),
        }
    }
}

impl Body for NoTrailers {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            let polled = Pin::new(&mut self.body).poll_frame(cx);
            match polled {
                Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                    debug!("request trailers dropped");
                }
                other => {
                    self.size.count(&other);
                    return other;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The app's response body on its way to the peer; its size goes to
/// `portcullis_http_response_size_bytes`.
pub struct ResponseSize<B = Incoming> {
    body: B,
    size: BodySize,
}

impl<B> ResponseSize<B> {
    pub fn new(body: B, histogram: Histogram) -> Self {
        ResponseSize {
            body,
            size: BodySize::new(histogram),
        }
    }
}

impl<B: Body<Data = Bytes, Error = hyper::Error> + Unpin> Body for ResponseSize<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        self.size.count(&polled);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
