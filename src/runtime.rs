//! The sidecar's threads, sized by `--worker-threads`: one event loop per
//! thread ("shard"), each a tokio current-thread runtime, sharing nothing
//! on the data path but read-mostly state (certificates, rules, metrics).
//!
//! A connection lives its whole life on one shard: its tasks are never
//! handed to another thread, so no worker is woken through the kernel to
//! pick one up. tokio's work-stealing runtime did that hand-off, and on a
//! loaded node it cost more CPU per request than the second core saved
//! (benches/README.md, *Worker threads*). Shards keep one thread's cost per
//! request and still use more cores: the kernel spreads new outbound
//! connections over the shards' listening sockets (`SO_REUSEPORT`), and
//! inbound connections are handed to the shard with the fewest open ones
//! (see `proxy::inbound`). Pools (tunnel connections, app connections) are
//! per shard for the same reason.

use std::cell::Cell;
use std::io;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::{Builder, Handle, Runtime};
use tokio_util::sync::CancellationToken;

/// The most threads `--worker-threads` (and the injector) accepts.
pub const MAX_WORKER_THREADS: u16 = 1024;

/// The name of every shard thread but the first, which is the process's
/// main thread (what `top -H` shows).
pub const WORKER_NAME: &str = "proxy-worker";

thread_local! {
    /// The shard this thread runs; 0 on any thread that is not a shard.
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// The shard the calling thread runs (0 outside of any shard): the index
/// of its per-shard pools.
pub fn shard() -> usize {
    SHARD.with(Cell::get)
}

/// How many threads run the proxy: `0` asks for one per CPU this process
/// may use (its cgroup CPU limit and affinity mask included).
pub fn worker_count(requested: usize) -> usize {
    match requested {
        0 => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        n => n,
    }
}

/// The runtime of shard 0, run by the calling (main) thread.
pub fn build() -> io::Result<Runtime> {
    Builder::new_current_thread().enable_all().build()
}

/// Every shard's handle and its count of open connections (for handing
/// inbound connections to the least busy one).
#[derive(Clone)]
pub struct Shards {
    inner: Arc<Inner>,
}

struct Inner {
    handles: Vec<Handle>,
    open: Vec<AtomicUsize>,
    /// Where the next search for the least busy shard starts, so ties
    /// rotate instead of all going to shard 0.
    next: AtomicUsize,
    stop: CancellationToken,
}

impl Shards {
    /// Shard 0 is the runtime of the caller; `count - 1` more threads each
    /// run a runtime of their own until this (and every clone) is dropped
    /// or [`Shards::stop`] is called. Must be called inside a runtime.
    pub fn start(count: usize) -> io::Result<Shards> {
        let stop = CancellationToken::new();
        let mut handles = vec![Handle::current()];
        for index in 1..count.max(1) {
            let (tx, rx) = std::sync::mpsc::channel();
            let stopped = stop.clone();
            std::thread::Builder::new()
                .name(WORKER_NAME.into())
                .spawn(move || {
                    SHARD.with(|s| s.set(index));
                    let rt = match build() {
                        Ok(rt) => rt,
                        Err(e) => return drop(tx.send(Err(e))),
                    };
                    let _ = tx.send(Ok(rt.handle().clone()));
                    rt.block_on(stopped.cancelled());
                })?;
            let handle = rx
                .recv()
                .map_err(|_| io::Error::other("a worker thread ended before it started"))??;
            handles.push(handle);
        }
        let open = handles.iter().map(|_| AtomicUsize::new(0)).collect();
        Ok(Shards {
            inner: Arc::new(Inner {
                handles,
                open,
                next: AtomicUsize::new(0),
                stop,
            }),
        })
    }

    /// One shard: the caller's runtime (tests and tools that run a
    /// sidecar inside their own runtime).
    pub fn single() -> Shards {
        Shards {
            inner: Arc::new(Inner {
                handles: vec![Handle::current()],
                open: vec![AtomicUsize::new(0)],
                next: AtomicUsize::new(0),
                stop: CancellationToken::new(),
            }),
        }
    }

    pub fn count(&self) -> usize {
        self.inner.handles.len()
    }

    pub fn handle(&self, index: usize) -> &Handle {
        &self.inner.handles[index]
    }

    /// The shard with the fewest connections handed to it still open; the
    /// returned guard counts one more there until it is dropped.
    pub fn least_busy(&self) -> (usize, ShardLoad) {
        let inner = &self.inner;
        let n = inner.handles.len();
        let start = inner.next.fetch_add(1, Ordering::Relaxed) % n;
        let index = (0..n)
            .map(|i| (start + i) % n)
            .min_by_key(|&i| inner.open[i].load(Ordering::Relaxed))
            .unwrap_or(0);
        inner.open[index].fetch_add(1, Ordering::Relaxed);
        let load = ShardLoad {
            inner: self.inner.clone(),
            index,
        };
        (index, load)
    }

    /// Ends the shard threads' runtimes (their tasks are dropped).
    pub fn stop(&self) {
        self.inner.stop.cancel();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One connection counted on a shard while it is open.
pub struct ShardLoad {
    inner: Arc<Inner>,
    index: usize,
}

impl Drop for ShardLoad {
    fn drop(&mut self) {
        self.inner.open[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_every_usable_cpu() {
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(worker_count(0), cpus);
        assert_eq!(worker_count(3), 3);
    }

    /// Each shard runs its tasks on a thread of its own, and knows its
    /// index there; shard 0 is the caller.
    #[test]
    fn every_shard_is_a_thread_that_knows_its_index() {
        let rt = build().unwrap();
        rt.block_on(async {
            let shards = Shards::start(3).unwrap();
            assert_eq!(shards.count(), 3);
            let mut threads = Vec::new();
            for i in 0..3 {
                let (thread, index) = shards
                    .handle(i)
                    .spawn(async { (std::thread::current().id(), shard()) })
                    .await
                    .unwrap();
                assert_eq!(index, i);
                threads.push(thread);
            }
            assert_eq!(threads[0], std::thread::current().id());
            threads.dedup();
            assert_eq!(threads.len(), 3, "three distinct threads");
            shards.stop();
        });
    }

    /// Connections go to the shard with the fewest open, and ties rotate.
    #[test]
    fn least_busy_balances_open_connections() {
        let rt = build().unwrap();
        rt.block_on(async {
            let shards = Shards::start(2).unwrap();
            let (a, la) = shards.least_busy();
            let (b, _lb) = shards.least_busy();
            assert_ne!(a, b, "the second goes to the idle shard");
            drop(la);
            let (c, _lc) = shards.least_busy();
            assert_eq!(c, a, "the shard whose connection closed is the least busy");
            shards.stop();
        });
    }
}
