//! A connection flood for the DoS tests: many holders, each keeping one
//! connection open (sending nothing, or only `first`) and opening a new one
//! as soon as the server closes it, from chosen loopback source addresses
//! (all of 127/8 is loopback on Linux). The holders run on a thread and
//! runtime of their own, as an attacker would be another process: they
//! compete with the sidecars for CPU, not for the sidecars' task queues.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Reopens per holder at most: every load loop is bounded.
const MAX_REOPENS: usize = 2_000;

/// The running flood.
pub struct Flood {
    stop: watch::Sender<bool>,
    thread: std::thread::JoinHandle<()>,
    opened: Arc<AtomicU64>,
    closed_by_server: Arc<AtomicU64>,
}

impl Flood {
    /// `holders` connections to `target`, spread over `sources`.
    pub fn start(target: SocketAddr, sources: &[IpAddr], holders: usize, first: &[u8]) -> Flood {
        let (stop, watch) = watch::channel(false);
        let opened = Arc::new(AtomicU64::new(0));
        let closed_by_server = Arc::new(AtomicU64::new(0));
        let (sources, first) = (sources.to_vec(), first.to_vec());
        let (o, c) = (opened.clone(), closed_by_server.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut tasks = JoinSet::new();
                for i in 0..holders {
                    tasks.spawn(hold(
                        target,
                        sources[i % sources.len()],
                        first.clone(),
                        watch.clone(),
                        o.clone(),
                        c.clone(),
                    ));
                }
                while tasks.join_next().await.is_some() {}
            });
        });
        Flood {
            stop,
            thread,
            opened,
            closed_by_server,
        }
    }

    /// Connections opened so far (first ones and reopened ones).
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::SeqCst)
    }

    /// Connections the server has closed so far.
    pub fn closed_by_server(&self) -> u64 {
        self.closed_by_server.load(Ordering::SeqCst)
    }

    /// Stops every holder and closes their connections.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .unwrap()
            .unwrap();
    }
}

async fn hold(
    target: SocketAddr,
    source: IpAddr,
    first: Vec<u8>,
    mut stop: watch::Receiver<bool>,
    opened: Arc<AtomicU64>,
    closed_by_server: Arc<AtomicU64>,
) {
    for _ in 0..MAX_REOPENS {
        if *stop.borrow() {
            return;
        }
        let connect = async {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source, 0))?;
            socket.connect(target).await
        };
        let conn = tokio::select! {
            r = connect => r,
            _ = stop.changed() => return,
        };
        let mut s = match conn {
            Ok(s) => s,
            Err(_) => {
                // Out of ports or a refused SYN: back off a little, as a
                // real client would, instead of spinning.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(20)) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        opened.fetch_add(1, Ordering::SeqCst);
        if !first.is_empty() && s.write_all(&first).await.is_err() {
            closed_by_server.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let mut buf = [0u8; 256];
        // Hold until the server closes it (reading and dropping anything
        // it sends), or until the flood stops.
        loop {
            tokio::select! {
                r = s.read(&mut buf) => match r {
                    Ok(n) if n > 0 => continue,
                    _ => break,
                },
                _ = stop.changed() => return,
            }
        }
        closed_by_server.fetch_add(1, Ordering::SeqCst);
    }
}

/// Raises this process's descriptor limits: the flood's sockets and the
/// in-process sidecars' share them.
pub fn raise_nofile(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft >= want {
        return;
    }
    // Tests run as root, which may raise the hard limit too.
    let hard = hard.max(want);
    setrlimit(Resource::RLIMIT_NOFILE, want, hard).unwrap();
}
