//! Load benchmark: a direct client→server path against
//! client→sidecar A→mTLS→sidecar B→server on 127.0.0.1, measured in one run
//! and printed as a Markdown table. See `benches/README.md` for how to read it.
//!
//! The two sidecars run in-process through the library API (the same code
//! the binary runs); the idle-memory row starts the real release binary,
//! since only a separate process has its own RSS. Every loop is bounded by a
//! count and a deadline, so a broken proxy makes the bench fail, not hang.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use portcullis::app::{App, BoundAddrs};
use portcullis::config::{Cli, Command};
use portcullis::identity::{CaFiles, NewCa, TrustDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// Size of the single stream, and the most time it may take.
const STREAM_BYTES: u64 = 1 << 30;
const STREAM_LIMIT: Duration = Duration::from_secs(60);
/// The connection test stops at whichever comes first.
const CONNS: usize = 2_000;
const CONNS_LIMIT: Duration = Duration::from_secs(5);
/// Connections opened before the connection test, not counted.
const WARMUP_CONNS: usize = 20;
/// Longest wait for any single read, write or connect.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a sidecar's `/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the started binary idles after `/ready` before its RSS is read.
const SETTLE: Duration = Duration::from_secs(1);
/// The app's accept loop ends after this, whatever happens.
const SERVER_LIFETIME: Duration = Duration::from_secs(600);
const CHUNK: usize = 256 * 1024;
const MIB: f64 = 1024.0 * 1024.0;
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

#[tokio::main]
async fn main() -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("pair bench: {cores} cores, loopback; direct first, then through the pair");

    let ca_dir = tempfile::tempdir()?;
    let td = TrustDomain::new("cluster.local")?;
    let ca = NewCa::root(&td, Duration::from_secs(24 * 3600))?.write(ca_dir.path(), false)?;

    let server = TcpListener::bind("127.0.0.1:0").await?;
    let direct = server.local_addr()?;
    let app = tokio::spawn(serve(server));

    let target = direct.to_string();
    let b = start_in_process(&ca, "server", &["--inbound-target", &target]).await?;
    let upstream = format!("127.0.0.1:0={}={SERVER_ID}", b.inbound);
    let a = start_in_process(&ca, "client", &["--upstream", &upstream]).await?;
    let pair = *a
        .upstreams
        .first()
        .context("sidecar A bound no upstream listener")?;

    eprintln!("stream: {} MiB direct…", STREAM_BYTES >> 20);
    let s_direct = stream(direct).await.context("direct stream")?;
    eprintln!("stream: {} MiB through the pair…", STREAM_BYTES >> 20);
    let s_pair = stream(pair).await.context("stream through the pair")?;

    eprintln!("connections: direct…");
    let c_direct = connections(direct).await.context("direct connections")?;
    eprintln!("connections: through the pair…");
    let c_pair = connections(pair)
        .await
        .context("connections through the pair")?;

    eprintln!("idle RSS: starting the release binary…");
    let rss = idle_rss(&ca, ca_dir.path()).await;
    app.abort();

    print_table(&s_direct, &s_pair, &c_direct, &c_pair, &rss);
    Ok(())
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
}

impl Stream {
    fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / MIB / self.elapsed.as_secs_f64()
    }
}

/// Writes `STREAM_BYTES` (less if `STREAM_LIMIT` passes first), half-closes,
/// and waits for the app's count: throughput is what really arrived, end to
/// end, including draining the proxies' buffers.
async fn stream(addr: SocketAddr) -> Result<Stream> {
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
    let got = u64::from_be_bytes(reply[1..].try_into()?);
    if got != sent {
        bail!("the app received {got} of {sent} bytes");
    }
    Ok(Stream {
        bytes: got,
        elapsed,
    })
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

async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let conn = timeout(IO_TIMEOUT, TcpStream::connect(addr))
        .await
        .with_context(|| format!("connect to {addr} timed out"))?
        .with_context(|| format!("connect to {addr}"))?;
    conn.set_nodelay(true)?;
    Ok(conn)
}

// ---- sidecars -------------------------------------------------------------------

/// `portcullis run` flags for a sidecar with its own identity, signing its
/// leaf with the bench CA, on the given ports.
fn run_args(ca: &CaFiles, sa: &str, inbound: &str, admin: &str, extra: &[&str]) -> Vec<String> {
    let cert = ca.cert.display().to_string();
    let key = ca.key.display().to_string();
    let mut argv: Vec<String> = [
        "portcullis",
        "run",
        "--trust-bundle",
        &cert,
        "--ca-cert",
        &cert,
        "--ca-key",
        &key,
        "--service-account",
        sa,
        "--inbound-listen",
        inbound,
        "--admin-listen",
        admin,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(extra.iter().map(|s| s.to_string()));
    argv
}

/// Binds and starts a sidecar on this runtime and waits until it is ready.
async fn start_in_process(ca: &CaFiles, sa: &str, extra: &[&str]) -> Result<BoundAddrs> {
    let argv = run_args(ca, sa, "127.0.0.1:0", "127.0.0.1:0", extra);
    let Command::Run(args) = Cli::try_parse_from(argv)?.command else {
        bail!("not a run command");
    };
    let settings = args.settings().map_err(|e| anyhow!(e))?;
    let app = App::bind(settings).await?;
    let addrs = app.addrs().clone();
    tokio::spawn(app.run());
    wait_ready(addrs.admin, || Ok(()))
        .await
        .with_context(|| format!("sidecar {sa}"))?;
    Ok(addrs)
}

/// Polls `GET /ready` (plain HTTP/1.0 over a socket) until it answers 200;
/// `alive` is asked before each try so a dead process fails at once.
async fn wait_ready(admin: SocketAddr, mut alive: impl FnMut() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        alive()?;
        match http_get(admin, "/ready").await {
            Ok(reply) if reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200") => {
                return Ok(())
            }
            Ok(reply) => last = reply.lines().next().unwrap_or_default().to_string(),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("not ready at http://{admin}/ready after {READY_TIMEOUT:?}: {last}")
}

async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut conn = connect(addr).await?;
    let mut reply = Vec::new();
    timeout(IO_TIMEOUT, async {
        conn.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await?;
        conn.read_to_end(&mut reply).await
    })
    .await??;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// The release binary: `<target>/release/portcullis`, next to the bench's
/// own `<target>/release/deps/pair-<hash>`.
fn release_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let release = exe
        .parent()
        .and_then(Path::parent)
        .context("bench executable has no parent folder")?;
    Ok(release.join("portcullis"))
}

/// Kills and reaps the child when dropped, whatever path the bench takes.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Idle resident memory of one sidecar process, in MiB, or why it is
/// missing. The process is set up like sidecar B (explicit mode, so it binds
/// no fixed port); its stderr goes to a file that is quoted if it dies.
async fn idle_rss(ca: &CaFiles, dir: &Path) -> Result<f64, String> {
    let bin = release_binary().map_err(|e| e.to_string())?;
    if !bin.exists() {
        return Err(format!(
            "{} is missing: run `cargo build --release` (or `make bench`)",
            bin.display()
        ));
    }
    let measure = async {
        let (inbound, admin, target) = (free_port()?, free_port()?, free_port()?);
        let extra = [
            "--inbound-target",
            &target.to_string(),
            "--log-level",
            "warn",
        ];
        let argv = run_args(
            ca,
            "server",
            &inbound.to_string(),
            &admin.to_string(),
            &extra,
        );
        let log_path = dir.join("sidecar.log");
        let child = std::process::Command::new(&bin)
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut child = Reaped(child);
        wait_ready(admin, || match child.0.try_wait()? {
            None => Ok(()),
            Some(status) => {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("{} exited ({status}): {}", bin.display(), log.trim())
            }
        })
        .await?;
        tokio::time::sleep(SETTLE).await;
        vm_rss_kib(child.0.id())
    };
    measure
        .await
        .map(|kib| kib as f64 / 1024.0)
        .map_err(|e| format!("{e:#}"))
}

/// A loopback address with a port that was free a moment ago.
fn free_port() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// `VmRSS` of a process, in KiB, from `/proc/<pid>/status`.
fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS line")?;
    let kib = line.trim().trim_end_matches("kB").trim();
    Ok(kib.parse()?)
}

// ---- report -----------------------------------------------------------------------

fn print_table(
    s_direct: &Stream,
    s_pair: &Stream,
    c_direct: &Conns,
    c_pair: &Conns,
    rss: &Result<f64, String>,
) {
    let ratio = |pair: f64, direct: f64| format!("{:.2}", pair / direct);
    let row = |measure: &str, direct: f64, pair: f64, digits: usize| {
        println!(
            "| {measure} | {direct:.digits$} | {pair:.digits$} | {} |",
            ratio(pair, direct)
        );
    };
    println!();
    println!("| measure | direct | through portcullis pair | ratio |");
    println!("| --- | ---: | ---: | ---: |");
    row(
        "1 GiB stream throughput (MiB/s)",
        s_direct.mib_per_sec(),
        s_pair.mib_per_sec(),
        0,
    );
    row(
        "new connections per second (sequential)",
        c_direct.per_sec(),
        c_pair.per_sec(),
        0,
    );
    for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
        row(
            &format!("connection time {name} (µs)"),
            c_direct.quantile_us(q),
            c_pair.quantile_us(q),
            0,
        );
    }
    match rss {
        Ok(mib) => println!("| idle RSS of one sidecar process (MiB) | — | {mib:.1} | — |"),
        Err(why) => println!("| idle RSS of one sidecar process (MiB) | — | n/a | — |\n\nidle RSS not measured: {why}"),
    }
    println!();
    println!(
        "ratio = through the pair ÷ direct. Stream: {} MiB direct in {:.2?}, {} MiB through the pair in {:.2?}. \
         Connections: {} direct in {:.2?}, {} through the pair in {:.2?} (each a full mTLS handshake; limit {CONNS} or {CONNS_LIMIT:?}).",
        s_direct.bytes >> 20,
        s_direct.elapsed,
        s_pair.bytes >> 20,
        s_pair.elapsed,
        c_direct.latencies.len(),
        c_direct.elapsed,
        c_pair.latencies.len(),
        c_pair.elapsed,
    );
}
