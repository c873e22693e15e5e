//! The outbound side: the app's connections leave through here. Explicit
//! upstreams carry them over mTLS to a known sidecar; the transparent
//! listener forwards redirected connections to their original destination.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::ServerName;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, Instrument};

use super::{original_destination, plan, splice, traffic, ConnGuard, Route, Shared};
use crate::config::Upstream;
use crate::identity::SpiffeId;
use crate::limits::AcceptErrors;
use crate::tls::{handshake_result, peer_identity};

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
                drain.spawn(to_sidecar(shared, stream, u.dest, u.expect.clone()).instrument(span))
            }
            None => drain.spawn(transparent(shared, stream).instrument(span)),
        }
    }
}

/// Carries one app connection over mesh mTLS to the sidecar at `dest`,
/// requiring the server to be `expect` when given (else any identity of
/// our trust domain).
async fn to_sidecar(
    shared: Arc<Shared>,
    app: TcpStream,
    dest: SocketAddr,
    expect: Option<SpiffeId>,
) {
    let _ = app.set_nodelay(true);
    let _guard = ConnGuard::new(&shared.metrics, "outbound", dest.port());
    let handshakes = &shared.metrics.tls_handshakes;
    let snapshot = shared.tls.snapshot();
    let config = match snapshot.client_at(SystemTime::now()) {
        Ok(config) => config,
        Err(why) => {
            handshakes
                .with_label_values(&["outbound", why.label()])
                .inc();
            return info!(%dest, result = why.label(), "outbound connection refused: {why}");
        }
    };
    let tcp = match shared.connect(dest).await {
        Ok(s) => s,
        Err(e) => return info!(error = %e, "outbound connection failed"),
    };
    let started = Instant::now();
    let connect = TlsConnector::from(config).connect(ServerName::IpAddress(dest.ip().into()), tcp);
    let tls = match tokio::time::timeout(shared.handshake_timeout, connect).await {
        Err(_) => {
            handshakes.with_label_values(&["outbound", "timeout"]).inc();
            return info!(%dest, "outbound handshake timed out");
        }
        Ok(Err(e)) => {
            let result = handshake_result(&e);
            handshakes.with_label_values(&["outbound", result]).inc();
            return info!(%dest, result, error = %e, "outbound handshake failed");
        }
        Ok(Ok(tls)) => tls,
    };
    let (_, conn) = tls.get_ref();
    let server = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| peer_identity(c, shared.tls.trust_domain()));
    let Some(Ok(server)) = server else {
        handshakes
            .with_label_values(&["outbound", "bad_identity"])
            .inc();
        return info!(%dest, "outbound connection refused: server identity unreadable");
    };
    if let Some(want) = &expect {
        if &server != want {
            handshakes
                .with_label_values(&["outbound", "wrong_identity"])
                .inc();
            return info!(%dest, got = %server, want = %want, "outbound connection refused: unexpected server identity");
        }
    }
    shared
        .metrics
        .tls_handshake_duration
        .with_label_values(&["outbound"])
        .observe(started.elapsed().as_secs_f64());
    handshakes.with_label_values(&["outbound", "ok"]).inc();
    shared.metrics.count_key_exchange("outbound", conn);
    let traffic = traffic(&shared.metrics, "outbound", dest.port());
    if let Err(e) = splice(app, tls, shared.idle_timeout, &traffic).await {
        debug!(%server, error = %e, "outbound connection ended with an error");
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
        return to_sidecar(shared, app, dest, None).await;
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
