//! What authorization costs: rule evaluation with 10, 1,000 and 10,000
//! rules; reload latency (file written → decision enforced) with 1,000
//! rules; and HTTP requests per second through a sidecar pair with
//! per-request authorization and metrics on, against the same pair carrying
//! the port as opaque TCP (no HTTP parsing, no per-request decision) and
//! against a direct connection, all in one run; and the HTTP pair again with
//! the JSON access log on. `make bench` runs it.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::app::App;
use portcullis::authz::{
    authorize, load_paths, AuthzMetrics, Connection, DefaultPolicy, HttpRequest, LiveRules, Peer,
};
use portcullis::config::{Cli, Command};
use portcullis::identity::{CaFiles, NewCa, SpiffeId, TrustDomain};
use tokio::net::{TcpListener, TcpStream};

/// Time spent measuring each evaluation case.
const EVAL_TIME: Duration = Duration::from_millis(700);
/// Reload rounds, and the longest one round may take.
const RELOADS: usize = 30;
const RELOAD_LIMIT: Duration = Duration::from_secs(5);
/// Load test: concurrent keep-alive connections, and how long each case runs.
const WORKERS: usize = 8;
const LOAD_TIME: Duration = Duration::from_secs(3);
const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    println!("| measure | value |\n| --- | ---: |");
    for n in [10, 1_000, 10_000] {
        let (hit, miss) = evaluation(dir.path(), n)?;
        println!("| evaluate, {n} rules, request allowed by the last rule (ns) | {hit:.0} |");
        println!("| evaluate, {n} rules, request no rule matches (ns) | {miss:.0} |");
    }
    let reload = rt.block_on(reload_latency(dir.path()))?;
    println!(
        "| reload with 1,000 rules, write → enforced, p50 (ms) | {:.1} |",
        reload.0
    );
    println!(
        "| reload with 1,000 rules, write → enforced, p99 (ms) | {:.1} |",
        reload.1
    );
    println!();
    // The access log writes to this process's stdout: during the load runs
    // (all of them, so they compete under the same conditions) stdout goes
    // to /dev/null, and the table is printed through a copy of the real one.
    use std::io::Write;
    use std::os::fd::AsFd;
    std::io::stdout().flush()?;
    let mut table = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1)?;
    let load = rt.block_on(requests_per_second(dir.path()))?;
    writeln!(
        table,
        "| path ({WORKERS} keep-alive connections, {LOAD_TIME:?} each) | requests/s | vs direct |"
    )?;
    writeln!(table, "| --- | ---: | ---: |")?;
    for (name, rps) in &load {
        writeln!(table, "| {name} | {rps:.0} | {:.2} |", rps / load[0].1)?;
    }
    Ok(())
}

/// `n` rules over 100 ports and `n` identities, the last one allowing
/// the bench client's `GET /bench/**` on port 8080.
fn rules_yaml(n: usize, app_port: u16) -> String {
    let mut y = String::from("rules:\n");
    for i in 0..n.saturating_sub(1) {
        y.push_str(&format!(
            "  - name: r{i}\n    action: allow\n    ports: [{}]\n    from:\n      identities: [\"spiffe://cluster.local/ns/ns{i}/sa/sa{i}\"]\n    http:\n      methods: [GET, POST]\n      paths: [\"/svc{i}/**\", \"/api/*/item{i}\"]\n",
            9000 + i % 100
        ));
    }
    y.push_str(&format!(
        "  - name: bench-client\n    action: allow\n    ports: [{app_port}]\n    from:\n      identities: [\"{CLIENT_ID}\"]\n    http:\n      methods: [GET]\n      paths: [\"/bench/**\"]\n"
    ));
    y
}

/// Writes a generated rule set as files of at most 2,000 rules each (a rule
/// file may hold at most 1 MiB), named so they load in order; the paths.
fn split_rule_files(dir: &Path, stem: &str, yaml: &str) -> Result<Vec<PathBuf>> {
    let body = yaml.strip_prefix("rules:\n").unwrap_or(yaml);
    let mut rules: Vec<String> = Vec::new();
    for line in body.split_inclusive('\n') {
        if line.starts_with("  - ") || rules.is_empty() {
            rules.push(String::new());
        }
        rules.last_mut().expect("pushed above").push_str(line);
    }
    let mut files = Vec::new();
    for (i, chunk) in rules.chunks(2_000).enumerate() {
        let file = dir.join(format!("{stem}-{i:03}.yaml"));
        std::fs::write(&file, format!("rules:\n{}", chunk.concat()))?;
        files.push(file);
    }
    Ok(files)
}

/// Nanoseconds per `authorize` call: a request the last rule allows, and
/// one that no rule matches (the full scan, then the default).
fn evaluation(dir: &Path, n: usize) -> Result<(f64, f64)> {
    let files = split_rule_files(dir, &format!("eval-{n}"), &rules_yaml(n, 8080))?;
    let set = load_paths(&files).map_err(|e| anyhow!("{e}"))?;
    let td = TrustDomain::new("cluster.local").map_err(|e| anyhow!("{e}"))?;
    let peer = Peer::Mesh(SpiffeId::parse(CLIENT_ID).map_err(|e| anyhow!("{e}"))?);
    let headers = hyper::HeaderMap::new();
    let time = |path: &str, port: u16| {
        let conn = Connection {
            peer: &peer,
            source: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
            port,
        };
        let req = HttpRequest {
            method: "GET",
            path,
            host: Some("api.bench"),
            headers: &headers,
        };
        let started = Instant::now();
        let mut calls = 0u64;
        while started.elapsed() < EVAL_TIME {
            for _ in 0..64 {
                std::hint::black_box(authorize(
                    &set,
                    &td,
                    DefaultPolicy::Authenticated,
                    &conn,
                    Some(&req),
                ));
            }
            calls += 64;
        }
        started.elapsed().as_nanos() as f64 / calls as f64
    };
    Ok((time("/bench/x", 8080), time("/nothing/here", 7070)))
}

/// Milliseconds from writing a new rules file to the live set deciding by
/// it, with 1,000 rules: p50 and p99 over `RELOADS` rounds.
async fn reload_latency(dir: &Path) -> Result<(f64, f64)> {
    let rules_dir = dir.join("reload");
    std::fs::create_dir_all(&rules_dir)?;
    let file = rules_dir.join("rules.yaml");
    let base = rules_yaml(1_000, 8080);
    std::fs::write(&file, &base)?;
    let registry = prometheus::Registry::new();
    let live = LiveRules::load(
        &rules_dir,
        true,
        DefaultPolicy::Authenticated,
        AuthzMetrics::new(&registry),
    )
    .map_err(|e| anyhow!("{e}"))?;
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    live.spawn_reloader(Duration::from_secs(10), stop)
        .map_err(|e| anyhow!("{e}"))?;
    let td = TrustDomain::new("cluster.local").map_err(|e| anyhow!("{e}"))?;
    let peer = Peer::Mesh(SpiffeId::parse(CLIENT_ID).map_err(|e| anyhow!("{e}"))?);
    let headers = hyper::HeaderMap::new();
    let allowed = |path: &str| {
        let conn = Connection {
            peer: &peer,
            source: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 8080,
        };
        let req = HttpRequest {
            method: "GET",
            path,
            host: None,
            headers: &headers,
        };
        authorize(
            &live.current(),
            &td,
            DefaultPolicy::Authenticated,
            &conn,
            Some(&req),
        )
        .allowed
    };
    let mut samples = Vec::with_capacity(RELOADS);
    for round in 0..RELOADS {
        // Each round opens a new path, so "enforced" is a changed decision.
        let path = format!("/round{round}");
        let text = base.replace("\"/bench/**\"]", &format!("\"/bench/**\", \"{path}\"]"));
        let tmp = rules_dir.join("rules.yaml.tmp");
        std::fs::write(&tmp, text)?;
        let started = Instant::now();
        std::fs::rename(&tmp, &file)?;
        while !allowed(&path) {
            if started.elapsed() > RELOAD_LIMIT {
                bail!("round {round}: not enforced after {RELOAD_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Ok((at(0.5), at(0.99)))
}

/// Requests per second: direct, through the pair as opaque TCP, and through
/// the pair with per-request authorization (1,000 rules) and HTTP metrics.
async fn requests_per_second(dir: &Path) -> Result<Vec<(&'static str, f64)>> {
    let app = app().await?;
    let ca_dir = dir.join("ca");
    let td = TrustDomain::new("cluster.local").map_err(|e| anyhow!("{e}"))?;
    let ca = NewCa::root(&td, Duration::from_secs(3600))
        .and_then(|c| c.write(&ca_dir, false))
        .map_err(|e| anyhow!("{e}"))?;
    let rules = dir.join("pair-rules");
    std::fs::create_dir_all(&rules)?;
    std::fs::write(rules.join("rules.yaml"), rules_yaml(1_000, app.port()))?;
    let rules = rules.display().to_string();
    let port = app.port().to_string();
    let l7 = pair(&ca, app, &["--rules-dir", &rules]).await?;
    let logged = pair(&ca, app, &["--rules-dir", &rules, "--access-log", "json"]).await?;
    let l4 = pair(
        &ca,
        app,
        &["--opaque-ports", &port, "--default-policy", "allow"],
    )
    .await?;
    Ok(vec![
        ("direct (client → app)", load(app).await?),
        (
            "pair, opaque TCP (no per-request authorization)",
            load(l4).await?,
        ),
        (
            "pair, HTTP with 1,000 rules and HTTP metrics (per peer)",
            load(l7).await?,
        ),
        (
            "pair, HTTP as above, access log on (json)",
            load(logged).await?,
        ),
        (
            "pair, HTTP as above, access log off (again)",
            load(l7).await?,
        ),
    ])
}

/// A tiny HTTP app answering every request with a short body.
async fn app() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Starts server sidecar B (in front of `app`, with `extra` flags) and
/// client sidecar A; returns A's upstream listener.
async fn pair(ca: &CaFiles, app: SocketAddr, extra: &[&str]) -> Result<SocketAddr> {
    let b = start(
        ca,
        "server",
        &[&["--inbound-target", &app.to_string()], extra].concat(),
    )
    .await?;
    let upstream = format!("127.0.0.1:0={}", b.inbound);
    let a = start(ca, "client", &["--upstream", &upstream]).await?;
    Ok(a.upstreams[0])
}

async fn start(ca: &CaFiles, sa: &str, extra: &[&str]) -> Result<portcullis::app::BoundAddrs> {
    let (cert, key) = (ca.cert.display().to_string(), ca.key.display().to_string());
    let mut argv = vec![
        "portcullis",
        "run",
        "--namespace",
        "bench",
        "--service-account",
        sa,
        "--trust-bundle",
        &cert,
        "--ca-cert",
        &cert,
        "--ca-key",
        &key,
        "--inbound-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--log-level",
        "warn",
    ];
    argv.extend_from_slice(extra);
    let Command::Run(args) = Cli::try_parse_from(argv)?.command else {
        bail!("not a run command");
    };
    let app = App::bind(args.settings().map_err(|e| anyhow!(e))?).await?;
    let addrs = app.addrs().clone();
    tokio::spawn(app.run());
    // Ready once a request passes end to end; bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready(addrs.admin).await {
        if Instant::now() > deadline {
            bail!("sidecar {sa} not ready");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(addrs)
}

async fn ready(admin: SocketAddr) -> bool {
    let Ok(mut send) = h1(admin).await else {
        return false;
    };
    let req = Request::get("/ready")
        .header("host", "admin")
        .body(Empty::<Bytes>::new())
        .expect("request");
    matches!(send.send_request(req).await, Ok(r) if r.status() == 200)
}

async fn h1(addr: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    stream.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// `WORKERS` keep-alive connections sending `GET /bench/..` back to back
/// for `LOAD_TIME`; every response must be 200.
async fn load(addr: SocketAddr) -> Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            let mut send = h1(addr).await?;
            while started.elapsed() < LOAD_TIME {
                send.ready().await?;
                let req = Request::get(format!("/bench/w{w}"))
                    .header("host", "app.bench")
                    .body(Empty::<Bytes>::new())?;
                let resp =
                    tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await??;
                if resp.status() != 200 {
                    bail!("status {}", resp.status());
                }
                resp.into_body().collect().await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for w in workers {
        w.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}
