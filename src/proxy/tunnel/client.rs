//! Carrying one outbound app connection through the pool: take a stream's
//! room on a pooled connection (or dial one, once per peer at a time), send
//! `CONNECT` for the original destination, and report what happened.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tracing::info;

use super::early::Early;
use super::pool::{self, Opened, StreamSlot};
use super::stream::H2Stream;
use crate::identity::SpiffeId;
use crate::proxy::dial::{dial, Alpn, DialError};
use crate::proxy::{ReadAhead, Shared};

/// How many connections one app connection tries before giving up (a
/// connection that went away between picking and sending counts once).
const ATTEMPTS: usize = 3;

/// The way an app connection reaches the peer sidecar.
pub enum Link {
    /// A stream on a pooled tunnel connection; `early` bytes of the app
    /// already went with the request.
    Stream {
        io: H2Stream,
        slot: StreamSlot,
        early: u64,
    },
    /// The peer agreed to mesh mTLS but not to the tunnel (an older
    /// sidecar): this connection is the app connection's own.
    Direct {
        tls: Box<TlsStream<ReadAhead<TcpStream>>>,
        server: SpiffeId,
    },
}

/// Why no link came up.
pub enum Failed {
    /// Nothing answers on the peer's tunnel port: per-connection mTLS to
    /// the original destination may still work.
    NoTunnel(&'static str),
    /// Refused or failed after connecting (counted and logged already).
    Refused,
}

fn count_stream(shared: &Shared, result: &str) {
    let tunnel = &shared.metrics.tunnel;
    match result {
        "ok" => tunnel.outbound.ok.inc(),
        _ => tunnel
            .streams
            .with_label_values(&["outbound", result])
            .inc(),
    }
}

fn count_pool(shared: &Shared, result: &str) {
    let tunnel = &shared.metrics.tunnel;
    match result {
        "hit" => tunnel.pool_hits.inc(),
        _ => tunnel.pool.with_label_values(&[result]).inc(),
    }
}

/// A stream's room to the peer at `addr`, dialling a new connection only
/// when none has room. `Err` ends the attempt with that outcome.
async fn slot(
    shared: &Arc<Shared>,
    entry: &pool::Entry,
    addr: SocketAddr,
    expect: Option<&SpiffeId>,
    transparent: bool,
) -> Result<Result<StreamSlot, Link>, Failed> {
    if let Some(slot) = entry.pick(shared) {
        count_pool(shared, "hit");
        return Ok(Ok(slot));
    }
    let _dialing = entry.dialing.lock().await;
    if let Some(slot) = entry.pick(shared) {
        count_pool(shared, "hit");
        return Ok(Ok(slot));
    }
    count_pool(shared, "miss");
    let dialed = match dial(shared, addr, expect, Alpn::Tunnel).await {
        Ok(d) => d,
        Err(DialError::Connect(e))
            if transparent
                && matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut
                ) =>
        {
            return Err(Failed::NoTunnel(
                if e.kind() == std::io::ErrorKind::TimedOut {
                    "timeout"
                } else {
                    "refused"
                },
            ));
        }
        Err(DialError::Connect(e)) => {
            shared.log_refusal(
                ("outbound", "connect_failed"),
                |count| info!(%addr, error = %e, count, "outbound connection failed"),
            );
            return Err(Failed::Refused);
        }
        Err(DialError::Refused) => return Err(Failed::Refused),
    };
    if !dialed.is_tunnel() {
        if transparent {
            // A connection to the peer's tunnel port that a sidecar without
            // a tunnel took (its own interception redirected it): carrying
            // app bytes on it would deliver them to that port, not to the
            // original destination. Go to the original destination instead.
            return Err(Failed::NoTunnel("no_h2"));
        }
        return Ok(Err(Link::Direct {
            server: dialed.server,
            tls: Box::new(dialed.tls),
        }));
    }
    match pool::start(shared, entry, dialed).await {
        Some(slot) => Ok(Ok(slot)),
        None => Err(Failed::Refused),
    }
}

/// Carries a connection for `authority` to the peer sidecar at `addr`
/// (its tunnel port in transparent mode, the explicit upstream otherwise).
pub async fn connect(
    shared: &Arc<Shared>,
    app: &TcpStream,
    addr: SocketAddr,
    authority: SocketAddr,
    expect: Option<&SpiffeId>,
    transparent: bool,
) -> Result<Link, Failed> {
    let entry = shared.pool.entry(addr, expect);
    let authority = authority.to_string();
    let mut early = Early::default();
    for _ in 0..ATTEMPTS {
        let slot = match slot(shared, &entry, addr, expect, transparent).await? {
            Ok(slot) => slot,
            Err(direct) => return Ok(direct),
        };
        match pool::open(shared, &slot, &authority, app, &mut early).await {
            Opened::Stream(io) => {
                count_stream(shared, "ok");
                return Ok(Link::Stream {
                    io,
                    slot,
                    early: early.sent(),
                });
            }
            Opened::Refused(status) => {
                let result = match status {
                    StatusCode::FORBIDDEN => "denied",
                    StatusCode::SERVICE_UNAVAILABLE => "app_unreachable",
                    _ => "error",
                };
                count_stream(shared, result);
                shared.log_refusal(("outbound", result), |count| {
                    info!(server = %slot.server(), %authority, %status, count, "outbound connection refused by the peer sidecar")
                });
                return Err(Failed::Refused);
            }
            Opened::Retry => count_stream(shared, "retried"),
        }
    }
    shared.log_refusal(("outbound", "tunnel_failed"), |count| {
        info!(%addr, count, "outbound connection failed: no tunnel connection took the stream")
    });
    Err(Failed::Refused)
}
