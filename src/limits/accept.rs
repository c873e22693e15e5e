//! What an accept loop does when `accept` fails, above all when the process
//! is out of file descriptors (EMFILE, ENFILE).
//!
//! tokio reports such an error without clearing the listener's readiness,
//! so a loop that simply tries again spins at full CPU while the pending
//! connections wait unanswered in the kernel's queue. Instead one spare
//! descriptor (a handle on /dev/null) is kept per listener: when accept
//! fails for want of descriptors the spare is closed, the waiting
//! connection is accepted and closed at once (its client sees a clean
//! close, not a hang), and the spare is opened again. Without a spare the
//! loop pauses. Failures are counted and logged at most once per interval
//! with how many there were, and once more when accepting works again.

use std::fs::File;
use std::time::Duration;

use prometheus::IntCounterVec;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// At most one log line per listener per this long while accept fails.
pub const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How long a loop without a spare descriptor waits before trying again.
const PAUSE: Duration = Duration::from_millis(100);
/// How long an accept after a descriptor-limit failure may wait for the
/// connection that caused it.
const REFUSE_WAIT: Duration = Duration::from_millis(5);

/// The accept-failure state of one listener.
pub struct AcceptErrors {
    listener: &'static str,
    counter: Option<IntCounterVec>,
    spare: Option<File>,
    /// Failures since the last log line.
    unlogged: u64,
    /// Failures since accept last worked.
    total: u64,
    last_log: Option<Instant>,
}

/// Whether `e` means the process or system ran out of descriptors (or of
/// socket memory): something that frees up by itself, not a bad client.
pub fn out_of_descriptors(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

impl AcceptErrors {
    /// State for the listener named `listener` (a metric label value);
    /// failures are counted in `counter` (labels `listener`, `reason`) when
    /// given.
    pub fn new(listener: &'static str, counter: Option<IntCounterVec>) -> Self {
        if let Some(c) = &counter {
            for reason in ["fd_limit", "other"] {
                c.with_label_values(&[listener, reason]);
            }
        }
        AcceptErrors {
            listener,
            counter,
            spare: open_spare(),
            unlogged: 0,
            total: 0,
            last_log: None,
        }
    }

    /// Call after every successful accept.
    pub fn accepted(&mut self) {
        if self.total > 0 {
            info!(
                listener = self.listener,
                refused = self.total,
                "accepting connections again after running out of file descriptors"
            );
            self.total = 0;
            self.unlogged = 0;
            self.last_log = None;
        }
    }

    /// Handles a failed accept on `listener`; returns when the loop may
    /// accept again.
    pub async fn failed(&mut self, listener: &TcpListener, e: std::io::Error) {
        if !out_of_descriptors(&e) {
            self.count("other");
            // A connection reset before it was accepted, and the like: it
            // concerns that connection only. Pause briefly in case it repeats.
            debug!(listener = self.listener, error = %e, "accept failed");
            return tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.count("fd_limit");
        self.unlogged += 1;
        self.total += 1;
        let due = self
            .last_log
            .is_none_or(|at| at.elapsed() >= ACCEPT_LOG_INTERVAL);
        if due {
            warn!(
                listener = self.listener,
                refused = self.unlogged,
                error = %e,
                "out of file descriptors: refusing new connections"
            );
            self.unlogged = 0;
            self.last_log = Some(Instant::now());
        }
        match self.spare.take() {
            Some(spare) => {
                drop(spare);
                if let Ok(Ok((stream, _))) =
                    tokio::time::timeout(REFUSE_WAIT, listener.accept()).await
                {
                    drop(stream);
                }
                self.spare = open_spare();
                if self.spare.is_none() {
                    tokio::time::sleep(PAUSE).await;
                }
            }
            None => {
                tokio::time::sleep(PAUSE).await;
                self.spare = open_spare();
            }
        }
    }

    fn count(&self, reason: &str) {
        if let Some(c) = &self.counter {
            c.with_label_values(&[self.listener, reason]).inc();
        }
    }
}

fn open_spare() -> Option<File> {
    File::open("/dev/null").ok()
}
