//! The mesh tunnel's flags of `portcullis run`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::proxy::tunnel::{TunnelSettings, DEFAULT_MAX_CONNECTIONS_PER_SOURCE, DEFAULT_PORT};

/// `--tunnel`: whether outbound connections use the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TunnelClient {
    /// Pooled HTTP/2 tunnels to peers that have one (per-connection mTLS
    /// to those that do not).
    On,
    /// A mesh mTLS connection of its own for every app connection.
    Off,
}

/// Where the tunnel listener binds, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelListen {
    Off,
    At(SocketAddr),
}

fn parse_listen(s: &str) -> Result<TunnelListen, String> {
    if s == "off" {
        return Ok(TunnelListen::Off);
    }
    s.parse()
        .map(TunnelListen::At)
        .map_err(|_| format!("{s:?} is neither `off` nor an address like [::]:15008"))
}

/// The tunnel flags.
#[derive(Debug, Args)]
pub struct TunnelArgs {
    /// Where peers' tunnels arrive: mesh mTLS with ALPN h2, one HTTP/2
    /// CONNECT stream per app connection. The inbound listener takes
    /// tunnels too (a client offering h2 there); `off` serves no tunnel at
    /// all [default: [::]:15008; in explicit mode (--inbound-target or
    /// --upstream), only the inbound listener].
    #[arg(long, env = "PORTCULLIS_TUNNEL_LISTEN", value_name = "ADDR|off", value_parser = parse_listen)]
    pub tunnel_listen: Option<TunnelListen>,
    /// Whether outbound app connections travel as streams of pooled tunnel
    /// connections (`on`) or each over an mTLS connection of its own (`off`).
    #[arg(long, env = "PORTCULLIS_TUNNEL", value_enum, default_value = "on")]
    pub tunnel: TunnelClient,
    /// A pooled tunnel connection that carries no stream for this long is closed.
    #[arg(long, env = "PORTCULLIS_TUNNEL_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub tunnel_idle_timeout: Duration,
    /// App connections carried at once by one tunnel connection (both as
    /// client and as server); past it a client opens another connection.
    #[arg(
        long,
        env = "PORTCULLIS_TUNNEL_MAX_STREAMS",
        default_value_t = 100,
        value_name = "N"
    )]
    pub tunnel_max_streams: u32,
    /// Tunnel connections one source address may hold open to this
    /// sidecar; past it its new ones are closed after the handshake
    /// (each may hold up to 8 MiB of bytes the app has not read yet).
    #[arg(
        long,
        env = "PORTCULLIS_TUNNEL_MAX_CONNECTIONS_PER_SOURCE",
        default_value_t = DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
        value_name = "N"
    )]
    pub tunnel_max_connections_per_source: usize,
}

impl TunnelArgs {
    /// The tunnel listener's address (`None`: no tunnel listener) and the
    /// settings; `explicit` is explicit mode (`--inbound-target` or
    /// `--upstream`).
    pub fn settings(&self, explicit: bool) -> Result<(Option<SocketAddr>, TunnelSettings), String> {
        if self.tunnel_idle_timeout.is_zero() {
            return Err("--tunnel-idle-timeout: must be more than zero".into());
        }
        if self.tunnel_max_streams == 0 {
            return Err("--tunnel-max-streams: must be at least 1".into());
        }
        if self.tunnel_max_connections_per_source == 0 {
            return Err("--tunnel-max-connections-per-source: must be at least 1".into());
        }
        let listen = match self.tunnel_listen {
            Some(TunnelListen::Off) => None,
            Some(TunnelListen::At(addr)) => Some(addr),
            None if explicit => None,
            None => Some(SocketAddr::new(
                std::net::Ipv6Addr::UNSPECIFIED.into(),
                DEFAULT_PORT,
            )),
        };
        let peer_port = match listen {
            Some(addr) if addr.port() != 0 => addr.port(),
            _ => DEFAULT_PORT,
        };
        Ok((
            listen,
            TunnelSettings {
                client: self.tunnel == TunnelClient::On,
                serve: self.tunnel_listen != Some(TunnelListen::Off),
                max_streams: self.tunnel_max_streams,
                idle_timeout: self.tunnel_idle_timeout,
                peer_port,
                own_ports: Vec::new(),
                max_connections_per_source: self.tunnel_max_connections_per_source,
            },
        ))
    }
}
