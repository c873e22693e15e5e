//! The mesh tunnel: one mTLS connection between two sidecars carries many
//! app connections, each an HTTP/2 `CONNECT` stream naming its original
//! destination (the framing Istio's ztunnel uses on port 15008). A new app
//! connection then costs a stream, not a handshake.

mod client;
mod early;
mod health;
mod pool;
mod server;
mod sources;
mod stream;

pub use client::{connect, Failed, Link};
pub use health::{ConnHealth, Stale};
pub use pool::Pool;
pub use server::{serve, TunnelConn};
pub use sources::SourceLimit;
pub use stream::H2Stream;

use std::time::Duration;

use prometheus::IntGauge;

/// The port peers' tunnel listeners use unless `--tunnel-listen` says
/// otherwise (every sidecar of a mesh is expected to use the same).
pub const DEFAULT_PORT: u16 = 15008;

/// HTTP/2 flow-control windows and frame size: large enough that one bulk
/// stream is not held back by window updates on a fast link (4 MiB in
/// flight carries 30 Gbit/s at a 1 ms round trip), bounded so a slow
/// reader cannot make us buffer much: a peer can make a sidecar hold at
/// most a connection window of unread bytes per tunnel connection, and
/// [`SourceLimit`] caps the connections of one source address.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
const MAX_FRAME: u32 = 1024 * 1024;
const SEND_BUFFER: usize = 1024 * 1024;

/// The default of `--tunnel-max-connections-per-source`.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 32;

/// How long a peer whose tunnel port refused us is sent per-connection
/// mTLS without trying its tunnel again.
pub const FALLBACK_MEMORY: Duration = Duration::from_secs(60);

/// The tunnel's settings (`--tunnel*` flags).
#[derive(Debug, Clone)]
pub struct TunnelSettings {
    /// Send outbound connections through tunnels (`--tunnel on`).
    pub client: bool,
    /// Serve tunnels (on the tunnel listener, and as ALPN `h2` on the
    /// inbound listener); `--tunnel-listen off` turns it off.
    pub serve: bool,
    /// Concurrent streams per tunnel connection, both ways.
    pub max_streams: u32,
    /// A pooled connection with no stream for this long is closed.
    pub idle_timeout: Duration,
    /// The tunnel port of peers in transparent mode.
    pub peer_port: u16,
    /// This sidecar's own listener ports: a CONNECT may not name them.
    pub own_ports: Vec<u16>,
    /// Tunnel connections one source address may hold open as a server.
    pub max_connections_per_source: usize,
}

impl Default for TunnelSettings {
    fn default() -> Self {
        TunnelSettings {
            client: true,
            serve: true,
            max_streams: 100,
            idle_timeout: Duration::from_secs(60),
            peer_port: DEFAULT_PORT,
            own_ports: Vec::new(),
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
        }
    }
}

/// Counts a gauge up while a tunnel connection or stream is open.
struct Open(IntGauge);

impl Open {
    fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Open(gauge)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}
