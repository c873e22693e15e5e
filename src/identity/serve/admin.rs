//! The identity service's admin server: `/live`, `/ready` (an issuer in
//! date and not draining) and `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tracing::debug;

use super::State;
use crate::drain::Drain;
use crate::limits::{serve_admin_connection, AcceptErrors, AdminConnections};

/// Serves until aborted; keeps answering while draining so `/ready` says
/// 503. Capped like the sidecar's admin server (see `crate::limits`).
pub async fn serve(listener: TcpListener, state: Arc<State>, drain: Drain) {
    let conns = AdminConnections::new(None);
    let mut errors = AcceptErrors::new("admin", None);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                errors.failed(&listener, e).await;
                continue;
            }
        };
        errors.accepted();
        let Some(slot) = conns.admit(peer.ip()) else {
            debug!("admin connection refused: every connection is busy");
            continue;
        };
        let (state, drain) = (state.clone(), drain.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let reply = route(&state, &drain, &req);
                async move { Ok::<_, Infallible>(reply) }
            });
            serve_admin_connection(stream, slot, service).await;
        });
    }
}

fn route<B>(state: &State, drain: &Drain, req: &Request<B>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => (StatusCode::OK, "text/plain", "live\n".to_string()),
        (&Method::GET, "/ready") => {
            let valid = state
                .issuer
                .current()
                .issuer
                .is_valid_at(time::OffsetDateTime::now_utc());
            match (drain.is_draining(), valid) {
                (true, _) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: draining\n".into(),
                ),
                (_, false) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: the issuer is not valid now\n".into(),
                ),
                _ => (StatusCode::OK, "text/plain", "ready\n".into()),
            }
        }
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.encode(),
        ),
        (_, "/live" | "/ready" | "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        ),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}
