//! Connection reuse: many app connections, few handshakes; many at once,
//! as many tunnel connections as the stream limit needs.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::common::*;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sequential_connections_cost_a_handful_of_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let pair = Pair::start(&ca, &ca.files.cert, &[], &[]).await;
    for i in 0..1_000 {
        let mut s = TcpStream::connect(pair.a.upstream()).await.unwrap();
        assert!(echo_once(&mut s, b"ping").await, "connection {i}");
    }
    let handshakes = pair.a.metric(
        "portcullis_tls_handshakes_total",
        &[("direction", "outbound"), ("result", "ok")],
    );
    assert!(
        (1.0..=3.0).contains(&handshakes),
        "{handshakes} handshakes for 1,000 connections"
    );
    assert_eq!(
        pair.b.metric(
            "portcullis_tunnel_streams_total",
            &[("direction", "inbound"), ("result", "ok")]
        ),
        1_000.0
    );
    assert!(
        pair.a.metric(
            "portcullis_tunnel_pool_requests_total",
            &[("result", "hit")]
        ) >= 997.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_connections_respect_the_stream_limit() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let pair = Pair::start(
        &ca,
        &ca.files.cert,
        &["--tunnel-max-streams", "100"],
        &["--tunnel-max-streams", "100"],
    )
    .await;
    assert_eq!(
        echo_twice_all_at_once(pair.a.upstream(), 500).await,
        500,
        "every connection echoed twice"
    );
    let opened = pair.a.metric(
        "portcullis_tunnel_connections_opened_total",
        &[("direction", "outbound")],
    );
    assert!(
        (5.0..=7.0).contains(&opened),
        "500 streams at 100 per connection took {opened} connections"
    );
    assert_eq!(
        pair.a.metric(
            "portcullis_tunnel_streams_total",
            &[("direction", "outbound"), ("result", "retried")]
        ),
        0.0,
        "no stream was sent past a connection's limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_connections_share_one_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let pair = Pair::start(&ca, &ca.files.cert, &[], &[]).await;
    let upstream = pair.a.upstream();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        tasks.spawn(async move {
            let mut s = TcpStream::connect(upstream).await.ok()?;
            Some(echo_once(&mut s, b"first").await)
        });
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap(), Some(true));
    }
    assert_eq!(
        pair.a.metric(
            "portcullis_tls_handshakes_total",
            &[("direction", "outbound"), ("result", "ok")]
        ),
        1.0,
        "50 connections racing to a new peer made one handshake"
    );
}

/// With two worker threads on each side, every thread keeps a pool of its
/// own: the client's app connections, accepted by both threads, travel on
/// one tunnel connection per thread, and the server hands the second
/// tunnel to its other thread. All echo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_thread_pools_its_own_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let threads = ["--worker-threads", "2"];
    let pair = Pair::start(&ca, &ca.files.cert, &threads, &threads).await;
    // All open at once, so neither thread's pool can serve another's.
    assert_eq!(
        echo_twice_all_at_once(pair.a.upstream(), 100).await,
        100,
        "every connection echoed twice"
    );
    for (side, direction) in [(&pair.a, "outbound"), (&pair.b, "inbound")] {
        assert_eq!(
            side.metric(
                "portcullis_tunnel_connections_opened_total",
                &[("direction", direction)],
            ),
            2.0,
            "{direction}: one tunnel connection per worker thread"
        );
    }
    for worker in ["0", "1"] {
        assert_eq!(
            pair.b
                .metric("portcullis_worker_connections", &[("worker", worker)]),
            1.0,
            "the server's worker {worker} serves one of the two tunnels"
        );
    }
}

/// Opens `n` connections to `upstream`, each echoes once, waits until all
/// have (so all are in flight together), and echoes again; returns how
/// many did both.
async fn echo_twice_all_at_once(upstream: std::net::SocketAddr, n: usize) -> usize {
    let all_up = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let all_up = all_up.clone();
        tasks.spawn(async move {
            let mut s = TcpStream::connect(upstream).await.ok()?;
            let first = echo_once(&mut s, b"one").await;
            tokio::time::timeout(Duration::from_secs(30), all_up.wait())
                .await
                .ok()?;
            Some(first && echo_once(&mut s, b"two").await)
        });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        ok += usize::from(r.unwrap() == Some(true));
    }
    ok
}
