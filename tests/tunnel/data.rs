//! Bytes through one stream: bulk both ways, half-closes each way, and a
//! protocol where the server speaks first.

use std::time::Duration;

use ring::digest::{Context, SHA256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::common::*;
use crate::support::*;

const BULK: usize = 64 * 1024 * 1024;

/// Deterministic bytes that do not compress or repeat in small blocks.
fn block(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_through_one_stream_arrive_intact() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let pair = Pair::start(&ca, &ca.files.cert, &[], &[]).await;
    let s = TcpStream::connect(pair.a.upstream()).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = Context::new(&SHA256);
        for i in 0..(BULK / (1 << 20)) {
            let chunk = block(i as u64 + 7, 1 << 20);
            sent.update(&chunk);
            w.write_all(&chunk).await.unwrap();
        }
        // Half-close: the echo app answers with its own end of stream.
        w.shutdown().await.unwrap();
        sent.finish()
    });
    let mut got = Context::new(&SHA256);
    let mut total = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    let read = async {
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.update(&buf[..n]);
            total += n;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .expect("the echo finishes");
    let sent = writer.await.unwrap();
    assert_eq!(total, BULK, "every byte came back");
    assert_eq!(
        got.finish().as_ref(),
        sent.as_ref(),
        "SHA-256 of what came back"
    );
    // It went through the tunnel: one stream, one handshake.
    assert_eq!(
        pair.b.metric(
            "portcullis_tunnel_streams_total",
            &[("direction", "inbound"), ("result", "ok")]
        ),
        1.0
    );
}

/// Sidecar A (explicit upstream) → B (`--inbound-target`) → the banner app
/// on an opaque port; the app reports each connection's byte count.
async fn banner_through_pair(ca: &Ca) -> (Sidecar, Sidecar, UnboundedReceiver<usize>) {
    let (app, counts) = banner_app("127.0.0.1").await;
    let mut b_args = issuer_args(ca, &ca.files.cert, "server");
    b_args.extend([
        "--inbound-target".to_string(),
        app.to_string(),
        "--opaque-ports".to_string(),
        app.port().to_string(),
    ]);
    let b = Sidecar::start(&b_args).await;
    let mut a_args = issuer_args(ca, &ca.files.cert, "client");
    a_args.extend([
        "--upstream".to_string(),
        format!("127.0.0.1:0={}={}", b.addrs.inbound, id("server")),
    ]);
    let a = Sidecar::start(&a_args).await;
    (a, b, counts)
}

/// Sends `payload` and half-closes; returns the byte count the banner app
/// reports for the connection.
async fn send_and_count(
    s: &mut TcpStream,
    payload: &[u8],
    counts: &mut UnboundedReceiver<usize>,
) -> usize {
    s.write_all(payload).await.unwrap();
    s.shutdown().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), counts.recv())
        .await
        .expect("the app reports")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_speaks_first_and_half_closes_first() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let (a, b, mut counts) = banner_through_pair(&ca).await;

    let mut s = TcpStream::connect(a.upstream()).await.unwrap();
    // The client sends nothing: the banner must come on its own.
    let mut banner = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut banner))
        .await
        .expect("the banner arrives without the client speaking")
        .unwrap();
    assert_eq!(&banner, b"HELLO\n");
    // The server half-closed: the client sees its end of stream...
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the server's half-close arrives")
        .unwrap();
    assert!(rest.is_empty());
    // ...and can still send; the app counts it after our own half-close.
    let payload = block(3, 300_000);
    assert_eq!(
        send_and_count(&mut s, &payload, &mut counts).await,
        payload.len()
    );
    assert_eq!(
        b.metric(
            "portcullis_tunnel_streams_total",
            &[("direction", "inbound"), ("result", "ok")]
        ),
        1.0
    );
}

/// A client that speaks first: its first bytes travel right behind the
/// `CONNECT` (before the peer's answer), arrive exactly once, and are
/// counted like every other byte. Repeated so both orders of the race
/// between the answer and the app's first bytes happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_speaks_first_is_delivered_once_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let (a, _b, mut counts) = banner_through_pair(&ca).await;

    let mut total = 0usize;
    for (i, len) in [1usize, 1000, 20_000, 70_000]
        .into_iter()
        .cycle()
        .take(20)
        .enumerate()
    {
        let payload = block(i as u64, len);
        let mut s = TcpStream::connect(a.upstream()).await.unwrap();
        let n = send_and_count(&mut s, &payload, &mut counts).await;
        assert_eq!(n, len, "connection {i}: the app got each byte exactly once");
        total += len;
        // The banner and the app's half-close come back.
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
            .await
            .expect("the app's end of stream arrives")
            .unwrap();
        assert_eq!(back, b"HELLO\n");
    }
    let received = || {
        a.metric(
            "portcullis_tcp_received_bytes_total",
            &[("direction", "outbound")],
        )
    };
    eventually(
        "every byte counted on the client side",
        Duration::from_secs(5),
        || async { received() == total as f64 },
    )
    .await;
}
