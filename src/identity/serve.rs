//! `portcullis ca serve`: the identity service. It holds the issuer so that
//! no pod has to: a sidecar sends a CSR with its projected ServiceAccount
//! token, the service asks the Kubernetes API server (TokenReview) whose
//! token it is, and signs a leaf for exactly that identity.

mod admin;
mod api;
mod code;
mod connector;
mod csr;
mod issuer;
mod judge;
mod metrics;
mod review;

pub use api::{workload_id, CertifyRequest, CertifyResponse, ErrorBody, MAX_BODY, MAX_TOKEN};
pub use code::Code;
pub use csr::{check_csr, CsrError};
pub use judge::{judge, ReviewStatus, UserInfo, POD_NAME_EXTRA};
pub use metrics::CaMetrics;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use hyper::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::config::LogArgs;
use crate::drain::Drain;
use crate::filewatch::{read_all, Reloader};
use crate::identity::TrustDomain;
use crate::limits::Activity;
use issuer::{IssuerFiles, LiveIssuer, ServingName};
use review::{ReviewSettings, Reviewer};

/// Where a pod's service-account credentials are mounted.
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// A TLS handshake from accept must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors starting or running the identity service; each names its flag.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Flag(String),
    #[error("watching the issuer files: {0}")]
    Watch(#[from] notify::Error),
}

/// `portcullis ca serve` flags (each also `PORTCULLIS_<FLAG>`).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The issuer's certificate (a CA, then its chain); watched.
    #[arg(long, env = "PORTCULLIS_ISSUER_CERT", value_name = "FILE")]
    pub issuer_cert: PathBuf,
    /// The issuer's private key; watched.
    #[arg(long, env = "PORTCULLIS_ISSUER_KEY", value_name = "FILE")]
    pub issuer_key: PathBuf,
    /// PEM roots the issuer must chain to (served at /v1/trust-bundle); watched.
    #[arg(long, env = "PORTCULLIS_TRUST_BUNDLE", value_name = "FILE")]
    pub trust_bundle: PathBuf,
    /// The trust domain whose SPIFFE ids this service signs.
    #[arg(long, env = "PORTCULLIS_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Where sidecars send their CSRs (HTTPS).
    #[arg(long, env = "PORTCULLIS_LISTEN", default_value = "[::]:15012")]
    pub listen: SocketAddr,
    /// Plain-HTTP `/metrics`, `/live`, `/ready`.
    #[arg(long, env = "PORTCULLIS_ADMIN_LISTEN", default_value = "0.0.0.0:15020")]
    pub admin_listen: SocketAddr,
    /// The namespace the service runs in [default: the pod's own, from the
    /// mounted service account].
    #[arg(long, env = "PORTCULLIS_NAMESPACE")]
    pub namespace: Option<String>,
    /// The Service name sidecars reach it by (its certificate's DNS names).
    #[arg(long, env = "PORTCULLIS_SERVICE_NAME", default_value = "portcullis-ca")]
    pub service_name: String,
    /// The API server [default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT].
    #[arg(long, env = "PORTCULLIS_KUBE_API_URL", value_name = "URL")]
    pub kube_api_url: Option<String>,
    /// Roots for the API server's certificate.
    #[arg(
        long,
        env = "PORTCULLIS_KUBE_CA_FILE",
        value_name = "FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    pub kube_ca_file: PathBuf,
    /// This service's own token for the API server; re-read every minute and after a 401.
    #[arg(
        long,
        env = "PORTCULLIS_KUBE_TOKEN_FILE",
        value_name = "FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub kube_token_file: PathBuf,
    /// The audience sidecars' tokens must be minted for.
    #[arg(long, env = "PORTCULLIS_AUDIENCE", default_value = "portcullis-ca")]
    pub audience: String,
    /// The longest leaf lifetime granted.
    #[arg(long, env = "PORTCULLIS_MAX_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_ttl: Duration,
    /// How long one TokenReview may take before the request gets 503.
    #[arg(long, env = "PORTCULLIS_TOKENREVIEW_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub tokenreview_timeout: Duration,
    /// TokenReviews in flight at once; past it requests get 503 at once.
    #[arg(long, env = "PORTCULLIS_MAX_REVIEWS_IN_FLIGHT", default_value_t = 64)]
    pub max_reviews_in_flight: usize,
    /// How often the issuer files' content hash is compared even without a change event.
    #[arg(long, env = "PORTCULLIS_ISSUER_POLL_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub issuer_poll_interval: Duration,
    /// How long open requests may take to finish after SIGTERM.
    #[arg(long, env = "PORTCULLIS_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Validated settings for `ca serve`.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub files: IssuerFiles,
    pub td: TrustDomain,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub namespace: String,
    pub service_name: String,
    pub kube_ca_file: PathBuf,
    pub review: ReviewSettings,
    pub max_ttl: Duration,
    pub issuer_poll_interval: Duration,
    pub drain_timeout: Duration,
}

/// `https://host:port` of the API server from the variables every pod gets.
pub fn in_cluster_url(host: Option<&str>, port: Option<&str>) -> Option<String> {
    let host = host.filter(|h| !h.is_empty())?;
    let port = port.filter(|p| !p.is_empty()).unwrap_or("443");
    Some(if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    })
}

impl ServeArgs {
    /// Checks the flags; the error names the flag at fault.
    pub fn settings(&self) -> Result<ServeSettings, String> {
        let td =
            TrustDomain::new(&self.trust_domain).map_err(|e| format!("--trust-domain: {e}"))?;
        let namespace = match &self.namespace {
            Some(ns) => ns.clone(),
            None => crate::file_limits::read_capped_string(
                Path::new(&format!("{SA_DIR}/namespace")),
                crate::file_limits::TOKEN_FILE_MAX_BYTES,
            )
            .map(|s| s.trim().to_string())
            .map_err(|_| "--namespace: required outside a Kubernetes pod".to_string())?,
        };
        ServingName::new(&td, &namespace, &self.service_name)
            .map_err(|e| format!("--namespace/--service-name: {e}"))?;
        let url = match &self.kube_api_url {
            Some(u) => u.clone(),
            None => in_cluster_url(
                std::env::var("KUBERNETES_SERVICE_HOST").ok().as_deref(),
                std::env::var("KUBERNETES_SERVICE_PORT").ok().as_deref(),
            )
            .ok_or(
                "--kube-api-url: required outside a cluster (KUBERNETES_SERVICE_HOST is unset)",
            )?,
        };
        let api_url: Uri = url
            .parse()
            .map_err(|e| format!("--kube-api-url {url:?}: {e}"))?;
        if api_url.scheme_str() != Some("https") || api_url.host().is_none() {
            return Err(format!(
                "--kube-api-url {url:?}: must be https://HOST[:PORT]"
            ));
        }
        if self.audience.is_empty() {
            return Err("--audience: must not be empty".into());
        }
        for (flag, d) in [
            ("--max-ttl", self.max_ttl),
            ("--tokenreview-timeout", self.tokenreview_timeout),
            ("--issuer-poll-interval", self.issuer_poll_interval),
        ] {
            if d.is_zero() {
                return Err(format!("{flag}: must be more than zero"));
            }
        }
        if self.max_reviews_in_flight == 0 {
            return Err("--max-reviews-in-flight: must be at least 1".into());
        }
        Ok(ServeSettings {
            files: IssuerFiles {
                cert: self.issuer_cert.clone(),
                key: self.issuer_key.clone(),
                bundle: self.trust_bundle.clone(),
            },
            td,
            listen: self.listen,
            admin_listen: self.admin_listen,
            namespace,
            service_name: self.service_name.clone(),
            kube_ca_file: self.kube_ca_file.clone(),
            review: ReviewSettings {
                api_url,
                token_file: self.kube_token_file.clone(),
                audience: self.audience.clone(),
                timeout: self.tokenreview_timeout,
                max_in_flight: self.max_reviews_in_flight,
            },
            max_ttl: self.max_ttl,
            issuer_poll_interval: self.issuer_poll_interval,
            drain_timeout: self.drain_timeout,
        })
    }
}

/// What every request reads.
pub(crate) struct State {
    td: TrustDomain,
    audience: String,
    max_ttl: Duration,
    issuer: Arc<LiveIssuer>,
    reviewer: Reviewer,
    metrics: Arc<CaMetrics>,
}

/// The addresses a running identity service listens on.
#[derive(Debug, Clone)]
pub struct CaAddrs {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

/// A bound, not yet running, identity service.
pub struct CaServer {
    settings: ServeSettings,
    listener: TcpListener,
    admin: TcpListener,
    addrs: CaAddrs,
    state: Arc<State>,
    initial: Vec<Vec<u8>>,
    drain: Drain,
}

impl CaServer {
    /// Loads and checks the issuer, bundle and API server roots, and binds
    /// both listeners.
    pub async fn bind(settings: ServeSettings) -> Result<CaServer, Error> {
        let flag = Error::Flag;
        let metrics = Arc::new(CaMetrics::new());
        let name = ServingName::new(&settings.td, &settings.namespace, &settings.service_name)
            .map_err(flag)?;
        let initial = read_all(&settings.files.paths())
            .map_err(|e| flag(format!("--issuer-cert/--issuer-key/--trust-bundle: {e}")))?;
        let served = issuer::load(&settings.files, &initial, &settings.td, &name)
            .map_err(|e| flag(format!("--issuer-cert/--issuer-key/--trust-bundle: {e}")))?;
        let kube_roots = crate::tls::TrustBundle::load(&settings.kube_ca_file)
            .map_err(|e| flag(format!("--kube-ca-file: {e}")))?;
        let kube_tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| flag(e.to_string()))?
            .with_root_certificates(kube_roots.roots.clone())
            .with_no_client_auth();
        let connector = connector::HttpsConnector::new(
            Arc::new(kube_tls),
            settings.review.timeout.min(Duration::from_secs(5)),
        );
        let reviewer = Reviewer::new(
            settings.review.clone(),
            connector,
            metrics.tokenreview_duration.clone(),
        );
        let listener = bind("--listen", settings.listen)?;
        let admin = bind("--admin-listen", settings.admin_listen)?;
        let addrs = CaAddrs {
            listen: listener
                .local_addr()
                .map_err(|e| flag(format!("--listen: {e}")))?,
            admin: admin
                .local_addr()
                .map_err(|e| flag(format!("--admin-listen: {e}")))?,
        };
        let state = Arc::new(State {
            td: settings.td.clone(),
            audience: settings.review.audience.clone(),
            max_ttl: settings.max_ttl,
            issuer: Arc::new(LiveIssuer::new(served, name, metrics.clone())),
            reviewer,
            metrics,
        });
        Ok(CaServer {
            settings,
            listener,
            admin,
            addrs,
            state,
            initial,
            drain: Drain::new(),
        })
    }

    pub fn addrs(&self) -> &CaAddrs {
        &self.addrs
    }

    pub fn metrics(&self) -> Arc<CaMetrics> {
        self.state.metrics.clone()
    }

    /// The handle that starts a graceful shutdown.
    pub fn drain(&self) -> Drain {
        self.drain.clone()
    }

    /// Serves until a shutdown begins, then lets open requests finish (at
    /// most the drain timeout).
    pub async fn run(self) -> Result<(), Error> {
        let exit = CancellationToken::new();
        let _stop_background = exit.clone().drop_guard();
        let s = &self.settings;
        let (td, files) = (s.td.clone(), s.files.clone());
        let name = ServingName::new(&s.td, &s.namespace, &s.service_name).map_err(Error::Flag)?;
        let live = self.state.issuer.clone();
        Reloader::new(
            "issuer",
            s.files.paths(),
            &self.initial,
            move |c| issuer::load(&files, c, &td, &name),
            move |served| live.set(served),
            self.state.metrics.issuer_reloads.clone(),
        )
        .with_validity(self.state.metrics.issuer_valid.clone())
        .spawn(s.issuer_poll_interval, exit.clone())?;

        let live = self.state.issuer.clone();
        let refresher = exit.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(60)) => live.refresh_serving(),
                    _ = refresher.cancelled() => return,
                }
            }
        });

        let admin = tokio::spawn(admin::serve(
            self.admin,
            self.state.clone(),
            self.drain.clone(),
        ));
        info!(
            listen = %self.addrs.listen,
            admin = %self.addrs.admin,
            trust_domain = %s.td,
            audience = %s.review.audience,
            "identity service listening"
        );
        let mut errors = crate::limits::AcceptErrors::new("identity", None);
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = self.drain.stopping() => break,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    errors.failed(&self.listener, e).await;
                    continue;
                }
            };
            errors.accepted();
            let state = self.state.clone();
            let drain = self.drain.clone();
            let span = tracing::debug_span!("certify_conn", %peer);
            self.drain
                .spawn(serve_connection(tcp, state, drain).instrument(span));
        }
        drop(self.listener);
        info!(open = self.drain.open(), "draining");
        let left = self.drain.wait(s.drain_timeout).await;
        if left > 0 {
            warn!(left, "drain timeout reached");
        }
        admin.abort();
        Ok(())
    }
}

/// An HTTP/1 client must send a whole request head within this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection with no request in flight for this long is closed: hyper
/// has no HTTP/2 idle limit, and waits without one for the first bytes
/// that tell HTTP/1 from HTTP/2.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection asked to close may take to finish its requests.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// One client connection: TLS with the current serving certificate, then
/// HTTP/1.1 or HTTP/2; closed gracefully when idle or when a shutdown begins.
async fn serve_connection(tcp: tokio::net::TcpStream, state: Arc<State>, drain: Drain) {
    let _ = tcp.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(state.issuer.current().tls.clone());
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return debug!(error = %e, "handshake failed"),
        Err(_) => return debug!("handshake timed out"),
    };
    let activity = Activity::default();
    let idle = activity.idle_for(IDLE_TIMEOUT);
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        let busy = activity.busy();
        async move {
            let reply = api::handle(&state, req).await;
            drop(busy);
            Ok::<_, Infallible>(reply)
        }
    });
    let builder = crate::limits::server_auto(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r { debug!(error = %e, "connection ended with an error") }
            return;
        }
        _ = drain.stopping() => conn.as_mut().graceful_shutdown(),
        _ = idle => {
            debug!("closing an idle connection");
            conn.as_mut().graceful_shutdown();
        }
    }
    if tokio::time::timeout(CLOSE_GRACE, conn).await.is_err() {
        debug!("connection closed: it did not finish in time");
    }
}

/// Binds `addr`; `[::]` falls back to `0.0.0.0` where IPv6 is off.
fn bind(flag: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    match crate::proxy::bind(flag, addr) {
        Ok(l) => Ok(l),
        Err(_) if addr.is_ipv6() && addr.ip().is_unspecified() => {
            let v4 = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), addr.port());
            crate::proxy::bind(flag, v4).map_err(|e| Error::Flag(e.to_string()))
        }
        Err(e) => Err(Error::Flag(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_cluster_urls() {
        let cases = [
            (
                Some("10.96.0.1"),
                Some("443"),
                Some("https://10.96.0.1:443"),
            ),
            (Some("10.96.0.1"), None, Some("https://10.96.0.1:443")),
            (
                Some("fd00::1"),
                Some("6443"),
                Some("https://[fd00::1]:6443"),
            ),
            (None, Some("443"), None),
            (Some(""), Some("443"), None),
        ];
        for (h, p, want) in cases {
            assert_eq!(in_cluster_url(h, p).as_deref(), want, "{h:?} {p:?}");
        }
    }
}
