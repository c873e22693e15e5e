//! The inbound HTTP path: every request on a connection is authorized on
//! its own, then sent to the app over a pooled connection, with streaming
//! bodies, trailers, gRPC and `Upgrade` (WebSocket) passed through.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info};

use super::policy::RequestFacts;
use super::Shared;
use crate::authz::{HttpRequest, Peer};

/// The body of every response the proxy hands back.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The header that tells the app who called; callers cannot set it.
const XFCC: &str = "x-forwarded-client-cert";

/// Who is calling and where the connection was going.
#[derive(Clone)]
pub struct ConnInfo {
    pub peer: Arc<Peer>,
    pub source: SocketAddr,
    pub target: SocketAddr,
}

/// Serves HTTP/1.x or HTTP/2 on one accepted connection until it closes.
pub async fn serve<S>(shared: Arc<Shared>, io: S, conn: ConnInfo)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(&shared, &conn, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A client that never finishes its headers is closed (slowloris).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), super::access_log::Logged(service))
        .await
    {
        debug!(error = %e, "inbound HTTP connection ended with an error");
    }
}

async fn handle(shared: &Arc<Shared>, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = method_label(req.method());
    let port = conn.target.port();
    let resp = match authorize_and_rewrite(shared, conn, req) {
        Ok(req) => forward(shared, conn, req).await,
        Err(resp) => *resp,
    };
    let port = port.to_string();
    let peer = shared.metrics.peers.label(&conn.peer);
    let [td, ns, sa] = peer.values();
    let status = resp.status();
    let metrics = &shared.metrics;
    metrics
        .http_requests
        .with_label_values(&["inbound", &port, method, status.as_str(), td, ns, sa])
        .inc();
    metrics
        .http_request_duration
        .with_label_values(&["inbound", &port, td, ns, sa])
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// Normalizes the path, asks the rules, and prepares the request for the app
/// (normalized path, absolute URI, our `x-forwarded-client-cert`, no
/// hop-by-hop headers). A refusal comes back as the response to send.
fn authorize_and_rewrite(
    shared: &Shared,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
) -> Result<Request<Incoming>, Box<Response<Body>>> {
    let policy = &shared.policy;
    let raw_path = req.uri().path().to_string();
    let path = match crate::authz::normalize_path(&raw_path, policy.allow_encoded_slash) {
        Ok(p) => p,
        Err(e) => {
            info!(peer = %conn.peer, path = %raw_path, error = %e, "request refused: bad path");
            return Err(Box::new(text(
                StatusCode::BAD_REQUEST,
                "bad request path\n",
            )));
        }
    };
    let host = match request_host(&req) {
        Ok(h) => h,
        Err(why) => {
            info!(peer = %conn.peer, why, "request refused: bad host");
            return Err(Box::new(text(StatusCode::BAD_REQUEST, "bad host\n")));
        }
    };
    let decision = policy.authorize_http(
        conn,
        &HttpRequest {
            method: req.method().as_str(),
            path: &path,
            host: host.as_deref(),
            headers: req.headers(),
        },
    );
    if !decision.allowed {
        info!(
            peer = %conn.peer,
            source = %conn.source.ip(),
            port = conn.target.port(),
            method = %req.method(),
            path = %path,
            rule = %decision.rule,
            "request denied"
        );
        return Err(Box::new(denied(&req)));
    }
    let upgrade = is_upgrade(req.headers());
    strip_hop_by_hop(req.headers_mut(), upgrade);
    strip_client_cert_headers(req.headers_mut());
    if req.version() >= Version::HTTP_2 {
        // HTTP/2 names the host in `:authority`, which the rules saw; a
        // `host` header the rules did not see must not reach the app.
        req.headers_mut().remove(header::HOST);
    }
    if let Peer::Mesh(id) = conn.peer.as_ref() {
        if let Ok(v) = HeaderValue::from_str(&format!("URI={id}")) {
            req.headers_mut().insert(XFCC, v);
        }
    }
    if let (Some(h), true) = (&host, req.version() < Version::HTTP_2) {
        // The app must see the host the rules saw: for an absolute-form
        // target that is the URI's authority, whatever `Host` said.
        if let Ok(v) = HeaderValue::from_str(h) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    let authority = host.unwrap_or_else(|| conn.target.to_string());
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let uri = format!("http://{authority}{path}{query}");
    *req.uri_mut() = match uri.parse::<Uri>() {
        Ok(u) => u,
        Err(_) => {
            return Err(Box::new(text(
                StatusCode::BAD_REQUEST,
                "bad request target\n",
            )))
        }
    };
    Ok(req)
}

/// The host the client asked for: HTTP/2 `:authority` (or an absolute-form
/// target), else the one `Host` header. Forms servers read differently are
/// refused: user information, a port that is not a number, two `Host`s.
fn request_host(req: &Request<Incoming>) -> Result<Option<String>, &'static str> {
    let value = match req.uri().authority() {
        Some(a) => a.as_str().to_string(),
        None => {
            let mut hosts = req.headers().get_all(header::HOST).iter();
            let Some(h) = hosts.next() else {
                return Ok(None);
            };
            if hosts.next().is_some() {
                return Err("more than one Host header");
            }
            h.to_str()
                .map_err(|_| "a Host header that is not text")?
                .to_string()
        }
    };
    check_authority(&value).map(Some)
}

/// A host (with an optional numeric port) that every server reads alike.
fn check_authority(value: &str) -> Result<String, &'static str> {
    let authority: hyper::http::uri::Authority = value.parse().map_err(|_| "a malformed host")?;
    if authority.as_str().contains('@') {
        return Err("a host with user information");
    }
    let rest = &authority.as_str()[authority.host().len()..];
    if !rest.is_empty() && authority.port_u16().is_none() {
        return Err("a host whose port is not a number");
    }
    Ok(authority.as_str().to_string())
}

/// Removes every header that claims to say who called, including spellings
/// with `_` that CGI-style gateways fold into the real name.
fn strip_client_cert_headers(headers: &mut HeaderMap) {
    let spoofs: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().replace('_', "-") == XFCC)
        .cloned()
        .collect();
    for name in spoofs {
        headers.remove(name);
    }
}

/// Sends the request to the app; on `101 Switching Protocols` joins the two
/// upgraded connections.
async fn forward(
    shared: &Arc<Shared>,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let upgrade = is_upgrade(req.headers());
    let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
    // What the upgrade was allowed as, to judge the tunnel again when the
    // rules change.
    let facts = upgrade.then(|| RequestFacts {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        host: req.uri().authority().map(|a| a.to_string()),
        headers: req.headers().clone(),
    });
    let client = shared
        .app_clients
        .get(conn.target, req.version() == Version::HTTP_2);
    let mut resp = match client.request(req).await {
        Ok(r) => r,
        Err(e) => {
            info!(peer = %conn.peer, target = %conn.target, error = %e, "app request failed");
            return text(StatusCode::BAD_GATEWAY, "app unreachable\n");
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_side) = client_side {
            let app_side = hyper::upgrade::on(&mut resp);
            let traffic = super::traffic(&shared.metrics, "inbound", conn.target.port());
            let (shared, conn) = (shared.clone(), conn.clone());
            // Tracked by the drain, and closed if new rules deny it.
            shared.drain.clone().spawn(async move {
                let (Ok(client_io), Ok(app_io)) = (client_side.await, app_side.await) else {
                    return debug!("upgrade did not complete");
                };
                let tunnel = super::splice(
                    TokioIo::new(client_io),
                    TokioIo::new(app_io),
                    shared.idle_timeout,
                    &traffic,
                );
                tokio::select! {
                    _ = tunnel => {}
                    rule = shared.policy.denied_later(&conn, facts.as_ref()) => info!(
                        peer = %conn.peer,
                        port = conn.target.port(),
                        rule = %rule,
                        "upgraded connection closed: the new rules deny it"
                    ),
                }
            });
        }
    } else {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    resp.map(|b| b.boxed())
}

/// Whether the request asks to switch protocols. `h2c` is never passed on:
/// after it the app would read HTTP/2 requests that no rule has seen.
fn is_upgrade(headers: &HeaderMap) -> bool {
    let to_h2c = headers.get_all(header::UPGRADE).iter().any(|v| {
        v.to_str()
            .map_or(true, |s| s.to_ascii_lowercase().contains("h2c"))
    });
    headers.contains_key(header::UPGRADE)
        && !to_h2c
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Removes headers that describe one hop only (RFC 9110 §7.6.1), keeping
/// `Connection: upgrade` and `Upgrade` when passing an upgrade on, and
/// `te: trailers` (gRPC needs it).
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
    ] {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|n| match n {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// 403, or for gRPC a trailers-only response with `grpc-status: 7`
/// (PERMISSION_DENIED), which gRPC clients understand.
fn denied<B>(req: &Request<B>) -> Response<Body> {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if !grpc {
        return text(StatusCode::FORBIDDEN, "access denied\n");
    }
    let mut resp = Response::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from_static("7"));
    h.insert("grpc-message", HeaderValue::from_static("access denied"));
    resp
}

/// The method as a metric label: standard methods by name, others `other`
/// (bounded cardinality).
pub fn method_label(m: &hyper::Method) -> &'static str {
    match m.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "CONNECT" => "CONNECT",
        "OPTIONS" => "OPTIONS",
        "TRACE" => "TRACE",
        "PATCH" => "PATCH",
        _ => "other",
    }
}

/// Pooled HTTP clients to the app, one per target address and protocol.
#[derive(Default)]
pub struct AppClients {
    clients: Mutex<HashMap<(SocketAddr, bool), Client<FixedConnector, Incoming>>>,
    connect_timeout: Duration,
}

impl AppClients {
    pub fn new(connect_timeout: Duration) -> Self {
        AppClients {
            clients: Mutex::default(),
            connect_timeout,
        }
    }

    fn get(&self, target: SocketAddr, h2: bool) -> Client<FixedConnector, Incoming> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry((target, h2))
            .or_insert_with(|| {
                Client::builder(TokioExecutor::new())
                    .http2_only(h2)
                    .pool_idle_timeout(Duration::from_secs(90))
                    .build(FixedConnector {
                        target,
                        timeout: self.connect_timeout,
                    })
            })
            .clone()
    }
}

/// Connects every request to one address, whatever its URI says, so the
/// app sees the caller's `Host`/`:authority` unchanged.
#[derive(Clone)]
pub struct FixedConnector {
    target: SocketAddr,
    timeout: Duration,
}

impl tower_service::Service<Uri> for FixedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<TcpStream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (target, timeout) = (self.target, self.timeout);
        Box::pin(async move {
            let s = tokio::time::timeout(timeout, TcpStream::connect(target))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect to app timed out")
                })??;
            let _ = s.set_nodelay(true);
            Ok(TokioIo::new(s))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-kept"]);

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert!(h.contains_key(header::UPGRADE) && h.contains_key(header::CONNECTION));

        // h2c would hand the app HTTP/2 requests no rule has seen: dropped.
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQAoAAAAAIAAAAA"),
        );
        assert!(!is_upgrade(&h));
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn hosts_servers_read_alike_only() {
        let ok = ["api.example", "api.example:8080", "[::1]:80", "10.0.0.1"];
        for h in ok {
            assert_eq!(check_authority(h).as_deref(), Ok(h), "{h}");
        }
        for bad in [
            "admin.internal:abc",
            "x@admin.internal",
            "admin.internal:",
            "a b",
            "",
        ] {
            assert!(check_authority(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_spelling_of_the_client_cert_header_is_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-client-cert",
            HeaderValue::from_static("URI=evil"),
        );
        h.insert(
            "x_forwarded_client_cert",
            HeaderValue::from_static("URI=evil"),
        );
        h.insert(
            "x-forwarded_client-cert",
            HeaderValue::from_static("URI=evil"),
        );
        h.insert("x-other", HeaderValue::from_static("1"));
        strip_client_cert_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-other"));
    }

    #[test]
    fn grpc_denials_use_grpc_status() {
        let req = Request::builder()
            .header("content-type", "application/grpc+proto")
            .body(())
            .unwrap();
        let resp = denied(&req);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["grpc-status"], "7");
        let req = Request::builder().body(()).unwrap();
        assert_eq!(denied(&req).status(), StatusCode::FORBIDDEN);
    }
}
