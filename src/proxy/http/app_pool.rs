//! Pooled HTTP/1.1 connections from the serving sidecar to the app.
//!
//! Every allowed HTTP/1 request goes to the app over an idle connection
//! of this pool, or a new one. A connection is handed back when its
//! response body has been read to the end, by the body itself, so no task
//! waits per request for the connection to become free, and a shard only
//! ever takes back its own connections (their tasks run on that shard).
//! Only a connection that is free at that moment goes back: one still
//! sending a request body (the app answered early) is closed once the body
//! is through, never reused, so no request waits behind another peer's
//! upload, and no answer the app gives to leftover body bytes can reach
//! the next request. A request that a pooled connection did not send (the
//! app had closed it) goes out again on another one, and so does a GET,
//! HEAD or OPTIONS without a body that a connection idle for a while
//! failed (see [`RESEND_AFTER_IDLE`]); idle connections are closed after
//! [`IDLE_TIMEOUT`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use prometheus::{IntCounter, IntGauge};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::NoTrailers;

/// What a request body must be to go to the app.
pub trait RequestBody:
    Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + Unpin + 'static
{
}
impl<B> RequestBody for B where
    B: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + Unpin
        + 'static
{
}

/// An idle connection to the app is closed after this long unused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The most idle connections one sidecar keeps (all apps, all shards):
/// enough for a burst of that many requests at once to find them again,
/// bounded so peers naming port after port cannot hold file descriptors
/// without end. A connection finishing past it is closed instead.
const MAX_IDLE: usize = 1024;

/// App servers close idle keep-alive connections after a few seconds
/// (Node and uvicorn 5 s, gunicorn 2 s). A request sent on a connection
/// idle this long can cross the app's close: the app reads it, or not,
/// and the connection ends without an answer. A GET, HEAD or OPTIONS
/// without a body is then sent once more on a new connection (as Go's
/// HTTP client does); anything else gets the error (a 502). Connections
/// in steady use are never idle this long, so busy paths keep no copy.
const RESEND_AFTER_IDLE: Duration = Duration::from_secs(1);

/// ... and only if the connection failed this soon after the request went
/// out, without one byte of an answer: an app that worked on a request and
/// then died is not given it twice.
const RESEND_WITHIN: Duration = Duration::from_millis(250);

/// How often a shard looks for connections idle past [`IDLE_TIMEOUT`].
const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// An app address, and the shard whose task drives the connection.
type Key = (SocketAddr, usize);

struct Idle<B> {
    conn: Conn<B>,
    since: Instant,
}

/// A connection to the app: hyper's handle, and how many bytes the app
/// has sent on it (an answer begun cannot be asked for again).
struct Conn<B> {
    send: SendRequest<ToApp<B>>,
    read: Arc<AtomicU64>,
}

struct Inner<B> {
    idle: HashMap<Key, Vec<Idle<B>>>,
    /// Connections in `idle`, over all keys.
    count: usize,
    /// Shards that have a sweeper running.
    sweeping: Vec<usize>,
}

/// Why a request did not reach the app.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("connect to app")]
    Connect(#[source] std::io::Error),
    #[error("connect to app timed out")]
    ConnectTimeout,
    #[error("app connection")]
    Http(#[source] hyper::Error),
    #[error("not an HTTP/1 request this pool sends")]
    Unsupported,
}

/// The pool of one sidecar (all shards), for requests with bodies of type
/// `B`; cheap to clone.
pub struct AppPool<B = NoTrailers> {
    inner: Arc<Mutex<Inner<B>>>,
    connect_timeout: Duration,
    max_idle: usize,
    metrics: PoolMetrics,
}

/// What the pool counts (the sidecar's metrics).
#[derive(Clone)]
pub struct PoolMetrics {
    /// Connections opened.
    pub opened: IntCounter,
    /// Connections kept idle, now.
    pub idle: IntGauge,
    /// Requests sent again after an idle connection ended unanswered.
    pub resent: IntCounter,
}

impl<B> Clone for AppPool<B> {
    fn clone(&self) -> Self {
        AppPool {
            inner: self.inner.clone(),
            connect_timeout: self.connect_timeout,
            max_idle: self.max_idle,
            metrics: self.metrics.clone(),
        }
    }
}

impl<B: RequestBody> AppPool<B> {
    /// A pool that counts what it does in `metrics`.
    pub fn new(connect_timeout: Duration, metrics: PoolMetrics) -> Self {
        AppPool {
            inner: Arc::new(Mutex::new(Inner {
                idle: HashMap::new(),
                count: 0,
                sweeping: Vec::new(),
            })),
            connect_timeout,
            max_idle: MAX_IDLE,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<B>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Idle connections to `target` held by the calling shard.
    #[cfg(test)]
    fn idle_count(&self, target: SocketAddr) -> usize {
        let key = (target, crate::runtime::shard());
        self.lock().idle.get(&key).map_or(0, Vec::len)
    }

    /// Makes every idle connection look unused for `by` longer.
    #[cfg(test)]
    fn age(&self, by: Duration) {
        for idle in self.lock().idle.values_mut().flatten() {
            idle.since -= by;
        }
    }

    /// Sends `req` (its URI already rewritten; sent in origin form) to the
    /// app at `target`. The response body hands the connection back when it
    /// has been read to the end; an upgrade (`101`) keeps it.
    pub async fn send(
        &self,
        target: SocketAddr,
        mut req: Request<B>,
    ) -> Result<Response<PooledBody<B>>, AppError> {
        // hyper's HTTP/1 client sends only these (admission refuses
        // CONNECT before a request gets here).
        let http1 = matches!(req.version(), Version::HTTP_10 | Version::HTTP_11);
        if !http1 || req.method() == Method::CONNECT {
            return Err(AppError::Unsupported);
        }
        origin_form(req.uri_mut());
        // An HTTP/1.0 exchange ends with the app closing, unless both
        // sides asked to keep it: not worth keeping.
        let keep = req.version() == Version::HTTP_11;
        let key = (target, crate::runtime::shard());
        let mut req = req.map(ToApp::Body);
        // Idle connections first, newest first; a request one of them did
        // not send (the app had just closed it) goes to the next one.
        let mut resending = false;
        while let Some((mut conn, idle_for)) = self.take(key) {
            let again = (idle_for >= RESEND_AFTER_IDLE)
                .then(|| resend_copy(&req))
                .flatten();
            let (sent_at, read_before) = (Instant::now(), conn.read.load(Ordering::Relaxed));
            match conn.send.try_send_request(req).await {
                Ok(resp) => return Ok(self.wrap(key, conn, resp, keep)),
                Err(mut e) => match (e.take_message(), again) {
                    (Some(unsent), _) => req = unsent,
                    // Not one byte of an answer, and at once: the app had
                    // closed the connection, not failed the request.
                    (None, Some(copy))
                        if conn.read.load(Ordering::Relaxed) == read_before
                            && sent_at.elapsed() < RESEND_WITHIN =>
                    {
                        debug!(error = %e.error(), "idle app connection closed under a request: sending it again on a new one");
                        (req, resending) = (copy, true);
                        break;
                    }
                    (None, _) => return Err(AppError::Http(e.into_error())),
                },
            }
        }
        let mut conn = self.connect(target).await?;
        if resending {
            self.metrics.resent.inc();
        }
        match conn.send.send_request(req).await {
            Ok(resp) => Ok(self.wrap(key, conn, resp, keep)),
            Err(e) => Err(AppError::Http(e)),
        }
    }

    /// The newest idle connection of `key` and how long it was idle,
    /// dropping any found closed, no longer free, or idle too long on the
    /// way.
    fn take(&self, key: Key) -> Option<(Conn<B>, Duration)> {
        let mut inner = self.lock();
        let list = inner.idle.get_mut(&key)?;
        let mut found = None;
        let before = list.len();
        while let Some(idle) = list.pop() {
            let idle_for = idle.since.elapsed();
            if idle.conn.send.is_ready() && idle_for < IDLE_TIMEOUT {
                found = Some((idle.conn, idle_for));
                break;
            }
        }
        let taken = before - list.len();
        if list.is_empty() {
            inner.idle.remove(&key);
        }
        inner.count -= taken;
        self.metrics.idle.set(inner.count as i64);
        found
    }

    /// Hands a connection whose exchange is over back to its shard's list,
    /// if it is free for the next request. When the pool is full, it
    /// replaces the oldest idle connection to the same app, if any.
    fn put(&self, key: Key, conn: Conn<B>) {
        // A request still being written, or a closed connection: not reused.
        if !conn.send.is_ready() {
            return;
        }
        // The sweeper (and hyper's connection task) need a runtime; a body
        // dropped outside one just closes its connection.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let start_sweeper = {
            let mut inner = self.lock();
            let full = inner.count >= self.max_idle;
            let list = inner.idle.entry(key).or_default();
            if full {
                if list.is_empty() {
                    inner.idle.remove(&key);
                    return;
                }
                list.remove(0);
            }
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
            if !full {
                inner.count += 1;
            }
            self.metrics.idle.set(inner.count as i64);
            let new = !inner.sweeping.contains(&key.1);
            if new {
                inner.sweeping.push(key.1);
            }
            new
        };
        if start_sweeper {
            self.spawn_sweeper(&runtime, key.1);
        }
    }

    /// Closes this shard's connections idle past [`IDLE_TIMEOUT`] (and
    /// those the app closed), until the shard has none left.
    fn spawn_sweeper(&self, runtime: &tokio::runtime::Handle, shard: usize) {
        let pool = self.clone();
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                if !pool.sweep(shard) {
                    return;
                }
            }
        });
    }

    /// Drops `shard`'s connections that are closed or idle too long;
    /// whether the shard still has any (else its sweeper stops).
    fn sweep(&self, shard: usize) -> bool {
        let mut inner = self.lock();
        let mut dropped = 0;
        inner.idle.retain(|key, list| {
            if key.1 == shard {
                let before = list.len();
                list.retain(|i| i.conn.send.is_ready() && i.since.elapsed() < IDLE_TIMEOUT);
                dropped += before - list.len();
            }
            !list.is_empty()
        });
        inner.count -= dropped;
        self.metrics.idle.set(inner.count as i64);
        let left = inner.idle.keys().any(|key| key.1 == shard);
        if !left {
            inner.sweeping.retain(|&s| s != shard);
        }
        left
    }

    async fn connect(&self, target: SocketAddr) -> Result<Conn<B>, AppError> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(target))
            .await
            .map_err(|_| AppError::ConnectTimeout)?
            .map_err(AppError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let read = Arc::new(AtomicU64::new(0));
        let io = ReadCount {
            inner: tcp,
            read: read.clone(),
        };
        let (send, task) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(AppError::Http)?;
        self.metrics.opened.inc();
        tokio::spawn(async move {
            if let Err(e) = task.with_upgrades().await {
                debug!(error = %e, "app connection ended with an error");
            }
        });
        Ok(Conn { send, read })
    }

    fn wrap(
        &self,
        key: Key,
        conn: Conn<B>,
        resp: Response<Incoming>,
        keep: bool,
    ) -> Response<PooledBody<B>> {
        // After a `101` the connection is no longer HTTP: never reused.
        // Nor after an HTTP/1.0 request or response.
        let reusable = keep
            && resp.status() != StatusCode::SWITCHING_PROTOCOLS
            && resp.version() == Version::HTTP_11;
        let back = reusable.then(|| Return {
            pool: self.clone(),
            key,
            conn,
        });
        resp.map(|body| PooledBody {
            body,
            back,
            ended: false,
            failed: false,
        })
    }
}

/// A copy of `req` to send again if a connection fails it: only a GET,
/// HEAD or OPTIONS without a body (safe to repeat, and nothing to keep).
fn resend_copy<B: RequestBody>(req: &Request<ToApp<B>>) -> Option<Request<ToApp<B>>> {
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe || !req.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(ToApp::Empty);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// What goes to the app: the caller's body, or none (a request sent again,
/// whose original body was empty and went with the failed attempt).
pub(crate) enum ToApp<B> {
    Body(B),
    Empty,
}

impl<B: RequestBody> Body for ToApp<B> {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ToApp::Body(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ToApp::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ToApp::Body(body) => body.is_end_stream(),
            ToApp::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ToApp::Body(body) => body.size_hint(),
            ToApp::Empty => SizeHint::with_exact(0),
        }
    }
}

/// The app socket, counting the bytes read from it.
struct ReadCount<S> {
    inner: S,
    read: Arc<AtomicU64>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ReadCount<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        polled
    }
}

write_through!(ReadCount);

/// The request line's target as an origin server expects it: the path and
/// query (`/` when empty).
fn origin_form(uri: &mut Uri) {
    *uri = match uri.path_and_query() {
        Some(pq) if pq.as_str() != "/" => Uri::from(pq.clone()),
        _ => Uri::from_static("/"),
    };
}

/// Where a connection goes back once its response is read.
struct Return<B: RequestBody> {
    pool: AppPool<B>,
    key: Key,
    conn: Conn<B>,
}

/// A response body from the app. Read to its end, it returns its
/// connection to the pool; dropped before that, the connection is not
/// reused (hyper closes it once the rest of the response is discarded).
pub struct PooledBody<B: RequestBody = NoTrailers> {
    body: Incoming,
    back: Option<Return<B>>,
    /// The body said it ended: no more frames, or its trailers (a chunked
    /// body's end is known only so).
    ended: bool,
    /// A frame was an error: the connection is not reused, whatever follows.
    failed: bool,
}

impl<B: RequestBody> Body for PooledBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.ended = true,
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => self.ended = true,
            Poll::Ready(Some(Err(_))) => self.failed = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B: RequestBody> Drop for PooledBody<B> {
    fn drop(&mut self) {
        if let Some(back) = self.back.take() {
            if !self.failed && (self.ended || self.body.is_end_stream()) {
                back.pool.put(back.key, back.conn);
            }
        }
    }
}

#[cfg(test)]
mod tests;
