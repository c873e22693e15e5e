//! Denial of service by connection floods: thousands of silent connections
//! to the inbound port, or hundreds of idle ones to the admin port, each
//! reopened as soon as the server closes it, must not stop mesh traffic or
//! the kubelet's probes.

mod common;
#[path = "dos_flood/flood.rs"]
mod flood;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use flood::{raise_nofile, Flood};

/// Connections each flood holds open at once.
const HOLDERS: usize = 2_000;
/// Requests made through the mesh while the flood runs.
const REQUESTS: usize = 100;

fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Floods B's inbound port from `sources` while A makes `REQUESTS` echo
/// requests through the mesh to B; returns how many succeeded.
async fn mesh_requests_under_flood(sources: &[IpAddr]) -> usize {
    raise_nofile(16_384);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    // Default limits: the test is about what a deployment gets.
    let pair = Pair::start(&ca, &ca.files.cert, &[], &[]).await;
    assert!(pair.ping(b"before").await);
    let flood = Flood::start(pair.b.addrs.inbound, sources, HOLDERS, b"");
    eventually(
        "every flood connection opened once",
        Duration::from_secs(60),
        || async { flood.opened() >= HOLDERS as u64 },
    )
    .await;
    let started = Instant::now();
    let opened_before = flood.opened();
    let mut ok = 0;
    for i in 0..REQUESTS {
        if pair.ping(format!("request {i}").as_bytes()).await {
            ok += 1;
        }
    }
    let took = started.elapsed();
    let reopened = flood.opened() - opened_before;
    let handshakes = |result| {
        pair.b.metric(
            "portcullis_tls_handshakes_total",
            &[("direction", "inbound"), ("result", result)],
        )
    };
    println!(
        "sources={} ok={ok}/{REQUESTS} in {took:?}; flood reopened {reopened} connections meanwhile; \
         inbound handshakes: overload={} source_overload={} timeout={} ok={}",
        sources.len(),
        handshakes("overload"),
        handshakes("source_overload"),
        handshakes("timeout"),
        handshakes("ok"),
    );
    assert!(
        flood.closed_by_server() > 0,
        "the flood was pushed back at some point"
    );
    flood.stop().await;
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_flood_from_one_address_does_not_block_mesh_traffic() {
    // The same address as the meshed client's own connections.
    let ok = mesh_requests_under_flood(&[loopback(1)]).await;
    assert!(ok * 100 >= REQUESTS * 99, "{ok}/{REQUESTS} succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_flood_from_many_addresses_does_not_block_mesh_traffic() {
    let sources: Vec<IpAddr> = (2..=9).map(loopback).collect();
    let ok = mesh_requests_under_flood(&sources).await;
    assert!(ok * 100 >= REQUESTS * 99, "{ok}/{REQUESTS} succeeded");
}

/// Floods `admin` with `IDLE_HOLDERS` idle connections (reopened as they
/// close) while polling /live, /ready and /metrics like a kubelet and a
/// scraper, for longer than the first-request timeout so that idle
/// connections are both timed out and evicted meanwhile. Probes must answer
/// 200 as a kubelet needs (never 3 failures in a row, at most 1% failed);
/// returns a summary of how long they took.
async fn probes_under_idle_flood(admin: std::net::SocketAddr) -> String {
    raise_nofile(16_384);
    let flood = Flood::start(admin, &[loopback(1)], IDLE_HOLDERS, b"");
    eventually(
        "every idle connection opened once",
        Duration::from_secs(30),
        || async { flood.opened() >= IDLE_HOLDERS as u64 },
    )
    .await;
    let mut slowest = Duration::ZERO;
    let mut total = Duration::ZERO;
    let mut probes = 0u32;
    let mut failed = 0u32;
    let mut streaks = std::collections::HashMap::new();
    let until = Instant::now() + Duration::from_secs(6);
    for round in 0..100_000 {
        if Instant::now() > until && round >= 20 {
            break;
        }
        for path in ["/live", "/ready", "/metrics"] {
            let t = Instant::now();
            let got = tokio::time::timeout(Duration::from_secs(5), http_get(admin, path)).await;
            let status = match got {
                Ok(Ok((status, _))) => status,
                _ => 0,
            };
            // A kubelet marks a probe failed after 3 failures in a row
            // (its default failureThreshold): on a loaded machine one probe
            // may miss, but never that many in a row, and at most 1% overall.
            let streak = streaks.entry(path).or_insert(0u32);
            if status == 200 {
                *streak = 0;
            } else {
                *streak += 1;
                failed += 1;
                assert!(
                    *streak < 3,
                    "{path} failed 3 times in a row under the flood (round {round})"
                );
            }
            slowest = slowest.max(t.elapsed());
            total += t.elapsed();
            probes += 1;
        }
    }
    assert!(
        failed * 100 <= probes,
        "{failed} of {probes} probes failed under the flood"
    );
    let summary = format!(
        "{probes} probes ({failed} failed) under a flood of {IDLE_HOLDERS} idle connections \
         ({} opened in all): slowest {slowest:?}, mean {:?}",
        flood.opened(),
        total / probes,
    );
    flood.stop().await;
    summary
}

/// Idle connections held against an admin port: more than its cap (256).
const IDLE_HOLDERS: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_flood_does_not_block_probes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let sidecar = Sidecar::start(&issuer_args(&ca, &ca.files.cert, "server")).await;
    let summary = probes_under_idle_flood(sidecar.addrs.admin).await;
    let dropped = |reason| {
        sidecar.metric(
            "portcullis_admin_connections_dropped_total",
            &[("reason", reason)],
        )
    };
    println!(
        "sidecar: {summary}; dropped: evicted={} no_request={} full={}",
        dropped("evicted"),
        dropped("no_request"),
        dropped("full"),
    );
    assert!(dropped("evicted") > 0.0, "idle connections were evicted");
}

/// The webhook's admin port shares the admin connection handling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flood_on_the_webhook_admin_port_does_not_block_probes() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    /// Kills the webhook however the test ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "webhook",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .args(["--log-format", "json"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = await_log_line(&mut lines, "listening", |_| {});
    let _webhook = Killed(child);
    std::thread::spawn(move || for _ in lines {});
    let admin = listening["admin"].as_str().unwrap().parse().unwrap();
    let summary = probes_under_idle_flood(admin).await;
    println!("webhook: {summary}");
}
