//! Bulk and connection-rate rows: one 1 GiB stream and sequential new
//! connections, direct and through a sidecar pair running in this process
//! (`App::bind` → `App::run`); the stream also through the nginx TCP-mode
//! mTLS pair when nginx is installed. The app echoes the first byte, then
//! counts bytes until end of stream and answers with the count.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use portcullis::app::{App, BoundAddrs};
use portcullis::config::{Cli, Command};
use portcullis::identity::{CaFiles, TrustDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

use crate::external::{self, Certs};
use crate::idle::Idle;
use crate::procs::cpu_seconds;
use crate::{connect, run_args, wait_ok, IO_TIMEOUT, SERVER_ID};

/// Size of the single stream, and the most time it may take.
const STREAM_BYTES: u64 = 1 << 30;
const STREAM_LIMIT: Duration = Duration::from_secs(60);
/// Runs of the stream row on each path; the table shows the median.
const STREAM_RUNS: usize = 3;
/// The connection test stops at whichever comes first.
const CONNS: usize = 2_000;
const CONNS_LIMIT: Duration = Duration::from_secs(5);
/// Connections opened before the connection test, not counted.
const WARMUP_CONNS: usize = 20;
/// The app's accept loop ends after this, whatever happens.
const SERVER_LIFETIME: Duration = Duration::from_secs(600);
const CHUNK: usize = 256 * 1024;
const MIB: f64 = 1024.0 * 1024.0;

/// What the in-process rows measured.
pub struct Bulk {
    s_direct: Stream,
    s_pair: Stream,
    /// Through the nginx TCP-mode pair, or why it did not run.
    s_nginx: Result<Stream, String>,
    c_direct: Conns,
    c_pair: Conns,
}

/// Starts the app and the in-process pair (and the nginx pair when it is
/// installed), then runs the stream and the connection rows, direct first.
pub async fn run(ca: &CaFiles, td: &TrustDomain, dir: &Path) -> Result<Bulk> {
    let server = TcpListener::bind("127.0.0.1:0").await?;
    let direct = server.local_addr()?;
    let app = tokio::spawn(serve(server));

    let target = direct.to_string();
    let (b, b_running) = start(ca, "server", &["--inbound-target", &target]).await?;
    let upstream = format!("127.0.0.1:0={}={SERVER_ID}", b.inbound);
    let (a, a_running) = start(ca, "client", &["--upstream", &upstream]).await?;
    let pair = *a
        .upstreams
        .first()
        .context("sidecar A bound no upstream listener")?;

    let nginx = nginx_pair(ca, td, dir, direct).await;

    // Alternating runs, median of each: one run of the direct path lasts
    // well under a second and moves with whatever else the machine does.
    let (mut directs, mut pairs, mut nginxes) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=STREAM_RUNS {
        eprintln!(
            "stream {run}/{STREAM_RUNS}: {} MiB direct, then through each pair…",
            STREAM_BYTES >> 20
        );
        directs.push(stream(direct, &[]).await.context("direct stream")?);
        pairs.push(stream(pair, &[]).await.context("stream through the pair")?);
        if let Ok(n) = &nginx {
            nginxes.push(stream(n.front, &n.pids).await.map_err(|e| format!("{e:#}")));
        }
    }
    let s_direct = median(directs);
    let s_pair = median(pairs);
    let s_nginx = nginx.and_then(|running| {
        drop(running);
        Ok(median(nginxes.into_iter().collect::<Result<_, _>>()?))
    });

    eprintln!("connections: direct…");
    let c_direct = connections(direct).await.context("direct connections")?;
    eprintln!("connections: through the pair…");
    let c_pair = connections(pair)
        .await
        .context("connections through the pair")?;
    app.abort();
    // The rows after these run other processes: stop this pair first.
    for running in [a_running, b_running] {
        running.stop().await;
    }
    Ok(Bulk {
        s_direct,
        s_pair,
        s_nginx,
        c_direct,
        c_pair,
    })
}

/// The nginx TCP-mode mTLS pair in front of the app, or why it cannot run.
async fn nginx_pair(
    ca: &CaFiles,
    td: &TrustDomain,
    dir: &Path,
    app: SocketAddr,
) -> Result<external::Running, String> {
    let start = async {
        let dir = dir.join("bulk-nginx");
        std::fs::create_dir_all(&dir)?;
        let certs = Certs::write(ca, td, &dir)?;
        external::nginx_stream_pair(&dir, &certs, app).await
    };
    start.await.map_err(|e| format!("{e:#}"))
}

/// An in-process sidecar: its drain and its running task.
struct Running {
    drain: portcullis::drain::Drain,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Drains the sidecar (as on SIGTERM) and waits a bounded time for it.
    async fn stop(self) {
        self.drain.begin();
        if timeout(IO_TIMEOUT, self.task).await.is_err() {
            eprintln!("an in-process sidecar did not stop within {IO_TIMEOUT:?}");
        }
    }
}

/// Binds and starts a sidecar on this runtime and waits until it is ready.
async fn start(ca: &CaFiles, sa: &str, extra: &[&str]) -> Result<(BoundAddrs, Running)> {
    let argv = run_args(ca, sa, "127.0.0.1:0", "127.0.0.1:0", extra);
    let Command::Run(args) = Cli::try_parse_from(argv)?.command else {
        bail!("not a run command");
    };
    let settings = args.settings().map_err(|e| anyhow!(e))?;
    let app = App::bind(settings).await?;
    let addrs = app.addrs().clone();
    let drain = app.drain();
    let task = tokio::spawn(app.run());
    wait_ok(addrs.admin, "/ready", || Ok(()))
        .await
        .with_context(|| format!("sidecar {sa}"))?;
    Ok((addrs, Running { drain, task }))
}

// ---- the app behind sidecar B ----------------------------------------------

/// The app: echoes the first byte at once (for the connection test), then
/// counts bytes until EOF and answers with the total as 8 big-endian bytes
/// (for the stream test, so the client knows every byte arrived).
async fn serve(listener: TcpListener) {
    let deadline = tokio::time::Instant::now() + SERVER_LIFETIME;
    while let Ok(Ok((conn, _))) = tokio::time::timeout_at(deadline, listener.accept()).await {
        tokio::spawn(async move {
            let _ = sink(conn).await;
        });
    }
}

async fn sink(mut conn: TcpStream) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        // Each read is bounded; the byte count bounds the loop in practice.
        let n = timeout(IO_TIMEOUT, conn.read(&mut buf)).await??;
        if n == 0 {
            break;
        }
        if total == 0 {
            conn.write_all(&buf[..1]).await?;
        }
        total += n as u64;
    }
    conn.write_all(&total.to_be_bytes()).await?;
    conn.shutdown().await
}

// ---- measures -----------------------------------------------------------------

/// One big stream: bytes the app confirmed and the time until it did.
struct Stream {
    bytes: u64,
    elapsed: Duration,
    /// CPU time (user + system) of the client, the app and the proxies
    /// together: what carrying the bytes cost, whatever the parallelism.
    cpu_secs: f64,
    /// Minor page faults of this whole process (client, app and, through
    /// the pair, both sidecars) during the run: a data path that gives
    /// buffers back to the kernel and faults them in again shows here.
    faults: u64,
}

impl Stream {
    fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / MIB / self.elapsed.as_secs_f64()
    }

    fn cpu_ms_per_mib(&self) -> f64 {
        self.cpu_secs * 1000.0 / (self.bytes as f64 / MIB)
    }
}

/// Writes `STREAM_BYTES` (less if `STREAM_LIMIT` passes first), half-closes,
/// and waits for the app's count: throughput is what really arrived, end to
/// end, including draining the proxies' buffers. `pids` are proxy
/// processes outside this one, whose CPU time counts too.
async fn stream(addr: SocketAddr, pids: &[u32]) -> Result<Stream> {
    let before = Usage::now(pids)?;
    let start = Instant::now();
    let mut conn = connect(addr).await?;
    let chunk = vec![0x5a; CHUNK];
    let mut sent = 0u64;
    while sent < STREAM_BYTES && start.elapsed() < STREAM_LIMIT {
        timeout(IO_TIMEOUT, conn.write_all(&chunk))
            .await
            .context("write stalled")??;
        sent += CHUNK as u64;
    }
    conn.shutdown().await?;
    let mut reply = [0u8; 9]; // the echoed first byte, then the count
    timeout(IO_TIMEOUT, conn.read_exact(&mut reply))
        .await
        .context("no byte count from the app after the half-close")??;
    let elapsed = start.elapsed();
    let after = Usage::now(pids)?;
    let got = u64::from_be_bytes(reply[1..].try_into()?);
    if got != sent {
        bail!("the app received {got} of {sent} bytes");
    }
    Ok(Stream {
        bytes: got,
        elapsed,
        cpu_secs: after.cpu_secs - before.cpu_secs,
        faults: after.faults - before.faults,
    })
}

/// CPU time so far of this process (every thread: client, app and the
/// in-process sidecars) and of `pids`, and this process's minor page
/// faults.
struct Usage {
    cpu_secs: f64,
    faults: u64,
}

impl Usage {
    fn now(pids: &[u32]) -> Result<Usage> {
        use nix::sys::resource::{getrusage, UsageWho};
        let own = getrusage(UsageWho::RUSAGE_SELF)?;
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        Ok(Usage {
            cpu_secs: secs(own.user_time()) + secs(own.system_time()) + cpu_seconds(pids)?,
            faults: own.minor_page_faults() as u64,
        })
    }
}

/// The run with the median throughput.
fn median(mut runs: Vec<Stream>) -> Stream {
    runs.sort_by(|a, b| a.mib_per_sec().total_cmp(&b.mib_per_sec()));
    runs.swap_remove(runs.len() / 2)
}

/// Sequential new connections: how many were done, in how long, and the
/// time of each (connect → 1 byte out → its echo back).
struct Conns {
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Conns {
    fn per_sec(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// The `q` quantile (0..=1) of the per-connection times, in µs.
    fn quantile_us(&self, q: f64) -> f64 {
        let mut v: Vec<Duration> = self.latencies.clone();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_unstable();
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        v[i].as_secs_f64() * 1e6
    }
}

/// Opens connections one after another (up to `CONNS`, within
/// `CONNS_LIMIT`): connect, send a byte, read its echo, close. One at a time
/// so each number is one connection's cost, not a queueing effect.
async fn connections(addr: SocketAddr) -> Result<Conns> {
    for _ in 0..WARMUP_CONNS {
        one_connection(addr).await?;
    }
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(CONNS);
    while latencies.len() < CONNS && start.elapsed() < CONNS_LIMIT {
        let t = Instant::now();
        one_connection(addr)
            .await
            .with_context(|| format!("connection {}", latencies.len() + 1))?;
        latencies.push(t.elapsed());
    }
    Ok(Conns {
        latencies,
        elapsed: start.elapsed(),
    })
}

async fn one_connection(addr: SocketAddr) -> Result<()> {
    let mut conn = connect(addr).await?;
    let mut byte = [b'x'];
    timeout(IO_TIMEOUT, async {
        conn.write_all(&byte).await?;
        conn.read_exact(&mut byte).await
    })
    .await
    .context("no echo")??;
    Ok(())
}

// ---- report -----------------------------------------------------------------------

/// The first table: bulk, sequential connections and memory.
pub fn print_table(bulk: &Bulk, idle: &Result<Idle, String>) {
    let Bulk {
        s_direct,
        s_pair,
        s_nginx,
        c_direct,
        c_pair,
    } = bulk;
    // The nginx pair's cells for a stream row: its value and its ratio.
    let nginx = |value: fn(&Stream) -> f64, digits: usize| match s_nginx {
        Ok(n) => format!("{:.digits$} | {:.2}", value(n), value(n) / value(s_direct)),
        Err(_) => "n/a | —".to_string(),
    };
    let row = |measure: &str, direct: f64, pair: f64, digits: usize, nginx: String| {
        println!(
            "| {measure} | {direct:.digits$} | {pair:.digits$} | {:.2} | {nginx} |",
            pair / direct
        );
    };
    println!();
    println!("| measure | direct | through portcullis pair | ratio | through nginx TCP-mode pair, mTLS | ratio |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    row(
        "1 GiB stream throughput (MiB/s)",
        s_direct.mib_per_sec(),
        s_pair.mib_per_sec(),
        0,
        nginx(Stream::mib_per_sec, 0),
    );
    row(
        "CPU time per MiB carried (ms; client, app and proxies)",
        s_direct.cpu_ms_per_mib(),
        s_pair.cpu_ms_per_mib(),
        2,
        nginx(Stream::cpu_ms_per_mib, 2),
    );
    let per_mib = |s: &Stream| s.faults as f64 / (s.bytes as f64 / MIB);
    println!(
        "| minor page faults per MiB carried (whole bench process) | {:.1} | {:.1} | — | — | — |",
        per_mib(s_direct),
        per_mib(s_pair)
    );
    let none = || "— | —".to_string();
    row(
        "new connections per second (sequential)",
        c_direct.per_sec(),
        c_pair.per_sec(),
        0,
        none(),
    );
    for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
        row(
            &format!("connection time {name} (µs)"),
            c_direct.quantile_us(q),
            c_pair.quantile_us(q),
            0,
            none(),
        );
    }
    crate::idle::print_rows(idle);
    println!();
    println!(
        "ratio = through the pair ÷ direct. Stream (median of {STREAM_RUNS} runs each): {} MiB direct in {:.2?}, {} MiB through the pair in {:.2?}. \
         Connections: {} direct in {:.2?}, {} through the pair in {:.2?} (each a stream on the pooled tunnel, or a full mTLS handshake with PORTCULLIS_TUNNEL=off; limit {CONNS} or {CONNS_LIMIT:?}).{}",
        s_direct.bytes >> 20,
        s_direct.elapsed,
        s_pair.bytes >> 20,
        s_pair.elapsed,
        c_direct.latencies.len(),
        c_direct.elapsed,
        c_pair.latencies.len(),
        c_pair.elapsed,
        crate::idle::note(idle),
    );
    if let Err(why) = s_nginx {
        println!("\nnginx stream rows not measured: {why}");
    }
    if let Err(why) = idle {
        println!("\nMemory rows not measured: {why}");
    }
}
