//! HTTP load: `wrk` when installed, else a bounded in-process generator
//! doing the same (32 connections, `GET /bench/…`, every answer must be
//! 2xx); and a small hyper app for when nginx is not installed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::{connect, IO_TIMEOUT};

/// Concurrent client connections.
pub const CONNECTIONS: usize = 32;
/// Longest a `wrk` run may take beyond its duration before it is killed.
const WRK_GRACE: Duration = Duration::from_secs(20);

/// How the client uses its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// A new TCP connection per request (`Connection: close`).
    Close,
    /// Requests back to back on the same connections.
    Alive,
}

/// What one load run measured.
#[derive(Debug, Clone)]
pub struct Run {
    pub requests: u64,
    pub elapsed: Duration,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Run {
    pub fn per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

/// Which load generator runs.
pub fn generator() -> &'static str {
    if crate::procs::which("wrk").is_some() {
        "wrk"
    } else {
        "in-process generator (wrk not installed)"
    }
}

/// `CONNECTIONS` clients sending `GET /bench/load` to `addr` for `time`.
pub async fn run(addr: SocketAddr, keep: Keep, time: Duration) -> Result<Run> {
    if let Some(wrk_bin) = crate::procs::which("wrk") {
        wrk(&wrk_bin, addr, keep, time).await
    } else {
        in_process(addr, keep, time).await
    }
}

async fn wrk(bin: &std::path::Path, addr: SocketAddr, keep: Keep, time: Duration) -> Result<Run> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["-t2", &format!("-c{CONNECTIONS}")])
        .arg(format!("-d{}s", time.as_secs().max(1)))
        .args(["--latency", "--timeout", "5s"]);
    if keep == Keep::Close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{addr}/bench/load"))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(time + WRK_GRACE, cmd.output())
        .await
        .context("wrk did not finish")??;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("wrk output:\n{text}"))
}

/// Reads requests, duration, latency percentiles and errors from wrk's
/// report; any non-2xx answer or socket error beyond 0.1% fails the run.
fn parse_wrk(text: &str) -> Result<Run> {
    let mut requests = None;
    let mut elapsed = None;
    let (mut p50, mut p99) = (None, None);
    for line in text.lines().map(str::trim) {
        if let Some((n, rest)) = line.split_once(" requests in ") {
            requests = Some(n.trim().parse::<u64>()?);
            elapsed = rest.split(',').next().and_then(duration_us);
        } else if let Some(v) = line.strip_prefix("50%") {
            p50 = duration_us(v.trim());
        } else if let Some(v) = line.strip_prefix("99%") {
            p99 = duration_us(v.trim());
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            bail!("{} answers were not 2xx/3xx", v.trim());
        }
    }
    let requests = requests.context("no request count")?;
    let errors: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|e| {
            e.split(',')
                .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    if errors * 1000 > requests.max(1) {
        bail!("{errors} socket errors for {requests} requests");
    }
    Ok(Run {
        requests,
        elapsed: Duration::from_secs_f64(elapsed.context("no duration")? / 1e6),
        p50_us: p50.unwrap_or(f64::NAN),
        p99_us: p99.unwrap_or(f64::NAN),
    })
}

/// `812.00us`, `1.20ms`, `5.00s`, `1.00m` → microseconds.
fn duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        _ => return None,
    };
    Some(n * scale)
}

/// The same load as `wrk` from this process: `CONNECTIONS` tasks, each
/// sending requests one after the other until `time` is up.
async fn in_process(addr: SocketAddr, keep: Keep, time: Duration) -> Result<Run> {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let latencies = latencies.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut send = None;
            while started.elapsed() < time {
                let t = Instant::now();
                if send.is_none() {
                    send = Some(h1(addr).await?);
                }
                let s = send.as_mut().context("no connection")?;
                let mut req = Request::get("/bench/load").header("host", "bench");
                if keep == Keep::Close {
                    req = req.header("connection", "close");
                }
                let resp = tokio::time::timeout(IO_TIMEOUT, async {
                    s.ready().await?;
                    let resp = s.send_request(req.body(Empty::<Bytes>::new())?).await?;
                    let status = resp.status();
                    resp.into_body().collect().await?;
                    Ok::<_, anyhow::Error>(status)
                })
                .await
                .context("request timed out")??;
                if !resp.is_success() {
                    bail!("status {resp}");
                }
                if keep == Keep::Close {
                    send = None;
                }
                mine.push(t.elapsed());
            }
            latencies.lock().await.extend(mine);
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed();
    let mut all = std::mem::take(&mut *latencies.lock().await);
    all.sort_unstable();
    let q = |q: f64| {
        all.get(((all.len().max(1) - 1) as f64 * q).round() as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
    };
    Ok(Run {
        requests: all.len() as u64,
        elapsed,
        p50_us: q(0.5),
        p99_us: q(0.99),
    })
}

async fn h1(addr: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let stream = connect(addr).await?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// A tiny HTTP app in this process answering every request with `ok`, for
/// when nginx is not installed; its accept loop ends after `lifetime`.
pub async fn hyper_app(lifetime: Duration) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let deadline = tokio::time::Instant::now() + lifetime;
    tokio::spawn(async move {
        while let Ok(Ok((s, _))) = tokio::time::timeout_at(deadline, listener.accept()).await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}
