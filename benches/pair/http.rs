//! HTTP rows: 32 client connections against an HTTP app, with a new
//! connection per request and with keep-alive, direct and through each
//! pair, with the proxies' CPU time per request.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use portcullis::identity::{CaFiles, TrustDomain};

use crate::external::{self, Certs, Running};
use crate::load::{self, Keep, CONNECTIONS};
use crate::procs::{cpu_seconds, which, Pair};

/// How long each measured load runs (`PAIR_BENCH_SECS` overrides it).
const LOAD_SECS: u64 = 5;
/// A keep-alive run before each path's measured runs, not counted.
const WARMUP: Duration = Duration::from_secs(1);
/// Rules in the default-mode pair: 99 for other peers and ports, then the
/// one allowing the bench client.
const RULES: usize = 100;
/// `perf record` flags: call graphs from DWARF unwind tables (release
/// builds keep `.eh_frame` but no frame pointers, so `-g` alone shows no
/// callers in Rust code), at a rate that keeps the file near 100 MB.
const PERF_RECORD: [&str; 4] = ["record", "-F", "999", "--call-graph=dwarf,16384"];
/// The profiled run is this many times as long as a measured one, for
/// more samples.
const PROFILE_LENGTH: u32 = 2;
/// Longest the app in this process serves (when nginx is not installed).
const APP_LIFETIME: Duration = Duration::from_secs(900);

/// One path's two runs (or why it did not run).
struct PathRuns {
    name: &'static str,
    runs: Result<[Measured; 2], String>,
}

#[derive(Clone)]
struct Measured {
    run: load::Run,
    /// The proxies' CPU time per request in µs (none for direct).
    cpu_us: Option<f64>,
}

/// Everything the HTTP table needs.
pub struct Results {
    paths: Vec<PathRuns>,
    app: &'static str,
    secs: u64,
}

/// Runs every path, one after the other; each path's processes are
/// stopped before the next starts.
pub async fn run(ca: &CaFiles, td: &TrustDomain, dir: &Path) -> Result<Results> {
    let secs = std::env::var("PAIR_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(LOAD_SECS)
        .max(1);
    let time = Duration::from_secs(secs);
    let ext = dir.join("external");
    std::fs::create_dir_all(&ext)?;
    let (app, _nginx_app, app_name) = match external::nginx_missing() {
        None => {
            let running = external::nginx_app(&ext).await.context("nginx app")?;
            (running.front, Some(running), "nginx")
        }
        Some(_) => (
            load::hyper_app(APP_LIFETIME).await?,
            None,
            "a hyper server in the bench process (nginx not installed)",
        ),
    };
    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules)?;
    std::fs::write(rules.join("rules.yaml"), rules_yaml(RULES, app.port()))?;
    let rules = rules.display().to_string();
    let certs = Certs::write(ca, td, &ext)?;

    let mut paths = Vec::new();
    eprintln!("HTTP: direct…");
    paths.push(PathRuns {
        name: "direct (client → app)",
        runs: Ok(measure(app, &[], time).await.context("direct")?),
    });

    eprintln!("HTTP: portcullis pair, default mode…");
    let pair = Pair::start(ca, app, &["--rules-dir", &rules]).await?;
    paths.push(
        pair_path(
            &pair,
            "portcullis pair, default mode (HTTP detected, 100 rules, metrics)",
            time,
        )
        .await?,
    );
    if let Ok(out) = std::env::var("PAIR_BENCH_PERF") {
        profile(&pair, time, &out).await?;
    }
    drop(pair);

    eprintln!("HTTP: portcullis pair, two worker threads each…");
    let threads = ["--worker-threads", "2"];
    let server = ["--rules-dir", &rules, "--worker-threads", "2"];
    let pair = Pair::start_with(ca, app, &server, &threads).await?;
    paths.push(
        pair_path(
            &pair,
            "portcullis pair, two worker threads each (otherwise default mode)",
            time,
        )
        .await?,
    );
    drop(pair);

    eprintln!("HTTP: portcullis pair, opaque port…");
    let port = app.port().to_string();
    let pair = Pair::start(ca, app, &["--opaque-ports", &port]).await?;
    paths.push(
        pair_path(
            &pair,
            "portcullis pair, app port opaque (bytes spliced, no HTTP)",
            time,
        )
        .await?,
    );
    drop(pair);

    eprintln!("HTTP: nginx TCP-mode pair…");
    let nginx = external::nginx_stream_pair(&ext, &certs, app).await;
    paths.push(PathRuns {
        name: "nginx TCP-mode (stream) pair, mTLS",
        runs: external_runs(nginx, time).await,
    });
    eprintln!("HTTP: haproxy HTTP-mode pair…");
    let haproxy = external::haproxy_http_pair(&ext, &certs, app).await;
    paths.push(PathRuns {
        name: "haproxy HTTP-mode pair, mTLS, pooled",
        runs: external_runs(haproxy, time).await,
    });
    Ok(Results {
        paths,
        app: app_name,
        secs,
    })
}

/// A portcullis pair's runs, under `name`.
async fn pair_path(pair: &Pair, name: &'static str, time: Duration) -> Result<PathRuns> {
    let runs = measure(pair.front, &pair.pids(), time)
        .await
        .context(name)?;
    Ok(PathRuns {
        name,
        runs: Ok(runs),
    })
}

/// A comparison proxy's runs, or why it has none (not installed, or it
/// failed: the bench goes on, the table says why).
async fn external_runs(running: Result<Running>, time: Duration) -> Result<[Measured; 2], String> {
    let running = running.map_err(|e| format!("{e:#}"))?;
    measure(running.front, &running.pids, time)
        .await
        .map_err(|e| format!("{e:#}"))
}

/// Checks one request passes, warms up, then runs a new connection per
/// request and keep-alive, reading the CPU time of `pids` around each.
async fn measure(front: SocketAddr, pids: &[u32], time: Duration) -> Result<[Measured; 2]> {
    let reply = crate::http_get(front, "/bench/check").await?;
    if !reply.starts_with("HTTP/1.1 200") && !reply.starts_with("HTTP/1.0 200") {
        bail!("GET /bench/check: {}", reply.lines().next().unwrap_or(""));
    }
    load::run(front, Keep::Alive, WARMUP).await?;
    let mut out = Vec::new();
    for keep in [Keep::Close, Keep::Alive] {
        let cpu_before = cpu_seconds(pids)?;
        let run = load::run(front, keep, time)
            .await
            .with_context(|| format!("{keep:?}"))?;
        let cpu = cpu_seconds(pids)? - cpu_before;
        let cpu_us = (!pids.is_empty()).then(|| cpu * 1e6 / run.requests.max(1) as f64);
        out.push(Measured { run, cpu_us });
    }
    let [close, alive] = <[Measured; 2]>::try_from(out).map_err(|_| anyhow::anyhow!("two runs"))?;
    Ok([close, alive])
}

/// One more run (keep-alive, or a new connection per request with
/// `PAIR_BENCH_PERF_MODE=close`) on the default-mode pair with `perf record`
/// attached to both sidecars, written to `out` (`PAIR_BENCH_PERF=FILE`).
async fn profile(pair: &Pair, time: Duration, out: &str) -> Result<()> {
    let Some(perf) = which("perf") else {
        bail!("PAIR_BENCH_PERF is set but perf is not installed (apt-get install linux-perf)");
    };
    let pids = pair
        .pids()
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let time = time * PROFILE_LENGTH;
    eprintln!("HTTP: profiling the default-mode pair (pids {pids}: client, server) into {out}…");
    let mut perf = tokio::process::Command::new(perf)
        .args(PERF_RECORD)
        .args(["-o", out, "-p", &pids, "--", "sleep"])
        .arg(time.as_secs().to_string())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting perf")?;
    // `PAIR_BENCH_PERF_MODE=close` profiles a new connection per request.
    let keep = match std::env::var("PAIR_BENCH_PERF_MODE").as_deref() {
        Ok("close") => Keep::Close,
        _ => Keep::Alive,
    };
    let run = load::run(pair.front, keep, time).await?;
    let status = tokio::time::timeout(time + Duration::from_secs(30), perf.wait())
        .await
        .context("perf did not finish")??;
    eprintln!(
        "HTTP: profiled {} requests ({:.0}/s, slowed by perf); perf exited {status}. \
         Read it with: perf report -i {out} --no-children --sort dso,symbol, or \
         perf script -i {out} -F pid,ip,sym,dso | python3 benches/pair/perf_groups.py {}",
        run.requests,
        run.per_sec(),
        pair.a.proc.pid()
    );
    Ok(())
}

/// `n` rules over 100 other ports and `n - 1` other identities, the last
/// one allowing the bench client's `GET /bench/**` on the app's port.
fn rules_yaml(n: usize, app_port: u16) -> String {
    let mut y = String::from("rules:\n");
    for i in 0..n.saturating_sub(1) {
        y.push_str(&format!(
            "  - name: r{i}\n    action: allow\n    ports: [{}]\n    from:\n      identities: [\"spiffe://cluster.local/ns/ns{i}/sa/sa{i}\"]\n    http:\n      methods: [GET, POST]\n      paths: [\"/svc{i}/**\", \"/api/*/item{i}\"]\n",
            9000 + i % 100
        ));
    }
    y.push_str(&format!(
        "  - name: bench-client\n    action: allow\n    ports: [{app_port}]\n    from:\n      identities: [\"{}\"]\n    http:\n      methods: [GET]\n      paths: [\"/bench/**\"]\n",
        crate::CLIENT_ID
    ));
    y
}

impl Results {
    /// The HTTP table, a latency table, and the comparisons.
    pub fn print(&self) {
        let direct = match &self.paths[0].runs {
            Ok(runs) => runs.clone(),
            Err(_) => return,
        };
        println!();
        println!(
            "| path ({CONNECTIONS} connections, {} s per run) | new connection per request: requests/s | ÷ direct | proxies' CPU per request (µs) | keep-alive: requests/s | ÷ direct | proxies' CPU per request (µs) |",
            self.secs
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        let cpu = |m: &Measured| m.cpu_us.map_or("—".to_string(), |c| format!("{c:.1}"));
        for p in &self.paths {
            match &p.runs {
                Ok(runs) => {
                    let cells: Vec<String> = runs
                        .iter()
                        .zip(&direct)
                        .map(|(m, d)| {
                            format!(
                                "{:.0} | {:.3} | {}",
                                m.run.per_sec(),
                                m.run.per_sec() / d.run.per_sec(),
                                cpu(m)
                            )
                        })
                        .collect();
                    println!("| {} | {} |", p.name, cells.join(" | "));
                }
                Err(why) => {
                    let cell = if why.contains("not installed") {
                        "not installed"
                    } else {
                        "failed (below)"
                    };
                    println!("| {} | {cell} | | | {cell} | | |", p.name);
                }
            }
        }
        println!();
        println!("| path | new connection per request: latency p50 / p99 (ms) | keep-alive: latency p50 / p99 (ms) |");
        println!("| --- | ---: | ---: |");
        for p in &self.paths {
            if let Ok([c, a]) = &p.runs {
                let l =
                    |m: &Measured| format!("{:.2} / {:.2}", m.run.p50_us / 1e3, m.run.p99_us / 1e3);
                println!("| {} | {} | {} |", p.name, l(c), l(a));
            }
        }
        println!();
        println!(
            "Load: {}; {CONNECTIONS} connections, `GET /bench/load`; new connection per request sends \
             `Connection: close`; a {WARMUP:?} keep-alive warm-up per path first. App: {}. \
             CPU: user + system time of every proxy process of the path (both sidecars; every nginx \
             or haproxy process of both), from /proc, divided by the requests of that run.",
            load::generator(),
            self.app
        );
        self.print_comparisons();
        for p in &self.paths {
            if let Err(why) = &p.runs {
                println!("\n{}: not measured: {why}", p.name);
            }
        }
    }

    fn print_comparisons(&self) {
        let get = |prefix: &str| {
            self.paths
                .iter()
                .find(|p| p.name.starts_with(prefix))
                .and_then(|p| p.runs.as_ref().ok())
        };
        let (Some(ours), nginx, haproxy) = (
            get("portcullis pair, default"),
            get("nginx"),
            get("haproxy"),
        ) else {
            return;
        };
        let ratio = |a: f64, b: f64| format!("{:.2}", a / b);
        println!();
        if let Some(n) = nginx {
            println!(
                "- portcullis default mode ÷ nginx TCP pair, keep-alive requests/s: {}; new connection per request: {}",
                ratio(ours[1].run.per_sec(), n[1].run.per_sec()),
                ratio(ours[0].run.per_sec(), n[0].run.per_sec()),
            );
        }
        if let Some(h) = haproxy {
            let cpu = |i: usize| match (ours[i].cpu_us, h[i].cpu_us) {
                (Some(a), Some(b)) => ratio(a, b),
                _ => "n/a".into(),
            };
            println!(
                "- portcullis default mode ÷ haproxy HTTP pair, CPU per request: keep-alive {}, new connection per request {}; requests/s: keep-alive {}, new connection per request {}",
                cpu(1),
                cpu(0),
                ratio(ours[1].run.per_sec(), h[1].run.per_sec()),
                ratio(ours[0].run.per_sec(), h[0].run.per_sec()),
            );
        }
    }
}
