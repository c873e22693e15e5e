//! Graceful shutdown: stop accepting, let open connections finish for up to
//! the drain timeout, then exit.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Resolves on SIGTERM or SIGINT (logged), the signals that start a
/// graceful shutdown. Never resolves if the handlers cannot be installed.
pub async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// Shared by every listener: `stopping` ends accept loops, `connections`
/// tracks the tasks that must finish (or time out) before exit.
#[derive(Clone, Default)]
pub struct Drain {
    stopping: CancellationToken,
    connections: TaskTracker,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the shutdown: listeners stop accepting and `/ready` turns 503.
    pub fn begin(&self) {
        self.stopping.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// Resolves when the shutdown has begun.
    pub fn stopping(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.stopping.cancelled()
    }

    /// A token that is cancelled when the shutdown begins, for background tasks.
    pub fn token(&self) -> CancellationToken {
        self.stopping.clone()
    }

    /// Runs a connection task that the drain waits for. The future is boxed
    /// first: a connection's state machine is several KiB, and the runtime
    /// would otherwise copy all of it into the task and again when the task
    /// finishes (those copies stood out in profiles of short connections).
    pub fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.connections.spawn(Box::pin(fut));
    }

    /// [`Drain::spawn`] on another shard's runtime.
    pub fn spawn_on<F>(&self, fut: F, handle: &tokio::runtime::Handle)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.connections.spawn_on(Box::pin(fut), handle);
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.connections.len()
    }

    /// Waits for open connections to finish, at most `timeout`. Returns how
    /// many were still open when it gave up.
    pub async fn wait(&self, timeout: Duration) -> usize {
        self.connections.close();
        let _ = tokio::time::timeout(timeout, self.connections.wait()).await;
        self.connections.len()
    }
}
