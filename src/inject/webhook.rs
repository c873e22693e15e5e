//! `portcullis webhook`: the mutating admission webhook. AdmissionReview v1
//! over HTTPS (HTTP/1.1 and HTTP/2), answered by [`review::review`], which
//! calls the same pure [`inject`](super::inject) as the offline command.
//!
//! Paths: `POST /inject` for the webhook entry that selects pods by their
//! own label, `POST /inject/namespace-enabled` for the entry whose
//! namespaceSelector matched `portcullis.io/inject=enabled` (an
//! AdmissionReview carries no namespace labels, so the path tells us).
//! The serving certificate is hot-reloaded; metrics are on a plain-HTTP
//! admin port so Prometheus needs no TLS setup to scrape them.

pub mod review;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Error, InjectorConfig};
use crate::config::LogArgs;
use crate::file_limits::{read_capped, PEM_FILE_MAX_BYTES};
use crate::filewatch::Reloader;

/// The largest AdmissionReview accepted (a pod is at most ~1.5 MiB in etcd).
const MAX_BODY: usize = 8 << 20;

/// `portcullis webhook` flags.
#[derive(Debug, Args)]
pub struct WebhookArgs {
    /// Where the API server sends admission reviews (HTTPS).
    #[arg(long, env = "PORTCULLIS_LISTEN", default_value = "[::]:8443")]
    pub listen: SocketAddr,
    /// The serving certificate (then its chain), PEM; watched and reloaded.
    #[arg(long, env = "PORTCULLIS_TLS_CERT", value_name = "FILE")]
    pub tls_cert: PathBuf,
    /// The serving key, PEM; watched and reloaded.
    #[arg(long, env = "PORTCULLIS_TLS_KEY", value_name = "FILE")]
    pub tls_key: PathBuf,
    /// The injector's config file; built-in defaults without it.
    #[arg(long, env = "PORTCULLIS_INJECTOR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Plain-HTTP `/metrics`, `/live`, `/ready`.
    #[arg(long, env = "PORTCULLIS_ADMIN_LISTEN", default_value = "0.0.0.0:15020")]
    pub admin_listen: SocketAddr,
    /// How often the certificate files are re-read even without a change event.
    #[arg(long, env = "PORTCULLIS_FILE_POLL_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub file_poll_interval: Duration,
    #[command(flatten)]
    pub log: LogArgs,
}

/// The injector's metrics, in their own registry.
pub struct WebhookMetrics {
    registry: Registry,
    pub admissions: IntCounterVec,
    pub duration: Histogram,
    pub tls_reloads: IntCounterVec,
}

impl WebhookMetrics {
    fn new() -> Self {
        let registry = crate::metrics::registry_with_process_metrics();
        let admissions = IntCounterVec::new(
            Opts::new(
                "portcullis_injector_admissions_total",
                "Admission reviews answered, by result and reason.",
            ),
            &["result", "reason"],
        )
        .expect("valid metric");
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "portcullis_injector_admission_duration_seconds",
                "Time to answer an admission review.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
            ]),
        )
        .expect("valid metric");
        let tls_reloads = IntCounterVec::new(
            Opts::new(
                "portcullis_injector_tls_reloads_total",
                "Serving certificate reloads, ok or error.",
            ),
            &["result"],
        )
        .expect("valid metric");
        for m in [&admissions, &tls_reloads] {
            registry
                .register(Box::new(m.clone()))
                .expect("unique metric");
        }
        registry
            .register(Box::new(duration.clone()))
            .expect("unique metric");
        admissions.with_label_values(&["injected", "none"]);
        tls_reloads.with_label_values(&["ok"]);
        tls_reloads.with_label_values(&["error"]);
        WebhookMetrics {
            registry,
            admissions,
            duration,
            tls_reloads,
        }
    }

    pub fn encode(&self) -> String {
        crate::metrics::encode(&self.registry)
    }
}

/// Builds a TLS server config from PEM cert chain and key bytes.
pub fn server_config(cert: &[u8], key: &[u8]) -> Result<ServerConfig, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--tls-cert: {e}"))?;
    if chain.is_empty() {
        return Err("--tls-cert: no PEM CERTIFICATE block".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("--tls-key: {e}"))?;
    let mut cfg = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The bound webhook: call [`Webhook::run`] to serve.
pub struct Webhook {
    listener: TcpListener,
    admin: TcpListener,
    tls: Arc<ArcSwap<ServerConfig>>,
    cfg: Arc<InjectorConfig>,
    metrics: Arc<WebhookMetrics>,
    reloader: Reloader<ServerConfig>,
    poll: Duration,
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = match std::net::TcpListener::bind(addr) {
        // `[::]` where the kernel has no IPv6: serve IPv4.
        Err(e) if addr.ip().is_unspecified() && addr.is_ipv6() && e.raw_os_error() == Some(97) => {
            std::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], addr.port())))?
        }
        other => other?,
    };
    l.set_nonblocking(true)?;
    Ok(l)
}

impl Webhook {
    /// Loads the config and the certificate, and binds both listeners.
    pub fn bind(args: &WebhookArgs) -> Result<Self, Error> {
        let cfg = InjectorConfig::load(args.config.as_deref())?;
        let paths = vec![args.tls_cert.clone(), args.tls_key.clone()];
        // Read one by one so a missing file names the flag that gave it.
        let initial = [("--tls-cert", &args.tls_cert), ("--tls-key", &args.tls_key)]
            .into_iter()
            .map(|(flag, p)| {
                read_capped(p, PEM_FILE_MAX_BYTES).map_err(|e| Error::Input(format!("{flag} {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tls = Arc::new(ArcSwap::from_pointee(
            server_config(&initial[0], &initial[1]).map_err(Error::Tls)?,
        ));
        let metrics = Arc::new(WebhookMetrics::new());
        let target = tls.clone();
        let reloader = Reloader::new(
            "webhook certificate",
            paths,
            &initial,
            |c: &[Vec<u8>]| server_config(&c[0], &c[1]),
            move |c| target.store(Arc::new(c)),
            metrics.tls_reloads.clone(),
        );
        // One line naming the flag and the address (an `Io` error would
        // print its message twice through anyhow's chain).
        let bind_flag = |flag: &str, addr: SocketAddr| {
            bind(addr)
                .and_then(TcpListener::from_std)
                .map_err(|e| Error::Input(format!("{flag} {addr}: cannot listen: {e}")))
        };
        Ok(Webhook {
            listener: bind_flag("--listen", args.listen)?,
            admin: bind_flag("--admin-listen", args.admin_listen)?,
            tls,
            cfg: Arc::new(cfg),
            metrics,
            reloader,
            poll: args.file_poll_interval,
        })
    }

    /// The webhook's and the admin server's bound addresses.
    pub fn addrs(&self) -> (SocketAddr, SocketAddr) {
        (
            self.listener.local_addr().expect("bound"),
            self.admin.local_addr().expect("bound"),
        )
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        self.reloader
            .spawn(self.poll, shutdown.clone())
            .map_err(|e| Error::Tls(format!("watching the certificate files: {e}")))?;
        tokio::spawn(serve_admin(
            self.admin,
            self.metrics.clone(),
            shutdown.clone(),
        ));
        let mut errors = crate::limits::AcceptErrors::new("webhook", None);
        loop {
            let (stream, peer) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        errors.failed(&self.listener, e).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return Ok(()),
            };
            errors.accepted();
            let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.load_full());
            let (cfg, metrics) = (self.cfg.clone(), self.metrics.clone());
            tokio::spawn(async move {
                let tls =
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => return debug!(%peer, error = %e, "tls handshake failed"),
                        Err(_) => return debug!(%peer, "tls handshake timed out"),
                    };
                let service = hyper::service::service_fn(move |req| {
                    let (cfg, metrics) = (cfg.clone(), metrics.clone());
                    async move { Ok::<_, Infallible>(handle(req, &cfg, &metrics).await) }
                });
                if let Err(e) = crate::limits::server_auto(Duration::from_secs(30))
                    .serve_connection(TokioIo::new(tls), service)
                    .await
                {
                    debug!(%peer, error = %e, "webhook connection ended with an error");
                }
            });
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(
    req: Request<Incoming>,
    cfg: &InjectorConfig,
    metrics: &WebhookMetrics,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let namespace_enabled = match req.uri().path() {
        "/inject" => false,
        "/inject/namespace-enabled" => true,
        _ => return text(StatusCode::NOT_FOUND, "not found\n"),
    };
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            metrics
                .admissions
                .with_label_values(&["error", "malformed"])
                .inc();
            return text(StatusCode::PAYLOAD_TOO_LARGE, format!("body: {e}\n"));
        }
    };
    let reply = match review::review(&body, namespace_enabled, cfg) {
        Ok(r) => {
            info!(result = r.result, reason = r.reason, uid = %r.review["response"]["uid"].as_str().unwrap_or(""), "admission reviewed");
            metrics
                .admissions
                .with_label_values(&[r.result, r.reason])
                .inc();
            let mut resp = Response::new(Full::new(Bytes::from(r.review.to_string())));
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(why) => {
            warn!(error = %why, "malformed admission review");
            metrics
                .admissions
                .with_label_values(&["error", "malformed"])
                .inc();
            text(
                StatusCode::BAD_REQUEST,
                format!("malformed AdmissionReview: {why}\n"),
            )
        }
    };
    metrics.duration.observe(started.elapsed().as_secs_f64());
    reply
}

async fn serve_admin(
    listener: TcpListener,
    metrics: Arc<WebhookMetrics>,
    shutdown: CancellationToken,
) {
    // Like the sidecar's admin port: a bounded number of connections, idle
    // ones make room for new ones, and a pause instead of a spin when
    // accept fails (out of descriptors).
    let conns = crate::limits::AdminConnections::new(None);
    let mut errors = crate::limits::AcceptErrors::new("admin", None);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    errors.failed(&listener, e).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        errors.accepted();
        let Some(slot) = conns.admit(peer.ip()) else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                async move {
                    Ok::<_, Infallible>(match (req.method(), req.uri().path()) {
                        (&Method::GET, "/metrics") => text(StatusCode::OK, metrics.encode()),
                        (&Method::GET, "/live" | "/ready") => text(StatusCode::OK, "ok\n"),
                        _ => text(StatusCode::NOT_FOUND, "not found\n"),
                    })
                }
            });
            crate::limits::serve_admin_connection(stream, slot, service).await;
        });
    }
}

/// Runs `portcullis webhook` until SIGTERM or SIGINT.
pub async fn run(args: WebhookArgs) -> Result<(), Error> {
    let webhook = Webhook::bind(&args)?;
    let (listen, admin) = webhook.addrs();
    info!(listen = %listen, admin = %admin, "listening");
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        crate::drain::terminated().await;
        info!("stopping");
        stop.cancel();
    });
    webhook.run(shutdown).await
}
