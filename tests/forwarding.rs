//! Test 1: bytes cross client → A → mTLS → B → app unchanged, 64 MiB each
//! way, and a half-close is passed on.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SIZE: usize = 64 * 1024 * 1024;

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

fn digest(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_with_half_close() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let pair = Pair::start(&ca, &ca.files.cert, &[], &[]).await;

    let data: Vec<u8> = (0..SIZE).map(pattern).collect();
    let want = digest(&data);
    let stream = TcpStream::connect(pair.a.upstream()).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(256 * 1024) {
            w.write_all(chunk).await.unwrap();
        }
        // Half-close: the echo server sees EOF only if it is passed on.
        w.shutdown().await.unwrap();
        w
    });
    let mut got = Vec::with_capacity(SIZE);
    tokio::time::timeout(Duration::from_secs(120), r.read_to_end(&mut got))
        .await
        .expect("echo finished in time")
        .unwrap();
    let _w = writer.await.unwrap();
    assert_eq!(got.len(), SIZE, "all bytes came back");
    assert_eq!(digest(&got), want, "checksums match");

    let inbound = [("direction", "inbound")];
    assert_eq!(
        pair.b
            .metric("portcullis_tcp_received_bytes_total", &inbound),
        SIZE as f64
    );
    assert_eq!(
        pair.b.metric("portcullis_tcp_sent_bytes_total", &inbound),
        SIZE as f64
    );
    let outbound = [("direction", "outbound")];
    assert_eq!(
        pair.a
            .metric("portcullis_tcp_received_bytes_total", &outbound),
        SIZE as f64
    );
    assert_eq!(
        pair.b
            .metric("portcullis_tls_handshakes_total", &[("result", "ok")]),
        1.0
    );
    eventually(
        "connection closed on both sides",
        Duration::from_secs(5),
        || async {
            pair.a.metric("portcullis_tcp_connections_open", &[]) == 0.0
                && pair.b.metric("portcullis_tcp_connections_open", &[]) == 0.0
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_can_answer_after_client_half_closes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    // The app reads until EOF, then answers: it only works if the FIN crosses both hops.
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = app.accept().await.unwrap();
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        s.write_all(format!("got {} bytes", req.len()).as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
    });
    let mut b_args = issuer_args(&ca, &ca.files.cert, "server");
    b_args.extend(["--inbound-target".into(), app_addr.to_string()]);
    let b = Sidecar::start(&b_args).await;
    let mut a_args = issuer_args(&ca, &ca.files.cert, "client");
    a_args.extend([
        "--upstream".into(),
        format!("127.0.0.1:0={}", b.addrs.inbound),
    ]);
    let a = Sidecar::start(&a_args).await;
    let s = TcpStream::connect(a.upstream()).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), round_trip(s, b"twelve bytes"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, b"got 12 bytes");
}
