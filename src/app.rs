//! Binds everything a sidecar needs, starts its tasks, and hands back the
//! bound addresses (so tests can use port 0).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{Admin, AdminState};
use crate::authz::{AuthzMetrics, LiveRules};
use crate::config::{CertSource, Settings};
use crate::drain::Drain;
use crate::filewatch::{read_all, Reloader};
use crate::identity::{CaFiles, Issuer, LeafRequest, LeafSource, RemoteCa, Rotator};
use crate::limits::LogEveryByKind;
use crate::metrics::Metrics;
use crate::proxy::{
    self, AppClients, Inbound, Outbound, PendingHandshakes, Policy, Shared, UpstreamListener,
};
use crate::tls::{MeshTls, TrustBundle};

/// The addresses a running sidecar listens on.
#[derive(Debug, Clone)]
pub struct BoundAddrs {
    pub inbound: SocketAddr,
    pub outbound: Vec<SocketAddr>,
    pub upstreams: Vec<SocketAddr>,
    pub admin: SocketAddr,
    /// The tunnel listener, when there is one.
    pub tunnel: Option<SocketAddr>,
}

/// A bound, not yet running, sidecar.
pub struct App {
    addrs: BoundAddrs,
    settings: Settings,
    metrics: Arc<Metrics>,
    tls: Arc<MeshTls>,
    drain: Drain,
    inbound: Inbound,
    tunnel: Option<Inbound>,
    outbound: Outbound,
    admin: Admin,
    /// The mounted issuer (its file contents and itself), in issuer mode.
    issuer: Option<(Vec<Vec<u8>>, Issuer)>,
    rules: LiveRules,
    bundle_pem: Vec<u8>,
    shards: crate::runtime::Shards,
}

impl App {
    /// Loads the trust bundle and issuer and binds every listener. Each
    /// error names the flag or file at fault.
    pub async fn bind(settings: Settings) -> Result<App> {
        crate::heap::tune();
        let metrics = Arc::new(Metrics::new());
        metrics.peers.set_max(settings.metrics_max_peers);
        let td = settings.id.trust_domain().clone();
        let bundle_pem = crate::file_limits::read_capped(
            &settings.trust_bundle,
            crate::file_limits::PEM_FILE_MAX_BYTES,
        )
        .map_err(|e| anyhow!("--trust-bundle {e}"))?;
        let bundle = TrustBundle::from_pem(&settings.trust_bundle, &bundle_pem)
            .map_err(|e| anyhow!("--trust-bundle: {e}"))?;
        let issuer = match &settings.cert_source {
            CertSource::LocalIssuer { cert, key } => Some(load_issuer(cert, key, &td, &bundle)?),
            CertSource::Remote { .. } => None,
        };
        let tls = Arc::new(MeshTls::new(td.clone(), bundle));

        let drain = Drain::new();
        let worker_gauge = |i: usize| {
            metrics
                .worker_connections
                .with_label_values(&[&i.to_string()])
        };
        let shards = crate::runtime::Shards::start(settings.worker_threads, worker_gauge)
            .context("starting --worker-threads threads")?;
        let inbound_listener = bind_inbound("--inbound-listen", settings.inbound_listen)?;
        let tunnel_listener = match settings.tunnel_listen {
            Some(addr) => Some(bind_inbound("--tunnel-listen", addr)?),
            None => None,
        };
        let explicit = is_explicit(&settings);
        let mut transparent = Vec::new();
        if !explicit {
            for addr in &settings.outbound_listen {
                match proxy::bind_for_shards("--outbound-listen", *addr, shards.count()) {
                    Ok(l) => transparent.push(l),
                    Err(e) if addr.is_ipv6() && is_no_ipv6(&e) => {
                        warn!(%addr, "IPv6 is off; not listening there")
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let mut upstreams = Vec::new();
        for u in &settings.upstreams {
            upstreams.push(UpstreamListener {
                listeners: proxy::bind_for_shards("--upstream", u.listen, shards.count())?,
                upstream: u.clone(),
            });
        }
        let admin_listener = proxy::bind("--admin-listen", settings.admin_listen)?;
        // Rules last: every other start-up check has passed before it logs.
        let rules = LiveRules::load(
            &settings.rules_dir,
            settings.rules_required,
            settings.default_policy,
            AuthzMetrics::new(metrics.registry()),
        )
        .map_err(|e| anyhow!("--rules-dir: {e}"))?;
        let addrs = BoundAddrs {
            inbound: inbound_listener.local_addr()?,
            outbound: transparent
                .iter()
                .filter_map(|l| l.first()?.local_addr().ok())
                .collect(),
            upstreams: upstreams
                .iter()
                .filter_map(|u| u.listeners.first()?.local_addr().ok())
                .collect(),
            admin: admin_listener.local_addr()?,
            tunnel: match &tunnel_listener {
                Some(l) => Some(l.local_addr()?),
                None => None,
            },
        };
        let mut tunnel = settings.tunnel.clone();
        tunnel.own_ports = [Some(addrs.inbound), Some(addrs.admin), addrs.tunnel]
            .into_iter()
            .flatten()
            .map(|a| a.port())
            .collect();
        let shared = Arc::new(Shared {
            tunnel_sources: proxy::tunnel::SourceLimit::new(tunnel.max_connections_per_source),
            tls: tls.clone(),
            metrics: metrics.clone(),
            drain: drain.clone(),
            mode: settings.inbound_mode,
            opaque_ports: settings.opaque_ports.clone(),
            outbound: settings.outbound.clone(),
            forward_to_localhost: settings.inbound_forward_to_localhost,
            policy: Policy {
                rules: rules.clone(),
                td,
                default: settings.default_policy,
                allow_encoded_slash: settings.allow_encoded_slash,
                access_log: proxy::access_log::AccessLog::start(
                    settings.access_log,
                    metrics.access_log_dropped.clone(),
                ),
            },
            app_clients: AppClients::new(settings.connect_timeout, &metrics),
            connect_timeout: settings.connect_timeout,
            handshake_timeout: settings.handshake_timeout,
            pending_handshakes: PendingHandshakes::new(
                settings.max_pending_handshakes,
                settings.max_pending_handshakes_per_source,
            ),
            hello_timeout: settings.hello_timeout,
            detect_timeout: settings.detect_timeout,
            idle_timeout: settings.idle_timeout,
            tunnel,
            pool: proxy::tunnel::Pool::default(),
            shards: shards.clone(),
            refusal_logs: LogEveryByKind::new(proxy::REFUSAL_LOG_INTERVAL),
        });
        Ok(App {
            addrs,
            inbound: Inbound::new(inbound_listener, settings.inbound_target, shared.clone()),
            tunnel: tunnel_listener
                .map(|l| Inbound::tunnel(l, settings.inbound_target, shared.clone())),
            outbound: Outbound {
                transparent,
                upstreams,
                shared,
            },
            admin: Admin::new(
                admin_listener,
                AdminState {
                    metrics: metrics.clone(),
                    tls: tls.clone(),
                    drain: drain.clone(),
                    rules: rules.clone(),
                    default_policy: settings.default_policy,
                    allow_shutdown: settings.allow_shutdown,
                },
            ),
            issuer,
            rules,
            bundle_pem,
            shards,
            settings,
            metrics,
            tls,
            drain,
        })
    }

    pub fn addrs(&self) -> &BoundAddrs {
        &self.addrs
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The handle that starts a graceful shutdown (`drain().begin()`).
    pub fn drain(&self) -> Drain {
        self.drain.clone()
    }

    /// Runs until a shutdown begins, then drains. Returns once every
    /// connection has finished or the drain timeout has passed.
    pub async fn run(self) -> Result<()> {
        let exit = CancellationToken::new();
        let _stop_background = exit.clone().drop_guard();
        // Also when this future is dropped before the drain ends (tasks on
        // other shards hold the shards' handles, so dropping is not enough).
        let _stop_shards = StopShards(self.shards.clone());
        let s = &self.settings;
        let td = s.id.trust_domain().clone();
        let source = match (&s.cert_source, self.issuer) {
            (CertSource::LocalIssuer { cert, key }, Some((issuer_pem, issuer))) => {
                let (issuer_tx, issuer_rx) = tokio::sync::watch::channel(Arc::new(issuer));
                let files = CaFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                };
                let parse_td = td.clone();
                let check_tls = self.tls.clone();
                Reloader::new(
                    "issuer",
                    vec![files.cert.clone(), files.key.clone()],
                    &issuer_pem,
                    move |c| {
                        let issuer = Issuer::from_pem(&files, &c[0], &c[1], &parse_td)
                            .map_err(|e| e.to_string())?;
                        crate::tls::check_issuer(
                            &issuer,
                            &parse_td,
                            check_tls.snapshot().bundle.roots.clone(),
                        )?;
                        Ok(issuer)
                    },
                    move |issuer| {
                        issuer_tx.send_replace(Arc::new(issuer));
                    },
                    self.metrics.issuer_reloads.clone(),
                )
                .with_validity(self.metrics.issuer_valid.clone())
                .spawn(s.file_poll_interval, exit.clone())
                .context("watching --ca-cert/--ca-key")?;
                LeafSource::Issuer(issuer_rx)
            }
            (
                CertSource::Remote {
                    url,
                    token_file,
                    connect_to,
                },
                _,
            ) => {
                let remote = Arc::new(
                    RemoteCa::new(url, token_file.clone(), *connect_to, self.tls.clone())
                        .map_err(|e| anyhow!("--ca-url: {e}"))?,
                );
                if !s.trust_bundle_refresh.is_zero() {
                    tokio::spawn(refresh_bundle(
                        remote.clone(),
                        self.tls.clone(),
                        self.metrics.clone(),
                        s.trust_bundle_refresh,
                        exit.clone(),
                    ));
                }
                LeafSource::Remote(remote)
            }
            (CertSource::LocalIssuer { .. }, None) => unreachable!("bind loads the issuer"),
        };

        let bundle_path = s.trust_bundle.clone();
        let tls = self.tls.clone();
        let bundle_valid = self.metrics.trust_bundle_valid.clone();
        Reloader::new(
            "trust bundle",
            vec![bundle_path.clone()],
            &[self.bundle_pem],
            move |c| TrustBundle::from_pem(&bundle_path, &c[0]),
            move |bundle| {
                if let Err(e) = tls.set_bundle(bundle) {
                    warn!(error = %e, "new trust bundle could not be used");
                    bundle_valid.set(0);
                }
            },
            self.metrics.trust_bundle_reloads.clone(),
        )
        .with_validity(self.metrics.trust_bundle_valid.clone())
        .spawn(s.file_poll_interval, exit.clone())
        .context("watching --trust-bundle")?;

        self.rules
            .spawn_reloader(s.file_poll_interval, exit.clone())
            .context("watching --rules-dir")?;

        let tls = self.tls.clone();
        let rotator = Rotator {
            request: LeafRequest {
                id: s.id.clone(),
                ttl: s.cert_ttl,
            },
            source,
            publish: Box::new(move |leaf| {
                if let Err(e) = tls.set_leaf(leaf) {
                    warn!(error = %e, "new certificate could not be used");
                }
            }),
            metrics: self.metrics.clone(),
        };
        tokio::spawn(rotator.run(exit.clone()));
        let admin = tokio::spawn(self.admin.run());
        let inbound = tokio::spawn(self.inbound.run());
        let tunnel = self.tunnel.map(|t| tokio::spawn(t.run()));
        let outbound = tokio::spawn(self.outbound.run());
        if !is_explicit(s) && s.outbound.mesh_cidrs.is_empty() {
            warn!("no --mesh-cidrs: every outbound connection passes through in plaintext");
        }
        let a = &self.addrs;
        info!(
            id = %s.id,
            inbound = %a.inbound,
            outbound = ?a.outbound,
            upstreams = ?a.upstreams,
            admin = %a.admin,
            tunnel = ?a.tunnel,
            worker_threads = s.worker_threads,
            "listening"
        );

        self.drain.stopping().await;
        let _ = tokio::join!(inbound, outbound);
        if let Some(tunnel) = tunnel {
            let _ = tunnel.await;
        }
        info!(open = self.drain.open(), timeout = ?s.drain_timeout, "draining");
        let left = self.drain.wait(s.drain_timeout).await;
        if left > 0 {
            warn!(
                left,
                "drain timeout reached; closing the remaining connections"
            );
        } else {
            info!("drained");
        }
        admin.abort();
        // Connections still open on the other threads end with them.
        self.shards.stop(SHARD_STOP_WAIT);
        Ok(())
    }
}

/// How long the end of a drain waits for the other threads to close what
/// they still hold (and log it).
const SHARD_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Stops the other shards when dropped.
struct StopShards(crate::runtime::Shards);

impl Drop for StopShards {
    fn drop(&mut self) {
        self.0.stop(std::time::Duration::ZERO);
    }
}

/// Loads the mounted issuer (`--ca-cert/--ca-key`), naming the flags in errors.
fn load_issuer(
    cert: &std::path::Path,
    key: &std::path::Path,
    td: &crate::identity::TrustDomain,
    bundle: &TrustBundle,
) -> Result<(Vec<Vec<u8>>, Issuer)> {
    let files = CaFiles {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
    };
    let pem = read_all(&[files.cert.clone(), files.key.clone()])
        .map_err(|e| anyhow!("--ca-cert/--ca-key: {e}"))?;
    let issuer = Issuer::from_pem(&files, &pem[0], &pem[1], td)
        .map_err(|e| anyhow!("--ca-cert/--ca-key: {e}"))?;
    crate::tls::check_issuer(&issuer, td, bundle.roots.clone())
        .map_err(|e| anyhow!("--ca-cert/--ca-key: {e}"))?;
    Ok((pem, issuer))
}

/// Fetches the identity service's trust bundle every `every` and uses it
/// when it changed. A failure keeps the current bundle; the next round
/// tries again.
async fn refresh_bundle(
    remote: Arc<RemoteCa>,
    tls: Arc<MeshTls>,
    metrics: Arc<Metrics>,
    every: std::time::Duration,
    exit: CancellationToken,
) {
    let mut last = crate::filewatch::content_hash(&[]);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = exit.cancelled() => return,
        }
        match remote.fetch_bundle().await {
            Ok((bundle, pem)) => {
                let hash = crate::filewatch::content_hash(&[&pem]);
                let same = bundle.certs == tls.snapshot().bundle.certs;
                if hash == last || same {
                    last = hash;
                    continue;
                }
                last = hash;
                match tls.set_bundle(bundle) {
                    Ok(()) => {
                        info!(
                            roots = tls.snapshot().bundle.certs.len(),
                            "trust bundle refreshed from the identity service"
                        );
                        metrics
                            .trust_bundle_reloads
                            .with_label_values(&["ok"])
                            .inc();
                        metrics.trust_bundle_valid.set(1);
                    }
                    Err(e) => {
                        warn!(error = %e, "trust bundle from the identity service could not be used");
                        metrics
                            .trust_bundle_reloads
                            .with_label_values(&["error"])
                            .inc();
                        metrics.trust_bundle_valid.set(0);
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "fetching the trust bundle from the identity service failed; keeping the current one");
                metrics
                    .trust_bundle_reloads
                    .with_label_values(&["error"])
                    .inc();
            }
        }
    }
}

/// Explicit mode: targets and upstreams are given, nothing is intercepted.
fn is_explicit(settings: &Settings) -> bool {
    settings.inbound_target.is_some() || !settings.upstreams.is_empty()
}

/// Binds an inbound (or tunnel) listener; `[::]` falls back to `0.0.0.0`
/// where IPv6 is off.
fn bind_inbound(flag: &'static str, addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    match proxy::bind(flag, addr) {
        Err(e) if addr.ip().is_unspecified() && addr.is_ipv6() && is_no_ipv6(&e) => {
            warn!("IPv6 is off; {flag} falls back to IPv4 only");
            let v4 = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), addr.port());
            Ok(proxy::bind(flag, v4)?)
        }
        other => Ok(other?),
    }
}

fn is_no_ipv6(e: &proxy::Error) -> bool {
    match e {
        proxy::Error::Bind { source, .. } => {
            matches!(source.raw_os_error(), Some(code) if code == nix::libc::EAFNOSUPPORT || code == nix::libc::EADDRNOTAVAIL)
        }
        _ => false,
    }
}
