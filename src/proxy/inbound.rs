//! The inbound listener: peers connect here; mesh mTLS is terminated, the
//! peer's identity read from its certificate, and the bytes forwarded to the app.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, Instrument};

use super::detect::{progress_now, Progress};
use super::http::{self, ConnInfo};
use super::{
    detect, original_destination, sniff_http, splice, traffic, AppProtocol, ConnGuard, Detected,
    Rewind, Shared,
};
use crate::authz::Peer;
use crate::config::InboundMode;
use crate::limits::{AcceptErrors, Eviction, EvictionSet, LogEvery, Slot};
use crate::tls::{handshake_result, peer_identity};

/// On opaque ports a plaintext client may wait for the server to speak, so
/// only this long is spent looking for a mesh ClientHello (a sidecar sends
/// its hello as soon as it connects).
const OPAQUE_GRACE: Duration = Duration::from_millis(10);
/// At most one log line per this long about connections refused before or
/// during their handshake (a flood must not become a flood of log lines).
const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(10);

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
    refused_log: LogEvery,
}

impl PendingHandshakes {
    pub fn new(max: usize, max_per_source: usize) -> Self {
        PendingHandshakes {
            set: EvictionSet::new(max, max_per_source),
            evicted_log: LogEvery::new(REFUSED_LOG_INTERVAL),
            refused_log: LogEvery::new(REFUSED_LOG_INTERVAL),
        }
    }
}

/// The bound inbound listener.
pub struct Inbound {
    listener: TcpListener,
    /// Explicit mode target; `None` means use the original destination.
    target: Option<SocketAddr>,
    shared: Arc<Shared>,
}

impl Inbound {
    pub fn new(listener: TcpListener, target: Option<SocketAddr>, shared: Arc<Shared>) -> Self {
        Inbound {
            listener,
            target,
            shared,
        }
    }

    /// Accepts until the drain begins.
    pub async fn run(self) {
        let drain = self.shared.drain.clone();
        let accept_errors = self.shared.metrics.accept_errors.clone();
        let mut errors = AcceptErrors::new("inbound", Some(accept_errors));
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
            let span = tracing::info_span!("inbound", %source);
            drain.spawn(serve(shared, stream, source, target, slot).instrument(span));
        }
    }
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

/// Counts a connection refused before its handshake, and logs it at most
/// once per interval.
fn refused(shared: &Shared, port: u16, result: &'static str, why: &'static str) {
    shared
        .metrics
        .tls_handshakes
        .with_label_values(&["inbound", result])
        .inc();
    if let Some(count) = shared.pending_handshakes.refused_log.tick() {
        info!(
            port,
            result,
            refused = count,
            "inbound connection refused: {why}"
        );
    }
}

async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    source: SocketAddr,
    target: Option<SocketAddr>,
    mut slot: Slot,
) {
    let _ = stream.set_nodelay(true);
    let started = Instant::now();
    let target = match target {
        Some(t) => t,
        None => match original_destination(&stream) {
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
            serve_mesh(shared, stream, source, target, remaining, slot).await;
        }
        (Detected::Silent | Detected::Partial, InboundMode::Strict) => {
            refused(&shared, port, "timeout", "no whole TLS ClientHello in time")
        }
        (other, InboundMode::Strict) => {
            let result = if other == Detected::OtherTls {
                "no_alpn"
            } else {
                "plaintext_refused"
            };
            refused(&shared, port, result, "strict mode accepts only mesh mTLS");
        }
        (_, InboundMode::Permissive) => {
            drop(slot);
            let conn = ConnInfo {
                peer: Arc::new(Peer::Unauthenticated),
                source,
                target,
            };
            serve_app(shared, stream, conn).await
        }
    }
}

/// Terminates mesh mTLS and hands the stream on with the peer's identity.
async fn serve_mesh(
    shared: Arc<Shared>,
    stream: TcpStream,
    source: SocketAddr,
    target: SocketAddr,
    timeout: Duration,
    mut slot: Slot,
) {
    let snapshot = shared.tls.snapshot();
    let handshakes = &shared.metrics.tls_handshakes;
    let config = match snapshot.server_at(SystemTime::now()) {
        Ok(config) => config,
        Err(why) => {
            handshakes
                .with_label_values(&["inbound", why.label()])
                .inc();
            return info!(result = why.label(), "inbound connection refused: {why}");
        }
    };
    let started = Instant::now();
    let accept = tokio::time::timeout(timeout, TlsAcceptor::from(config).accept(stream));
    let handshake = tokio::select! {
        r = accept => r,
        why = slot.evicted() => return evicted(&shared, why),
    };
    let tls = match handshake {
        Err(_) => {
            return refused(
                &shared,
                target.port(),
                "timeout",
                "the TLS handshake did not finish in time",
            )
        }
        Ok(Err(e)) => {
            let result = handshake_result(&e);
            handshakes.with_label_values(&["inbound", result]).inc();
            return info!(result, error = %e, "inbound handshake failed");
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
        handshakes
            .with_label_values(&["inbound", "bad_identity"])
            .inc();
        return info!("inbound connection refused: peer identity unreadable");
    };
    shared
        .metrics
        .tls_handshake_duration
        .with_label_values(&["inbound"])
        .observe(started.elapsed().as_secs_f64());
    handshakes.with_label_values(&["inbound", "ok"]).inc();
    shared.metrics.count_key_exchange("inbound", conn);
    let conn = ConnInfo {
        peer: Arc::new(Peer::Mesh(peer)),
        source,
        target,
    };
    serve_app(shared, tls, conn).await;
}

/// HTTP goes to the per-request path; anything else is authorized once as
/// a connection and copied, and closed if a rule change denies it later.
async fn serve_app<S>(shared: Arc<Shared>, mut io: S, conn: ConnInfo)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Counted by port only once accepted (mesh identity, or plaintext in
    // permissive mode): refused connections are counted by
    // `portcullis_tls_handshakes_total{result}` alone, so a port scan cannot
    // grow the number of series.
    let _guard = ConnGuard::new(&shared.metrics, "inbound", conn.target.port());
    let (protocol, prefix) = if shared.is_opaque(conn.target.port()) {
        (AppProtocol::Opaque, Bytes::new())
    } else {
        sniff_http(&mut io, shared.detect_timeout).await
    };
    let io = Rewind::new(prefix, io);
    if protocol != AppProtocol::Opaque {
        return http::serve(shared, io, conn).await;
    }
    let decision = shared.policy.authorize_tcp(&conn);
    let started = std::time::Instant::now();
    let log = &shared.policy.access_log;
    if !decision.allowed {
        log.write_with(|| tcp_entry(&conn, false, &decision.rule, started, None));
        return info!(
            peer = %conn.peer,
            source = %conn.source.ip(),
            port = conn.target.port(),
            rule = %decision.rule,
            "connection denied"
        );
    }
    let app = match shared.connect(conn.target).await {
        Ok(s) => s,
        Err(e) => {
            return info!(peer = %conn.peer, error = %e, "inbound connection dropped: app unreachable")
        }
    };
    debug!(peer = %conn.peer, target = %conn.target, "inbound connection forwarded");
    let traffic = traffic(&shared.metrics, "inbound", conn.target.port());
    tokio::select! {
        r = splice(io, app, shared.idle_timeout, &traffic) => {
            if let Err(e) = &r {
                debug!(peer = %conn.peer, error = %e, "inbound connection ended with an error");
            }
            log.write_with(|| tcp_entry(&conn, true, &decision.rule, started, r.ok()));
        }
        rule = shared.policy.denied_later(&conn, None) => {
            log.write_with(|| tcp_entry(&conn, false, &rule, started, None));
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

/// The loopback address of the same family and port, for apps that listen
/// on localhost only.
fn localhost(dest: SocketAddr) -> SocketAddr {
    let ip: std::net::IpAddr = if dest.is_ipv4() {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        std::net::Ipv6Addr::LOCALHOST.into()
    };
    SocketAddr::new(ip, dest.port())
}

/// The access log line of an opaque connection: `rule` decided it (or, for
/// one closed by a rule change, closed it); bytes when it ended cleanly.
fn tcp_entry(
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
