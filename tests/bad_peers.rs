//! Test 2: every kind of bad peer is refused and counted under the right
//! `result`, and good connections keep working; permissive mode accepts
//! plaintext, strict mode refuses it.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOUR: Duration = Duration::from_secs(3600);

/// True when the sidecar closes `s` without passing anything through.
async fn closed_without_data(mut s: TcpStream, send: &[u8]) -> bool {
    let _ = s.write_all(send).await;
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// A TLS handshake to `addr` with `config`, then an echo; true if refused.
async fn tls_refused(config: Arc<rustls::ClientConfig>, addr: std::net::SocketAddr) -> bool {
    match tls_connect(config, addr).await {
        Err(_) => true,
        // TLS 1.3 client auth fails after the client's handshake is done:
        // the refusal shows on the first read.
        Ok(s) => round_trip(s, b"secret")
            .await
            .map(|out| out.is_empty())
            .unwrap_or(true),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let foreign = Ca::root(dir.path(), "foreign", TD);
    let bundle = ca.cert_pem();
    let pair = Pair::start(&ca, &ca.files.cert, &[], &["--handshake-timeout", "1s"]).await;
    let b = pair.b.addrs.inbound;
    let now = SystemTime::now();
    let count = |result: &'static str, want: f64| {
        let b = &pair.b;
        async move {
            let read = || {
                b.metric(
                    "portcullis_tls_handshakes_total",
                    &[("direction", "inbound"), ("result", result)],
                )
            };
            for _ in 0..250 {
                if read() == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let text = b.metrics.encode();
            let now: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("portcullis_tls_handshakes_total"))
                .collect();
            panic!("inbound handshakes with result {result}: want {want}, have {now:#?}");
        }
    };

    // Each case: (what, expected result label, how the peer behaves).
    let garbage = TcpStream::connect(b).await.unwrap();
    assert!(
        closed_without_data(garbage, b"\x00\x01garbage\r\n\r\n").await,
        "garbage"
    );
    count("plaintext_refused", 1.0).await;

    let plain_http = TcpStream::connect(b).await.unwrap();
    assert!(
        closed_without_data(plain_http, b"GET / HTTP/1.1\r\nHost: b\r\n\r\n").await,
        "plaintext HTTP"
    );
    count("plaintext_refused", 2.0).await;

    assert!(
        tls_refused(tls12_client(b"portcullis/1"), b).await,
        "TLS 1.2 client"
    );
    count("protocol", 1.0).await;

    let roots = portcullis::tls::TrustBundle::from_pem(std::path::Path::new("bundle"), &bundle)
        .unwrap()
        .roots;
    let verifier = portcullis::tls::MeshVerifier::new(roots, td()).unwrap();
    let mut no_cert = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    no_cert.alpn_protocols = vec![b"portcullis/1".to_vec()];
    assert!(
        tls_refused(Arc::new(no_cert), b).await,
        "no client certificate"
    );
    count("no_client_cert", 1.0).await;

    let foreign_client = client_config(foreign.leaf("client"), &bundle);
    assert!(tls_refused(foreign_client, b).await, "foreign CA");
    count("untrusted", 1.0).await;

    let expired = ca.custom_leaf(
        &["spiffe://cluster.local/ns/default/sa/old"],
        now - 2 * HOUR,
        now - HOUR,
    );
    assert!(
        tls_refused(client_config(expired, &bundle), b).await,
        "expired certificate"
    );
    count("expired", 1.0).await;

    let other_td = ca.custom_leaf(
        &["spiffe://other.org/ns/default/sa/x"],
        now - HOUR,
        now + HOUR,
    );
    assert!(
        tls_refused(client_config(other_td, &bundle), b).await,
        "other trust domain"
    );
    count("wrong_trust_domain", 1.0).await;

    let no_id = ca.custom_leaf(&[], now - HOUR, now + HOUR);
    assert!(
        tls_refused(client_config(no_id, &bundle), b).await,
        "no SPIFFE id"
    );
    let two_ids = ca.custom_leaf(
        &[
            "spiffe://cluster.local/ns/a/sa/x",
            "spiffe://cluster.local/ns/b/sa/y",
        ],
        now - HOUR,
        now + HOUR,
    );
    assert!(
        tls_refused(client_config(two_ids, &bundle), b).await,
        "two SPIFFE ids"
    );
    count("bad_identity", 2.0).await;

    let silent = TcpStream::connect(b).await.unwrap();
    let started = std::time::Instant::now();
    assert!(closed_without_data(silent, b"").await, "silent client");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed after the handshake timeout"
    );
    count("timeout", 1.0).await;

    // Nothing above reached the app, and good traffic still flows.
    count("ok", 0.0).await;
    // Refused connections add no per-port series (a port scan cannot grow them).
    let opened = || {
        pair.b.metric(
            "portcullis_tcp_connections_opened_total",
            &[("direction", "inbound")],
        )
    };
    assert_eq!(opened(), 0.0);
    assert!(!pair
        .b
        .metrics
        .encode()
        .contains("portcullis_tcp_connections_opened_total{direction=\"inbound\""));
    assert!(pair.ping(b"still working").await);
    count("ok", 1.0).await;
    // A good direct client with a mesh certificate works too.
    let good = tls_connect(client_config(ca.leaf("direct"), &bundle), b)
        .await
        .unwrap();
    assert_eq!(round_trip(good, b"direct").await.unwrap(), b"direct");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_side_refuses_a_server_with_the_wrong_identity_or_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let foreign = Ca::root(dir.path(), "foreign", TD);
    let echo = echo_server().await;
    // A server sidecar of another identity than A expects.
    let mut b_args = issuer_args(&ca, &ca.files.cert, "impostor");
    b_args.extend(["--inbound-target".into(), echo.to_string()]);
    let b = Sidecar::start(&b_args).await;
    // And one under a CA that A does not trust.
    let mut c_args = issuer_args(&foreign, &foreign.files.cert, "server");
    c_args.extend(["--inbound-target".into(), echo.to_string()]);
    let c = Sidecar::start(&c_args).await;

    let mut a_args = issuer_args(&ca, &ca.files.cert, "client");
    a_args.extend([
        "--upstream".into(),
        format!("127.0.0.1:0={}={}", b.addrs.inbound, id("server")),
        "--upstream".into(),
        format!("127.0.0.1:0={}", c.addrs.inbound),
    ]);
    let a = Sidecar::start(&a_args).await;
    let out = round_trip(
        TcpStream::connect(a.addrs.upstreams[0]).await.unwrap(),
        b"x",
    )
    .await;
    assert!(
        out.map(|o| o.is_empty()).unwrap_or(true),
        "impostor refused"
    );
    let out = round_trip(
        TcpStream::connect(a.addrs.upstreams[1]).await.unwrap(),
        b"x",
    )
    .await;
    assert!(
        out.map(|o| o.is_empty()).unwrap_or(true),
        "foreign server refused"
    );
    let outbound = |r| {
        a.metric(
            "portcullis_tls_handshakes_total",
            &[("direction", "outbound"), ("result", r)],
        )
    };
    assert_eq!(outbound("wrong_identity"), 1.0);
    assert_eq!(outbound("untrusted"), 1.0);
    assert_eq!(outbound("ok"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_accepts_plaintext_strict_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let pair = Pair::start(
        &ca,
        &ca.files.cert,
        &[],
        &["--inbound-mode", "permissive", "--default-policy", "allow"],
    )
    .await;
    let s = TcpStream::connect(pair.b.addrs.inbound).await.unwrap();
    assert_eq!(round_trip(s, b"plain hello").await.unwrap(), b"plain hello");
    // mTLS still works in permissive mode.
    assert!(pair.ping(b"mesh hello").await);
    assert_eq!(
        pair.b.metric(
            "portcullis_tcp_connections_opened_total",
            &[("direction", "inbound")]
        ),
        2.0
    );

    let strict = Pair::start(&ca, &ca.files.cert, &[], &[]).await;
    let s = TcpStream::connect(strict.b.addrs.inbound).await.unwrap();
    assert!(closed_without_data(s, b"plain hello").await);
    assert!(strict.ping(b"mesh hello").await);
}

/// An app that greets first, like SMTP or MySQL.
async fn greeting_app() -> std::net::SocketAddr {
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            let _ = s.write_all(b"220 hello\r\n").await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_protocol_on_opaque_port_in_permissive_mode() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let app_addr = greeting_app().await;
    let port = app_addr.port().to_string();
    let mut args = issuer_args(&ca, &ca.files.cert, "server");
    args.extend([
        "--inbound-target".into(),
        app_addr.to_string(),
        "--inbound-mode".into(),
        "permissive".into(),
        "--default-policy".into(),
        "allow".into(),
        "--opaque-ports".into(),
        port,
    ]);
    let b = Sidecar::start(&args).await;
    let mut s = TcpStream::connect(b.addrs.inbound).await.unwrap();
    let mut buf = [0u8; 11];
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"220 hello\r\n");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "greeting came without waiting for the client"
    );
}

/// On a port that is not opaque, a silent plaintext client hears a
/// server-speaks-first app once `--detect-timeout` has passed since it
/// connected, not once the TLS detection's wait and then the HTTP
/// detection's wait have passed one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_protocol_on_any_port_waits_one_detect_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let app_addr = greeting_app().await;
    let mut args = issuer_args(&ca, &ca.files.cert, "server");
    args.extend(
        [
            "--inbound-target",
            &app_addr.to_string(),
            "--inbound-mode",
            "permissive",
            "--default-policy",
            "allow",
            "--detect-timeout",
            "1s",
            "--hello-timeout",
            "1s",
        ]
        .map(String::from),
    );
    let b = Sidecar::start(&args).await;
    let started = std::time::Instant::now();
    let mut s = TcpStream::connect(b.addrs.inbound).await.unwrap();
    let mut buf = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"220 hello\r\n");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(1800),
        "greeting after {waited:?}: one detect timeout (1 s), not two"
    );
}
