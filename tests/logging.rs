//! The log filter changed at runtime: `PUT /logging?level=` on the admin
//! port turns debug lines on and off in the running sidecar's stderr, `GET
//! /logging` shows the filter in force, and a change from a non-loopback
//! address is refused. The sidecar runs in its own network namespace whose
//! `lo` also carries a non-loopback address (10.99.0.1), so a non-loopback
//! client exists whatever the machine's own interfaces are.
//!
//! And logs that help without flooding: a flood of refusals of one kind
//! (plaintext, untrusted certificates, outbound handshakes, an app that is
//! down) makes one line per 10 s with a count, and app failures say why.

mod common;
mod netns;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use netns::Netns;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const ADMIN: &str = "127.0.0.1:15020";
const OUTSIDE: &str = "10.99.0.1";
/// The sidecar's debug line for a malformed admin request.
const DEBUG_LINE: &str = "admin connection failed";
/// The sidecar's info line for every accepted change.
const CHANGED: &str = "log level changed through the admin endpoint";

/// `curl` inside `ns`: the status code and the body.
fn curl(ns: &Netns, method: &str, url: &str) -> (u16, String) {
    let out = ns.run(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
        url,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        body.trim_end().to_string(),
    )
}

/// Sends a request hyper cannot parse to the admin port and waits until
/// the sidecar closed it (by then its debug line, if enabled, is written).
fn malformed_admin_request(ns: &Netns) {
    ns.ok(&[
        "bash",
        "-c",
        "exec 3<>/dev/tcp/127.0.0.1/15020; printf 'not http\\r\\n\\r\\n' >&3; timeout 5 cat <&3 >/dev/null",
    ]);
}

/// The JSON `message` of every stderr line so far.
fn messages(lines: &Mutex<Vec<String>>) -> Vec<String> {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["message"].as_str().map(str::to_string))
        .collect()
}

fn count(lines: &Mutex<Vec<String>>, message: &str) -> usize {
    messages(lines).iter().filter(|m| *m == message).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_changes_at_runtime_from_loopback_only() {
    if netns::skip(
        "log_level_changes_at_runtime_from_loopback_only",
        &["ip", "curl", "bash"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let ns = Netns::new("logging");
    ns.addr("lo", &format!("{OUTSIDE}/32"));
    let mut argv: Vec<String> = [
        BIN,
        "run",
        "--log-format",
        "json",
        "--log-level",
        "info",
        "--inbound-listen",
        "127.0.0.1:15006",
        "--admin-listen",
        "0.0.0.0:15020",
        "--inbound-target",
        "127.0.0.1:9",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(issuer_args(&ca, &ca.files.cert, "server"));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut sidecar = ns.spawn_with(&argv, Stdio::null(), Stdio::piped());
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = sidecar.take_stderr().unwrap();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    eventually("sidecar ready", Duration::from_secs(10), || {
        let ready = curl(&ns, "GET", &format!("http://{ADMIN}/ready")).0 == 200;
        async move { ready }
    })
    .await;

    let url = |host: &str, query: &str| format!("http://{host}:15020/logging{query}");
    assert_eq!(
        curl(&ns, "GET", &url("127.0.0.1", "")),
        (200, "info".into())
    );

    // At info, the debug line does not appear.
    malformed_admin_request(&ns);

    // From a non-loopback address: refused, and the filter is unchanged.
    let (status, body) = curl(&ns, "PUT", &url(OUTSIDE, "?level=debug"));
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        curl(&ns, "GET", &url(OUTSIDE, "")),
        (200, "info".into()),
        "GET /logging answers from anywhere"
    );

    // A directive that does not parse: 400, filter unchanged.
    let (status, body) = curl(&ns, "PUT", &url("127.0.0.1", "?level=%3D%3D%3D"));
    assert_eq!(status, 400, "{body}");
    let (status, _) = curl(&ns, "PUT", &url("127.0.0.1", ""));
    assert_eq!(status, 400);

    // From loopback: debug on, and the debug line appears.
    assert_eq!(curl(&ns, "PUT", &url("127.0.0.1", "?level=debug")).0, 200);
    assert_eq!(
        curl(&ns, "GET", &url("127.0.0.1", "")),
        (200, "debug".into())
    );
    malformed_admin_request(&ns);
    eventually("the debug line appears", Duration::from_secs(5), || {
        let n = count(&lines, DEBUG_LINE);
        async move { n == 1 }
    })
    .await;

    // Back to info: the same event no longer logs. The second change is a
    // marker logged after the malformed request was closed.
    assert_eq!(curl(&ns, "PUT", &url("127.0.0.1", "?level=info")).0, 200);
    malformed_admin_request(&ns);
    assert_eq!(curl(&ns, "PUT", &url("127.0.0.1", "?level=info")).0, 200);
    eventually("both changes logged", Duration::from_secs(5), || {
        let n = count(&lines, CHANGED);
        async move { n == 3 }
    })
    .await;
    assert_eq!(
        count(&lines, DEBUG_LINE),
        1,
        "debug lines: {:#?}",
        messages(&lines)
    );
    drop(sidecar);
}

/// How many connections of each refused kind the flood test makes.
const PLAINTEXT: usize = 200;
const UNTRUSTED: usize = 200;
const OUTBOUND: usize = 200;
const APP_DOWN: usize = 20;

/// Reads `url` from the sidecar's admin port with a bare HTTP/1.0 request.
async fn admin_request(admin: SocketAddr, method: &str, path: &str) -> u16 {
    http_request(admin, method, path).await.unwrap().0
}

/// The JSON log lines so far whose message is `message` (and, for
/// inbound refusals, whose `result` is `result`).
fn lines_of(lines: &Mutex<Vec<String>>, message: &str, result: Option<&str>) -> Vec<Value> {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == message)
        .filter(|v| result.is_none_or(|r| v["result"] == r))
        .collect()
}

/// Connects, sends `msg`, and reads until the sidecar closes (bounded).
async fn refused_once<S>(mut s: S, msg: &[u8]) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = s.write_all(msg).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

/// A flood of refusals of one kind makes one log line, or two if it spans
/// the 10 s interval, each with the number of refusals it stands for
/// (`count`): plaintext clients and untrusted certificates on the inbound
/// side, a server that is no sidecar on the outbound side. Requests and
/// connections to an app that is down (502, and an opaque connection) are
/// logged the same way, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_refusals_are_logged_once_per_interval_with_a_count() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    // Not a sidecar: accepts and closes, so every outbound handshake fails.
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_addr = fake.local_addr().unwrap();
    tokio::spawn(async move { while fake.accept().await.is_ok() {} });
    // The app is down: nothing listens on its port.
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut args = run_args(&[
        "--inbound-target".into(),
        down.to_string(),
        "--upstream".into(),
        format!("127.0.0.1:0={fake_addr}={}", id("server")),
    ]);
    args.extend(issuer_args(&ca, &ca.files.cert, "server"));
    let mut child = std::process::Command::new(BIN)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = await_log_line(&mut stderr, "listening", |_| {});
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in stderr.map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let addr = |s: &str| -> SocketAddr { s.trim_matches(['[', ']']).parse().unwrap() };
    let inbound = addr(listening["inbound"].as_str().unwrap());
    let admin = addr(listening["admin"].as_str().unwrap());
    let upstream = addr(listening["upstreams"].as_str().unwrap());
    eventually("sidecar ready", Duration::from_secs(10), || async move {
        admin_request(admin, "GET", "/ready").await == 200
    })
    .await;

    for _ in 0..PLAINTEXT {
        let s = TcpStream::connect(inbound).await.unwrap();
        assert!(refused_once(s, b"plain").await.is_empty());
    }
    let intruder = Ca::root(dir.path(), "intruder", TD).leaf("client");
    let untrusted = client_config(intruder, &ca.cert_pem());
    for _ in 0..UNTRUSTED {
        if let Ok(s) = tls_connect(untrusted.clone(), inbound).await {
            refused_once(s, b"hello\n").await;
        }
    }
    for _ in 0..OUTBOUND {
        let s = TcpStream::connect(upstream).await.unwrap();
        assert!(refused_once(s, b"hello\n").await.is_empty());
    }
    let client = client_config(ca.leaf("client"), &ca.cert_pem());
    for _ in 0..APP_DOWN {
        let s = tls_connect(client.clone(), inbound).await.unwrap();
        let answer =
            refused_once(s, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        assert!(answer.starts_with(b"HTTP/1.1 502"), "{answer:?}");
        let s = tls_connect(client.clone(), inbound).await.unwrap();
        assert!(refused_once(s, b"hello\n").await.is_empty());
    }
    // Every refusal counted (inbound ones are logged before they are
    // counted), then a marker line: everything before it has been read.
    let metrics = || async move { http_get(admin, "/metrics").await.unwrap().1 };
    eventually("refusals counted", Duration::from_secs(10), || async {
        let text = metrics().await;
        let inbound_failed = metric_value(
            &text,
            "portcullis_tls_handshakes_total",
            &[("direction", "inbound")],
        ) - metric_value(
            &text,
            "portcullis_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "ok")],
        );
        inbound_failed == (PLAINTEXT + UNTRUSTED) as f64
    })
    .await;
    assert_eq!(
        admin_request(admin, "PUT", "/logging?level=info").await,
        200
    );
    eventually("the marker line", Duration::from_secs(5), || {
        let n = count(&lines, CHANGED);
        async move { n == 1 }
    })
    .await;

    let kinds: [(&str, &str, Option<&str>, usize); 5] = [
        (
            "plaintext clients",
            "inbound connection refused: strict mode accepts only mesh mTLS",
            Some("plaintext_refused"),
            PLAINTEXT,
        ),
        (
            "untrusted certificates",
            "inbound connection refused: TLS handshake failed",
            None,
            UNTRUSTED,
        ),
        (
            "outbound handshakes",
            "outbound handshake failed",
            None,
            OUTBOUND,
        ),
        ("502s", "app request failed: answered 502", None, APP_DOWN),
        (
            "opaque connections to the app",
            "inbound connection dropped: app unreachable",
            None,
            APP_DOWN,
        ),
    ];
    for (what, message, result, events) in kinds {
        let logged = lines_of(&lines, message, result);
        assert!(
            (1..=2).contains(&logged.len()),
            "{what}: {} lines for {events} events: {logged:#?}",
            logged.len()
        );
        let counted: u64 = logged
            .iter()
            .map(|l| {
                l["count"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{what}: no count in {l}"))
            })
            .sum();
        assert!(
            counted >= 1 && counted <= events as u64,
            "{what}: counts {counted}"
        );
    }
    // The app failures say why.
    for message in [
        "app request failed: answered 502",
        "inbound connection dropped: app unreachable",
    ] {
        let line = &lines_of(&lines, message, None)[0];
        let error = line["error"].as_str().unwrap_or_default();
        assert!(error.contains("refused"), "{message}: {line}");
    }
    let _ = child.kill();
    let _ = child.wait();
}
