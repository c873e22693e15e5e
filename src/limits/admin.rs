//! Admin ports (the sidecar's, the webhook's, the identity service's):
//! kubelet probes and Prometheus scrapes must keep answering even when
//! someone holds hundreds of idle connections open.
//!
//! A connection that has not sent a whole request within
//! `ADMIN_FIRST_REQUEST_TIMEOUT` is closed, and when the cap is reached a
//! newcomer evicts the oldest connection that never sent a request, else
//! the oldest idle keep-alive one; only connections with a request in
//! flight are safe. A newcomer is refused only when every slot is busy.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::IntCounterVec;
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::evict::{EvictionSet, Slot, SlotHandle, PROTECTED};
use super::LogEvery;

/// Admin connections held at once, so the admin port can never hold more
/// descriptors than this.
pub const ADMIN_MAX_CONNECTIONS: usize = 256;
/// A new admin connection must send a whole request head within this, or
/// it is closed; probes and scrapers send theirs at once.
pub const ADMIN_FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an idle keep-alive connection stays open, and how long a
/// later request head may take (hyper starts the timer whenever it waits
/// for a request head).
pub const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// After this an admin connection is asked to close (it finishes the
/// request in flight, for at most `CLOSE_GRACE`): a client that pipelines
/// requests and never reads the answers cannot hold its slot for ever.
pub const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How long a connection asked to close may take to finish.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// At most one log line per this long about dropped admin connections.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Eviction classes: never-requested connections go first.
const NEVER_REQUESTED: u8 = 0;
const IDLE: u8 = 1;

/// The connections of one admin server.
#[derive(Clone)]
pub struct AdminConnections {
    set: EvictionSet,
    dropped: Option<IntCounterVec>,
    log: Arc<LogEvery>,
}

/// A connection's place on an admin server.
pub struct AdminSlot {
    slot: Slot,
    owner: AdminConnections,
}

impl AdminConnections {
    /// A server's set; drops are counted in `dropped` (label `reason`:
    /// `no_request`, `evicted`, `full`) when given.
    pub fn new(dropped: Option<IntCounterVec>) -> Self {
        if let Some(c) = &dropped {
            for reason in ["no_request", "evicted", "full"] {
                c.with_label_values(&[reason]);
            }
        }
        AdminConnections {
            set: EvictionSet::new(ADMIN_MAX_CONNECTIONS, ADMIN_MAX_CONNECTIONS),
            dropped,
            log: Arc::new(LogEvery::new(LOG_INTERVAL)),
        }
    }

    /// A place for a new connection from `peer`, evicting an idle one when
    /// full; `None` (counted) when every connection has a request in flight.
    pub fn admit(&self, peer: IpAddr) -> Option<AdminSlot> {
        match self.set.admit(peer, NEVER_REQUESTED) {
            Some(slot) => Some(AdminSlot {
                slot,
                owner: self.clone(),
            }),
            None => {
                self.dropped("full");
                None
            }
        }
    }

    fn dropped(&self, reason: &'static str) {
        if let Some(c) = &self.dropped {
            c.with_label_values(&[reason]).inc();
        }
        if let Some(count) = self.log.tick() {
            info!(
                reason,
                dropped = count,
                "admin connections dropped to keep the port answering"
            );
        }
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

/// Serves one admin connection with `admin_http1`: closed when no request
/// came within `ADMIN_FIRST_REQUEST_TIMEOUT` or when evicted while idle,
/// asked to close once it has lived `ADMIN_CONNECTION_LIFETIME`, and closed
/// hard `CLOSE_GRACE` later.
pub async fn serve_admin_connection<S, B>(stream: TcpStream, mut slot: AdminSlot, service: S)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let requested = Arc::new(AtomicBool::new(false));
    let tracked = Tracked {
        inner: service,
        handle: slot.slot.handle(),
        requested: requested.clone(),
    };
    let conn = admin_http1().serve_connection(TokioIo::new(stream), tracked);
    tokio::pin!(conn);
    let first_request = async {
        tokio::time::sleep(ADMIN_FIRST_REQUEST_TIMEOUT).await;
        if requested.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    };
    let ended = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = tokio::time::sleep(ADMIN_CONNECTION_LIFETIME) => None,
        _ = first_request => {
            slot.owner.dropped("no_request");
            return debug!("admin connection closed: no request in time");
        }
        _ = slot.slot.evicted() => {
            slot.owner.dropped("evicted");
            return debug!("admin connection closed: idle, and a new one needed its slot");
        }
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

/// A service that marks its connection busy (never evicted) while a
/// request is in flight.
struct Tracked<S> {
    inner: S,
    handle: SlotHandle,
    requested: Arc<AtomicBool>,
}

/// Moves the connection back to idle when the request ends, however it ends.
struct InFlight(SlotHandle);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.set_class(IDLE);
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.requested.store(true, Ordering::SeqCst);
        self.handle.set_class(PROTECTED);
        let in_flight = InFlight(self.handle.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            drop(in_flight);
            r
        })
    }
}
