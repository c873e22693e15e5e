//! The admin HTTP server: `/live`, `/ready`, `/metrics`, `/certs`, and
//! `POST /shutdown` (loopback only) for Jobs whose app has finished.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::drain::Drain;
use crate::metrics::Metrics;
use crate::tls::MeshTls;

/// What the admin endpoints report on.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub tls: Arc<MeshTls>,
    pub drain: Drain,
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
    /// that `/ready` can say 503.
    pub async fn run(self) {
        loop {
            let Ok((stream, peer)) = self.listener.accept().await else {
                continue;
            };
            let state = self.state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(&state, peer, req)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!(error = %e, "admin connection failed");
                }
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
        (&Method::GET, "/live") => reply(StatusCode::OK, TEXT, "live\n"),
        (&Method::GET, "/ready") => match not_ready_reason(state) {
            None => reply(StatusCode::OK, TEXT, "ready\n"),
            Some(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {why}\n"),
            ),
        },
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.encode(),
        ),
        (&Method::GET, "/certs") => reply(StatusCode::OK, JSON, certs_json(state).to_string()),
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
        (_, "/live" | "/ready" | "/metrics" | "/certs" | "/shutdown") => {
            reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n")
        }
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n"),
    }
}

/// `None` when ready; otherwise why not.
fn not_ready_reason(state: &AdminState) -> Option<&'static str> {
    if state.drain.is_draining() {
        return Some("draining");
    }
    if !state.tls.snapshot().has_valid_leaf() {
        return Some("no valid certificate");
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
        })
    });
    json!({
        "trust_domain": state.tls.trust_domain().to_string(),
        "certificate": leaf,
        "trust_bundle": snap.bundle.info,
    })
}
