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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_flood_does_not_block_probes() {
    const IDLE: usize = 400;
    raise_nofile(16_384);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let sidecar = Sidecar::start(&issuer_args(&ca, &ca.files.cert, "server")).await;
    let admin = sidecar.addrs.admin;
    let flood = Flood::start(admin, &[loopback(1)], IDLE, b"");
    eventually(
        "every idle connection opened once",
        Duration::from_secs(30),
        || async { flood.opened() >= IDLE as u64 },
    )
    .await;
    // Poll like a kubelet and a scraper would, for longer than the
    // first-request timeout, so that idle connections are both timed out
    // and evicted meanwhile.
    let mut slowest = Duration::ZERO;
    let mut total = Duration::ZERO;
    let mut probes = 0u32;
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
            assert_eq!(
                status, 200,
                "{path} answered under the flood (round {round})"
            );
            slowest = slowest.max(t.elapsed());
            total += t.elapsed();
            probes += 1;
        }
    }
    let dropped = |reason| {
        sidecar.metric(
            "portcullis_admin_connections_dropped_total",
            &[("reason", reason)],
        )
    };
    println!(
        "{probes} probes answered under a flood of {IDLE} idle connections ({} opened in all): \
         slowest {slowest:?}, mean {:?}; dropped: evicted={} no_request={} full={}",
        flood.opened(),
        total / probes,
        dropped("evicted"),
        dropped("no_request"),
        dropped("full"),
    );
    assert!(dropped("evicted") > 0.0, "idle connections were evicted");
    flood.stop().await;
}
