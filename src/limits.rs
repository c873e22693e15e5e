//! Limits that keep a flood of idle or half-sent connections from starving
//! the process: every socket is a file descriptor, and a container's soft
//! RLIMIT_NOFILE is often 1024, so a few hundred sockets held open on a
//! side port (admin, identity service) would otherwise stop mTLS traffic
//! and kubelet probes alike.

mod accept;
mod admin;
mod evict;

pub use accept::{out_of_descriptors, AcceptErrors, ACCEPT_LOG_INTERVAL};
pub use admin::{
    admin_http1, serve_admin_connection, AdminConnections, AdminSlot, ADMIN_CONNECTION_LIFETIME,
    ADMIN_FIRST_REQUEST_TIMEOUT, ADMIN_HEADER_READ_TIMEOUT, ADMIN_MAX_CONNECTIONS,
};
pub use evict::{Eviction, EvictionSet, Slot, SlotHandle, PROTECTED};

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
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

/// Lets one log line through per interval and counts the events in
/// between, so a flood of refused connections costs one line, not one
/// line each.
pub struct LogEvery {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    events: AtomicU64,
}

impl LogEvery {
    pub fn new(interval: Duration) -> Self {
        LogEvery {
            interval,
            last: Mutex::new(None),
            events: AtomicU64::new(0),
        }
    }

    /// Records one event; `Some(events since the last line)` when a line
    /// is due now.
    pub fn tick(&self) -> Option<u64> {
        self.events.fetch_add(1, Ordering::SeqCst);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < self.interval) {
            return None;
        }
        *last = Some(now);
        Some(self.events.swap(0, Ordering::SeqCst))
    }
}

/// A [`LogEvery`] per kind of event (a refusal's cause, a handshake
/// failure's reason): a flood of one kind costs one line per interval,
/// with the count, and does not hide the first event of another kind.
/// Kinds are pairs of fixed words from the code (`("inbound", "untrusted")`),
/// so the map stays small.
pub struct LogEveryByKind {
    interval: Duration,
    kinds: Mutex<HashMap<LogKind, LogEvery>>,
}

/// A kind of logged event: where (`inbound`, `outbound`) and what.
pub type LogKind = (&'static str, &'static str);

impl LogEveryByKind {
    pub fn new(interval: Duration) -> Self {
        LogEveryByKind {
            interval,
            kinds: Mutex::default(),
        }
    }

    /// Records one event of `kind`; `Some(events of that kind since its
    /// last line)` when a line is due now.
    pub fn tick(&self, kind: LogKind) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds
            .entry(kind)
            .or_insert_with(|| LogEvery::new(self.interval))
            .tick()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_every_lets_one_line_through_per_interval_with_the_count() {
        let quiet = LogEvery::new(Duration::from_secs(3600));
        assert_eq!(quiet.tick(), Some(1), "the first event is logged");
        for _ in 0..99 {
            assert_eq!(quiet.tick(), None);
        }
        let chatty = LogEvery::new(Duration::ZERO);
        assert_eq!(chatty.tick(), Some(1));
        assert_eq!(chatty.tick(), Some(1), "each line counts its own events");
    }

    #[test]
    fn log_every_by_kind_limits_each_kind_on_its_own() {
        let logs = LogEveryByKind::new(Duration::from_secs(3600));
        assert_eq!(logs.tick(("inbound", "untrusted")), Some(1));
        for _ in 0..199 {
            assert_eq!(logs.tick(("inbound", "untrusted")), None);
        }
        assert_eq!(
            logs.tick(("inbound", "plaintext")),
            Some(1),
            "another kind is not hidden"
        );
        assert_eq!(logs.tick(("outbound", "untrusted")), Some(1));
        let chatty = LogEveryByKind::new(Duration::ZERO);
        assert_eq!(chatty.tick(("inbound", "untrusted")), Some(1));
        assert_eq!(chatty.tick(("inbound", "untrusted")), Some(1));
    }
}
