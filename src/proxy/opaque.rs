//! Carrying an allowed non-HTTP connection to the app as bytes: until
//! either side ends, a rule change denies it, or (behind a
//! `FirstLineGuard`) its first line turns out to be an HTTP request.

use std::time::Duration;

use tracing::{debug, info};

use super::http::ConnInfo;
use super::request_line::RequestLineInOpaque;
use super::{splice, Chunked, ConnGuard, Shared};

/// Copies an allowed opaque connection to the app until either side ends,
/// or until a rule change denies it; `guard` counts it open meanwhile.
pub(super) async fn forward_opaque<S>(
    shared: &Shared,
    io: S,
    mut app: tokio::net::TcpStream,
    conn: &ConnInfo,
    rule: String,
    guard: ConnGuard,
) where
    S: Chunked,
{
    let started = std::time::Instant::now();
    let log = &shared.policy.access_log;
    debug!(peer = %conn.peer, target = %conn.target, "inbound connection forwarded");
    let traffic = guard.traffic();
    tokio::select! {
        r = splice(io, &mut app, shared.idle_timeout, &traffic) => {
            match &r {
                Err(e) if RequestLineInOpaque::is(e) => {
                    // Reset, not closed: an app that sees the end of the
                    // stream may take the line it holds as a last request.
                    let _ = socket2::SockRef::from(&app).set_linger(Some(Duration::ZERO));
                    shared.metrics.opaque_request_lines.inc();
                    shared.log_refusal(("inbound", "request_line_in_opaque"), |count| {
                        info!(peer = %conn.peer, port = conn.target.port(), count, "inbound connection reset: an HTTP request line came after the connection was taken for another protocol (split, slow or late)")
                    });
                }
                Err(e) => debug!(peer = %conn.peer, error = %e, "inbound connection ended with an error"),
                Ok(_) => {}
            }
            log.write_with(|| tcp_entry(conn, true, &rule, started, r.ok()));
        }
        rule = shared.policy.denied_later(conn, None) => {
            log.write_with(|| tcp_entry(conn, false, &rule, started, None));
            info!(
                peer = %conn.peer,
                source = %conn.source.ip(),
                port = conn.target.port(),
                rule = %rule,
                "open connection closed: the new rules deny it"
            );
        }
    }
}

/// The access log line of an opaque connection: `rule` decided it (or, for
/// one closed by a rule change, closed it); bytes when it ended cleanly.
pub(super) fn tcp_entry(
    conn: &ConnInfo,
    allowed: bool,
    rule: &str,
    started: std::time::Instant,
    bytes: Option<(u64, u64)>,
) -> super::access_log::Entry {
    super::access_log::Entry {
        time: super::access_log::now_rfc3339(),
        kind: "tcp",
        peer: conn.peer.to_string(),
        method: None,
        authority: None,
        path: None,
        status: None,
        decision: if allowed { "allow" } else { "deny" }.into(),
        rule: rule.to_string(),
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        bytes_received: bytes.map(|b| b.0),
        bytes_sent: bytes.map(|b| b.1),
        upstream: conn.target.to_string(),
    }
}
