//! Denial of service: clients that connect and stall must not starve the
//! process of descriptors or CPU. Stalled ClientHellos meet
//! --max-pending-handshakes, half-sent admin requests meet the admin
//! connection cap and header timeout, and the soft descriptor limit is
//! raised at start-up.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The start of a ClientHello: a record header declaring 512 bytes, then
/// only 40 of them.
fn partial_hello() -> Vec<u8> {
    let mut b = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    b.resize(45, 0);
    b
}

async fn stalled(addr: SocketAddr, first: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(first).await.unwrap();
    s
}

/// True when the server closes `s` within `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(limit, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_hellos_do_not_stop_good_connections_and_overload_is_counted() {
    const CAP: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let cap = CAP.to_string();
    let pair = Pair::start(
        &ca,
        &ca.files.cert,
        &[],
        &[
            "--max-pending-handshakes",
            &cap,
            "--handshake-timeout",
            "60s",
        ],
    )
    .await;
    let b = pair.b.addrs.inbound;
    let overload = || {
        pair.b.metric(
            "portcullis_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "overload")],
        )
    };

    // Many stalled hellos, fewer than the cap: a good peer is served at once.
    let mut held = Vec::new();
    for _ in 0..CAP - 4 {
        held.push(stalled(b, &partial_hello()).await);
    }
    let started = Instant::now();
    assert!(pair.ping(b"served while others stall").await);
    // Generous: this asserts "not blocked until the stalled ones time out
    // (60 s)", not a speed; benches/ measure speed.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "served while the others stall"
    );
    assert_eq!(overload(), 0.0);

    // Past the cap, new connections are closed at once and counted.
    while held.len() < CAP {
        held.push(stalled(b, &partial_hello()).await);
    }
    eventually(
        "the cap is full",
        Duration::from_secs(20),
        move || async move {
            let mut extra = stalled(b, &partial_hello()).await;
            closed_within(&mut extra, Duration::from_secs(1)).await
        },
    )
    .await;
    assert!(overload() >= 1.0, "overload counted");
    // The stalled connections themselves are still waiting for their hello.
    let mut first = held.remove(0);
    assert!(!closed_within(&mut first, Duration::from_millis(200)).await);

    // Once they go, their slots are free again.
    drop(first);
    drop(held);
    eventually(
        "a good peer is served again",
        Duration::from_secs(20),
        || pair.ping(b"after"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_sent_in_pieces_is_still_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let pair = Pair::start(&ca, &ca.files.cert, &[], &[]).await;
    // A proxy between the peer and B that forwards a byte at a time for the
    // first 60 bytes: the hello arrives in many small segments.
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let b = pair.b.addrs.inbound;
    tokio::spawn(async move {
        let (mut client, _) = relay.accept().await.unwrap();
        let mut server = TcpStream::connect(b).await.unwrap();
        server.set_nodelay(true).unwrap();
        let mut byte = [0u8; 1];
        for _ in 0..60 {
            client.read_exact(&mut byte).await.unwrap();
            server.write_all(&byte).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    });
    let config = client_config(ca.leaf("direct"), &ca.cert_pem());
    let name = rustls::pki_types::ServerName::IpAddress(relay_addr.ip().into());
    let tcp = TcpStream::connect(relay_addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(round_trip(tls, b"slowly").await.unwrap(), b"slowly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_capped_and_half_sent_requests_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let args = issuer_args(&ca, &ca.files.cert, "server");
    let sidecar = Sidecar::start(&args).await;
    let admin = sidecar.addrs.admin;
    let half = b"GET /metrics HTTP/1.1\r\nHost: x\r\n";
    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..portcullis::limits::ADMIN_MAX_CONNECTIONS {
        held.push(stalled(admin, half).await);
    }
    // Over the cap: accepted and closed at once.
    eventually(
        "an admin connection over the cap is closed",
        Duration::from_secs(5),
        move || async move {
            let mut extra = stalled(admin, half).await;
            closed_within(&mut extra, Duration::from_secs(1)).await
        },
    )
    .await;
    // The half-sent requests are closed after the header timeout...
    let timeout = portcullis::limits::ADMIN_HEADER_READ_TIMEOUT;
    for s in &mut held {
        let left = (timeout + Duration::from_secs(5)).saturating_sub(started.elapsed());
        assert!(closed_within(s, left).await, "half-sent request closed");
    }
    assert!(started.elapsed() >= timeout - Duration::from_secs(1));
    // ...and the admin port answers again.
    assert_eq!(http_get(admin, "/ready").await.unwrap().0, 200);
}

/// `run` raises its soft descriptor limit to the hard one.
#[test]
fn run_raises_the_soft_descriptor_limit() {
    use std::process::{Command, Stdio};
    let bin = env!("CARGO_BIN_EXE_portcullis");
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let script = format!(
        "ulimit -Sn 256 && exec {bin} run --ca-cert {c} --ca-key {k} --trust-bundle {c} \
         --inbound-listen 127.0.0.1:0 --outbound-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0",
        c = ca.files.cert.display(),
        k = ca.files.key.display(),
    );
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let limits = format!("/proc/{}/limits", child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let (soft, hard) = loop {
        let text = std::fs::read_to_string(&limits).unwrap_or_default();
        let line = text.lines().find(|l| l.starts_with("Max open files"));
        let fields: Vec<&str> = line
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        let (soft, hard) = (fields.get(3).copied(), fields.get(4).copied());
        if soft.is_some() && soft == hard || Instant::now() > deadline {
            break (soft.map(String::from), hard.map(String::from));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(soft, hard, "soft limit raised to the hard limit");
    assert_ne!(soft.as_deref(), Some("256"));
}
