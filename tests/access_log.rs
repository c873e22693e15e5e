//! `--access-log`: the real binary writes one JSON line per HTTP request
//! and per opaque connection on stdout, with the documented fields; with the
//! default (`off`) it writes nothing there.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";

/// An HTTP app: `200 ok` to every request, then close.
async fn app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16384 {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n",
                    )
                    .await;
            });
        }
    });
    addr
}

/// A `portcullis run` process serving `app` with rules; its inbound
/// address (from its "listening" log line) and its stdout.
struct Server {
    child: Child,
    inbound: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server(dir: &std::path::Path, ca: &Ca, app: SocketAddr, extra: &[&str]) -> Server {
    let rules = dir.join(format!("rules-{}", app.port()));
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("policy.yaml"),
        format!(
            "rules:\n  - name: no-admin\n    action: deny\n    http:\n      paths: [\"/admin/**\"]\n  - name: client-may-connect\n    action: allow\n    from:\n      identities: [\"{CLIENT}\"]\n"
        ),
    )
    .unwrap();
    let mut args = run_args(&[
        "--inbound-target".into(),
        app.to_string(),
        "--rules-dir".into(),
        rules.to_str().unwrap().into(),
    ]);
    args.extend(issuer_args(ca, &ca.files.cert, "server"));
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut child = Command::new(BIN)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = await_log_line(&mut lines, "listening", |_| {});
    std::thread::spawn(move || for _ in lines {});
    let addr = |k: &str| listening[k].as_str().unwrap().parse().unwrap();
    Server {
        inbound: addr("inbound"),
        admin: addr("admin"),
        child,
    }
}

/// Through a client sidecar to `server`: an allowed request, a denied one,
/// and an opaque connection (denied: a deny rule with `http` also denies
/// connections that are not HTTP).
async fn traffic(ca: &Ca, server: &Server) {
    let admin = server.admin;
    eventually("server ready", Duration::from_secs(10), || async move {
        matches!(http_get(admin, "/ready").await, Ok((200, _)))
    })
    .await;
    let mut a_args = issuer_args(ca, &ca.files.cert, "client");
    a_args.extend([
        "--upstream".to_string(),
        format!("127.0.0.1:0={}={}", server.inbound, id("server")),
    ]);
    let a = Sidecar::start(&a_args).await;
    // As curl sends it: no body, no Content-Length.
    let mut s = TcpStream::connect(a.upstream()).await.unwrap();
    s.write_all(b"GET /public/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");
    assert_eq!(
        http_request(a.upstream(), "GET", "/admin/x")
            .await
            .unwrap()
            .0,
        403
    );
    let opaque = TcpStream::connect(a.upstream()).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), round_trip(opaque, b"hello\n")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_has_one_line_per_request_and_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let app = app().await;
    let mut b = server(dir.path(), &ca, app, &["--access-log", "json"]);
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let stdout = b.child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    traffic(&ca, &b).await;
    eventually("three access log lines", Duration::from_secs(10), || {
        let n = lines.lock().unwrap().len();
        async move { n >= 3 }
    })
    .await;
    let entries: Vec<Value> = lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(entries.len(), 3, "{entries:#?}");
    for e in &entries {
        for key in [
            "time",
            "kind",
            "peer",
            "method",
            "authority",
            "path",
            "status",
            "decision",
            "rule",
            "duration_ms",
            "bytes_received",
            "bytes_sent",
            "upstream",
        ] {
            assert!(e.get(key).is_some(), "{key} missing: {e}");
        }
        assert_eq!(e["peer"], CLIENT);
        assert_eq!(e["upstream"], app.to_string());
        assert!(e["duration_ms"].as_f64().unwrap() >= 0.0);
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
    }
    let find = |kind: &str, decision: &str| {
        entries
            .iter()
            .find(|e| e["kind"] == kind && e["decision"] == decision)
            .unwrap_or_else(|| panic!("no {kind} {decision} line: {entries:#?}"))
    };
    let allowed = find("http", "allow");
    assert_eq!(allowed["method"], "GET");
    assert_eq!(allowed["path"], "/public/x");
    assert_eq!(allowed["authority"], "x");
    assert_eq!(allowed["status"], 200);
    assert_eq!(allowed["rule"], "client-may-connect");
    assert_eq!(allowed["bytes_sent"], 3);
    // A GET without a body (and without Content-Length) received 0 bytes;
    // null is for a length not known in advance.
    assert_eq!(allowed["bytes_received"], 0);
    let denied = find("http", "deny");
    assert_eq!(
        (denied["status"].clone(), denied["rule"].clone()),
        (403.into(), "no-admin".into())
    );
    let tcp = find("tcp", "deny");
    assert_eq!(tcp["rule"], "no-admin");
    assert!(tcp["method"].is_null() && tcp["status"].is_null());
    let metrics = http_get(b.admin, "/metrics").await.unwrap().1;
    assert_eq!(
        metric_value(&metrics, "portcullis_access_log_dropped_total", &[]),
        0.0
    );
    // Per-peer labels on the request metrics.
    assert_eq!(
        metric_value(
            &metrics,
            "portcullis_http_requests_total",
            &[
                ("peer_trust_domain", "cluster.local"),
                ("peer_namespace", "default"),
                ("peer_service_account", "client"),
                ("status_code", "200"),
            ]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_off_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let app = app().await;
    let mut b = server(dir.path(), &ca, app, &[]);
    traffic(&ca, &b).await;
    // The requests were answered, so their lines would have been queued:
    // stop the process and read everything it wrote.
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let mut out = String::new();
    b.child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, "", "nothing on stdout with --access-log off");
}
