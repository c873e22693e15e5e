//! The outbound side: the app's connections leave through here. Explicit
//! upstreams carry them over mTLS to a known sidecar; the transparent
//! listener forwards redirected connections to their original destination.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use super::dial::{dial, Alpn, DialError};
use super::tunnel::{self, Failed, Link, FALLBACK_MEMORY};
use super::{original_destination, plan, splice, ConnGuard, Route, Shared};
use crate::authz::Peer;
use crate::config::Upstream;
use crate::identity::SpiffeId;
use crate::limits::AcceptErrors;

/// An explicit upstream's listening socket, a descriptor per shard.
pub struct UpstreamListener {
    pub listeners: Vec<std::net::TcpListener>,
    pub upstream: Upstream,
}

/// The outbound listeners of one sidecar: each shard accepts on every
/// listening socket through a descriptor of its own
/// (`proxy::bind_for_shards`). A new app connection stays on the shard
/// that took it, unless that shard serves `runtime::SLACK` connections
/// more than the least busy one, which then gets it.
pub struct Outbound {
    pub transparent: Vec<Vec<std::net::TcpListener>>,
    pub upstreams: Vec<UpstreamListener>,
    pub shared: Arc<Shared>,
}

impl Outbound {
    /// Accepts on every outbound listener until the drain begins.
    pub async fn run(self) {
        let mut tasks = tokio::task::JoinSet::new();
        let listeners = self.transparent.into_iter().map(|l| (l, None)).chain(
            self.upstreams
                .into_iter()
                .map(|u| (u.listeners, Some(u.upstream))),
        );
        for (sockets, upstream) in listeners {
            for (shard, socket) in sockets.into_iter().enumerate() {
                let handle = self.shared.shards.handle(shard);
                let task = accept_loop(socket, upstream.clone(), self.shared.clone());
                tasks.spawn_on(task, handle);
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}

async fn accept_loop(
    listener: std::net::TcpListener,
    upstream: Option<Upstream>,
    shared: Arc<Shared>,
) {
    // Registered here, with this shard's own runtime.
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return tracing::error!(error = %e, "outbound listener could not be used"),
    };
    let drain = shared.drain.clone();
    let accept_errors = shared.metrics.accept_errors.clone();
    let mut errors = AcceptErrors::new("outbound", Some(accept_errors));
    loop {
        let (stream, source) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    errors.failed(&listener, e).await;
                    continue;
                }
            },
            _ = drain.stopping() => return,
        };
        errors.accepted();
        let shared = shared.clone();
        let span = tracing::info_span!("outbound", %source);
        let placed = shared.shards.place(crate::runtime::shard());
        match &upstream {
            Some(u) => {
                let (dest, expect) = (u.dest, u.expect.clone());
                let serve = move |shared, app| to_sidecar(shared, app, dest, expect, false);
                super::run_on_shard(shared, "outbound", placed, stream, span, serve);
            }
            None => super::run_on_shard(shared, "outbound", placed, stream, span, transparent),
        }
    }
}

/// Carries one app connection to the sidecar at `dest` (explicit mode: the
/// upstream; transparent mode: the original destination, whose sidecar
/// listens on the tunnel port of the same address), requiring the server
/// to be `expect` when given (else any identity of our trust domain).
/// Through a pooled tunnel when it can; over a connection of its own when
/// the peer has no tunnel or the tunnel is off.
async fn to_sidecar(
    shared: Arc<Shared>,
    app: TcpStream,
    dest: SocketAddr,
    expect: Option<SpiffeId>,
    transparent: bool,
) {
    if shared.tunnel.client {
        let addr = if transparent {
            SocketAddr::new(dest.ip(), shared.tunnel.peer_port)
        } else {
            dest
        };
        let fallbacks = &shared.metrics.tunnel.fallbacks;
        if shared.pool.remembered_without_tunnel(addr, FALLBACK_MEMORY) {
            fallbacks.with_label_values(&["remembered"]).inc();
        } else {
            match tunnel::connect(&shared, &app, addr, dest, expect.as_ref(), transparent).await {
                Ok(Link::Stream { io, slot, early }) => {
                    let active = &shared.metrics.tunnel.outbound.active;
                    active.inc();
                    let server = slot.server().clone();
                    carry(&shared, app, io, dest, server, early).await;
                    active.dec();
                    return;
                }
                Ok(Link::Direct { tls, server }) => {
                    fallbacks.with_label_values(&["no_h2"]).inc();
                    shared.pool.remember_without_tunnel(addr);
                    return carry(&shared, app, tls, dest, server, 0).await;
                }
                Err(Failed::NoTunnel(reason)) => {
                    fallbacks.with_label_values(&[reason]).inc();
                    shared.pool.remember_without_tunnel(addr);
                    shared.log_refusal(("outbound", "no_tunnel"), |count| {
                        info!(%addr, reason, count, "peer has no tunnel: using a connection of its own for a while")
                    });
                }
                Err(Failed::Refused) => return,
            }
        }
    }
    let dialed = match dial(&shared, dest, expect.as_ref(), Alpn::Link).await {
        Ok(d) => d,
        Err(DialError::Connect(e)) => {
            return shared.log_refusal(
                ("outbound", "connect_failed"),
                |count| info!(%dest, error = %e, count, "outbound connection failed"),
            )
        }
        Err(DialError::Refused) => return,
    };
    carry(&shared, app, dialed.tls, dest, dialed.server, 0).await;
}

/// Copies an app connection to the verified `server` and back, counted
/// under the server's identity (connections whose server was not verified
/// are counted by `portcullis_tls_handshakes_total` alone). `early` bytes
/// of the app went with the tunnel request already.
async fn carry<S>(
    shared: &Shared,
    app: TcpStream,
    link: S,
    dest: SocketAddr,
    server: SpiffeId,
    early: u64,
) where
    S: super::Chunked,
{
    let server = Peer::Mesh(server);
    let guard = ConnGuard::new(&shared.metrics, "outbound", dest.port(), &server);
    let traffic = guard.traffic();
    traffic.received.inc_by(early);
    if let Err(e) = splice(app, link, shared.idle_timeout, &traffic).await {
        debug!(%server, error = %e, "outbound connection ended with an error");
    }
}

/// A redirected connection: to a mesh destination over mTLS, else as plain
/// TCP to where it was going. One whose original destination cannot be
/// read is refused, never looped.
async fn transparent(shared: Arc<Shared>, app: TcpStream) {
    let dest = match original_destination(&app) {
        Ok(d) => d,
        Err(e) => {
            return shared.log_refusal(
                ("outbound", "no_original_destination"),
                |count| info!(error = %e, count, "outbound connection refused"),
            )
        }
    };
    if plan(dest, &shared.outbound) == Route::Mesh {
        return to_sidecar(shared, app, dest, None, true).await;
    }
    // Plain TCP outside the mesh: nobody was verified.
    let guard = ConnGuard::new(
        &shared.metrics,
        "outbound",
        dest.port(),
        &Peer::Unauthenticated,
    );
    let remote = match shared.connect(dest).await {
        Ok(s) => s,
        Err(e) => {
            return shared.log_refusal(
                ("outbound", "connect_failed"),
                |count| info!(error = %e, count, "outbound connection failed"),
            )
        }
    };
    let traffic = guard.traffic();
    if let Err(e) = splice(app, remote, shared.idle_timeout, &traffic).await {
        debug!(%dest, error = %e, "outbound connection ended with an error");
    }
}
