//! The authorization metrics, registered into the sidecar's one registry.
//! Labels are bounded: rule names (a fixed set per rule file) and fixed
//! words, never a path or a peer address.

use std::time::SystemTime;

use prometheus::{Gauge, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::{Decision, RuleSet};

/// Rule reloads, the active set, and decisions.
#[derive(Clone)]
pub struct AuthzMetrics {
    /// `portcullis_rules_reloads_total{result="ok"|"error"}`.
    pub reloads: IntCounterVec,
    /// `portcullis_rules_last_reload_success_timestamp_seconds`.
    pub last_success: Gauge,
    /// `portcullis_rules_info{hash}` = 1 for the active set only.
    pub info: IntGaugeVec,
    /// `portcullis_rules_active`.
    pub count: IntGauge,
    /// `portcullis_rules_valid`: 1 when the files on disk are the rules in
    /// force, 0 while the newest files are refused; the admin server sets
    /// it from the live rules' last error at every scrape.
    pub valid: IntGauge,
    /// `portcullis_authz_decisions_total{rule,action,decision}`.
    pub decisions: IntCounterVec,
    /// `portcullis_authz_connections_terminated_total{rule}`.
    pub connections_terminated: IntCounterVec,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl AuthzMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn new(registry: &Registry) -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(
                registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let m = AuthzMetrics {
            reloads: counter(
                "portcullis_rules_reloads_total",
                "Rule set reloads by outcome.",
                &["result"],
            ),
            last_success: register(
                registry,
                Gauge::new(
                    "portcullis_rules_last_reload_success_timestamp_seconds",
                    "Unix time of the last successful rule load.",
                )
                .expect("valid metric"),
            ),
            info: register(
                registry,
                IntGaugeVec::new(
                    Opts::new("portcullis_rules_info", "The active rule set (value 1)."),
                    &["hash"],
                )
                .expect("valid metric"),
            ),
            count: register(
                registry,
                IntGauge::new("portcullis_rules_active", "Rules in the active set.")
                    .expect("valid metric"),
            ),
            valid: crate::metrics::validity_gauge(registry, "portcullis_rules_valid", "rule files"),
            decisions: counter(
                "portcullis_authz_decisions_total",
                "Authorization decisions by deciding rule (or \"default\"), how it was decided, and outcome; audit matches are counted with action \"audit\".",
                &["rule", "action", "decision"],
            ),
            connections_terminated: counter(
                "portcullis_authz_connections_terminated_total",
                "Open connections closed because a new rule set denies them.",
                &["rule"],
            ),
        };
        for result in ["ok", "error"] {
            m.reloads.with_label_values(&[result]);
        }
        m
    }

    /// Shows `set` as the active set.
    pub fn set_active(&self, set: &RuleSet) {
        self.info.reset();
        self.info.with_label_values(&[set.hash()]).set(1);
        self.count.set(set.len() as i64);
        self.valid.set(1);
        let secs = set
            .loaded_at()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.last_success.set(secs);
    }

    /// Counts one decision, and each audit rule that matched.
    pub fn record(&self, d: &Decision) {
        self.decisions
            .with_label_values(&[&d.rule, d.action.label(), d.verdict()])
            .inc();
        for audit in &d.audits {
            self.decisions
                .with_label_values(&[audit, "audit", d.verdict()])
                .inc();
        }
    }

    /// Counts a connection closed after a rule change denied it.
    pub fn count_terminated(&self, rule: &str) {
        self.connections_terminated.with_label_values(&[rule]).inc();
    }
}
