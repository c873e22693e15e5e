//! The client side of a mesh mTLS handshake, shared by per-connection
//! links and tunnel connections: connect, handshake within the timeout,
//! check the server's SPIFFE id, and count the outcome.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::info;

use super::{ReadAhead, Shared};
use crate::identity::SpiffeId;
use crate::tls::{handshake_result, peer_identity, Snapshot};

/// Which client config a handshake uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// `portcullis/1` only: one app connection per mTLS connection.
    Link,
    /// `h2` first, then `portcullis/1`: a tunnel if the server has one.
    Tunnel,
}

/// Why no mesh connection came up.
#[derive(Debug)]
pub enum DialError {
    /// The TCP connect failed (kept, so a caller can tell "refused").
    Connect(std::io::Error),
    /// Anything after the TCP connect; already counted and logged.
    Refused,
}

/// A verified mesh connection and what it was verified with.
pub struct Dialed {
    pub tls: TlsStream<ReadAhead<TcpStream>>,
    pub server: SpiffeId,
    /// The configs and bundle in force when it was made.
    pub snapshot: Arc<Snapshot>,
}

impl Dialed {
    /// Whether the server agreed to the tunnel.
    pub fn is_tunnel(&self) -> bool {
        self.tls.get_ref().1.alpn_protocol() == Some(crate::tls::TUNNEL_ALPN)
    }
}

fn config(snapshot: &Snapshot, alpn: Alpn) -> Result<Arc<ClientConfig>, crate::tls::Unusable> {
    let now = SystemTime::now();
    match alpn {
        Alpn::Link => snapshot.client_at(now),
        Alpn::Tunnel => snapshot.tunnel_client_at(now),
    }
}

/// Connects to `addr` and completes mesh mTLS, requiring the server to be
/// `expect` when given (else any identity of our trust domain).
pub async fn dial(
    shared: &Shared,
    addr: SocketAddr,
    expect: Option<&SpiffeId>,
    alpn: Alpn,
) -> Result<Dialed, DialError> {
    let handshakes = &shared.metrics.tls_handshakes;
    let count = |result: &str| handshakes.with_label_values(&["outbound", result]).inc();
    let count = &count;
    let snapshot = shared.tls.snapshot();
    let config = match config(&snapshot, alpn) {
        Ok(config) => config,
        Err(why) => {
            count(why.label());
            shared.log_refusal(("outbound", why.label()), |count| {
                info!(%addr, result = why.label(), count, "outbound connection refused: {why}")
            });
            return Err(DialError::Refused);
        }
    };
    let tcp = match tokio::time::timeout(shared.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(DialError::Connect(e)),
        Err(_) => return Err(DialError::Connect(std::io::ErrorKind::TimedOut.into())),
    };
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    let name = ServerName::IpAddress(addr.ip().into());
    let connect = TlsConnector::from(config).connect(name, ReadAhead::new(tcp));
    let tls = match tokio::time::timeout(shared.handshake_timeout, connect).await {
        Err(_) => {
            count("timeout");
            shared.log_refusal(
                ("outbound", "timeout"),
                |count| info!(%addr, count, "outbound handshake timed out"),
            );
            return Err(DialError::Refused);
        }
        Ok(Err(e)) => {
            let result = handshake_result(&e);
            count(result);
            shared.log_refusal(
                ("outbound", result),
                |count| info!(%addr, result, error = %e, count, "outbound handshake failed"),
            );
            return Err(DialError::Refused);
        }
        Ok(Ok(tls)) => tls,
    };
    let server = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| peer_identity(c, shared.tls.trust_domain()));
    let Some(Ok(server)) = server else {
        count("bad_identity");
        shared.log_refusal(
            ("outbound", "bad_identity"),
            |count| info!(%addr, count, "outbound connection refused: server identity unreadable"),
        );
        return Err(DialError::Refused);
    };
    if let Some(want) = expect {
        if &server != want {
            count("wrong_identity");
            shared.log_refusal(("outbound", "wrong_identity"), |count| {
                info!(%addr, got = %server, want = %want, count, "outbound connection refused: unexpected server identity")
            });
            return Err(DialError::Refused);
        }
    }
    shared
        .metrics
        .tls_handshake_duration
        .with_label_values(&["outbound"])
        .observe(started.elapsed().as_secs_f64());
    count("ok");
    shared
        .metrics
        .count_key_exchange("outbound", tls.get_ref().1);
    Ok(Dialed {
        tls,
        server,
        snapshot,
    })
}
