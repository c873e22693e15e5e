//! Denial of service: clients that connect and stall must not starve the
//! process of descriptors or CPU, nor lock out newer clients. Stalled
//! ClientHellos meet --hello-timeout, --max-pending-handshakes (the oldest
//! is evicted) and its per-source cap; half-sent admin requests meet the
//! first-request timeout and the admin cap (idle ones are evicted); the
//! soft descriptor limit is raised at start-up. See dos_flood.rs for
//! whole floods and dos_fds.rs for running out of descriptors.

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

/// A connection from `source` (any 127/8 address) that sends `first`.
async fn stalled_from(source: [u8; 4], addr: SocketAddr, first: &[u8]) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    s.write_all(first).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pending_set_evicts_its_oldest_stalled_hello_and_still_serves_peers() {
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
            "--hello-timeout",
            "60s",
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

    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(stalled(b, &partial_hello()).await);
    }
    assert_eq!(overload(), 0.0);
    // One more: an older stalled connection makes room, not the newcomer.
    // (Which one is the oldest of the least advanced: a connection whose
    // bytes had not arrived when it was accepted counts as silent, which on
    // a loaded machine can be any of them.)
    let mut extra = stalled(b, &partial_hello()).await;
    eventually("an eviction counted", Duration::from_secs(10), || async {
        overload() >= 1.0
    })
    .await;
    let mut closed = Vec::new();
    for (i, s) in held.iter_mut().enumerate() {
        if closed_within(s, Duration::from_millis(20)).await {
            closed.push(i);
        }
    }
    assert_eq!(
        closed.len(),
        1,
        "exactly one pending connection evicted: {closed:?}"
    );
    assert_ne!(closed[0], CAP - 1, "the newest held connection stays");
    assert!(!closed_within(&mut extra, Duration::from_millis(200)).await);

    // A good peer is served while the set is full of stalled clients, long
    // before they would time out (60 s).
    let started = Instant::now();
    assert!(pair.ping(b"served while others stall").await);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_hellos_are_closed_after_the_hello_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let pair = Pair::start(
        &ca,
        &ca.files.cert,
        &[],
        &["--hello-timeout", "1s", "--handshake-timeout", "60s"],
    )
    .await;
    let b = pair.b.addrs.inbound;
    let started = Instant::now();
    let mut silent = stalled(b, b"").await;
    let mut slow = stalled(b, &partial_hello()).await;
    // Generous bounds: well under the 60 s handshake timeout.
    assert!(closed_within(&mut silent, Duration::from_secs(10)).await);
    assert!(closed_within(&mut slow, Duration::from_secs(10)).await);
    assert!(started.elapsed() >= Duration::from_millis(900));
    let timeouts = pair.b.metric(
        "portcullis_tls_handshakes_total",
        &[("direction", "inbound"), ("result", "timeout")],
    );
    assert_eq!(timeouts, 2.0);
    assert!(pair.ping(b"still served").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_at_its_cap_evicts_only_its_own_pending_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let pair = Pair::start(
        &ca,
        &ca.files.cert,
        &[],
        &[
            "--max-pending-handshakes-per-source",
            "4",
            "--hello-timeout",
            "60s",
        ],
    )
    .await;
    let b = pair.b.addrs.inbound;
    let mut other = stalled_from([127, 0, 0, 3], b, b"").await;
    let mut mine = Vec::new();
    for _ in 0..4 {
        mine.push(stalled_from([127, 0, 0, 2], b, b"").await);
    }
    let _fifth = stalled_from([127, 0, 0, 2], b, b"").await;
    assert!(
        closed_within(&mut mine[0], Duration::from_secs(10)).await,
        "the source's oldest was closed"
    );
    assert!(!closed_within(&mut other, Duration::from_millis(200)).await);
    assert!(!closed_within(&mut mine[1], Duration::from_millis(200)).await);
    let counted = pair.b.metric(
        "portcullis_tls_handshakes_total",
        &[("direction", "inbound"), ("result", "source_overload")],
    );
    assert_eq!(counted, 1.0);
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
async fn a_full_admin_port_still_answers_and_half_sent_requests_are_closed_soon() {
    use portcullis::limits::{
        ADMIN_FIRST_REQUEST_TIMEOUT, ADMIN_HEADER_READ_TIMEOUT, ADMIN_MAX_CONNECTIONS,
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let args = issuer_args(&ca, &ca.files.cert, "server");
    let sidecar = Sidecar::start(&args).await;
    let admin = sidecar.addrs.admin;
    let half = b"GET /metrics HTTP/1.1\r\nHost: x\r\n";
    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..ADMIN_MAX_CONNECTIONS {
        held.push(stalled(admin, half).await);
    }
    // At the cap, a probe evicts the oldest connection that never sent a
    // whole request, and is answered.
    let probe = tokio::time::timeout(Duration::from_secs(5), http_get(admin, "/ready")).await;
    assert!(matches!(probe, Ok(Ok((200, _)))), "{probe:?}");
    // The half-sent requests are closed after the first-request timeout,
    // long before the header timeout.
    for s in &mut held {
        let left = (ADMIN_FIRST_REQUEST_TIMEOUT + Duration::from_secs(5))
            .saturating_sub(started.elapsed());
        assert!(closed_within(s, left).await, "half-sent request closed");
    }
    assert!(started.elapsed() < ADMIN_HEADER_READ_TIMEOUT);
    let dropped = |reason| {
        sidecar.metric(
            "portcullis_admin_connections_dropped_total",
            &[("reason", reason)],
        )
    };
    assert!(dropped("evicted") >= 1.0);
    assert!(dropped("no_request") >= 1.0);
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
