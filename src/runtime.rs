//! The sidecar's threads, sized by `--worker-threads`: one event loop per
//! thread ("shard"), each a tokio current-thread runtime. Shards share
//! certificates, rules and metrics, a few maps behind short locks (pool
//! entries, pending handshakes), and the drain; a connection's tasks and
//! sockets belong to one shard.
//!
//! A connection lives its whole life on one shard: its tasks are never
//! handed to another thread, so no worker is woken through the kernel to
//! pick one up. tokio's work-stealing runtime did that hand-off, and on a
//! loaded node it cost more CPU per request than the second core saved
//! (benches/README.md, *Worker threads*). Shards hand nothing over once a
//! connection runs and still use more cores: every shard accepts on the
//! outbound listeners (`proxy::bind_for_shards`) and keeps what it accepts
//! unless it is [`SLACK`] connections busier than another, and inbound
//! connections (tunnels among them: few, long-lived) always go to the
//! shard with the fewest open (`proxy::inbound`). Pools (tunnel
//! connections, app connections) are per shard for the same reason.

use std::cell::Cell;
use std::io;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::IntGauge;
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

/// How many more open connections than the least busy shard a shard may
/// serve before the connections it accepts go to that one instead.
pub const SLACK: i64 = 4;

/// Every shard's handle and its count of open connections (to hand new
/// ones to the least busy).
#[derive(Clone)]
pub struct Shards {
    inner: Arc<Inner>,
}

struct Inner {
    handles: Vec<Handle>,
    /// Connections each shard serves, open now (a metric too).
    open: Vec<IntGauge>,
    /// Where the next search for the least busy shard starts, so ties
    /// rotate instead of all going to shard 0.
    next: AtomicUsize,
    stop: CancellationToken,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shards {
    /// Shard 0 is the runtime of the caller; `count - 1` more threads each
    /// run a runtime of their own until [`Shards::stop`] (or until the
    /// last clone is dropped). `open(i)` counts shard i's open
    /// connections. Must be called inside a runtime.
    pub fn start(count: usize, open: impl Fn(usize) -> IntGauge) -> io::Result<Shards> {
        let stop = CancellationToken::new();
        let mut handles = vec![Handle::current()];
        let mut threads = Vec::new();
        for index in 1..count.max(1) {
            match start_thread(index, &stop) {
                Ok((handle, thread)) => {
                    handles.push(handle);
                    threads.push(thread);
                }
                Err(e) => {
                    // The threads already started end with their runtime.
                    stop.cancel();
                    return Err(e);
                }
            }
        }
        let open = (0..handles.len()).map(open).collect();
        Ok(Shards {
            inner: Arc::new(Inner {
                handles,
                open,
                next: AtomicUsize::new(0),
                stop,
                threads: Mutex::new(threads),
            }),
        })
    }

    pub fn count(&self) -> usize {
        self.inner.handles.len()
    }

    pub fn handle(&self, index: usize) -> &Handle {
        &self.inner.handles[index]
    }

    /// The shard with the fewest open connections; the returned guard
    /// counts one more there until it is dropped.
    pub fn least_busy(&self) -> (usize, ShardLoad) {
        let index = self.least_busy_index();
        (index, self.count_on(index))
    }

    /// Where a connection accepted by shard `here` runs: there, unless
    /// `here` already serves more than [`SLACK`] connections over the least
    /// busy shard (whichever shard wakes first takes a new connection, and
    /// long-lived ones would otherwise pile up on it).
    pub fn place(&self, here: usize) -> (usize, ShardLoad) {
        let least = self.least_busy_index();
        let open = |i: usize| self.inner.open[i].get();
        let index = if open(here) <= open(least) + SLACK {
            here
        } else {
            least
        };
        (index, self.count_on(index))
    }

    fn least_busy_index(&self) -> usize {
        let inner = &self.inner;
        let n = inner.handles.len();
        let start = inner.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|i| (start + i) % n)
            .min_by_key(|&i| inner.open[i].get())
            .unwrap_or(0)
    }

    fn count_on(&self, index: usize) -> ShardLoad {
        let gauge = self.inner.open[index].clone();
        gauge.inc();
        ShardLoad { gauge }
    }

    /// Ends the other shards' runtimes (their tasks are dropped, closing
    /// their connections) and waits up to `wait` for their threads, so
    /// what they log on the way out is written before the process exits.
    pub fn stop(&self, wait: Duration) {
        self.inner.stop.cancel();
        let deadline = Instant::now() + wait;
        let threads =
            std::mem::take(&mut *self.inner.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for thread in threads {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Starts shard `index` on a thread of its own; its runtime runs until
/// `stop` is cancelled.
fn start_thread(index: usize, stop: &CancellationToken) -> io::Result<(Handle, JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let stopped = stop.clone();
    let thread = std::thread::Builder::new()
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
    Ok((handle, thread))
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One connection counted on a shard while it is open.
pub struct ShardLoad {
    gauge: IntGauge,
}

impl Drop for ShardLoad {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge(i: usize) -> IntGauge {
        IntGauge::new(format!("open_{i}"), "test").unwrap()
    }

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
            let shards = Shards::start(3, gauge).unwrap();
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
            let distinct: std::collections::HashSet<_> = threads.into_iter().collect();
            assert_eq!(distinct.len(), 3, "three distinct threads");
            shards.stop(Duration::from_secs(1));
            let after = shards.handle(1).spawn(async {}).await;
            assert!(after.is_err(), "a stopped shard runs nothing");
        });
    }

    /// Connections go to the shard with the fewest open, and ties rotate.
    #[test]
    fn least_busy_balances_open_connections() {
        let rt = build().unwrap();
        rt.block_on(async {
            let shards = Shards::start(2, gauge).unwrap();
            let (a, la) = shards.least_busy();
            let (b, _lb) = shards.least_busy();
            assert_ne!(a, b, "the second goes to the idle shard");
            drop(la);
            let (c, _lc) = shards.least_busy();
            assert_eq!(c, a, "the shard whose connection closed is the least busy");
            shards.stop(Duration::from_secs(1));
        });
    }
}
