//! The data path: inbound (peers → app) and outbound (app → peers)
//! listeners, protocol detection, original destinations and byte copying.

/// `AsyncWrite` for a read-side wrapper (`$wrapper<S>` with an `inner: S`
/// field): every write call goes straight to `inner`, vectored writes
/// included, so wrapping a stream never splits or copies what is written.
macro_rules! write_through {
    ($wrapper:ident) => {
        impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<S> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}

pub mod access_log;
mod chunks;
mod detect;
mod dial;
pub mod http;
mod inbound;
mod opaque;
mod orig_dst;
mod outbound;
mod own_address;
mod plan;
mod policy;
mod read_ahead;
mod request_line;
mod rewind;
mod silent;
mod splice;
pub mod tunnel;

pub use chunks::Chunked;
pub use detect::{classify_buffered, detect, sniff_http, sniff_http_after, AppProtocol, Detected};
pub use http::AppClients;
pub use inbound::{Inbound, PendingHandshakes};
pub use orig_dst::original_destination;
pub use outbound::{Outbound, UpstreamListener};
pub use own_address::{may_receive, same_host};
pub use plan::{plan, OutboundPolicy, Route};
pub use policy::Policy;
pub use read_ahead::ReadAhead;
pub use request_line::{LineScan, Verdict};
pub use rewind::Rewind;
pub use splice::{splice, Traffic};
pub use tunnel::TunnelSettings;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::authz::Peer;
use crate::config::{InboundMode, PortRange};
use crate::drain::Drain;
use crate::limits::{LogEveryByKind, LogKind};
use crate::metrics::conn_series::ConnSeries;
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
    /// Tunnel connections open per source address (as a server).
    pub tunnel_sources: tunnel::SourceLimit,
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
    /// Pooled tunnel connections to peer sidecars (per shard).
    pub pool: tunnel::Pool,
    /// The threads that run connections (`--worker-threads`).
    pub shards: crate::runtime::Shards,
    /// Lines about refused or failed connections, at most one per
    /// [`REFUSAL_LOG_INTERVAL`] for each kind, with the count since the
    /// last one: a flood must not become a flood of log lines.
    pub refusal_logs: LogEveryByKind,
}

/// How often each kind of refusal or failure may be logged.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl Shared {
    /// Whether clients on `port` may wait for the server to speak first.
    pub fn is_opaque(&self, port: u16) -> bool {
        self.opaque_ports.iter().any(|r| r.contains(port))
    }

    /// Runs `log` with the number of events of `kind` since its last line
    /// when a line is due (at most one per [`REFUSAL_LOG_INTERVAL`] for
    /// each kind); for refusals and failures a client can repeat at will.
    pub fn log_refusal(&self, kind: LogKind, log: impl FnOnce(u64)) {
        if let Some(count) = self.refusal_logs.tick(kind) {
            log(count)
        }
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

/// Runs `serve` for a connection accepted on `listener` on the shard
/// `placed` names, counted there while it runs: on this thread as it is, or
/// handed to that shard's runtime (deregistered here, registered there).
pub fn run_on_shard<F, Fut>(
    shared: Arc<Shared>,
    listener: &'static str,
    placed: (usize, crate::runtime::ShardLoad),
    stream: TcpStream,
    span: tracing::Span,
    serve: F,
) where
    F: FnOnce(Arc<Shared>, TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tracing::Instrument;
    let (shard, load) = placed;
    let drain = shared.drain.clone();
    if shard == crate::runtime::shard() {
        let task = async move {
            let _load = load;
            serve(shared, stream).await
        };
        return drain.spawn(task.instrument(span));
    }
    let stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => return handoff_failed(&shared, listener, &e),
    };
    let handle = shared.shards.handle(shard).clone();
    let task = async move {
        let _load = load;
        match TcpStream::from_std(stream) {
            Ok(stream) => serve(shared, stream).await,
            Err(e) => handoff_failed(&shared, listener, &e),
        }
    };
    drain.spawn_on(task.instrument(span), &handle);
}

/// A connection that could not move to another shard (the kernel refused
/// to register it there, e.g. at the `max_user_watches` limit) is closed,
/// counted as a failed accept and logged.
fn handoff_failed(shared: &Shared, listener: &'static str, e: &std::io::Error) {
    shared
        .metrics
        .accept_errors
        .with_label_values(&[listener, "handoff"])
        .inc();
    shared.log_refusal((listener, "handoff_failed"), |count| {
        tracing::warn!(listener, error = %e, count, "connection closed: it could not be handed to another worker thread")
    });
}

/// Connections the kernel queues for each listener before accept.
const LISTEN_BACKLOG: i32 = 4096;

/// Binds a TCP listener with SO_REUSEADDR; an IPv6 wildcard also accepts IPv4.
pub fn bind(flag: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    let socket = bind_std(flag, addr)?;
    TcpListener::from_std(socket).map_err(|source| Error::Bind { flag, addr, source })
}

/// Binds one listening socket for `count` shards: each gets a descriptor
/// of its own (`try_clone`), registered only with its own runtime
/// (`TcpListener::from_std` there), and takes the connections it accepts
/// first. One socket rather than an `SO_REUSEPORT` group: any process of
/// the sidecar's user could join such a group and be handed a share of
/// the app's intercepted, still plaintext connections.
pub fn bind_for_shards(
    flag: &'static str,
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<std::net::TcpListener>, Error> {
    let first = bind_std(flag, addr)?;
    let mut all = Vec::with_capacity(count.max(1));
    for _ in 1..count {
        all.push(
            first
                .try_clone()
                .map_err(|source| Error::Bind { flag, addr, source })?,
        );
    }
    all.insert(0, first);
    Ok(all)
}

fn bind_std(flag: &'static str, addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
    let err = |source| Error::Bind { flag, addr, source };
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
        .map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).map_err(err)?;
    }
    socket.set_nonblocking(true).map_err(err)?;
    // Accepted connections inherit TCP_NODELAY from the listener (Linux):
    // one system call per connection saved, on the path every new
    // connection takes.
    socket.set_nodelay(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    // Deeper than --max-pending-handshakes: connections a flood churns
    // through wait here, and a full queue drops everyone's SYNs alike.
    // The kernel caps it at net.core.somaxconn.
    socket.listen(LISTEN_BACKLOG).map_err(err)?;
    Ok(socket.into())
}

/// Counts one connection as open until dropped, under its direction, the
/// app's port and its peer: inbound the caller (`unauthenticated` for a
/// plaintext one), outbound the server identity the sidecar verified
/// (`unauthenticated` for plain TCP to a destination outside the mesh).
/// The peer's labels are resolved once (capped by `--metrics-max-peers`)
/// and the series with them are shared with [`ConnGuard::traffic`] and the
/// connection's HTTP metrics.
pub struct ConnGuard {
    series: Arc<ConnSeries>,
}

impl ConnGuard {
    pub fn new(metrics: &Metrics, direction: &'static str, port: u16, peer: &Peer) -> Self {
        let series = conn_series(metrics, direction, port, peer);
        series.opened.inc();
        series.open.inc();
        ConnGuard { series }
    }

    /// The byte counters of this connection (same labels as the guard).
    pub fn traffic(&self) -> Traffic {
        Traffic {
            received: self.series.received.clone(),
            sent: self.series.sent.clone(),
        }
    }

    /// The series of this connection's labels.
    pub fn series(&self) -> &Arc<ConnSeries> {
        &self.series
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.series.open.dec();
        self.series.closed.inc();
    }
}

fn conn_series(
    metrics: &Metrics,
    direction: &'static str,
    port: u16,
    peer: &Peer,
) -> Arc<ConnSeries> {
    let label = metrics.peers.label(peer);
    metrics.conn_series.get(metrics, direction, port, label)
}

#[cfg(test)]
mod tests {
    /// The data path relies on accepted connections inheriting
    /// TCP_NODELAY from the listener instead of setting it on each.
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = super::bind("test", addr.parse().unwrap()) else {
                continue; // no IPv6 here
            };
            let at = listener.local_addr().unwrap();
            let _client = tokio::net::TcpStream::connect(at).await.unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            assert!(accepted.nodelay().unwrap(), "{addr}");
        }
    }
}
