//! Many connections held open at once through a real sidecar pair (two
//! `portcullis run` processes): none may crash, memory must stay bounded,
//! and new connections must still be served while the others are held.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::common::*;
use crate::proc::Proc;

/// Connections being opened at once (well under the sidecar's 1024
/// pending-handshake cap).
const OPENING: usize = 128;

/// What one run measured.
#[derive(Debug)]
pub struct Held {
    pub connections: usize,
    pub open_time: Duration,
    /// kB, before opening and while all are held; the peak (VmHWM, which
    /// the kernel updates lazily) over the run.
    pub client_rss: (u64, u64, u64),
    pub server_rss: (u64, u64, u64),
    pub client_fds: usize,
    pub server_fds: usize,
    /// Slowest of the new connections made while the others were held.
    pub new_conn_worst: Duration,
}

/// How many connections each sidecar can hold: `want`, or fewer if the
/// descriptor limit cannot be raised far enough (each held connection is
/// two sockets in each sidecar). Raises this process's soft limit to its
/// hard one, and the hard one too where allowed (CAP_SYS_RESOURCE); the
/// sidecars inherit both.
pub fn connections_allowed(want: usize) -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let need = (2 * want + 64) as u64;
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if setrlimit(Resource::RLIMIT_NOFILE, need.max(hard), need.max(hard)).is_err() {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    want.min((soft.saturating_sub(64) / 2) as usize)
}

/// One echoed message through `addr`, returning the stream still open.
async fn open_one(addr: SocketAddr, n: usize) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    let msg = format!("held {n:08}");
    s.write_all(msg.as_bytes()).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("no echo in 30 s"))??;
    if buf != msg.as_bytes() {
        return Err(std::io::Error::other("wrong echo"));
    }
    Ok(s)
}

/// Opens `n` connections through a pair to the echo server `echo`, holds
/// them, checks new ones are served, and measures both sidecars.
pub async fn hold(n: usize, echo: SocketAddr) -> Held {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let listen = [
        "--inbound-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--outbound-listen",
        "127.0.0.1:0",
    ]
    .map(String::from);
    let mut b_args = issuer_args(&ca, &ca.files.cert, "server");
    b_args.extend(listen.clone());
    b_args.extend(["--inbound-target".into(), echo.to_string()]);
    let b = Proc::run(&b_args);
    b.wait_ready().await;
    let mut a_args = issuer_args(&ca, &ca.files.cert, "client");
    a_args.extend(listen);
    a_args.extend([
        "--upstream".into(),
        format!("127.0.0.1:0={}={}", b.inbound, id("server")),
    ]);
    let a = Proc::run(&a_args);
    a.wait_ready().await;
    let upstream = a.upstream.expect("the upstream listener was logged");
    let before = (a.rss_kb(), b.rss_kb());

    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(OPENING));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                open_one(upstream, i).await
            })
        })
        .collect();
    let mut held = Vec::with_capacity(n);
    let mut failures = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(s) => held.push(s),
            Err(e) => failures.push(e.to_string()),
        }
    }
    let open_time = started.elapsed();
    assert!(
        failures.is_empty(),
        "{} of {n} connections failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    // All held: new connections are still served, one after the other.
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        let s = open_one(upstream, n + i)
            .await
            .unwrap_or_else(|e| panic!("new connection {i} while {n} are held: {e}"));
        worst = worst.max(t.elapsed());
        drop(s);
    }
    let during = (a.rss_kb(), b.rss_kb());
    let fds = (a.fds(), b.fds());
    // The held ones still carry bytes.
    for (i, s) in held.iter_mut().enumerate().step_by((n / 50).max(1)) {
        s.write_all(b"still").await.unwrap();
        let mut buf = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("held connection {i} answers"))
            .unwrap();
    }
    for p in [&a, &b] {
        assert_eq!(http_get(p.admin, "/ready").await.unwrap().0, 200);
    }
    let result = Held {
        connections: n,
        open_time,
        client_rss: (before.0, during.0, a.peak_rss_kb()),
        server_rss: (before.1, during.1, b.peak_rss_kb()),
        client_fds: fds.0,
        server_fds: fds.1,
        new_conn_worst: worst,
    };
    drop(held);
    eprintln!(
        "held {n} connections through a pair (opened in {:?}): client sidecar RSS {} kB idle, \
         {} kB holding them (peak {} kB), {} fds; server sidecar RSS {} kB idle, {} kB holding \
         them (peak {} kB), {} fds; slowest of 20 new connections meanwhile {:?}",
        result.open_time,
        result.client_rss.0,
        result.client_rss.1,
        result.client_rss.2,
        result.client_fds,
        result.server_rss.0,
        result.server_rss.1,
        result.server_rss.2,
        result.server_fds,
        result.new_conn_worst,
    );
    result
}

/// Asserts memory stays within `per_conn_kb` per held connection on top of
/// the idle figure, for both sidecars.
pub fn assert_bounded(h: &Held, per_conn_kb: u64) {
    for (who, (idle, during, _)) in [("client", h.client_rss), ("server", h.server_rss)] {
        let grew = during.saturating_sub(idle);
        assert!(
            grew <= per_conn_kb * h.connections as u64,
            "{who} sidecar grew {grew} kB for {} connections (more than {per_conn_kb} kB each)",
            h.connections
        );
    }
}
