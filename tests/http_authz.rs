//! Issue 4, tests 3 and 4: HTTP enforcement through two real sidecars
//! (HTTP/1.1 keep-alive, HTTP/2, gRPC-style, WebSocket upgrade,
//! `x-forwarded-client-cert`), and live rule reloads.

mod common;
#[path = "http_authz/evasion.rs"]
mod evasion;
#[path = "http_authz/raw.rs"]
mod raw;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The app: answers `METHOD PATH xfcc=<header>`; `/ws` upgrades and echoes;
/// gRPC requests get `grpc-status: 0` in trailers.
async fn app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |mut req: Request<hyper::body::Incoming>| async move {
                        if req.headers().contains_key("upgrade") {
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
                            let resp = Response::builder()
                                .status(StatusCode::SWITCHING_PROTOCOLS)
                                .header("connection", "upgrade")
                                .header("upgrade", "websocket")
                                .body(Full::new(Bytes::new()))
                                .unwrap();
                            return Ok::<_, Infallible>(resp);
                        }
                        let xfcc = req
                            .headers()
                            .get_all("x-forwarded-client-cert")
                            .iter()
                            .map(|v| v.to_str().unwrap().to_string())
                            .collect::<Vec<_>>()
                            .join("|");
                        let mut body = format!("{} {} xfcc={xfcc}", req.method(), req.uri().path());
                        if req
                            .headers()
                            .keys()
                            .any(|k| k.as_str().contains("client_cert"))
                        {
                            body.push_str(" spoofed-header-arrived");
                        }
                        if req.headers().contains_key("x-echo-host") {
                            body.push_str(&format!(
                                " host={}",
                                req.headers()["host"].to_str().unwrap()
                            ));
                        }
                        Ok(Response::new(Full::new(Bytes::from(body))))
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

fn write_rules(dir: &Path, name: &str, yaml: &str) {
    write_atomic(&dir.join(name), yaml.as_bytes());
}

/// Rules: the client may GET /public/**; nobody may touch /admin/**.
fn rules_for(port: u16) -> String {
    format!(
        r#"rules:
  - name: client-reads-public
    action: allow
    ports: [{port}]
    from:
      identities: ["spiffe://cluster.local/ns/default/sa/client"]
    http:
      methods: [GET, POST]
      paths: ["/public/**", "/grpc.Echo/*"]
  - name: no-admin
    action: deny
    ports: [{port}]
    http:
      paths: ["/admin/**"]
"#
    )
}

struct Mesh {
    app_port: u16,
    pair_a: Sidecar,
    b: Sidecar,
    rules: std::path::PathBuf,
    ca: Ca,
    _dir: tempfile::TempDir,
}

async fn mesh() -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let app = app().await;
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    write_rules(&rules, "policy.yaml", &rules_for(app.port()));
    let b = server_with(&ca, app, &["--rules-dir", &rules.display().to_string()]).await;
    let a = client_of(&ca, &b, &[]).await;
    Mesh {
        app_port: app.port(),
        pair_a: a,
        b,
        rules,
        ca,
        _dir: dir,
    }
}

/// A server sidecar in front of `app`, with `extra` flags.
async fn server_with(ca: &Ca, app: SocketAddr, extra: &[&str]) -> Sidecar {
    let mut args = issuer_args(ca, &ca.files.cert, "server");
    args.extend(["--inbound-target".into(), app.to_string()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    Sidecar::start(&args).await
}

/// A client sidecar whose upstream listener leads to `b`, with `extra` flags.
async fn client_of(ca: &Ca, b: &Sidecar, extra: &[&str]) -> Sidecar {
    let mut args = issuer_args(ca, &ca.files.cert, "client");
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend([
        "--upstream".into(),
        format!("127.0.0.1:0={}", b.addrs.inbound),
    ]);
    Sidecar::start(&args).await
}

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn h1(addr: SocketAddr) -> H1 {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    send
}

async fn get(send: &mut H1, path: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
    send.ready().await.unwrap();
    let mut req = Request::get(path).header("host", "server.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keepalive_allows_denies_and_sets_xfcc() {
    let m = mesh().await;
    let mut c = h1(m.pair_a.upstream()).await;
    let (status, body) = get(
        &mut c,
        "/public/page",
        &[("x-forwarded-client-cert", "URI=spiffe://evil/ns/x/sa/y")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        "GET /public/page xfcc=URI=spiffe://cluster.local/ns/default/sa/client"
    );
    // Same keep-alive connection: denied requests never reach the app.
    let (status, _) = get(&mut c, "/private", &[]).await;
    assert_eq!(status, 403, "implicit deny: an allow rule covers the port");
    let (status, _) = get(&mut c, "/admin/users", &[]).await;
    assert_eq!(status, 403);
    let (status, _) = get(&mut c, "/public/../admin/users", &[]).await;
    assert_eq!(status, 403, "dot segments are resolved before matching");
    let (status, body) = get(&mut c, "/public//./a", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (
            StatusCode::OK,
            "GET /public/a xfcc=URI=spiffe://cluster.local/ns/default/sa/client"
        )
    );
    let (status, _) = get(&mut c, "/public/%2e%2e/admin/x", &[]).await;
    assert_eq!(status, 403);
    let (status, _) = get(&mut c, "/public/a%2Fb", &[]).await;
    assert_eq!(status, 400, "an encoded slash is refused");
    let (status, _) = get(&mut c, "/public/ok", &[]).await;
    assert_eq!(status, 200, "the connection is still usable");
    // The underscore spelling of the identity header never reaches the app.
    let (status, body) = get(
        &mut c,
        "/public/u",
        &[("x_forwarded_client_cert", "URI=spiffe://evil/x")],
    )
    .await;
    assert_eq!(status, 200);
    assert!(!body.contains("spoofed-header-arrived"), "{body}");
    // Hosts that servers read differently are refused.
    for bad in ["server.test:abc", "x@server.test"] {
        let mut raw = TcpStream::connect(m.pair_a.upstream()).await.unwrap();
        raw.write_all(format!("GET /public/h HTTP/1.1\r\nHost: {bad}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut head = [0u8; 12];
        raw.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 400", "Host: {bad}");
    }
    // An absolute-form target: the app sees the host the rules saw.
    let (status, body) = get(
        &mut c,
        "http://api.example/public/abs",
        &[("x-echo-host", "1")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.ends_with(
            "GET /public/abs xfcc=URI=spiffe://cluster.local/ns/default/sa/client host=api.example"
        ),
        "{body}"
    );

    let port = |m: &Sidecar, decision| {
        m.metric(
            "portcullis_authz_decisions_total",
            &[("decision", decision)],
        )
    };
    assert!(port(&m.b, "deny") >= 4.0);
    assert_eq!(
        m.b.metric(
            "portcullis_authz_decisions_total",
            &[("rule", "no-admin"), ("decision", "deny")]
        ),
        3.0
    );
    assert!(
        m.b.metric(
            "portcullis_http_requests_total",
            &[("status_code", "403"), ("method", "GET")]
        ) >= 4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_grpc_requests_are_authorized_one_by_one() {
    let m = mesh().await;
    let io = TokioIo::new(TcpStream::connect(m.pair_a.upstream()).await.unwrap());
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = |path: &str| {
        Request::get(format!("http://server.test{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let resp = send.send_request(req("/public/h2")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        body,
        "GET /public/h2 xfcc=URI=spiffe://cluster.local/ns/default/sa/client"
    );
    assert_eq!(
        send.send_request(req("/admin")).await.unwrap().status(),
        403
    );

    let grpc = |path: &str| {
        Request::post(format!("http://server.test{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap()
    };
    let resp = send.send_request(grpc("/grpc.Echo/Say")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("grpc-status").is_none());
    let resp = send.send_request(grpc("/grpc.Admin/Drop")).await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "gRPC denials are trailers-only responses"
    );
    assert_eq!(resp.headers()["grpc-status"], "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_when_allowed() {
    let m = mesh().await;
    let mut s = TcpStream::connect(m.pair_a.upstream()).await.unwrap();
    s.write_all(
        b"GET /public/ws HTTP/1.1\r\nHost: server.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"frames both ways").await.unwrap();
    let mut back = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"frames both ways");

    // New rules that deny the route close the open tunnel.
    write_rules(
        &m.rules,
        "policy.yaml",
        &rules_for(m.app_port).replace("\"/public/**\", ", ""),
    );
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut back))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "the tunnel was closed");
    let b = &m.b;
    eventually("termination counted", Duration::from_secs(5), || async {
        b.metric(
            "portcullis_authz_connections_terminated_total",
            &[("rule", "default")],
        ) >= 1.0
    })
    .await;

    let mut s = TcpStream::connect(m.pair_a.upstream()).await.unwrap();
    s.write_all(
        b"GET /admin/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 403");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_swap_flips_a_decision_on_an_open_keepalive_connection() {
    let m = mesh().await;
    // Rebuild the rules directory the way the kubelet mounts a ConfigMap.
    let data1 = m.rules.join("..2026_01");
    std::fs::create_dir(&data1).unwrap();
    let app_port = m.app_port;
    std::fs::write(data1.join("policy.yaml"), rules_for(app_port)).unwrap();
    std::os::unix::fs::symlink("..2026_01", m.rules.join("..data")).unwrap();
    std::fs::remove_file(m.rules.join("policy.yaml")).unwrap();
    std::os::unix::fs::symlink("..data/policy.yaml", m.rules.join("policy.yaml")).unwrap();

    let mut c = h1(m.pair_a.upstream()).await;
    assert_eq!(get(&mut c, "/private/x", &[]).await.0, 403);
    let reloads = |r| {
        m.b.metric("portcullis_rules_reloads_total", &[("result", r)])
    };
    let ok_before = reloads("ok");

    let data2 = m.rules.join("..2026_02");
    std::fs::create_dir(&data2).unwrap();
    let opened = rules_for(app_port).replace("\"/public/**\"", "\"/public/**\", \"/private/**\"");
    std::fs::write(data2.join("policy.yaml"), opened).unwrap();
    std::os::unix::fs::symlink("..2026_02", m.rules.join("..data_tmp")).unwrap();
    std::fs::rename(m.rules.join("..data_tmp"), m.rules.join("..data")).unwrap();

    let b = &m.b;
    eventually("reload counted", Duration::from_secs(5), || async {
        reloads("ok") > ok_before
    })
    .await;
    assert_eq!(
        get(&mut c, "/private/x", &[]).await.0,
        200,
        "same connection, new decision"
    );

    // A broken file: nothing changes, the error is reported.
    write_rules(
        &m.rules,
        "broken.yaml",
        "rules:\n  - name: x\n    action: maybe\n",
    );
    eventually("failed reload counted", Duration::from_secs(5), || async {
        reloads("error") >= 1.0
    })
    .await;
    assert_eq!(
        get(&mut c, "/private/x", &[]).await.0,
        200,
        "previous set still enforced"
    );
    let (status, body) = http_get(b.addrs.admin, "/rules").await.unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let err = v["last_error"]["message"].as_str().unwrap_or_default();
    assert!(err.contains("broken.yaml:3:"), "{body}");
    assert_eq!(v["rule_count"], 2, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_change_closes_only_the_tcp_connections_it_denies() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let echo = echo_server().await;
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    write_rules(
        &rules,
        "r.yaml",
        "rules:\n  - name: everyone\n    action: allow\n",
    );
    let mut b_args = issuer_args(&ca, &ca.files.cert, "server");
    b_args.extend([
        "--inbound-target".into(),
        echo.to_string(),
        "--rules-dir".into(),
        rules.display().to_string(),
    ]);
    let b = Sidecar::start(&b_args).await;
    let start_client = |sa: &'static str| {
        let ca = &ca;
        let b = &b;
        async move {
            let mut args = issuer_args(ca, &ca.files.cert, sa);
            args.extend([
                "--upstream".into(),
                format!("127.0.0.1:0={}", b.addrs.inbound),
            ]);
            Sidecar::start(&args).await
        }
    };
    let alice = start_client("alice").await;
    let bob = start_client("bob").await;
    // Opaque (non-HTTP) long-lived connections from two identities.
    let mut to_alice = TcpStream::connect(alice.upstream()).await.unwrap();
    let mut to_bob = TcpStream::connect(bob.upstream()).await.unwrap();
    for s in [&mut to_alice, &mut to_bob] {
        s.write_all(b"\x00hello").await.unwrap();
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).await.unwrap();
    }
    write_rules(
        &rules,
        "r.yaml",
        "rules:\n  - name: no-bob\n    action: deny\n    from:\n      identities: [\"spiffe://cluster.local/ns/default/sa/bob\"]\n  - name: everyone\n    action: allow\n",
    );
    let mut buf = [0u8; 6];
    let n = tokio::time::timeout(Duration::from_secs(5), to_bob.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "bob's connection was closed");
    to_alice.write_all(b"\x00again").await.unwrap();
    to_alice.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"\x00again", "alice's connection is untouched");
    assert_eq!(
        b.metric(
            "portcullis_authz_connections_terminated_total",
            &[("rule", "no-bob")]
        ),
        1.0
    );
}
