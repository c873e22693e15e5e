//! The inbound listener: peers connect here; mesh mTLS is terminated, the
//! peer's identity read from its certificate, and the bytes forwarded to the app.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use super::detect::{progress_now, Progress};
use super::http::{self, ConnInfo};
use super::opaque::{forward_opaque, tcp_entry};
use super::request_line::FirstLineGuard;
use super::silent::FirstWord;
use super::tunnel::{ConnHealth, TunnelConn};
use super::{
    detect, original_destination, sniff_http, AppProtocol, Chunked, ConnGuard, Detected, ReadAhead,
    Rewind, Shared, REFUSAL_LOG_INTERVAL,
};
use crate::authz::Peer;
use crate::config::InboundMode;
use crate::limits::{AcceptErrors, Eviction, EvictionSet, LogEvery, Slot};
use crate::tls::{handshake_result, peer_identity, TUNNEL_ALPN};

/// On opaque ports a plaintext client may wait for the server to speak, so
/// only this long is spent looking for a mesh ClientHello (a sidecar sends
/// its hello as soon as it connects).
const OPAQUE_GRACE: Duration = Duration::from_millis(10);

/// Eviction classes of pending connections: those that have sent nothing
/// go first, then those with part of a hello, so a peer that sent a whole
/// hello keeps its slot however fast a flood of silent or slow connections
/// churns.
const SILENT: u8 = 0;
const STARTED: u8 = 1;
const HANDSHAKING: u8 = 2;

/// Inbound connections in detection or in their TLS handshake
/// (`--max-pending-handshakes`, `--max-pending-handshakes-per-source`):
/// what clients that never finish a hello can hold. When full, a new
/// connection pushes out the oldest pending one instead of being refused.
pub struct PendingHandshakes {
    set: EvictionSet,
    evicted_log: LogEvery,
}

impl PendingHandshakes {
    pub fn new(max: usize, max_per_source: usize) -> Self {
        PendingHandshakes {
            set: EvictionSet::new(max, max_per_source),
            evicted_log: LogEvery::new(REFUSAL_LOG_INTERVAL),
        }
    }
}

/// Which inbound listener this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `--inbound-listen` (:15006): redirected connections, per-connection
    /// mesh mTLS, plaintext in permissive mode, and tunnels in explicit mode.
    Inbound,
    /// `--tunnel-listen` (:15008): mesh mTLS with ALPN `h2` only.
    Tunnel,
}

/// A bound inbound listener.
pub struct Inbound {
    listener: TcpListener,
    kind: Listener,
    /// Explicit mode target; `None` means use the original destination.
    target: Option<SocketAddr>,
    shared: Arc<Shared>,
}

impl Inbound {
    pub fn new(listener: TcpListener, target: Option<SocketAddr>, shared: Arc<Shared>) -> Self {
        Inbound {
            listener,
            kind: Listener::Inbound,
            target,
            shared,
        }
    }

    /// The tunnel listener: every connection must be mesh mTLS with `h2`.
    pub fn tunnel(listener: TcpListener, target: Option<SocketAddr>, shared: Arc<Shared>) -> Self {
        Inbound {
            listener,
            kind: Listener::Tunnel,
            target,
            shared,
        }
    }

    /// Accepts until the drain begins.
    pub async fn run(self) {
        let drain = self.shared.drain.clone();
        let accept_errors = self.shared.metrics.accept_errors.clone();
        let name = match self.kind {
            Listener::Inbound => "inbound",
            Listener::Tunnel => "tunnel",
        };
        let mut errors = AcceptErrors::new(name, Some(accept_errors));
        loop {
            let (stream, source) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(pair) => pair,
                    Err(e) => {
                        errors.failed(&self.listener, e).await;
                        continue;
                    }
                },
                _ = drain.stopping() => return,
            };
            errors.accepted();
            // Held through detection and the handshake; admitting always
            // succeeds (no pending connection is protected), evicting the
            // oldest silent one when full. A connection whose hello is
            // already here starts in a class that a flood does not reach.
            let class = match progress_now(&stream) {
                Progress::Nothing => SILENT,
                Progress::Started => STARTED,
                Progress::Decided => HANDSHAKING,
            };
            let pending = &self.shared.pending_handshakes.set;
            let Some(slot) = pending.admit(source.ip(), class) else {
                continue;
            };
            let shared = self.shared.clone();
            let target = self.target;
            let kind = self.kind;
            let span = tracing::info_span!("inbound", %source);
            // Tunnel connections live long and carry many app connections:
            // each goes to the shard with the fewest open, so two peers'
            // tunnels do not end up sharing one thread.
            let placed = shared.shards.least_busy();
            let serve = move |shared, stream| serve(shared, stream, source, kind, target, slot);
            super::run_on_shard(shared, name, placed, stream, span, serve);
        }
    }
}

/// Whether a redirected connection's original destination is this pod's
/// own address, not a loopback one and not one of the sidecar's ports. A packet routed
/// through the pod to another host, or one aimed at a sidecar port, would
/// otherwise have the sidecar connect there on the sender's behalf.
fn own_destination(shared: &Shared, stream: &TcpStream, target: SocketAddr) -> bool {
    let Ok(local) = stream.local_addr() else {
        return false;
    };
    super::may_receive(target, local.ip(), &shared.tunnel.own_ports)
}

/// Counts and logs (at most once per interval) a pending connection closed
/// to make room for a newer one.
fn evicted(shared: &Shared, why: Eviction) {
    shared
        .metrics
        .tls_handshakes
        .with_label_values(&["inbound", why.label()])
        .inc();
    if let Some(count) = shared.pending_handshakes.evicted_log.tick() {
        info!(
            closed = count,
            reason = why.label(),
            "too many pending inbound handshakes: closing the oldest to admit new connections"
        );
    }
}

/// Counts a connection refused before or during its handshake, and logs
/// it at most once per interval for each `result`, with the number of
/// such refusals since the last line (`count`). Logged before it is
/// counted, so the metric never runs ahead of the log.
fn refused(shared: &Shared, port: u16, result: &'static str, why: &dyn std::fmt::Display) {
    refused_with(shared, port, result, why, None)
}

/// [`refused`], with the error that caused it.
fn refused_with(
    shared: &Shared,
    port: u16,
    result: &'static str,
    why: &dyn std::fmt::Display,
    error: Option<&dyn std::fmt::Display>,
) {
    shared.log_refusal(("inbound", result), |count| match error {
        Some(error) => info!(port, result, count, %error, "inbound connection refused: {why}"),
        None => info!(port, result, count, "inbound connection refused: {why}"),
    });
    shared
        .metrics
        .tls_handshakes
        .with_label_values(&["inbound", result])
        .inc();
}

async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    source: SocketAddr,
    kind: Listener,
    explicit: Option<SocketAddr>,
    mut slot: Slot,
) {
    let started = Instant::now();
    if kind == Listener::Tunnel {
        return serve_tunnel_listener(shared, stream, source, explicit, slot).await;
    }
    let target = match explicit {
        Some(t) => t,
        None => match original_destination(&stream) {
            Ok(t) if !own_destination(&shared, &stream, t) => {
                return refused(
                    &shared,
                    t.port(),
                    "foreign_destination",
                    &format_args!("{t} is not an address of this pod, or is a sidecar port"),
                );
            }
            Ok(t) if shared.forward_to_localhost => localhost(t),
            Ok(t) => t,
            Err(e) => return info!(error = %e, "inbound connection refused"),
        },
    };
    let port = target.port();
    // The first byte and the whole ClientHello must come within
    // --hello-timeout: a sidecar sends its hello at once, so a client that
    // does not is slow or silent on purpose.
    let hello = shared.hello_timeout.min(shared.handshake_timeout);
    let wait = match (shared.mode, shared.is_opaque(port)) {
        (InboundMode::Strict, _) => hello,
        (InboundMode::Permissive, true) => OPAQUE_GRACE.min(hello),
        (InboundMode::Permissive, false) => shared.detect_timeout.min(hello),
    };
    let detected = tokio::select! {
        r = detect(&stream, wait) => match r {
            Ok(d) => d,
            Err(e) => return debug!(error = %e, "inbound connection failed before its first byte"),
        },
        why = slot.evicted() => return evicted(&shared, why),
    };
    match (detected, shared.mode) {
        (Detected::Closed, _) => {}
        (Detected::MeshTls, _) => {
            slot.set_class(HANDSHAKING);
            let remaining = shared.handshake_timeout.saturating_sub(started.elapsed());
            let at = MeshAt {
                kind,
                target,
                explicit,
            };
            serve_mesh(shared, stream, source, at, remaining, slot).await;
        }
        (Detected::Silent | Detected::Partial, InboundMode::Strict) => refused(
            &shared,
            port,
            "timeout",
            &"no whole TLS ClientHello in time",
        ),
        (other, InboundMode::Strict) => {
            let result = if other == Detected::OtherTls {
                "no_alpn"
            } else {
                "plaintext_refused"
            };
            refused(&shared, port, result, &"strict mode accepts only mesh mTLS");
        }
        (detected, InboundMode::Permissive) => {
            drop(slot);
            let conn = ConnInfo::new(Arc::new(Peer::Unauthenticated), source, target);
            // A silent client has used part of its detect timeout already.
            let silent_for = if detected == Detected::Silent {
                wait
            } else {
                Duration::ZERO
            };
            serve_app(shared, stream, conn, silent_for).await
        }
    }
}

/// Where a mesh connection arrived and where its bytes go.
struct MeshAt {
    kind: Listener,
    /// The original destination (or the explicit target).
    target: SocketAddr,
    /// Explicit mode's target, for tunnel streams.
    explicit: Option<SocketAddr>,
}

/// A connection on the tunnel listener: strict mTLS, then HTTP/2. A hello
/// without our ALPN is let through to the handshake, which refuses it
/// unless it offers `h2` (a tunnel client need not offer `portcullis/1`).
async fn serve_tunnel_listener(
    shared: Arc<Shared>,
    stream: TcpStream,
    source: SocketAddr,
    explicit: Option<SocketAddr>,
    mut slot: Slot,
) {
    let started = Instant::now();
    let local = match stream.local_addr() {
        Ok(a) => a,
        Err(e) => return debug!(error = %e, "tunnel connection gone before it was served"),
    };
    let port = local.port();
    let wait = shared.hello_timeout.min(shared.handshake_timeout);
    let detected = tokio::select! {
        r = detect(&stream, wait) => match r {
            Ok(d) => d,
            Err(e) => return debug!(error = %e, "tunnel connection failed before its first byte"),
        },
        why = slot.evicted() => return evicted(&shared, why),
    };
    match detected {
        Detected::Closed => {}
        Detected::MeshTls | Detected::OtherTls => {
            slot.set_class(HANDSHAKING);
            let remaining = shared.handshake_timeout.saturating_sub(started.elapsed());
            let at = MeshAt {
                kind: Listener::Tunnel,
                target: local,
                explicit,
            };
            serve_mesh(shared, stream, source, at, remaining, slot).await;
        }
        Detected::Silent | Detected::Partial => refused(
            &shared,
            port,
            "timeout",
            &"no whole TLS ClientHello in time",
        ),
        Detected::Plain => refused(
            &shared,
            port,
            "plaintext_refused",
            &"the tunnel port accepts only mesh mTLS",
        ),
    }
}

/// Terminates mesh mTLS and hands the stream on with the peer's identity:
/// to the tunnel when ALPN `h2` was agreed, else as one connection.
async fn serve_mesh(
    shared: Arc<Shared>,
    stream: TcpStream,
    source: SocketAddr,
    at: MeshAt,
    timeout: Duration,
    mut slot: Slot,
) {
    let target = at.target;
    let snapshot = shared.tls.snapshot();
    let handshakes = &shared.metrics.tls_handshakes;
    let port = target.port();
    let now = SystemTime::now();
    let config = match at.kind {
        Listener::Inbound if shared.tunnel.serve => snapshot.server_at(now),
        Listener::Inbound => snapshot.link_server_at(now),
        Listener::Tunnel => snapshot.tunnel_server_at(now),
    };
    let config = match config {
        Ok(config) => config,
        Err(why) => return refused(&shared, port, why.label(), &why),
    };
    let started = Instant::now();
    let accept = tokio::time::timeout(
        timeout,
        TlsAcceptor::from(config).accept(ReadAhead::new(stream)),
    );
    let handshake = tokio::select! {
        r = accept => r,
        why = slot.evicted() => return evicted(&shared, why),
    };
    let tls = match handshake {
        Err(_) => {
            return refused(
                &shared,
                port,
                "timeout",
                &"the TLS handshake did not finish in time",
            )
        }
        Ok(Err(e)) => {
            let result = handshake_result(&e);
            return refused_with(&shared, port, result, &"TLS handshake failed", Some(&e));
        }
        Ok(Ok(tls)) => tls,
    };
    drop(slot);
    let (_, conn) = tls.get_ref();
    let peer = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| peer_identity(c, shared.tls.trust_domain()));
    let Some(Ok(peer)) = peer else {
        return refused(&shared, port, "bad_identity", &"peer identity unreadable");
    };
    shared
        .metrics
        .tls_handshake_duration
        .with_label_values(&["inbound"])
        .observe(started.elapsed().as_secs_f64());
    handshakes.with_label_values(&["inbound", "ok"]).inc();
    shared.metrics.count_key_exchange("inbound", conn);
    let tunnel = conn.alpn_protocol() == Some(TUNNEL_ALPN);
    if !tunnel && at.kind == Listener::Tunnel {
        // A client that offered no ALPN at all completes a handshake.
        return refused(
            &shared,
            target.port(),
            "no_alpn",
            &"the tunnel port speaks only h2",
        );
    }
    let peer = Arc::new(Peer::Mesh(peer));
    if tunnel {
        let chain = conn.peer_certificates().unwrap_or_default();
        let Some(health) = ConnHealth::for_server(chain, snapshot.bundle.clone()) else {
            return refused(
                &shared,
                port,
                "bad_identity",
                &"peer certificate unreadable",
            );
        };
        let local = match at.kind {
            Listener::Tunnel => target,
            Listener::Inbound => match tls.get_ref().0.local_addr() {
                Ok(a) => a,
                Err(_) => return,
            },
        };
        let conn = TunnelConn {
            peer,
            source,
            local,
            explicit_target: at.explicit,
            health,
        };
        return super::tunnel::serve(shared, tls, conn).await;
    }
    let conn = ConnInfo::new(peer, source, target);
    serve_app(shared, tls, conn, Duration::ZERO).await;
}

/// HTTP goes to the per-request path; anything else is authorized once as
/// a connection and copied, and closed if a rule change denies it later.
/// `silent_for`: how long the client has already been silent (it counts
/// against `--detect-timeout`).
pub(super) async fn serve_app<S>(
    shared: Arc<Shared>,
    mut io: S,
    conn: ConnInfo,
    silent_for: Duration,
) where
    S: Chunked + Send + 'static,
{
    // Counted by port and peer only once accepted (mesh identity, or
    // plaintext in permissive mode): refused connections are counted by
    // `portcullis_tls_handshakes_total{result}` alone, so a port scan cannot
    // grow the number of series.
    let guard = ConnGuard::new(&shared.metrics, "inbound", conn.target.port(), &conn.peer);
    let mut app = None;
    // Carried opaque because the sniff saw no request line (yet): the
    // first line is still watched (see `FirstLineGuard`). Not on opaque
    // ports (the operator said so), nor once the app has spoken first.
    let mut watch_first_line = true;
    let (protocol, prefix) = if shared.is_opaque(conn.target.port()) {
        watch_first_line = false;
        (AppProtocol::Opaque, Bytes::new())
    } else {
        let wait = shared.detect_timeout.saturating_sub(silent_for);
        match sniff_http(&mut io, wait).await {
            (AppProtocol::Opaque, silence) if silence.is_empty() => {
                match super::silent::first_word(&shared, &mut io, &conn).await {
                    Some(FirstWord::Client(protocol, bytes, connected)) => {
                        app = connected.filter(|_| protocol == AppProtocol::Opaque);
                        (protocol, bytes)
                    }
                    Some(FirstWord::App(connected)) => {
                        app = Some(connected);
                        watch_first_line = false;
                        (AppProtocol::Opaque, Bytes::new())
                    }
                    None => return,
                }
            }
            sniffed => sniffed,
        }
    };
    let io = Rewind::new(prefix, io);
    if protocol != AppProtocol::Opaque {
        let http2 = protocol == AppProtocol::Http2;
        return http::serve(shared, io, conn, guard, http2).await;
    }
    let decision = shared.policy.authorize_tcp(&conn);
    let started = std::time::Instant::now();
    let log = &shared.policy.access_log;
    if !decision.allowed {
        log.write_with(|| tcp_entry(&conn, false, &decision.rule, started, None));
        return shared.log_refusal(("inbound", "connection_denied"), |count| {
            info!(
                peer = %conn.peer,
                source = %conn.source.ip(),
                port = conn.target.port(),
                rule = %decision.rule,
                count,
                "connection denied"
            )
        });
    }
    let app = match app {
        Some(app) => app,
        None => match shared.connect(conn.target).await {
            Ok(s) => s,
            Err(e) => {
                return shared.log_refusal(("inbound", "app_unreachable"), |count| {
                    info!(peer = %conn.peer, error = %e, count, "inbound connection dropped: app unreachable")
                })
            }
        },
    };
    if watch_first_line {
        let io = FirstLineGuard::new(io);
        forward_opaque(&shared, io, app, &conn, decision.rule, guard).await;
    } else {
        forward_opaque(&shared, io, app, &conn, decision.rule, guard).await;
    }
}

/// The loopback address of the same family and port, for apps that listen
/// on localhost only.
pub(super) fn localhost(dest: SocketAddr) -> SocketAddr {
    let ip: std::net::IpAddr = if dest.is_ipv4() {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        std::net::Ipv6Addr::LOCALHOST.into()
    };
    SocketAddr::new(ip, dest.port())
}
