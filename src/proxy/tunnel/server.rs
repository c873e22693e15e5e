//! The serving side of the tunnel: after mesh mTLS with ALPN `h2`, every
//! HTTP/2 `CONNECT` stream is one app connection, authorized on its own
//! with the connection's peer identity and then served exactly like a
//! direct connection (HTTP detection, per-request rules, or opaque bytes).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, Instrument};

use super::health::ConnHealth;
use super::stream::H2Stream;
use super::{Open, TunnelSettings};
use crate::authz::Peer;
use crate::proxy::http::ConnInfo;
use crate::proxy::inbound::{localhost, serve_app};
use crate::proxy::opaque::forward_opaque;
use crate::proxy::{same_host, ConnGuard, Shared};

/// One accepted tunnel connection: who the peer is and where it came in.
pub struct TunnelConn {
    pub peer: Arc<Peer>,
    pub source: SocketAddr,
    /// The address the peer connected to: a CONNECT must name this pod.
    pub local: SocketAddr,
    /// Explicit mode: every stream goes here, whatever it names.
    pub explicit_target: Option<SocketAddr>,
    pub health: ConnHealth,
}

fn builder(settings: &TunnelSettings) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(settings.max_streams)
        .initial_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME)
        .max_send_buffer_size(super::SEND_BUFFER);
    b
}

/// Serves tunnel streams on `io` until the peer closes it or the drain
/// ends it (GOAWAY first, so the peer moves new streams elsewhere while
/// open ones finish).
pub async fn serve<S>(shared: Arc<Shared>, io: S, conn: TunnelConn)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let metrics = &shared.metrics.tunnel;
    let Some(_source) = shared.tunnel_sources.acquire(conn.source.ip()) else {
        shared.log_refusal(("tunnel", "source_limit"), |count| {
            info!(peer = %conn.peer, source = %conn.source.ip(), count, "tunnel connection refused: its source address holds --tunnel-max-connections-per-source open already")
        });
        return metrics
            .connections_refused
            .with_label_values(&["source_limit"])
            .inc();
    };
    let handshake = builder(&shared.tunnel).handshake::<_, Bytes>(io);
    let mut h2 = match tokio::time::timeout(shared.handshake_timeout, handshake).await {
        Ok(Ok(h2)) => h2,
        Ok(Err(e)) => {
            return info!(peer = %conn.peer, error = %e, "tunnel connection refused: not HTTP/2")
        }
        Err(_) => {
            return info!(peer = %conn.peer, "tunnel connection refused: no HTTP/2 preface in time")
        }
    };
    metrics
        .connections_opened
        .with_label_values(&["inbound"])
        .inc();
    let _open = Open::new(metrics.connections_open.with_label_values(&["inbound"]));
    let conn = Arc::new(conn);
    let drain = shared.drain.clone();
    let mut draining = false;
    loop {
        let next = tokio::select! {
            next = h2.accept() => next,
            _ = drain.stopping(), if !draining => {
                draining = true;
                h2.graceful_shutdown();
                continue;
            }
        };
        match next {
            None => break,
            Some(Err(e)) => {
                debug!(peer = %conn.peer, error = %e, "tunnel connection ended with an error");
                break;
            }
            Some(Ok((_, mut respond))) if draining => {
                // Sent before our GOAWAY reached the peer: not processed,
                // so the peer may send it again on another connection.
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                count(&shared, "draining");
            }
            Some(Ok((request, respond))) => {
                let span = tracing::info_span!("stream", id = ?respond.stream_id());
                let task = stream(shared.clone(), conn.clone(), request, respond);
                drain.spawn(task.instrument(span));
            }
        }
    }
}

/// Answers a stream with `status` and nothing else.
fn refuse(
    shared: &Shared,
    mut respond: SendResponse<Bytes>,
    status: StatusCode,
    result: &'static str,
) {
    count(shared, result);
    let response = Response::builder()
        .status(status)
        .body(())
        .expect("a valid response");
    let _ = respond.send_response(response, true);
}

fn count(shared: &Shared, result: &'static str) {
    let tunnel = &shared.metrics.tunnel;
    match result {
        "ok" => tunnel.inbound.ok.inc(),
        _ => tunnel.streams.with_label_values(&["inbound", result]).inc(),
    }
}

/// Where a stream's bytes go, or why it may not go anywhere.
fn destination(
    shared: &Shared,
    conn: &TunnelConn,
    request: &Request<RecvStream>,
) -> Result<SocketAddr, (StatusCode, &'static str)> {
    if request.method() != Method::CONNECT {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "bad_request"));
    }
    let named: SocketAddr = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse().ok())
        .ok_or((StatusCode::BAD_REQUEST, "bad_request"))?;
    if let Some(target) = conn.explicit_target {
        return Ok(target);
    }
    // Not an open proxy: only this pod's own address, and never one of
    // the sidecar's own ports (that would loop back into it).
    if !same_host(named.ip(), conn.local.ip()) || shared.tunnel.own_ports.contains(&named.port()) {
        return Err((StatusCode::FORBIDDEN, "foreign_destination"));
    }
    Ok(if shared.forward_to_localhost {
        localhost(named)
    } else {
        named
    })
}

/// One stream: checked, authorized, answered, then served.
async fn stream(
    shared: Arc<Shared>,
    conn: Arc<TunnelConn>,
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) {
    let target = match destination(&shared, &conn, &request) {
        Ok(t) => t,
        Err((status, result)) => {
            shared.log_refusal(("tunnel", result), |count| {
                info!(peer = %conn.peer, uri = %request.uri(), method = %request.method(), result, count, "tunnel stream refused")
            });
            return refuse(&shared, respond, status, result);
        }
    };
    if let Err(stale) = conn.health.check(&shared.tls, SystemTime::now()) {
        // 421: this connection may not carry it, another may; the client
        // retires the connection and retries (as when the peer rotated
        // its trust bundle before we did).
        debug!(peer = %conn.peer, reason = stale.label(), "tunnel stream refused: the connection's certificates no longer hold");
        return refuse(&shared, respond, StatusCode::MISDIRECTED_REQUEST, "stale");
    }
    let info = ConnInfo::new(conn.peer.clone(), conn.source, target);
    let body = request.into_body();
    let metrics = &shared.metrics.tunnel;
    if !shared.is_opaque(target.port()) {
        // HTTP is judged per request inside the stream, as on a direct
        // connection; the stream itself is accepted.
        let Some(io) = accept(&shared, respond, body) else {
            return;
        };
        let _active = Open::new(metrics.inbound.active.clone());
        return serve_app(shared.clone(), io, info, std::time::Duration::ZERO).await;
    }
    let decision = shared.policy.authorize_tcp(&info);
    if !decision.allowed {
        shared.log_refusal(("tunnel", "denied"), |count| {
            info!(peer = %info.peer, port = target.port(), rule = %decision.rule, count, "tunnel stream denied")
        });
        return refuse(&shared, respond, StatusCode::FORBIDDEN, "denied");
    }
    let guard = ConnGuard::new(&shared.metrics, "inbound", target.port(), &info.peer);
    let app = match shared.connect(target).await {
        Ok(app) => app,
        Err(e) => {
            shared.log_refusal(("tunnel", "app_unreachable"), |count| {
                info!(peer = %info.peer, error = %e, count, "tunnel stream refused: app unreachable")
            });
            return refuse(
                &shared,
                respond,
                StatusCode::SERVICE_UNAVAILABLE,
                "app_unreachable",
            );
        }
    };
    let Some(io) = accept(&shared, respond, body) else {
        return;
    };
    let _active = Open::new(metrics.inbound.active.clone());
    forward_opaque(&shared, io, app, &info, decision.rule, guard).await;
}

/// Answers 200 and turns the stream into a byte stream.
fn accept(shared: &Shared, mut respond: SendResponse<Bytes>, body: RecvStream) -> Option<H2Stream> {
    let response = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .expect("a valid response");
    match respond.send_response(response, false) {
        Ok(send) => {
            count(shared, "ok");
            Some(H2Stream::new(send, body))
        }
        Err(e) => {
            count(shared, "error");
            debug!(error = %e, "tunnel stream reset before its answer");
            None
        }
    }
}
