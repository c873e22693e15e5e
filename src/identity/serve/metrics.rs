//! The identity service's own metrics, in their own registry (it is a
//! separate process from any sidecar).

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

use super::code::Code;

/// Every metric `ca serve` exports. Names are a contract.
pub struct CaMetrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub tokenreview_duration: Histogram,
    pub issuer_expiry: Gauge,
    pub issuer_reloads: IntCounterVec,
    /// `portcullis_ca_issuer_valid`: the newest issuer and bundle files are in use.
    pub issuer_valid: IntGauge,
}

impl CaMetrics {
    pub fn new() -> Self {
        let registry = crate::metrics::registry_with_process_metrics();
        let requests = IntCounterVec::new(
            Opts::new(
                "portcullis_ca_requests_total",
                "Certify requests by result (ok or the stable error code).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let tokenreview_duration = Histogram::with_opts(
            HistogramOpts::new(
                "portcullis_ca_tokenreview_duration_seconds",
                "Time taken by TokenReview calls to the Kubernetes API server.",
            )
            .buckets(crate::metrics::LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let issuer_expiry = Gauge::new(
            "portcullis_ca_issuer_expiry_timestamp_seconds",
            "Unix time at which the issuer in use expires.",
        )
        .expect("valid metric");
        let issuer_reloads = IntCounterVec::new(
            Opts::new(
                "portcullis_ca_issuer_reloads_total",
                "Issuer and trust bundle reloads by outcome.",
            ),
            &["result"],
        )
        .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(tokenreview_duration.clone()),
            Box::new(issuer_expiry.clone()),
            Box::new(issuer_reloads.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        for code in Code::ALL {
            requests.with_label_values(&[code.as_str()]);
        }
        for result in ["ok", "error"] {
            issuer_reloads.with_label_values(&[result]);
        }
        let issuer_valid = crate::metrics::validity_gauge(
            &registry,
            "portcullis_ca_issuer_valid",
            "issuer and trust bundle",
        );
        CaMetrics {
            issuer_valid,
            registry,
            requests,
            tokenreview_duration,
            issuer_expiry,
            issuer_reloads,
        }
    }

    pub fn count(&self, code: Code) {
        self.requests.with_label_values(&[code.as_str()]).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        crate::metrics::encode(&self.registry)
    }
}

impl Default for CaMetrics {
    fn default() -> Self {
        Self::new()
    }
}
