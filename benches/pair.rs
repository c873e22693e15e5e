//! Load benchmark: a direct client→app path against client→sidecar A→mTLS→
//! sidecar B→app on 127.0.0.1, measured in one run and printed as Markdown
//! tables. See `benches/README.md` for what each row means.
//!
//! - Bulk and sequential connections (`inproc`): both sidecars in this
//!   process through the library API, the same code the binary runs.
//! - HTTP under load (`http`): 32 connections from `wrk` (or an in-process
//!   generator without it), new connection per request and keep-alive,
//!   through the real release binary pair and, when installed, through an
//!   nginx TCP-mode pair and an haproxy HTTP-mode pair with mTLS, with the
//!   proxies' CPU time per request read from `/proc`.
//! - Memory (`idle`): the release binary pair holding 1,000 idle
//!   connections, `VmRSS` of each sidecar before and after.
//!
//! Every loop is bounded by a count and a deadline and every child process
//! is killed when the bench ends, so a broken proxy makes the bench fail,
//! not hang.

#[path = "pair/external.rs"]
mod external;
#[path = "pair/http.rs"]
mod http;
#[path = "pair/idle.rs"]
mod idle;
#[path = "pair/inproc.rs"]
mod inproc;
#[path = "pair/load.rs"]
mod load;
#[path = "pair/procs.rs"]
mod procs;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use portcullis::identity::{CaFiles, NewCa, TrustDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Longest wait for any single read, write or connect.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a sidecar's `/ready` or a proxy's first answer.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

#[tokio::main]
async fn main() -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("pair bench: {cores} cores, loopback; direct first, then through each pair");
    procs::raise_fd_limit();

    let dir = tempfile::tempdir()?;
    let td = TrustDomain::new("cluster.local")?;
    let ca =
        NewCa::root(&td, Duration::from_secs(24 * 3600))?.write(&dir.path().join("ca"), false)?;

    // `PAIR_BENCH_ONLY=bulk` (or `http`) runs one part, for profiling.
    let only = std::env::var("PAIR_BENCH_ONLY").unwrap_or_default();
    let part = |name: &str| only.is_empty() || only == name;
    if !only.is_empty() && !part("bulk") && !part("http") {
        bail!("PAIR_BENCH_ONLY={only}: expected bulk or http");
    }
    if part("bulk") {
        let bulk = inproc::run(&ca, &td, dir.path()).await?;
        eprintln!("idle connections: the release binary pair…");
        let idle = idle::run(&ca).await;
        inproc::print_table(&bulk, &idle);
    }
    if part("http") {
        http::run(&ca, &td, dir.path()).await?.print();
    }
    Ok(())
}

/// `portcullis run` flags for a sidecar with its own identity, signing its
/// leaf with the bench CA, on the given ports.
pub fn run_args(ca: &CaFiles, sa: &str, inbound: &str, admin: &str, extra: &[&str]) -> Vec<String> {
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

pub async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let conn = timeout(IO_TIMEOUT, TcpStream::connect(addr))
        .await
        .with_context(|| format!("connect to {addr} timed out"))?
        .with_context(|| format!("connect to {addr}"))?;
    conn.set_nodelay(true)?;
    Ok(conn)
}

/// Polls `GET path` (plain HTTP/1.0 over a socket) until it answers 200;
/// `alive` is asked before each try so a dead process fails at once.
pub async fn wait_ok(
    addr: SocketAddr,
    path: &str,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        alive()?;
        match http_get(addr, path).await {
            Ok(reply) if reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200") => {
                return Ok(())
            }
            Ok(reply) => last = reply.lines().next().unwrap_or_default().to_string(),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("no 200 from http://{addr}{path} after {READY_TIMEOUT:?}: {last}")
}

/// One `GET` as HTTP/1.0 (the server closes after answering): the reply.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut conn = connect(addr).await?;
    let mut reply = Vec::new();
    timeout(IO_TIMEOUT, async {
        conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").as_bytes())
            .await?;
        conn.read_to_end(&mut reply).await
    })
    .await??;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}
