//! Memory rows: the release binary pair (separate processes, so each has
//! its own RSS), idle, then holding 1,000 idle app connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use portcullis::identity::CaFiles;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;

use crate::procs::{fd_limit, vm_rss_kib, Pair};
use crate::{connect, IO_TIMEOUT};

/// Connections held at once (fewer if the descriptor limit is too low).
const HELD: usize = 1_000;
/// Connections being opened at once.
const OPENING: usize = 64;
/// Opened and closed before the baseline, so one-time costs of the first
/// connections (TLS configs warmed, worker threads' stacks touched) are
/// not counted per connection.
const WARMUP: usize = 16;
/// How long the processes idle before each RSS reading (a measurement
/// pause, not synchronization: every connection has answered by then).
const SETTLE: Duration = Duration::from_secs(1);
/// The echo app's accept loop and each of its reads end after this.
const APP_LIFETIME: Duration = Duration::from_secs(300);

/// RSS readings in KiB, client sidecar A and server sidecar B.
pub struct Idle {
    /// Right after `/ready`, no connection yet.
    fresh: (u64, u64),
    /// After the warm-up connections closed.
    before: (u64, u64),
    /// While `held` connections are open and idle.
    after: (u64, u64),
    held: usize,
}

/// Starts the pair in front of an echo app, reads RSS fresh, after a
/// warm-up, and while holding `HELD` idle connections that each echoed one
/// message. An error is the reason the rows are missing.
pub async fn run(ca: &CaFiles) -> Result<Idle, String> {
    measure(ca).await.map_err(|e| format!("{e:#}"))
}

async fn measure(ca: &CaFiles) -> Result<Idle> {
    // This process holds both ends: the client socket and the app's.
    let held = HELD.min((fd_limit().saturating_sub(200) / 2) as usize);
    if held < 100 {
        bail!(
            "descriptor limit {} is too low to hold connections",
            fd_limit()
        );
    }
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = listener.local_addr()?;
    let app = tokio::spawn(echo_app(listener));
    let pair = Pair::start(ca, app_addr, &[]).await?;
    let rss = |pair: &Pair| -> Result<(u64, u64)> {
        Ok((
            vm_rss_kib(pair.a.proc.pid())?,
            vm_rss_kib(pair.b.proc.pid())?,
        ))
    };
    tokio::time::sleep(SETTLE).await;
    let fresh = rss(&pair)?;
    for i in 0..WARMUP {
        open_one(pair.front, i).await?;
    }
    tokio::time::sleep(SETTLE).await;
    let before = rss(&pair)?;

    let gate = Arc::new(Semaphore::new(OPENING));
    let tasks: Vec<_> = (0..held)
        .map(|i| {
            let gate = gate.clone();
            let front = pair.front;
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await?;
                open_one(front, i).await
            })
        })
        .collect();
    let mut conns = Vec::with_capacity(held);
    for (i, t) in tasks.into_iter().enumerate() {
        conns.push(t.await?.with_context(|| format!("held connection {i}"))?);
    }
    tokio::time::sleep(SETTLE).await;
    let after = rss(&pair)?;
    // The held connections still carry bytes (a sample of them).
    for (i, conn) in conns.iter_mut().enumerate().step_by(held / 20) {
        echo(conn, i)
            .await
            .context("a held connection after the reading")?;
    }
    drop(conns);
    app.abort();
    Ok(Idle {
        fresh,
        before,
        after,
        held,
    })
}

/// Opens a connection through the pair and has one message echoed on it.
async fn open_one(addr: SocketAddr, n: usize) -> Result<TcpStream> {
    let mut conn = connect(addr).await?;
    echo(&mut conn, n).await?;
    Ok(conn)
}

async fn echo(conn: &mut TcpStream, n: usize) -> Result<()> {
    let msg = format!("held {n:08}");
    let mut buf = vec![0u8; msg.len()];
    timeout(IO_TIMEOUT, async {
        conn.write_all(msg.as_bytes()).await?;
        conn.read_exact(&mut buf).await
    })
    .await
    .context("no echo")??;
    if buf != msg.as_bytes() {
        bail!("wrong echo");
    }
    Ok(())
}

/// The app: echoes every byte until end of stream (bounded by
/// `APP_LIFETIME` per read and for the accept loop).
async fn echo_app(listener: TcpListener) {
    let deadline = tokio::time::Instant::now() + APP_LIFETIME;
    while let Ok(Ok((mut conn, _))) = tokio::time::timeout_at(deadline, listener.accept()).await {
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            while let Ok(Ok(n)) = timeout(APP_LIFETIME, conn.read(&mut buf)).await {
                if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// The memory rows of the first table.
pub fn print_rows(idle: &Result<Idle, String>) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let Ok(m) = idle else {
        println!("| idle RSS of one sidecar process (MiB) | — | n/a | — | — | — |");
        println!(
            "| memory per 1,000 idle connections, client sidecar (MiB) | — | n/a | — | — | — |"
        );
        println!(
            "| memory per 1,000 idle connections, server sidecar (MiB) | — | n/a | — | — | — |"
        );
        return;
    };
    println!(
        "| idle RSS of one sidecar process (MiB) | — | {:.1} | — | — | — |",
        mib(m.fresh.1)
    );
    let per_1000 = |before: u64, after: u64| {
        after.saturating_sub(before) as f64 / 1024.0 * 1000.0 / m.held as f64
    };
    println!(
        "| memory per 1,000 idle connections, client sidecar (MiB) | — | {:.1} | — | — | — |",
        per_1000(m.before.0, m.after.0)
    );
    println!(
        "| memory per 1,000 idle connections, server sidecar (MiB) | — | {:.1} | — | — | — |",
        per_1000(m.before.1, m.after.1)
    );
}

/// A sentence with the raw readings, printed under the first table.
pub fn note(idle: &Result<Idle, String>) -> String {
    let Ok(m) = idle else {
        return String::new();
    };
    let mib = |kib: u64| kib as f64 / 1024.0;
    format!(
        " RSS (MiB) client / server sidecar: fresh {:.1} / {:.1}, after {WARMUP} warm-up connections {:.1} / {:.1}, holding {} {:.1} / {:.1}.",
        mib(m.fresh.0),
        mib(m.fresh.1),
        mib(m.before.0),
        mib(m.before.1),
        m.held,
        mib(m.after.0),
        mib(m.after.1),
    )
}
