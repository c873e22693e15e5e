//! The outbound side: the app's connections leave through here. Explicit
//! upstreams carry them over mTLS to a known sidecar; the transparent
//! listener forwards redirected connections to their original destination.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, Instrument};

use super::dial::{dial, Alpn, DialError};
use super::tunnel::{self, Failed, Link, FALLBACK_MEMORY};
use super::{original_destination, plan, splice, traffic, ConnGuard, Route, Shared};
use crate::config::Upstream;
use crate::identity::SpiffeId;
use crate::limits::AcceptErrors;

/// An explicit upstream's listener.
pub struct UpstreamListener {
    pub listener: TcpListener,
    pub upstream: Upstream,
}

/// The outbound listeners of one sidecar.
pub struct Outbound {
    pub transparent: Vec<TcpListener>,
    pub upstreams: Vec<UpstreamListener>,
    pub shared: Arc<Shared>,
}

impl Outbound {
    /// Accepts on every outbound listener until the drain begins.
    pub async fn run(self) {
        let mut tasks = tokio::task::JoinSet::new();
        for listener in self.transparent {
            tasks.spawn(accept_loop(listener, None, self.shared.clone()));
        }
        for u in self.upstreams {
            tasks.spawn(accept_loop(
                u.listener,
                Some(u.upstream),
                self.shared.clone(),
            ));
        }
        while tasks.join_next().await.is_some() {}
    }
}

async fn accept_loop(listener: TcpListener, upstream: Option<Upstream>, shared: Arc<Shared>) {
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
        match &upstream {
            Some(u) => {
                let (dest, expect) = (u.dest, u.expect.clone());
                drain.spawn(to_sidecar(shared, stream, dest, expect, false).instrument(span))
            }
            None => drain.spawn(transparent(shared, stream).instrument(span)),
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
    let _ = app.set_nodelay(true);
    let _guard = ConnGuard::new(&shared.metrics, "outbound", dest.port());
    let traffic = traffic(&shared.metrics, "outbound", dest.port());
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
            match tunnel::connect(&shared, addr, dest, expect.as_ref(), transparent).await {
                Ok(Link::Stream { io, slot }) => {
                    let active = &shared.metrics.tunnel.streams_active;
                    let active = active.with_label_values(&["outbound"]);
                    active.inc();
                    let r = splice(app, io, shared.idle_timeout, &traffic).await;
                    active.dec();
                    if let Err(e) = r {
                        debug!(server = %slot.server(), error = %e, "outbound connection ended with an error");
                    }
                    return;
                }
                Ok(Link::Direct { tls, server }) => {
                    fallbacks.with_label_values(&["no_h2"]).inc();
                    shared.pool.remember_without_tunnel(addr);
                    if let Err(e) = splice(app, tls, shared.idle_timeout, &traffic).await {
                        debug!(%server, error = %e, "outbound connection ended with an error");
                    }
                    return;
                }
                Err(Failed::NoTunnel(reason)) => {
                    fallbacks.with_label_values(&[reason]).inc();
                    shared.pool.remember_without_tunnel(addr);
                    info!(%addr, reason, "peer has no tunnel: using a connection of its own for a while");
                }
                Err(Failed::Refused) => return,
            }
        }
    }
    let dialed = match dial(&shared, dest, expect.as_ref(), Alpn::Link).await {
        Ok(d) => d,
        Err(DialError::Connect(e)) => return info!(%dest, error = %e, "outbound connection failed"),
        Err(DialError::Refused) => return,
    };
    if let Err(e) = splice(app, dialed.tls, shared.idle_timeout, &traffic).await {
        debug!(server = %dialed.server, error = %e, "outbound connection ended with an error");
    }
}

/// A redirected connection: to a mesh destination over mTLS, else as plain
/// TCP to where it was going. One whose original destination cannot be
/// read is refused, never looped.
async fn transparent(shared: Arc<Shared>, app: TcpStream) {
    let _ = app.set_nodelay(true);
    let dest = match original_destination(&app) {
        Ok(d) => d,
        Err(e) => return info!(error = %e, "outbound connection refused"),
    };
    if plan(dest, &shared.outbound) == Route::Mesh {
        return to_sidecar(shared, app, dest, None, true).await;
    }
    let _guard = ConnGuard::new(&shared.metrics, "outbound", dest.port());
    let remote = match shared.connect(dest).await {
        Ok(s) => s,
        Err(e) => return info!(error = %e, "outbound connection failed"),
    };
    let traffic = traffic(&shared.metrics, "outbound", dest.port());
    if let Err(e) = splice(app, remote, shared.idle_timeout, &traffic).await {
        debug!(%dest, error = %e, "outbound connection ended with an error");
    }
}
