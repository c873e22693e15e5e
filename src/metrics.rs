//! The sidecar's Prometheus metrics: one typed struct registered into one
//! registry made at start-up (no global registry), so tests can run many
//! sidecars in one process and read each one's numbers.

pub mod conn_series;
pub mod peers;
pub mod tunnel;

use std::time::SystemTime;

use self::peers::PEER_LABELS;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Buckets of every latency histogram, in seconds: the first ones tell
/// 100 µs from 1 ms (a proxy hop on loopback is tens of microseconds), the
/// last ones reach the 10 s a slow upstream may take.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Buckets of the HTTP body size histograms, in bytes: 0 (no body) on its
/// own, then powers of four from 64 B to 64 MiB.
pub const SIZE_BUCKETS: &[f64] = &[
    0.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];

/// The labels of the TCP connection and byte metrics: the direction, the
/// app's port, and the peer (inbound: the caller; outbound: the server
/// identity the sidecar verified).
pub const CONN_LABELS: [&str; 5] = [
    "direction",
    "port",
    PEER_LABELS[0],
    PEER_LABELS[1],
    PEER_LABELS[2],
];

/// A registry holding the `process_*` metrics of this process (CPU seconds,
/// resident memory, open and maximum descriptors, start time), read from
/// procfs at every scrape. Each server (sidecar, `ca serve`, webhook) makes
/// its registry here.
pub fn registry_with_process_metrics() -> Registry {
    let registry = Registry::new();
    registry
        .register(Box::new(crate::logging::dropped_lines()))
        .expect("unique metric");
    #[cfg(target_os = "linux")]
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("unique metric");
    registry
}

/// A 0/1 gauge saying whether the newest version of a file-backed input is
/// the one in force (1), or was refused and an older one stays in use (0).
pub fn validity_gauge(registry: &Registry, name: &str, what: &str) -> IntGauge {
    let g = IntGauge::new(
        name,
        format!("1 when the newest {what} is the one in use, 0 while the newest was refused and the previous one stays in force."),
    )
    .expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g.set(1);
    g
}

/// Every metric the sidecar exports. Names are a contract (dashboards, alerts).
pub struct Metrics {
    registry: Registry,
    pub connections_opened: IntCounterVec,
    pub connections_closed: IntCounterVec,
    pub connections_open: IntGaugeVec,
    pub received_bytes: IntCounterVec,
    pub sent_bytes: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub tls_handshake_duration: HistogramVec,
    /// `portcullis_tls_key_exchanges_total{direction,group}`: the group each
    /// successful mesh handshake used (is the mesh post-quantum yet?).
    pub tls_key_exchanges: IntCounterVec,
    pub cert_expiry: Gauge,
    pub cert_rotations: IntCounterVec,
    pub trust_bundle_reloads: IntCounterVec,
    pub issuer_reloads: IntCounterVec,
    /// `portcullis_trust_bundle_valid`: see [`validity_gauge`].
    pub trust_bundle_valid: IntGauge,
    /// `portcullis_issuer_valid` (mounted issuer only; always 1 otherwise).
    pub issuer_valid: IntGauge,
    /// `portcullis_ready`: what `/ready` answers (1 for 200), updated at
    /// every scrape, so "not ready for 5 minutes" can be an alert.
    pub ready: IntGauge,
    /// The peer labels of per-peer metrics, capped (`--metrics-max-peers`).
    pub peers: peers::PeerLabels,
    /// The connection series of each (direction, port, peer), resolved once.
    pub conn_series: conn_series::ConnSeriesCache,
    /// `portcullis_access_log_dropped_total`: lines lost to a full queue.
    pub access_log_dropped: prometheus::IntCounter,
    /// `portcullis_opaque_request_lines_total`: connections carried as
    /// opaque bytes reset because their first line became a request line.
    pub opaque_request_lines: prometheus::IntCounter,
    pub build_info: IntGaugeVec,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    /// `portcullis_http_request_size_bytes{direction, port}`: request body
    /// bytes passed to the app.
    pub http_request_size: HistogramVec,
    /// `portcullis_http_response_size_bytes{direction, port}`: response
    /// body bytes sent to the peer.
    pub http_response_size: HistogramVec,
    /// Failed accepts by listener and reason (`fd_limit`: out of descriptors).
    pub accept_errors: IntCounterVec,
    /// Admin connections closed or refused to keep the admin port answering.
    pub admin_connections_dropped: IntCounterVec,
    /// The mesh tunnel's connections, streams, pool and fallbacks.
    pub tunnel: tunnel::TunnelMetrics,
    /// `portcullis_worker_connections{worker}`: connections each worker
    /// thread serves, open now.
    pub worker_connections: IntGaugeVec,
    /// `portcullis_http_app_connections_opened_total`: HTTP/1 connections
    /// the inbound path opened to the app (other requests reuse them).
    pub app_connections_opened: IntCounter,
    /// `portcullis_http_app_connections_idle`: HTTP/1 connections to the
    /// app kept for the next request, now.
    pub app_connections_idle: IntGauge,
    /// `portcullis_http_app_requests_resent_total`: requests sent again on
    /// a new connection after an idle one ended without an answer.
    pub app_requests_resent: IntCounter,
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

/// A counter without labels, registered.
fn single_counter(registry: &Registry, name: &str, help: &str) -> prometheus::IntCounter {
    let c = prometheus::IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

impl Metrics {
    pub fn new() -> Self {
        let registry = registry_with_process_metrics();
        let r = &registry;
        let connections_open = IntGaugeVec::new(
            Opts::new(
                "portcullis_tcp_connections_open",
                "TCP connections open now.",
            ),
            &CONN_LABELS,
        )
        .expect("valid metric");
        r.register(Box::new(connections_open.clone()))
            .expect("unique metric");
        let tls_handshake_duration = HistogramVec::new(
            HistogramOpts::new(
                "portcullis_tls_handshake_duration_seconds",
                "Time to complete a TLS handshake.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["direction"],
        )
        .expect("valid metric");
        r.register(Box::new(tls_handshake_duration.clone()))
            .expect("unique metric");
        let cert_expiry = Gauge::new(
            "portcullis_cert_expiry_timestamp_seconds",
            "Unix time at which the current leaf certificate expires.",
        )
        .expect("valid metric");
        r.register(Box::new(cert_expiry.clone()))
            .expect("unique metric");
        let build_info = IntGaugeVec::new(
            Opts::new("portcullis_build_info", "Build information (value 1)."),
            &["version"],
        )
        .expect("valid metric");
        r.register(Box::new(build_info.clone()))
            .expect("unique metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let http_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "portcullis_http_request_duration_seconds",
                "Time from a request's arrival to its response headers.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &[
                "direction",
                "port",
                PEER_LABELS[0],
                PEER_LABELS[1],
                PEER_LABELS[2],
            ],
        )
        .expect("valid metric");
        r.register(Box::new(http_request_duration.clone()))
            .expect("unique metric");
        Metrics {
            tunnel: tunnel::TunnelMetrics::new(r),
            http_requests: counter(
                r,
                "portcullis_http_requests_total",
                "HTTP requests by response status and calling peer (methods outside the standard set count as other).",
                &[
                    "direction",
                    "port",
                    "method",
                    "status_code",
                    PEER_LABELS[0],
                    PEER_LABELS[1],
                    PEER_LABELS[2],
                ],
            ),
            http_request_duration,
            http_request_size: histogram(
                r,
                "portcullis_http_request_size_bytes",
                "Request body bytes passed to the app (0 for a request answered by the sidecar itself, whose body is not read).",
                SIZE_BUCKETS,
                &["direction", "port"],
            ),
            http_response_size: histogram(
                r,
                "portcullis_http_response_size_bytes",
                "Response body bytes sent to the peer.",
                SIZE_BUCKETS,
                &["direction", "port"],
            ),
            trust_bundle_valid: validity_gauge(
                r,
                "portcullis_trust_bundle_valid",
                "trust bundle",
            ),
            issuer_valid: validity_gauge(r, "portcullis_issuer_valid", "issuer (CA files)"),
            conn_series: Default::default(),
            peers: peers::PeerLabels::new(single_counter(
                r,
                "portcullis_metrics_peers_overflow_total",
                "Connections whose peer was counted as \"other\" because --metrics-max-peers distinct peers already have their own series.",
            )),
            access_log_dropped: single_counter(
                r,
                "portcullis_access_log_dropped_total",
                "Access log lines dropped because the writer lagged behind (the data path never waits for it).",
            ),
            opaque_request_lines: single_counter(
                r,
                "portcullis_opaque_request_lines_total",
                "Inbound connections reset because their first line, sent late, slowly or after bytes the HTTP sniff gave up on, turned out to be an HTTP request line (the app never gets it unparsed).",
            ),
            ready: {
                let g = IntGauge::new(
                    "portcullis_ready",
                    "1 when /ready answers 200 (listeners bound, a certificate held, not draining), updated at every scrape.",
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            connections_opened: counter(
                r,
                "portcullis_tcp_connections_opened_total",
                "TCP connections accepted (inbound: once the peer is accepted; outbound: once the server is verified, or at accept for plain TCP).",
                &CONN_LABELS,
            ),
            connections_closed: counter(
                r,
                "portcullis_tcp_connections_closed_total",
                "TCP connections closed.",
                &CONN_LABELS,
            ),
            received_bytes: counter(
                r,
                "portcullis_tcp_received_bytes_total",
                "Payload bytes received from the accepted side of a connection (HTTP connections included).",
                &CONN_LABELS,
            ),
            sent_bytes: counter(
                r,
                "portcullis_tcp_sent_bytes_total",
                "Payload bytes sent to the accepted side of a connection (HTTP connections included).",
                &CONN_LABELS,
            ),
            tls_handshakes: counter(
                r,
                "portcullis_tls_handshakes_total",
                "Mesh TLS handshakes by outcome.",
                &["direction", "result"],
            ),
            tls_key_exchanges: counter(
                r,
                "portcullis_tls_key_exchanges_total",
                "Successful mesh TLS handshakes by key exchange group: x25519mlkem768 (post-quantum hybrid), x25519, secp256r1, secp384r1, other.",
                &["direction", "group"],
            ),
            cert_rotations: counter(
                r,
                "portcullis_cert_rotations_total",
                "Leaf certificate renewals by outcome.",
                &["result"],
            ),
            trust_bundle_reloads: counter(
                r,
                "portcullis_trust_bundle_reloads_total",
                "Trust bundle reloads by outcome.",
                &["result"],
            ),
            issuer_reloads: counter(
                r,
                "portcullis_issuer_reloads_total",
                "Issuer (CA files) reloads by outcome.",
                &["result"],
            ),
            accept_errors: counter(
                r,
                "portcullis_accept_errors_total",
                "Failed accepts by listener; reason fd_limit means out of file descriptors (the connection was refused), handoff that it could not move to another worker thread (closed).",
                &["listener", "reason"],
            ),
            admin_connections_dropped: counter(
                r,
                "portcullis_admin_connections_dropped_total",
                "Admin connections closed or refused to keep the admin port answering: no_request (no request in time), evicted (idle, its slot given to a new one), full (every slot busy).",
                &["reason"],
            ),
            worker_connections: gauge(
                r,
                "portcullis_worker_connections",
                "Connections (inbound, tunnel and outbound) each worker thread (--worker-threads) serves, open now.",
                &["worker"],
            ),
            app_connections_opened: counter(
                r,
                "portcullis_http_app_connections_opened_total",
                "HTTP/1 connections the inbound path opened to the app; its other requests reused pooled ones.",
                &[],
            )
            .with_label_values::<&str>(&[]),
            app_connections_idle: gauge(
                r,
                "portcullis_http_app_connections_idle",
                "HTTP/1 connections to the app kept idle for the next request, now.",
                &[],
            )
            .with_label_values::<&str>(&[]),
            app_requests_resent: counter(
                r,
                "portcullis_http_app_requests_resent_total",
                "GET, HEAD and OPTIONS requests without a body sent again on a new HTTP/1 connection to the app after a connection idle for 1 s or more ended at once without one byte of an answer.",
                &[],
            )
            .with_label_values::<&str>(&[]),
            connections_open,
            tls_handshake_duration,
            cert_expiry,
            build_info,
            registry,
        }
        .with_known_series()
    }

    /// Creates the series every dashboard expects, at zero, so that
    /// `rate()` and absence alerts work before the first event.
    fn with_known_series(self) -> Self {
        for result in ["ok", "error"] {
            self.cert_rotations.with_label_values(&[result]);
            self.trust_bundle_reloads.with_label_values(&[result]);
            self.issuer_reloads.with_label_values(&[result]);
        }
        for direction in ["inbound", "outbound"] {
            self.tls_handshakes.with_label_values(&[direction, "ok"]);
            self.tls_handshake_duration.with_label_values(&[direction]);
        }
        self
    }

    /// Counts one successful mesh handshake under the group it negotiated.
    pub fn count_key_exchange(&self, direction: &str, conn: &rustls::CommonState) {
        let group = crate::tls::kx_group_label(conn);
        self.tls_key_exchanges
            .with_label_values(&[direction, group])
            .inc();
    }

    pub fn set_cert_expiry(&self, not_after: SystemTime) {
        let secs = not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.cert_expiry.set(secs);
    }

    /// The registry, for later modules to register their own metrics into.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

/// The Prometheus text exposition of a registry (every server's `/metrics`).
pub fn encode(registry: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .expect("text encoding cannot fail");
    String::from_utf8(buf).expect("exposition is utf-8")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
