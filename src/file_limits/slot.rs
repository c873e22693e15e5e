//! A slot for one parse at a time, run on its own thread with a deadline.
//!
//! Parsing a file is CPU work of a size the file decides; on a tokio worker
//! it would stall traffic, the admin port and signal handling alike. A
//! plain thread (not `spawn_blocking`, which the runtime waits for at
//! shutdown) does the work; the caller waits at most a deadline. A parse
//! that overruns keeps the slot until it ends, so bad files cannot pile up
//! threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Why a parse did not produce a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// The previous parse is still running (it overran its deadline).
    #[error("a previous parse is still running")]
    Busy,
    /// The parse took longer than the deadline.
    #[error("parsing took longer than {0:?}; refused")]
    TimedOut(Duration),
    /// No thread could be started, or the parse panicked.
    #[error("the parse thread failed")]
    Failed,
}

/// At most one parse in flight; cheap to clone (clones share the slot).
#[derive(Clone, Default)]
pub struct ParseSlot {
    busy: Arc<AtomicBool>,
}

/// Frees the slot when the parse thread ends, however it ends.
struct Release(Arc<AtomicBool>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl ParseSlot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a parse is running now.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// Runs `work` on a new thread and waits for it at most `deadline`.
    pub async fn run<T, F>(&self, deadline: Duration, work: F) -> Result<T, SlotError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err(SlotError::Busy);
        }
        let release = Release(self.busy.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let span = tracing::Span::current();
        let spawned = std::thread::Builder::new()
            .name("portcullis-parse".into())
            .spawn(move || {
                let value = span.in_scope(work);
                // Free the slot before answering, so the caller may start the
                // next parse as soon as it has this one's result. (On a panic
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
            Err(_) => Err(SlotError::TimedOut(deadline)),
        }
    }
}
