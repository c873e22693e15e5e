//! Limits that keep a flood of idle or half-sent connections from starving
//! the process: every socket is a file descriptor, and a container's soft
//! RLIMIT_NOFILE is often 1024, so a few hundred sockets held open on a
//! side port (admin, identity service) would otherwise stop mTLS traffic
//! and kubelet probes alike.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::debug;

/// Raises the soft RLIMIT_NOFILE to the hard limit. Long-running commands
/// call it first: the hard limit is what the operator granted, the soft
/// one is only an inherited default, and running out of descriptors
/// stops every listener at once. Failure is logged, never fatal.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => return debug!(error = %e, "cannot read RLIMIT_NOFILE"),
    };
    if soft >= hard {
        return debug!(soft, hard, "RLIMIT_NOFILE already at its hard limit");
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => debug!(
            from = soft,
            to = hard,
            "raised the RLIMIT_NOFILE soft limit"
        ),
        Err(e) => debug!(soft, hard, error = %e, "cannot raise RLIMIT_NOFILE"),
    }
}

/// Admin connections served at once; more are accepted and closed at once,
/// so the admin port can never hold more descriptors than this.
pub const ADMIN_MAX_CONNECTIONS: usize = 256;
/// An admin client must send a whole request head within this; it is also
/// how long an idle keep-alive connection stays open (hyper starts the
/// timer whenever it waits for a request head).
pub const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// After this an admin connection is asked to close (it finishes the
/// request in flight, for at most `CLOSE_GRACE`): a client that pipelines
/// requests and never reads the answers cannot hold its slot for ever.
pub const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How long a connection asked to close may take to finish.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// A cap on the connections one server holds at once.
#[derive(Clone)]
pub struct ConnectionCap(Arc<Semaphore>);

impl ConnectionCap {
    pub fn new(max: usize) -> Self {
        ConnectionCap(Arc::new(Semaphore::new(max)))
    }

    /// A slot, held until the permit is dropped; `None` when all are taken.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        self.0.clone().try_acquire_owned().ok()
    }
}

/// An HTTP/1 server builder for admin ports: a request head must arrive
/// within `ADMIN_HEADER_READ_TIMEOUT`.
pub fn admin_http1() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEADER_READ_TIMEOUT);
    builder
}

/// HTTP/2 pings: a peer that stops answering for this long is gone.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one HTTP/2 client may have open at once on a control-plane port.
const H2_MAX_STREAMS: u32 = 100;

/// An HTTP/1-or-2 server builder for the identity service and the webhook:
/// HTTP/1 request heads within `header_read_timeout`, HTTP/2 peers pinged
/// and dropped when they stop answering. hyper has no HTTP/2 idle limit,
/// and its version detection waits without one, so servers also bound
/// idle time with `Activity`.
pub fn server_auto(
    header_read_timeout: Duration,
) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
        .max_concurrent_streams(H2_MAX_STREAMS);
    builder
}

/// Serves one admin connection: `admin_http1`, then a graceful close once
/// it has lived `ADMIN_CONNECTION_LIFETIME`, and a hard one `CLOSE_GRACE`
/// later.
pub async fn serve_admin_connection<S, B>(stream: TcpStream, service: S)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = admin_http1().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = tokio::time::sleep(ADMIN_CONNECTION_LIFETIME) => None,
    };
    let result = match ended {
        Some(r) => r,
        None => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(CLOSE_GRACE, conn).await {
                Ok(r) => r,
                Err(_) => return debug!("admin connection closed: it did not finish in time"),
            }
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "admin connection failed");
    }
}

/// Requests in flight on one connection and when the last one ended, so a
/// connection with nothing to do can be closed whatever its protocol.
#[derive(Clone)]
pub struct Activity(Arc<ActivityInner>);

struct ActivityInner {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

/// Marks one request in flight until dropped.
pub struct Busy(Arc<ActivityInner>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity(Arc::new(ActivityInner {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        }))
    }
}

impl Activity {
    /// Call when a request starts; hold the guard until it is answered.
    pub fn busy(&self) -> Busy {
        self.0.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(self.0.clone())
    }

    /// Resolves once no request has been in flight for `limit` (counting
    /// from creation, so a client that never sends one is covered too).
    pub fn idle_for(&self, limit: Duration) -> impl Future<Output = ()> + Send + 'static {
        let inner = self.0.clone();
        async move {
            loop {
                let last = *inner.last.lock().unwrap_or_else(|e| e.into_inner());
                let due = last + limit;
                if Instant::now() >= due && inner.in_flight.load(Ordering::SeqCst) == 0 {
                    return;
                }
                // Busy now: look again a full period later at the soonest.
                tokio::time::sleep_until(due.max(Instant::now() + limit / 4)).await;
            }
        }
    }
}
