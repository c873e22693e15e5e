//! The data path: inbound (peers → app) and outbound (app → peers)
//! listeners, protocol detection, original destinations and byte copying.

pub mod access_log;
mod detect;
mod dial;
pub mod http;
mod inbound;
mod orig_dst;
mod outbound;
mod plan;
mod policy;
mod rewind;
mod splice;
pub mod tunnel;

pub use detect::{classify_buffered, detect, sniff_http, AppProtocol, Detected};
pub use http::AppClients;
pub use inbound::{Inbound, PendingHandshakes};
pub use orig_dst::original_destination;
pub use outbound::{Outbound, UpstreamListener};
pub use plan::{plan, OutboundPolicy, Route};
pub use policy::Policy;
pub use rewind::Rewind;
pub use splice::{splice, Traffic};
pub use tunnel::TunnelSettings;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use tokio::net::{TcpListener, TcpStream};

use crate::config::{InboundMode, PortRange};
use crate::drain::Drain;
use crate::metrics::Metrics;
use crate::tls::MeshTls;

/// Errors of the data path; each one ends only its own connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding {flag} {addr}")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("connect to {0}: timed out")]
    ConnectTimeout(SocketAddr),
    #[error("original destination: {0}")]
    OriginalDst(String),
}

/// What every connection handler needs, shared by all listeners.
pub struct Shared {
    pub tls: Arc<MeshTls>,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    pub mode: InboundMode,
    pub opaque_ports: Vec<PortRange>,
    pub outbound: OutboundPolicy,
    pub forward_to_localhost: bool,
    pub policy: Policy,
    pub app_clients: AppClients,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// Inbound connections in detection or handshake
    /// (`--max-pending-handshakes`): what stalled clients can hold.
    pub pending_handshakes: PendingHandshakes,
    /// A client's first byte and whole ClientHello must arrive within this
    /// (`--hello-timeout`).
    pub hello_timeout: Duration,
    pub detect_timeout: Duration,
    pub idle_timeout: Duration,
    /// The mesh tunnel's settings (`--tunnel*`).
    pub tunnel: TunnelSettings,
    /// Pooled tunnel connections to peer sidecars.
    pub pool: tunnel::Pool,
}

impl Shared {
    /// Whether clients on `port` may wait for the server to speak first.
    pub fn is_opaque(&self, port: u16) -> bool {
        self.opaque_ports.iter().any(|r| r.contains(port))
    }

    /// Connects to `addr` within the connect timeout, with TCP_NODELAY.
    pub async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, Error> {
        match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => Err(Error::ConnectTimeout(addr)),
            Ok(Err(e)) => Err(Error::Connect(addr, e)),
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
        }
    }
}

/// Connections the kernel queues for each listener before accept.
const LISTEN_BACKLOG: i32 = 4096;

/// Binds a TCP listener with SO_REUSEADDR; an IPv6 wildcard also accepts IPv4.
pub fn bind(flag: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    let err = |source| Error::Bind { flag, addr, source };
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
        .map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).map_err(err)?;
    }
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    // Deeper than --max-pending-handshakes: connections a flood churns
    // through wait here, and a full queue drops everyone's SYNs alike.
    // The kernel caps it at net.core.somaxconn.
    socket.listen(LISTEN_BACKLOG).map_err(err)?;
    TcpListener::from_std(socket.into()).map_err(err)
}

/// Counts one connection as open until dropped.
pub struct ConnGuard {
    closed: IntCounter,
    open: IntGauge,
}

impl ConnGuard {
    pub fn new(metrics: &Metrics, direction: &str, port: u16) -> Self {
        let port = port.to_string();
        let labels = [direction, port.as_str()];
        metrics.connections_opened.with_label_values(&labels).inc();
        let open = metrics.connections_open.with_label_values(&labels);
        open.inc();
        ConnGuard {
            closed: metrics.connections_closed.with_label_values(&labels),
            open,
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.open.dec();
        self.closed.inc();
    }
}

/// Byte counters for one connection, resolved once.
pub fn traffic(metrics: &Metrics, direction: &str, port: u16) -> Traffic {
    let port = port.to_string();
    Traffic {
        received: metrics
            .received_bytes
            .with_label_values(&[direction, &port]),
        sent: metrics.sent_bytes.with_label_values(&[direction, &port]),
    }
}
