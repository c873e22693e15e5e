//! The admin HTTP server: `/live`, `/ready`, `/metrics`, `/certs`, and
//! `POST /shutdown` (loopback only) for Jobs whose app has finished,
//! `GET`/`PUT /logging` (the log filter; changing it is loopback only), and
//! `/app-health/...` (the app's rewritten probes, see `admin/app_health.rs`).

mod app_health;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::authz::{DefaultPolicy, LiveRules};
use crate::drain::Drain;
use crate::limits::{serve_admin_connection, AcceptErrors, AdminConnections};
use crate::metrics::Metrics;
use crate::tls::MeshTls;

/// What the admin endpoints report on.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub tls: Arc<MeshTls>,
    pub drain: Drain,
    pub rules: LiveRules,
    pub default_policy: DefaultPolicy,
    /// `POST /shutdown` is honoured (`--allow-shutdown`).
    pub allow_shutdown: bool,
}

/// The bound admin server.
pub struct Admin {
    listener: TcpListener,
    state: Arc<AdminState>,
}

type Reply = Response<Full<Bytes>>;

impl Admin {
    pub fn new(listener: TcpListener, state: AdminState) -> Self {
        Admin {
            listener,
            state: Arc::new(state),
        }
    }

    /// Serves until the process ends; it keeps answering while draining so
    /// that `/ready` can say 503. At most `ADMIN_MAX_CONNECTIONS` at once,
    /// so that the admin port cannot use up the descriptors the data path
    /// needs; when full, an idle connection makes room for a new one (see
    /// `crate::limits::AdminConnections`), so probes keep answering.
    pub async fn run(self) {
        let metrics = &self.state.metrics;
        let conns = AdminConnections::new(Some(metrics.admin_connections_dropped.clone()));
        let mut errors = AcceptErrors::new("admin", Some(metrics.accept_errors.clone()));
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(pair) => pair,
                Err(e) => {
                    errors.failed(&self.listener, e).await;
                    continue;
                }
            };
            errors.accepted();
            let Some(slot) = conns.admit(peer.ip()) else {
                debug!(%peer, "admin connection refused: every connection is busy");
                continue;
            };
            let state = self.state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move {
                        if let Some(reply) = app_health::route(&req).await {
                            return Ok(reply);
                        }
                        Ok::<_, Infallible>(route(&state, peer, req))
                    }
                });
                serve_admin_connection(stream, slot, service).await;
            });
        }
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn route(state: &AdminState, peer: SocketAddr, req: Request<Incoming>) -> Reply {
    const TEXT: &str = "text/plain; charset=utf-8";
    const JSON: &str = "application/json";
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => reply(StatusCode::OK, TEXT, INDEX),
        (&Method::GET, "/live") => reply(StatusCode::OK, TEXT, "live\n"),
        (&Method::GET, "/ready") => match not_ready_reason(state) {
            None => reply(StatusCode::OK, TEXT, "ready\n"),
            Some(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {why}\n"),
            ),
        },
        (&Method::GET, "/metrics") => {
            let ready = not_ready_reason(state).is_none();
            state.metrics.ready.set(i64::from(ready));
            // A refused reload leaves its error until the files are fixed.
            let rules_valid = state.rules.status().last_error.is_none();
            state.rules.metrics().valid.set(i64::from(rules_valid));
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                state.metrics.encode(),
            )
        }
        (&Method::GET, "/certs") => reply(StatusCode::OK, JSON, certs_json(state).to_string()),
        // File names and error text (which may quote a file) are for
        // loopback clients only, like explanations; others get the summary.
        (&Method::GET, "/rules") if peer.ip().to_canonical().is_loopback() => reply(
            StatusCode::OK,
            JSON,
            json!(state.rules.status()).to_string(),
        ),
        (&Method::GET, "/rules") => reply(
            StatusCode::OK,
            JSON,
            json!(state.rules.status().summary()).to_string(),
        ),
        (&Method::GET, "/authz/explain") if !peer.ip().to_canonical().is_loopback() => reply(
            StatusCode::FORBIDDEN,
            TEXT,
            "explanations reveal the rules: loopback only (use kubectl port-forward)\n",
        ),
        (&Method::GET, "/authz/explain") => {
            match explain_query(state, req.uri().query().unwrap_or("")) {
                Ok(v) => reply(StatusCode::OK, JSON, v.to_string()),
                Err(e) => reply(StatusCode::BAD_REQUEST, TEXT, format!("{e}\n")),
            }
        }
        (&Method::GET, "/logging") => match crate::logging::current() {
            Ok(level) => reply(StatusCode::OK, TEXT, format!("{level}\n")),
            Err(e) => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{e}\n")),
        },
        (&Method::PUT, "/logging") if !peer.ip().to_canonical().is_loopback() => reply(
            StatusCode::FORBIDDEN,
            TEXT,
            "changing the log level is allowed from loopback only\n",
        ),
        (&Method::PUT, "/logging") => set_log_level(req.uri().query().unwrap_or("")),
        (&Method::POST, "/shutdown") if !state.allow_shutdown => reply(
            StatusCode::FORBIDDEN,
            TEXT,
            "shutdown is disabled (--allow-shutdown false)\n",
        ),
        (&Method::POST, "/shutdown") => {
            if !peer.ip().to_canonical().is_loopback() {
                return reply(
                    StatusCode::FORBIDDEN,
                    TEXT,
                    "shutdown is allowed from loopback only\n",
                );
            }
            info!("shutdown requested through the admin endpoint");
            state.drain.begin();
            reply(StatusCode::ACCEPTED, TEXT, "draining\n")
        }
        (
            _,
            "/live" | "/ready" | "/metrics" | "/certs" | "/rules" | "/authz/explain" | "/shutdown"
            | "/logging",
        ) => reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n"),
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n"),
    }
}

/// What `GET /` answers: the endpoints, so that a person with `curl` finds them.
const INDEX: &str = "portcullis admin endpoints:
GET  /ready           200 when ready, else 503 and why
GET  /live            200 while the process runs
GET  /metrics         Prometheus metrics
GET  /certs           this sidecar's certificate and trust bundle (JSON)
GET  /rules           the rules in force, their hash and the last refused reload (JSON)
GET  /authz/explain   ?from=ID&port=P[&method=M&path=/p]: why a request is allowed or denied (loopback only)
GET  /logging         the log filter in force
PUT  /logging         ?level=DIRECTIVE: replace the log filter (loopback only)
POST /shutdown        drain and exit, for Jobs (loopback only)
GET  /app-health/...  the app's probes, rewritten by the injector
";

/// `None` when ready; otherwise why not.
fn not_ready_reason(state: &AdminState) -> Option<&'static str> {
    if state.drain.is_draining() {
        return Some("draining");
    }
    // Ready from the first certificate on: a later renewal failure (the
    // identity service down) must not pull every pod out of its Service.
    if state.tls.snapshot().leaf.is_none() {
        return Some("no certificate yet");
    }
    None
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn certs_json(state: &AdminState) -> serde_json::Value {
    let snap = state.tls.snapshot();
    let leaf = snap.leaf.as_ref().map(|l| {
        json!({
            "identity": l.id.to_string(),
            "serial": l.serial,
            "not_before": rfc3339(l.not_before),
            "not_after": rfc3339(l.not_after),
            "next_renewal": l.renew_at.map(rfc3339),
            "issuer": l.chain.first().and_then(|c| {
                use x509_parser::prelude::FromDer;
                let (_, x) = x509_parser::certificate::X509Certificate::from_der(c.as_ref()).ok()?;
                Some(x.issuer().to_string())
            }),
        })
    });
    // Most preferred first; `portcullis_tls_key_exchanges_total` shows which were used.
    let groups: Vec<&str> = crate::tls::KX_GROUPS
        .iter()
        .map(|g| crate::tls::group_label(g.name()))
        .collect();
    json!({
        "trust_domain": state.tls.trust_domain().to_string(),
        "certificate": leaf,
        "trust_bundle": snap.bundle.info,
        "key_exchange_groups": groups,
    })
}

/// `GET /authz/explain?from=ID|unauthenticated&port=P[&method=M&path=/p&host=H&header=k=v&source_ip=IP]`:
/// the live rules' explanation of one connection or request.
fn explain_query(state: &AdminState, query: &str) -> Result<serde_json::Value, String> {
    use crate::authz::{explain, normalize_path, Connection, HttpRequest, Peer};
    let mut from = None;
    let mut port = None;
    let (mut method, mut path, mut host, mut source) = (None, None, None, None);
    let mut headers = hyper::HeaderMap::new();
    for (k, v) in query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once('='))
    {
        let v = percent_decode(v).ok_or_else(|| format!("{k}: bad percent-encoding"))?;
        match k {
            "from" => from = Some(Peer::parse(&v).map_err(|e| format!("from: {e}"))?),
            "port" => {
                port = Some(
                    v.parse::<u16>()
                        .map_err(|_| "port: not a port".to_string())?,
                )
            }
            "method" => method = Some(v),
            "path" => path = Some(v),
            "host" => host = Some(v),
            "source_ip" => {
                source = Some(
                    v.parse::<std::net::IpAddr>()
                        .map_err(|_| "source_ip: not an IP".to_string())?,
                )
            }
            "header" => {
                // `name=value` as `rules explain --header` takes it; `name:value` too.
                let (name, value) = v
                    .split_once('=')
                    .or_else(|| v.split_once(':'))
                    .ok_or("header: use name=value")?;
                let name = hyper::header::HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|e| format!("header: {e}"))?;
                let value =
                    HeaderValue::from_str(value.trim()).map_err(|e| format!("header: {e}"))?;
                headers.append(name, value);
            }
            other => return Err(format!("unknown parameter {other}")),
        }
    }
    let peer = from.ok_or("from is required (a SPIFFE id or unauthenticated)")?;
    let port = port.ok_or("port is required")?;
    let conn = Connection {
        peer: &peer,
        // The same default as `rules explain --source-ip`.
        source: source.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        port,
    };
    let path = path
        .map(|p| normalize_path(&p, false).map_err(|e| format!("path: {e}")))
        .transpose()?;
    let request = path.as_deref().map(|p| HttpRequest {
        method: method.as_deref().unwrap_or("GET"),
        path: p,
        host: host.as_deref(),
        headers: &headers,
    });
    let rules = state.rules.current();
    let why = explain(
        &rules,
        state.tls.trust_domain(),
        state.default_policy,
        &conn,
        request.as_ref(),
    );
    serde_json::to_value(why).map_err(|e| e.to_string())
}

/// Decodes `%XX` and `+` in a query value.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// `PUT /logging?level=<directive>`: replaces the log filter.
fn set_log_level(query: &str) -> Reply {
    const TEXT: &str = "text/plain; charset=utf-8";
    let level = query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == "level")
        .and_then(|(_, v)| percent_decode(v));
    let Some(level) = level.filter(|l| !l.is_empty()) else {
        return reply(
            StatusCode::BAD_REQUEST,
            TEXT,
            "use PUT /logging?level=<directive>, e.g. level=debug or level=portcullis=debug,warn\n",
        );
    };
    match crate::logging::set(&level) {
        Ok(()) => {
            info!(level = %level, "log level changed through the admin endpoint");
            reply(StatusCode::OK, TEXT, format!("{level}\n"))
        }
        Err(e @ crate::logging::Error::BadDirective { .. }) => {
            reply(StatusCode::BAD_REQUEST, TEXT, format!("{e}\n"))
        }
        Err(e) => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{e}\n")),
    }
}
