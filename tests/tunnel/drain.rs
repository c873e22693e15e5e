//! Shutdown with tunnels open: the server says GOAWAY, streams already open
//! finish, and no new stream is sent on the draining connection.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::common::*;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_finishes_open_streams_and_gets_no_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let pair = Pair::start(&ca, &ca.files.cert, &[], &["--drain-timeout", "20s"]).await;
    let mut open = TcpStream::connect(pair.a.upstream()).await.unwrap();
    assert!(echo_once(&mut open, b"before").await);
    let streams = |s: &Sidecar, direction| {
        s.metric(
            "portcullis_tunnel_streams_total",
            &[("direction", direction), ("result", "ok")],
        )
    };
    assert_eq!(streams(&pair.b, "inbound"), 1.0);

    pair.b.drain.begin();
    // The open stream keeps working through the drain.
    assert!(echo_once(&mut open, b"during the drain").await);

    // A new app connection is not sent on the draining connection: the
    // client tries a new connection (which the stopped listener refuses).
    let misses = pair.a.metric(
        "portcullis_tunnel_pool_requests_total",
        &[("result", "miss")],
    );
    let s = TcpStream::connect(pair.a.upstream()).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), round_trip(s, b"new")).await;
    assert_eq!(
        streams(&pair.b, "inbound"),
        1.0,
        "no stream reached the draining server"
    );
    assert!(
        pair.a.metric(
            "portcullis_tunnel_pool_requests_total",
            &[("result", "miss")]
        ) > misses,
        "the client went to another connection"
    );

    // When the last stream ends, the server is done well before its timeout.
    ends_and_the_server_exits(open, pair.b.task).await;
}

/// With two worker threads, a tunnel served on the second one keeps the
/// drain open until its stream ends, and the server then exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_on_a_second_worker_thread_holds_the_drain_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let server_args = ["--worker-threads", "2", "--drain-timeout", "20s"];
    let pair = Pair::start(&ca, &ca.files.cert, &[], &server_args).await;
    let handed = |worker| {
        pair.b
            .metric("portcullis_worker_connections", &[("worker", worker)])
    };
    // A silent connection takes worker 0, so the tunnel goes to worker 1.
    let silent = TcpStream::connect(pair.b.addrs.inbound).await.unwrap();
    eventually(
        "the silent connection is handed to worker 0",
        Duration::from_secs(10),
        || async { handed("0") == 1.0 },
    )
    .await;
    let mut open = TcpStream::connect(pair.a.upstream()).await.unwrap();
    assert!(echo_once(&mut open, b"before").await);
    assert_eq!(handed("1"), 1.0, "the tunnel is served by worker 1");
    drop(silent);

    pair.b.drain.begin();
    assert!(echo_once(&mut open, b"during the drain").await);
    assert!(
        !pair.b.task.is_finished(),
        "the open stream holds the drain"
    );

    ends_and_the_server_exits(open, pair.b.task).await;
}

/// Ends the last open stream; the draining server must then exit cleanly,
/// well before its drain timeout.
async fn ends_and_the_server_exits(
    mut open: TcpStream,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    open.shutdown().await.unwrap();
    drop(open);
    let exited = tokio::time::timeout(Duration::from_secs(10), server).await;
    assert!(
        matches!(exited, Ok(Ok(Ok(())))),
        "the drained server exits: {exited:?}"
    );
}
