//! Test 7: `/metrics` is valid Prometheus exposition (`promtool check
//! metrics`), carries the contract's names, and the admin endpoints answer.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The contract: names later issues, dashboards and alerts rely on.
const NAMES: &[&str] = &[
    "portcullis_tcp_connections_opened_total",
    "portcullis_tcp_connections_closed_total",
    "portcullis_tcp_connections_open",
    "portcullis_tcp_received_bytes_total",
    "portcullis_tcp_sent_bytes_total",
    "portcullis_tls_handshakes_total",
    "portcullis_tls_handshake_duration_seconds",
    "portcullis_tls_key_exchanges_total",
    "portcullis_cert_expiry_timestamp_seconds",
    "portcullis_cert_rotations_total",
    "portcullis_trust_bundle_reloads_total",
    "portcullis_build_info",
    "portcullis_rules_valid",
    "portcullis_ready",
    "portcullis_issuer_valid",
    "portcullis_trust_bundle_valid",
    "portcullis_http_app_connections_opened_total",
    "portcullis_http_app_connections_idle",
    "portcullis_http_app_requests_resent_total",
    "portcullis_tunnel_connections_refused_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_admin_endpoints_answer() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let pair = Pair::start(&ca, &ca.files.cert, &[], &[]).await;
    assert!(pair.ping(b"hello").await);
    // A refused plaintext client, so a failure series exists too.
    let _ = round_trip(
        tokio::net::TcpStream::connect(pair.b.addrs.inbound)
            .await
            .unwrap(),
        b"plain",
    )
    .await;
    eventually("refusal counted", Duration::from_secs(5), || async {
        pair.b.metric(
            "portcullis_tls_handshakes_total",
            &[("result", "plaintext_refused")],
        ) == 1.0
    })
    .await;

    let admin = pair.b.addrs.admin;
    let (status, body) = http_get(admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for name in NAMES {
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "{name} missing from /metrics"
        );
    }
    promtool_check(&body);
    assert_eq!(metric_value(&body, "portcullis_ready", &[]), 1.0);

    let (status, body) = http_get(admin, "/live").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "live\n"));
    let (status, body) = http_get(admin, "/certs").await.unwrap();
    assert_eq!(status, 200);
    let certs: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        certs["certificate"]["identity"],
        "spiffe://cluster.local/ns/default/sa/server"
    );
    for key in ["serial", "not_before", "not_after", "next_renewal"] {
        assert!(
            certs["certificate"][key].is_string(),
            "/certs lacks {key}: {body}"
        );
    }
    assert_eq!(certs["trust_bundle"].as_array().unwrap().len(), 1);
    assert!(certs["trust_bundle"][0]["subject"]
        .as_str()
        .unwrap()
        .contains("portcullis root CA"));
    assert_eq!(http_get(admin, "/nope").await.unwrap().0, 404);
}

/// The `*_valid` gauges: 1 while the newest files are in force, 0 while a
/// bad new version is refused, 1 again once it is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validity_gauges_follow_refused_and_fixed_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, ca.cert_pem()).unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let good = "rules:\n  - name: anyone\n    action: allow\n";
    write_atomic(&rules.join("policy.yaml"), good.as_bytes());
    let mut args = issuer_args(&ca, &bundle, "server");
    args.extend([
        "--inbound-target".to_string(),
        echo_server().await.to_string(),
        "--rules-dir".to_string(),
        rules.display().to_string(),
        "--file-poll-interval".to_string(),
        "100ms".to_string(),
    ]);
    let b = Sidecar::start(&args).await;
    let admin = b.addrs.admin;
    let scrape = || async move { http_get(admin, "/metrics").await.unwrap().1 };
    let gauge = |text: &str, name: &str| metric_value(text, name, &[]);
    let text = scrape().await;
    for name in [
        "portcullis_rules_valid",
        "portcullis_issuer_valid",
        "portcullis_trust_bundle_valid",
    ] {
        assert_eq!(gauge(&text, name), 1.0, "{name} at start");
    }

    write_atomic(&rules.join("policy.yaml"), b"rules: [oops");
    write_atomic(&bundle, b"not a certificate");
    write_atomic(&ca.files.key, b"not a key");
    eventually("all three refused", Duration::from_secs(5), || async {
        let text = scrape().await;
        gauge(&text, "portcullis_rules_valid") == 0.0
            && gauge(&text, "portcullis_trust_bundle_valid") == 0.0
            && gauge(&text, "portcullis_issuer_valid") == 0.0
    })
    .await;
    promtool_check(&scrape().await);

    // Back to what is in force (rules) and to a new good version (bundle).
    write_atomic(&rules.join("policy.yaml"), good.as_bytes());
    write_atomic(&bundle, &[ca.cert_pem(), b"\n".to_vec()].concat());
    eventually(
        "rules and bundle valid again",
        Duration::from_secs(5),
        || async {
            let text = scrape().await;
            gauge(&text, "portcullis_rules_valid") == 1.0
                && gauge(&text, "portcullis_trust_bundle_valid") == 1.0
        },
    )
    .await;
    assert_eq!(gauge(&scrape().await, "portcullis_issuer_valid"), 0.0);
}

/// The peer labels of the test's client and server identities.
const CLIENT: &[(&str, &str)] = &[
    ("peer_trust_domain", "cluster.local"),
    ("peer_namespace", "default"),
    ("peer_service_account", "client"),
];
const SERVER: &[(&str, &str)] = &[
    ("peer_trust_domain", "cluster.local"),
    ("peer_namespace", "default"),
    ("peer_service_account", "server"),
];
const UNAUTHENTICATED: &[(&str, &str)] = &[
    ("peer_trust_domain", "unauthenticated"),
    ("peer_namespace", "unauthenticated"),
    ("peer_service_account", "unauthenticated"),
];

/// `labels` and `more` together.
fn with<'a>(labels: &[(&'a str, &'a str)], more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    labels.iter().chain(more).copied().collect()
}

/// Waits until `sidecar` has no connection of `direction` open.
async fn all_closed(sidecar: &Sidecar, direction: &str) {
    eventually(
        "connections closed",
        Duration::from_secs(5),
        || async move {
            sidecar.metric(
                "portcullis_tcp_connections_open",
                &[("direction", direction)],
            ) == 0.0
        },
    )
    .await;
}

/// TCP connection and byte metrics name the peer: inbound the calling
/// identity (or `unauthenticated` for plaintext), outbound the server
/// identity the client sidecar verified; `port` is the destination port
/// on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_metrics_are_labelled_by_peer_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let permissive = ["--inbound-mode", "permissive", "--default-policy", "allow"];
    let pair = Pair::start(&ca, &ca.files.cert, &[], &permissive).await;
    assert!(pair.ping(b"hello").await);
    let (a, b) = (&pair.a, &pair.b);
    all_closed(b, "inbound").await;
    all_closed(a, "outbound").await;
    let echo_port = pair.app.port().to_string();
    let inbound = with(CLIENT, &[("direction", "inbound"), ("port", &echo_port)]);
    for (name, want) in [
        ("portcullis_tcp_connections_opened_total", 1.0),
        ("portcullis_tcp_connections_closed_total", 1.0),
        ("portcullis_tcp_received_bytes_total", 5.0),
        ("portcullis_tcp_sent_bytes_total", 5.0),
    ] {
        assert_eq!(b.metric(name, &inbound), want, "server sidecar: {name}");
    }
    let b_port = b.addrs.inbound.port().to_string();
    let outbound = with(SERVER, &[("direction", "outbound"), ("port", &b_port)]);
    for (name, want) in [
        ("portcullis_tcp_connections_opened_total", 1.0),
        ("portcullis_tcp_connections_closed_total", 1.0),
        ("portcullis_tcp_received_bytes_total", 5.0),
        ("portcullis_tcp_sent_bytes_total", 5.0),
    ] {
        assert_eq!(a.metric(name, &outbound), want, "client sidecar: {name}");
    }

    // A plaintext peer (permissive mode, allowed by the default policy) is
    // `unauthenticated`.
    let plain = TcpStream::connect(b.addrs.inbound).await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(5), round_trip(plain, b"plain"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"plain");
    all_closed(b, "inbound").await;
    let plaintext = with(UNAUTHENTICATED, &[("direction", "inbound")]);
    assert_eq!(
        b.metric("portcullis_tcp_connections_opened_total", &plaintext),
        1.0
    );
    assert_eq!(
        b.metric("portcullis_tcp_received_bytes_total", &plaintext),
        5.0
    );
    promtool_check(&b.metrics.encode());
    promtool_check(&a.metrics.encode());
}

/// An HTTP app: `/ws` upgrades and then echoes; every other request gets
/// `hello\n`.
async fn http_app() -> SocketAddr {
    use hyper::{Request, Response, StatusCode};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |mut req: Request<hyper::body::Incoming>| async move {
                        use http_body_util::BodyExt;
                        let mut resp = Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"hello\n"),
                        ));
                        if req.uri().path() == "/ws" {
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let mut io = TokioIo::new(on.await.unwrap());
                                let mut buf = [0u8; 64];
                                while let Ok(n) = io.read(&mut buf).await {
                                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            });
                            *resp.body_mut() = http_body_util::Full::new(bytes::Bytes::new());
                            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                            let h = resp.headers_mut();
                            h.insert("connection", "upgrade".parse().unwrap());
                            h.insert("upgrade", "websocket".parse().unwrap());
                        } else {
                            let _ = req.into_body().collect().await;
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Sends `head` (and `body`) through `addr` and reads the response head;
/// returns the stream and the head.
async fn send_head(addr: SocketAddr, request: &[u8]) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut byte))
            .await
            .expect("an answer")
            .unwrap();
        head.push(byte[0]);
    }
    (s, String::from_utf8(head).unwrap())
}

/// The server sidecar counts the bytes of HTTP connections by peer, the
/// body sizes of requests and responses, and keeps an upgraded (WebSocket)
/// connection counted as open, with its bytes, until it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connections_count_bytes_body_sizes_and_upgrades() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let app = http_app().await;
    let Pair { a, b, .. } = Pair::in_front_of(app, &ca, &ca.files.cert, &[], &[]).await;

    let post = b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nconnection: close\r\n\r\nabcd";
    let (mut s, head) = send_head(a.upstream(), post).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = Vec::new();
    s.read_to_end(&mut body).await.unwrap();
    assert_eq!(body, b"hello\n");
    drop(s);
    all_closed(&b, "inbound").await;
    let inbound = with(CLIENT, &[("direction", "inbound")]);
    let received = b.metric("portcullis_tcp_received_bytes_total", &inbound);
    let sent = b.metric("portcullis_tcp_sent_bytes_total", &inbound);
    assert_eq!(received, post.len() as f64, "the request, as received");
    assert!(
        sent > head.len() as f64 + 6.0 - 1.0,
        "the response head and body: {sent}"
    );
    let sizes = |name: &str| {
        let text = b.metrics.encode();
        (
            metric_value(&text, &format!("{name}_count"), &[("direction", "inbound")]),
            metric_value(&text, &format!("{name}_sum"), &[("direction", "inbound")]),
        )
    };
    assert_eq!(sizes("portcullis_http_request_size_bytes"), (1.0, 4.0));
    assert_eq!(sizes("portcullis_http_response_size_bytes"), (1.0, 6.0));
    // The client's `connection: close` is its own: the app connection is
    // kept for the next request.
    let app_conns = |b: &Sidecar| {
        (
            b.metric("portcullis_http_app_connections_opened_total", &[]),
            b.metric("portcullis_http_app_connections_idle", &[]),
        )
    };
    assert_eq!(app_conns(&b), (1.0, 1.0));

    // An upgrade: counted open, with its bytes, until it closes.
    let upgrade =
        b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
    let (mut ws, head) = send_head(a.upstream(), upgrade).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(app_conns(&b), (1.0, 0.0), "the upgrade took the pooled one");
    for _ in 0..3 {
        ws.write_all(b"frames both ways").await.unwrap();
        let mut back = [0u8; 16];
        tokio::time::timeout(Duration::from_secs(5), ws.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&back, b"frames both ways");
    }
    let open = |s: &Sidecar, direction: &str| {
        s.metric(
            "portcullis_tcp_connections_open",
            &[("direction", direction)],
        )
    };
    assert_eq!(open(&b, "inbound"), 1.0, "the upgraded connection is open");
    assert_eq!(open(&a, "outbound"), 1.0);
    let after = b.metric("portcullis_tcp_received_bytes_total", &inbound);
    assert_eq!(
        after - received,
        (upgrade.len() + 3 * 16) as f64,
        "the upgrade request and the frames after it, each counted once"
    );
    drop(ws);
    all_closed(&b, "inbound").await;
    all_closed(&a, "outbound").await;
    promtool_check(&b.metrics.encode());
}

/// An app that answers the first request of each connection and keeps the
/// connection, then closes it without answering when the next request
/// comes (as if its keep-alive timeout had fired just then).
async fn first_request_only_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let mut heads = 0;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        got.drain(..end + 4);
                        heads += 1;
                        if heads > 1 {
                            return;
                        }
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nhello\n";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A GET that crosses the app's close of an idle pooled connection is sent
/// again on a new connection: the caller gets the answer, and the resend
/// is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_crossing_the_apps_keep_alive_close_is_sent_again_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let app = first_request_only_app().await;
    let Pair { a, b, .. } = Pair::in_front_of(app, &ca, &ca.files.cert, &[], &[]).await;
    let get = b"GET /again HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let (_s, head) = send_head(a.upstream(), get).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let b = &b;
    eventually(
        "the app connection is pooled",
        Duration::from_secs(5),
        || async move { b.metric("portcullis_http_app_connections_idle", &[]) == 1.0 },
    )
    .await;
    // The pool sends again only on a connection idle for a second or more.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_s, head) = send_head(a.upstream(), get).await;
    assert!(head.starts_with("HTTP/1.1 200"), "not sent again: {head}");
    assert_eq!(
        b.metric("portcullis_http_app_requests_resent_total", &[]),
        1.0
    );
    assert_eq!(
        b.metric("portcullis_http_app_connections_opened_total", &[]),
        2.0
    );
}
