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
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info};

use super::policy::RequestFacts;
use super::{ConnGuard, Shared, Traffic};
use crate::authz::Peer;
use crate::metrics::conn_series::{ConnSeries, HttpSeries};

mod admit;
mod app_pool;
mod fragment;
mod meter;

pub use admit::{admit_head, normalize_host, AdmitSettings, Admitted, FragmentSeen, Refusal, XFCC};
use admit::{is_upgrade, strip_hop_by_hop};
use app_pool::AppPool;
use fragment::Fragments;
pub use meter::NoTrailers;
use meter::{Metered, ResponseSize};

/// The body of every response the proxy hands back.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// How long a client may take to send a request's headers.
pub(super) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Who is calling and where the connection was going.
#[derive(Clone)]
pub struct ConnInfo {
    pub peer: Arc<Peer>,
    pub source: SocketAddr,
    pub target: SocketAddr,
    /// The `x-forwarded-client-cert` value for the app, made once per
    /// connection (a mesh peer's; none for an unauthenticated one).
    xfcc: Option<HeaderValue>,
}

impl ConnInfo {
    pub fn new(peer: Arc<Peer>, source: SocketAddr, target: SocketAddr) -> Self {
        let xfcc = match peer.as_ref() {
            Peer::Mesh(id) => HeaderValue::from_str(&format!("URI={id}")).ok(),
            Peer::Unauthenticated => None,
        };
        ConnInfo {
            peer,
            source,
            target,
            xfcc,
        }
    }

    /// The `x-forwarded-client-cert` value the app receives.
    pub fn xfcc(&self) -> Option<&HeaderValue> {
        self.xfcc.as_ref()
    }
}

/// Serves HTTP/1.x, or HTTP/2 when `http2` (the detection already read
/// the preface, so hyper is not asked to guess again), on one accepted
/// connection until it closes (or, for an upgraded connection, until the
/// upgraded tunnel ends). `guard` counts the connection as open; its bytes
/// are counted under the same labels.
pub async fn serve<S>(shared: Arc<Shared>, io: S, conn: ConnInfo, guard: ConnGuard, http2: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Resolved once per label set, and shared by its connections: the
    // peer's labels and the port do not change between requests.
    let metrics = guard.series().clone();
    metrics.http(&shared.metrics);
    let traffic = guard.traffic();
    let io = Metered::new(io, traffic, guard);
    let (io, fragments) = fragment::Watch::new(io);
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let conn = conn.clone();
        let fragments = fragments.clone();
        let metrics = metrics.clone();
        async move { Ok::<_, Infallible>(handle(&shared, &conn, &metrics, &fragments, req).await) }
    });
    let io = TokioIo::new(io);
    let service = super::access_log::Logged(service);
    let served = if http2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, service)
            .await
    } else {
        // A client that never finishes its headers is closed (slowloris).
        // One that shuts down its sending side after a request still gets
        // the answer, as it would from the app directly (`printf … | nc -N`).
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .half_close(true)
            .serve_connection(io, service)
            .with_upgrades()
            .await
    };
    if let Err(e) = served {
        debug!(error = %e, "inbound HTTP connection ended with an error");
    }
}

async fn handle(
    shared: &Arc<Shared>,
    conn: &ConnInfo,
    m: &ConnSeries,
    fragments: &Fragments,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let h = m.http(&shared.metrics);
    if req.version() < Version::HTTP_2 && fragments.take(req.method().as_str(), req.uri()) {
        req.extensions_mut().insert(FragmentSeen);
    }
    let method = method_label(req.method());
    let resp = match admit(shared, conn, req) {
        Ok(req) => {
            let req = req.map(|b| NoTrailers::new(b, h.request_size.clone()));
            forward(shared, conn, m, fragments, req).await
        }
        Err(resp) => {
            // Answered here: the body was not read, nothing went to the app.
            h.request_size.observe(0.0);
            local_size(h, &resp);
            *resp
        }
    };
    m.count_request(&shared.metrics, method, resp.status());
    h.duration.observe(started.elapsed().as_secs_f64());
    resp
}

/// Observes the size of a response the sidecar answers itself (a fixed
/// body).
fn local_size(h: &HttpSeries, resp: &Response<Body>) {
    let size = resp.body().size_hint().exact().unwrap_or(0);
    h.response_size.observe(size as f64);
}

/// Runs [`admit_head`] with the current rules, records and logs the
/// decision, and turns a refusal into the response to send.
fn admit(
    shared: &Shared,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Result<Request<Incoming>, Box<Response<Body>>> {
    let policy = &shared.policy;
    let (mut parts, body) = req.into_parts();
    let rules = policy.rules.current();
    let settings = AdmitSettings {
        td: &policy.td,
        default: policy.default,
        allow_encoded_slash: policy.allow_encoded_slash,
    };
    let admitted = admit_head(&mut parts, conn, &rules, settings);
    let decision = match &admitted {
        Ok(a) => Some(&a.decision),
        Err(refusal) => refusal.decision(),
    };
    if let Some(decision) = decision {
        policy.record(conn, decision);
    }
    match admitted {
        Ok(_) => Ok(Request::from_parts(parts, body)),
        Err(Refusal::Denied(decision)) => {
            info!(
                peer = %conn.peer,
                source = %conn.source.ip(),
                port = conn.target.port(),
                method = %parts.method,
                path = %parts.uri.path(),
                rule = %decision.rule,
                "request denied"
            );
            Err(Box::new(denied(&parts.headers)))
        }
        Err(refusal) => {
            info!(peer = %conn.peer, error = %refusal, "request refused");
            Err(Box::new(text(refusal.status(), refusal_body(&refusal))))
        }
    }
}

/// The short body of a refusal (what was wrong, never echoed input).
fn refusal_body(refusal: &Refusal) -> &'static str {
    match refusal {
        Refusal::Method(_) => "bad method\n",
        Refusal::Connect => "CONNECT is not served here\n",
        Refusal::Target(_) => "bad request target\n",
        Refusal::Path(_) => "bad request path\n",
        Refusal::Host(_) => "bad host\n",
        Refusal::Header(..) => "bad header value\n",
        Refusal::HeaderTwin(_) => "bad header name\n",
        Refusal::Denied(_) => "access denied\n",
    }
}

/// Sends the request to the app; on `101 Switching Protocols` joins the two
/// upgraded connections.
async fn forward(
    shared: &Arc<Shared>,
    conn: &ConnInfo,
    m: &ConnSeries,
    fragments: &Fragments,
    mut req: Request<NoTrailers>,
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
    let size = m.http(&shared.metrics).response_size.clone();
    // The two clients' bodies differ in type: each is metered, then boxed.
    let sent: Result<Response<Body>, Box<dyn std::error::Error + Send + Sync>> =
        if req.version() == Version::HTTP_2 {
            let client = shared.app_clients.http2(conn.target);
            let sent = client.request(req).await;
            sent.map(|r| r.map(|b| ResponseSize::new(b, size).boxed()))
                .map_err(Into::into)
        } else {
            let sent = shared.app_clients.http1.send(conn.target, req).await;
            sent.map(|r| r.map(|b| ResponseSize::new(b, size).boxed()))
                .map_err(Into::into)
        };
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) => {
            shared.log_refusal(("inbound", "app_request_failed"), |count| {
                info!(
                    peer = %conn.peer,
                    target = %conn.target,
                    error = %error_chain(e.as_ref()),
                    count,
                    "app request failed: answered 502"
                )
            });
            let resp = text(StatusCode::BAD_GATEWAY, "app unreachable\n");
            local_size(m.http(&shared.metrics), &resp);
            return resp;
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_side) = client_side {
            // What follows on the connection is no longer HTTP/1.
            fragments.stop();
            let app_side = hyper::upgrade::on(&mut resp);
            // The client side's bytes are counted by its `Metered` stream,
            // which the upgrade carries on, with the connection's guard.
            let traffic = Traffic::uncounted();
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
    resp
}

/// An error and its sources, `: `-separated: hyper's client errors say
/// only "client error (Connect)" themselves, the reason is in the source.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        out.push_str(": ");
        out.push_str(&source.to_string());
        next = source.source();
    }
    out
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
fn denied(headers: &HeaderMap) -> Response<Body> {
    let grpc = headers
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

/// The app's address and the shard.
type AppClientKey = (SocketAddr, usize);

/// The most app pools kept at once: far more than the ports a pod serves,
/// few enough that peers sending requests to every port cost little.
const MAX_APP_CLIENTS: usize = 512;

/// Connections to the app: HTTP/1 requests through [`AppPool`], HTTP/2
/// ones through a pooled HTTP/2 client per target address and shard (an
/// app connection's task stays on the shard that made it).
pub struct AppClients {
    pub http1: AppPool,
    clients: Mutex<HashMap<AppClientKey, Client<FixedConnector, NoTrailers>>>,
    connect_timeout: Duration,
}

impl AppClients {
    pub fn new(connect_timeout: Duration, metrics: &crate::metrics::Metrics) -> Self {
        AppClients {
            http1: AppPool::new(
                connect_timeout,
                app_pool::PoolMetrics {
                    opened: metrics.app_connections_opened.clone(),
                    idle: metrics.app_connections_idle.clone(),
                    resent: metrics.app_requests_resent.clone(),
                },
            ),
            clients: Mutex::default(),
            connect_timeout,
        }
    }

    fn http2(&self, target: SocketAddr) -> Client<FixedConnector, NoTrailers> {
        let key = (target, crate::runtime::shard());
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if clients.len() >= MAX_APP_CLIENTS && !clients.contains_key(&key) {
            // A peer naming port after port must not grow this without
            // end: one pool goes (its idle connections close; requests in
            // flight keep their clone of it).
            if let Some(old) = clients.keys().next().copied() {
                clients.remove(&old);
            }
        }
        clients
            .entry(key)
            .or_insert_with(|| {
                Client::builder(TokioExecutor::new())
                    .http2_only(true)
                    .pool_idle_timeout(app_pool::IDLE_TIMEOUT)
                    // The app gets the `:authority` the rules saw, and no
                    // `host` header besides.
                    .set_host(false)
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

    /// Requests to ever new ports keep at most `MAX_APP_CLIENTS` pools;
    /// a port seen again reuses its pool.
    #[tokio::test]
    async fn app_pools_are_bounded() {
        let metrics = crate::metrics::Metrics::new();
        let clients = AppClients::new(Duration::from_secs(1), &metrics);
        for port in 1..=2_000u16 {
            clients.http2(SocketAddr::from(([127, 0, 0, 1], port)));
        }
        let len = || clients.clients.lock().unwrap().len();
        assert_eq!(len(), MAX_APP_CLIENTS);
        let last = SocketAddr::from(([127, 0, 0, 1], 2_000));
        clients.http2(last);
        assert_eq!(len(), MAX_APP_CLIENTS, "a known target adds no pool");
    }

    #[test]
    fn grpc_denials_use_grpc_status() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        let resp = denied(&h);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["grpc-status"], "7");
        assert_eq!(denied(&HeaderMap::new()).status(), StatusCode::FORBIDDEN);
    }
}
