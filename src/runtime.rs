//! The sidecar's async runtime, sized by `--worker-threads`.
//!
//! One thread is the default, as in Linkerd's proxy: a sidecar carries one
//! pod's traffic, and on one thread no task is ever handed to another
//! thread, so no worker is woken through the kernel to pick it up. On a
//! loaded node that hand-off (futex wake-ups, context switches, work
//! stealing) cost more CPU per request than the proxying itself saved by
//! running on two cores (benches/README.md, *Worker threads*).

use std::io;
use std::num::NonZeroUsize;

use tokio::runtime::{Builder, Runtime};

/// The most threads `--worker-threads` (and the injector) accepts.
pub const MAX_WORKER_THREADS: u16 = 1024;

/// The name of the work-stealing runtime's threads (what `top -H` shows).
/// tokio gives it to its blocking-pool threads too (DNS lookups of
/// `--ca-url`, the access log's writes), which start only when needed.
pub const WORKER_NAME: &str = "proxy-worker";

/// How many threads run the proxy: `0` asks for one per CPU this process
/// may use (its cgroup CPU limit and affinity mask included).
pub fn worker_count(requested: usize) -> usize {
    match requested {
        0 => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        n => n,
    }
}

/// A runtime of `workers` threads: the current-thread scheduler for one,
/// the work-stealing one for more.
pub fn build(workers: usize) -> io::Result<Runtime> {
    if workers <= 1 {
        return Builder::new_current_thread().enable_all().build();
    }
    Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(WORKER_NAME)
        .enable_all()
        .build()
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

    /// Whether a spawned task ran on the thread that called `block_on`.
    fn runs_on_caller(rt: &Runtime) -> bool {
        let caller = std::thread::current().id();
        let ran_on =
            rt.block_on(async { tokio::spawn(async { std::thread::current().id() }).await });
        ran_on.unwrap() == caller
    }

    #[test]
    fn one_worker_is_the_calling_thread_more_are_threads_of_their_own() {
        assert!(runs_on_caller(&build(1).unwrap()));
        let rt = build(2).unwrap();
        assert!(!runs_on_caller(&rt));
        assert_eq!(rt.metrics().num_workers(), 2);
    }
}
