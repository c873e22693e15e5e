//! Request forms that could slip past the rules, sent through two real
//! sidecars over HTTP/1.1 (raw bytes, so nothing is cleaned up by a client
//! library) and HTTP/2: odd host ports, `;` path parameters, request
//! trailers, HTTP/2 field values with stray whitespace, comma-joined
//! values, lowercase methods, `CONNECT` and fragments; and forms built
//! from allowed parts (`assembled`).

mod common;

#[path = "http_bypass/assembled.rs"]
mod assembled;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The app: answers one line saying what it received, e.g.
/// `GET /p host=h tenant=good xfcc=URI=… trailers=x-a,x-b`.
async fn app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let (parts, body) = req.into_parts();
                        let host = match parts.headers.get("host") {
                            Some(h) => String::from_utf8_lossy(h.as_bytes()).into_owned(),
                            None => parts.uri.authority().map_or("-".into(), |a| a.to_string()),
                        };
                        let all = |name: &str| {
                            parts
                                .headers
                                .get_all(name)
                                .iter()
                                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                                .collect::<Vec<_>>()
                                .join("|")
                        };
                        let collected = body.collect().await.ok();
                        let trailers = collected
                            .as_ref()
                            .and_then(|c| c.trailers())
                            .map(|t| t.keys().map(|k| k.as_str()).collect::<Vec<_>>().join(","))
                            .unwrap_or_default();
                        let line = format!(
                            "{} {} host={host} tenant={} xfcc={} trailers={trailers}",
                            parts.method,
                            parts.uri.path(),
                            all("x-tenant"),
                            all("x-forwarded-client-cert"),
                        );
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(line))))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Every request must name a tenant of the allow list (so the allow
/// semantics of comma-joined values is tested too); denied: the host
/// `internal.example`, `/api/admin/**`, tenant `evil`, method `DELETE`.
const RULES: &str = r#"rules:
  - name: tenants
    action: allow
    http:
      headers: {x-tenant: [good, acme]}
  - name: no-internal-host
    action: deny
    http:
      hosts: [internal.example]
  - name: no-admin
    action: deny
    http:
      paths: ["/api/admin/**"]
  - name: no-evil-tenant
    action: deny
    http:
      headers: {x-tenant: evil}
  - name: no-delete
    action: deny
    http:
      methods: [DELETE]
"#;

const ME: &str = "spiffe://cluster.local/ns/default/sa/client";

struct Mesh {
    a: Sidecar,
    _b: Sidecar,
    _dir: tempfile::TempDir,
}

async fn mesh() -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let app = app().await;
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    write_atomic(&rules.join("policy.yaml"), RULES.as_bytes());
    let mut b_args = issuer_args(&ca, &ca.files.cert, "server");
    b_args.extend([
        "--inbound-target".into(),
        app.to_string(),
        "--rules-dir".into(),
        rules.display().to_string(),
    ]);
    let b = Sidecar::start(&b_args).await;
    let mut a_args = issuer_args(&ca, &ca.files.cert, "client");
    a_args.extend([
        "--upstream".into(),
        format!("127.0.0.1:0={}", b.addrs.inbound),
    ]);
    let a = Sidecar::start(&a_args).await;
    Mesh {
        a,
        _b: b,
        _dir: dir,
    }
}

/// Sends `head` (and `body`) as raw HTTP/1.1 bytes on a new connection
/// and returns the status and body of the answer; status 0 when the
/// connection was closed without one (not read as HTTP at all).
async fn raw(m: &Mesh, head: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(m.a.upstream()).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .unwrap_or_else(|_| panic!("no answer and no close for {head:?}"))
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&got).into_owned();
    if text.is_empty() {
        return (0, text);
    }
    let status = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response to {head:?}: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // A chunked answer: keep the chunk's data only.
    let body = match body.split_once("\r\n") {
        Some((size, rest)) if usize::from_str_radix(size, 16).is_ok() => {
            rest.split("\r\n").next().unwrap_or_default()
        }
        _ => body,
    };
    (status, body.to_string())
}

/// A GET with `host` and extra header lines, closing after the answer.
async fn get1(m: &Mesh, target: &str, host: &str, extra: &str) -> (u16, String) {
    let head = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n");
    raw(m, &head, b"").await
}

type H2 = hyper::client::conn::http2::SendRequest<BoxBody<Bytes, Infallible>>;

async fn h2(m: &Mesh) -> H2 {
    let io = TokioIo::new(TcpStream::connect(m.a.upstream()).await.unwrap());
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// Sends one HTTP/2 request; a stream reset counts as 400 (the request
/// was refused as malformed before any rule or app saw it).
async fn send2(c: &mut H2, req: Request<BoxBody<Bytes, Infallible>>) -> (u16, String) {
    c.ready().await.unwrap();
    match c.send_request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
        Err(e) => (400, format!("reset: {e}")),
    }
}

fn empty() -> BoxBody<Bytes, Infallible> {
    Full::new(Bytes::new()).boxed()
}

fn req2(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<BoxBody<Bytes, Infallible>> {
    let mut r = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(uri);
    for (k, v) in headers {
        r = r.header(
            *k,
            hyper::header::HeaderValue::from_bytes(v.as_bytes()).unwrap(),
        );
    }
    r.body(empty()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_port_must_be_digits_and_the_app_gets_the_host_the_rules_saw() {
    let m = mesh().await;
    let t = "x-tenant: good\r\n";
    let (status, body) = get1(&m, "/p", "public.example", t).await;
    assert_eq!(
        (status, body.as_str()),
        (
            200,
            format!("GET /p host=public.example tenant=good xfcc=URI={ME} trailers=").as_str()
        )
    );
    for bad in [
        "internal.example:+80",
        "internal.example:-80",
        "internal.example: 80",
        "internal.example:80a",
        "internal.example:123456",
        "internal.example:65536",
        "internal.example:",
        "internal%2eexample",
        "internal.example..",
        "[::1",
    ] {
        let (status, body) = get1(&m, "/p", bad, t).await;
        assert_eq!(status, 400, "Host: {bad} -> {body}");
        let (status, body) = get1(&m, &format!("http://{bad}/p"), "public.example", t).await;
        // A space splits the target, but the line is still read as HTTP
        // (and refused), never passed on as opaque bytes.
        assert_eq!(status, 400, "absolute-form http://{bad}/p -> {body}");
    }
    // Spellings of the denied host are denied; the app gets the host in
    // the one normalized form the rules saw.
    for denied in [
        "INTERNAL.example",
        "internal.example.",
        "internal.example:0080",
    ] {
        assert_eq!(get1(&m, "/p", denied, t).await.0, 403, "Host: {denied}");
    }
    let (status, body) = get1(&m, "/p", "Public.Example.:0080", t).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(" host=public.example:80 "), "{body}");

    let mut c = h2(&m).await;
    let tenant = [("x-tenant", "good")];
    for bad in ["internal.example:+80", "internal.example:65536"] {
        let (status, body) = send2(&mut c, req2("GET", &format!("http://{bad}/p"), &tenant)).await;
        assert_eq!(status, 400, ":authority {bad} -> {body}");
    }
    let (status, _) = send2(
        &mut c,
        req2("GET", "http://INTERNAL.example:080/p", &tenant),
    )
    .await;
    assert_eq!(status, 403);
    let (status, body) = send2(&mut c, req2("GET", "http://Public.Example:080/p", &tenant)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(" host=public.example:80 "), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_parameters_are_refused() {
    let m = mesh().await;
    let t = "x-tenant: good\r\n";
    for bad in [
        "/api/admin;x",
        "/api/admin;x/users",
        "/api/admin%3Bx",
        "/api/admin%3bx",
        "/api;/admin",
    ] {
        let (status, body) = get1(&m, bad, "h", t).await;
        assert_eq!(status, 400, "{bad} -> {body}");
    }
    assert_eq!(get1(&m, "/api/admin", "h", t).await.0, 403);
    let (status, body) = get1(&m, "/api/ok?a=1;b=2", "h", t).await;
    assert_eq!(
        (status, body.contains("GET /api/ok ")),
        (200, true),
        "a ';' in the query is fine: {body}"
    );

    let mut c = h2(&m).await;
    for bad in ["/api/admin;x", "/api/admin%3Bx"] {
        let (status, body) = send2(
            &mut c,
            req2("GET", &format!("http://h{bad}"), &[("x-tenant", "good")]),
        )
        .await;
        assert_eq!(status, 400, "{bad} -> {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_never_reach_the_app() {
    let m = mesh().await;
    let head = "POST /upload HTTP/1.1\r\nHost: h\r\nx-tenant: good\r\nConnection: close\r\n\
                Transfer-Encoding: chunked\r\nTrailer: x-forwarded-client-cert, x-tenant, x-note\r\n\r\n";
    let body = b"5\r\nhello\r\n0\r\nx-forwarded-client-cert: URI=spiffe://cluster.local/ns/x/sa/forged\r\n\
                 x-tenant: evil\r\nx-note: 1\r\n\r\n";
    let (status, got) = raw(&m, head, body).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(
        got,
        format!("POST /upload host=h tenant=good xfcc=URI={ME} trailers=")
    );

    let mut c = h2(&m).await;
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert(
        "x-forwarded-client-cert",
        "URI=spiffe://cluster.local/ns/x/sa/forged".parse().unwrap(),
    );
    trailers.insert("x-tenant", "evil".parse().unwrap());
    let body = Full::new(Bytes::from_static(b"hello"))
        .with_trailers(async move { Some(Ok(trailers)) })
        .boxed();
    let req = Request::post("http://h/upload")
        .header("x-tenant", "good")
        .body(body)
        .unwrap();
    let (status, got) = send2(&mut c, req).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(
        got,
        format!("POST /upload host=h tenant=good xfcc=URI={ME} trailers=")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_values_are_matched_element_by_element_and_never_padded() {
    let m = mesh().await;
    let mut c = h2(&m).await;
    // HTTP/2 lets a client send what HTTP/1 parsing would have trimmed.
    for bad in [" evil", "evil ", "\tevil", "evil\t", " good"] {
        let (status, body) = send2(&mut c, req2("GET", "http://h/p", &[("x-tenant", bad)])).await;
        assert_eq!(status, 400, "x-tenant: {bad:?} -> {body}");
    }
    let (status, body) = send2(
        &mut c,
        req2(
            "GET",
            "http://h/p",
            &[("x-tenant", "good"), ("x-other", " padded")],
        ),
    )
    .await;
    assert_eq!(status, 400, "any padded value is malformed: {body}");
    // A deny matches any element; an allow needs every element allowed.
    for (value, want) in [
        ("good, evil", 403),
        ("evil,good", 403),
        ("good, other", 403),
        ("good, acme", 200),
        ("good,acme", 200),
    ] {
        let (status, body) = send2(&mut c, req2("GET", "http://h/p", &[("x-tenant", value)])).await;
        assert_eq!(status, want, "h2 x-tenant: {value} -> {body}");
        let (status, body) = get1(&m, "/p", "h", &format!("x-tenant: {value}\r\n")).await;
        assert_eq!(status, want, "h1 x-tenant: {value} -> {body}");
    }
    let two = |a: &str, b: &str| format!("x-tenant: {a}\r\nx-tenant: {b}\r\n");
    assert_eq!(get1(&m, "/p", "h", &two("good", "evil")).await.0, 403);
    assert_eq!(
        get1(&m, "/p", "h", &two("good", "other")).await.0,
        403,
        "every line must be allowed"
    );
    assert_eq!(get1(&m, "/p", "h", &two("good", "acme")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_are_exact_uppercase_tokens_and_connect_is_refused() {
    let m = mesh().await;
    let t = "x-tenant: good\r\n";
    let mut c = h2(&m).await;
    for method in ["delete", "Delete", "get"] {
        let (status, body) =
            send2(&mut c, req2(method, "http://h/p", &[("x-tenant", "good")])).await;
        assert_eq!(status, 400, "h2 :method {method} -> {body}");
        let head = format!("{method} /p HTTP/1.1\r\nHost: h\r\n{t}Connection: close\r\n\r\n");
        let (status, body) = raw(&m, &head, b"").await;
        // Read as HTTP (never passed on as opaque bytes) and refused.
        assert_eq!(status, 400, "h1 {method} -> {body}");
    }
    assert_eq!(
        send2(
            &mut c,
            req2("DELETE", "http://h/p", &[("x-tenant", "good")])
        )
        .await
        .0,
        403
    );
    let (status, body) = send2(&mut c, req2("PURGE", "http://h/p", &[("x-tenant", "good")])).await;
    assert_eq!(
        (status, body.starts_with("PURGE /p ")),
        (200, true),
        "{body}"
    );

    let head = format!("CONNECT h:80 HTTP/1.1\r\nHost: h:80\r\n{t}Connection: close\r\n\r\n");
    let (status, body) = raw(&m, &head, b"").await;
    assert_eq!(status, 405, "{body}");
    let connect = Request::builder()
        .method(Method::CONNECT)
        .uri("h:80")
        .header("x-tenant", "good")
        .body(empty())
        .unwrap();
    let (status, body) = send2(&mut c, connect).await;
    assert_eq!(status, 405, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragment_in_the_target_is_refused() {
    let m = mesh().await;
    let t = "x-tenant: good\r\n";
    for target in ["/p#frag", "/api/admin#x", "/p?q=1#frag", "http://h/p#f"] {
        let (status, body) = get1(&m, target, "h", t).await;
        assert_eq!(status, 400, "{target} -> {body}");
    }
    // Keep-alive: a fragment in a later request on the same connection.
    let mut s = TcpStream::connect(m.a.upstream()).await.unwrap();
    let first =
        format!("POST /p HTTP/1.1\r\nHost: h\r\n{t}Content-Length: 13\r\n\r\nGET /x#y HTTP");
    s.write_all(first.as_bytes()).await.unwrap();
    s.write_all(format!("GET /q#z HTTP/1.1\r\nHost: h\r\n{t}Connection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "a '#' in a body is data: {text}"
    );
    assert!(text.contains("\r\n\r\nPOST /p "), "{text}");
    assert_eq!(text.matches("HTTP/1.1 400").count(), 1, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_requests_still_pass() {
    let m = mesh().await;
    let (status, body) = get1(&m, "/api/users", "api.example:8080", "x-tenant: acme\r\n").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        format!("GET /api/users host=api.example:8080 tenant=acme xfcc=URI={ME} trailers=")
    );
    let mut c = h2(&m).await;
    let (status, body) = send2(
        &mut c,
        req2(
            "GET",
            "http://api.example/api/users",
            &[("x-tenant", "acme")],
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        format!("GET /api/users host=api.example tenant=acme xfcc=URI={ME} trailers=")
    );
    // HTTP/1.1 needs a Host (RFC 9112 §3.2).
    let (status, _) = raw(
        &m,
        "GET /p HTTP/1.1\r\nx-tenant: good\r\nConnection: close\r\n\r\n",
        b"",
    )
    .await;
    assert_eq!(status, 400);
}
