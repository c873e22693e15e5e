//! A slot for one parse at a time, run on its own thread with a deadline.
//!
//! Parsing a file is CPU work of a size the file decides; on a tokio worker
//! it would stall traffic, the admin port and signal handling alike. A
//! plain thread (not `spawn_blocking`, which the runtime waits for at
//! shutdown) does the work; the caller waits at most a deadline.
//!
//! A thread cannot be stopped, so a parse that overruns its deadline runs
//! on. Two ways to bound that were weighed: keep the slot until it ends
//! (one thread at most, but then a single slow file blocks every later
//! reload, an emergency fix included, for as long as it runs, forever if
//! it never ends), or let a new parse start beside it. The slot does the
//! latter with a hard cap: at most [`MAX_ALIVE`] parse threads at once.
//! Callers wait for each parse (or its deadline) before starting the next,
//! so a thread still alive when `run` is called has overrun: the next file
//! gets a parse of its own, and only a second overrun makes later parses
//! wait ([`SlotError::Busy`]) until one of the two ends. Bad files thus
//! cost at most two threads, and one of them cannot block the next fix.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Why a parse did not produce a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// Two earlier parses are still running (both overran their deadline).
    #[error("two previous parses are still running")]
    Busy,
    /// The parse took longer than the deadline.
    #[error("parsing took longer than {0:?}; refused")]
    TimedOut(Duration),
    /// No thread could be started, or the parse panicked.
    #[error("the parse thread failed")]
    Failed,
}

/// The most parse threads alive at once per slot: the one running now and
/// one that overran its deadline.
pub const MAX_ALIVE: usize = 2;

/// At most one parse awaited and [`MAX_ALIVE`] threads alive; cheap to
/// clone (clones share the slot).
#[derive(Clone, Default)]
pub struct ParseSlot {
    alive: Arc<AtomicUsize>,
    /// Set when a parse overran, so the next start beside it is logged once.
    overran: Arc<AtomicBool>,
}

/// Counts a parse thread out when it ends, however it ends.
struct Release(Arc<AtomicUsize>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ParseSlot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether no new parse may start now ([`MAX_ALIVE`] are running).
    pub fn is_busy(&self) -> bool {
        self.alive() >= MAX_ALIVE
    }

    /// How many parse threads are alive now.
    pub fn alive(&self) -> usize {
        self.alive.load(Ordering::Acquire)
    }

    /// Runs `work` on a new thread and waits for it at most `deadline`.
    pub async fn run<T, F>(&self, deadline: Duration, work: F) -> Result<T, SlotError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let claimed = self
            .alive
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_ALIVE).then_some(n + 1)
            });
        match claimed {
            Err(_) => return Err(SlotError::Busy),
            Ok(1) if self.overran.swap(false, Ordering::AcqRel) => tracing::warn!(
                "a parse that overran its deadline is still running; \
                 starting the next one beside it (at most {MAX_ALIVE} at once)"
            ),
            Ok(_) => {}
        }
        let release = Release(self.alive.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let span = tracing::Span::current();
        let spawned = std::thread::Builder::new()
            .name("portcullis-parse".into())
            .spawn(move || {
                let value = span.in_scope(work);
                // Count this thread out before answering, so the caller may
                // start the next parse as soon as it has this one's result. (On a panic
                // the guard is dropped while unwinding.)
                drop(release);
                let _ = tx.send(value);
            });
        if spawned.is_err() {
            // The closure (and with it the release guard) was dropped.
            return Err(SlotError::Failed);
        }
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(SlotError::Failed),
            Err(_) => {
                self.overran.store(true, Ordering::Release);
                Err(SlotError::TimedOut(deadline))
            }
        }
    }
}
