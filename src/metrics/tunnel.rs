//! Metrics of the mesh tunnel (pooled HTTP/2 CONNECT between sidecars):
//! enough to see that connections are reused, why streams were refused, and
//! how often a peer without a tunnel made us fall back.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// `direction` is `inbound` (we serve the tunnel) or `outbound` (our pool).
pub struct TunnelMetrics {
    pub connections_open: IntGaugeVec,
    pub connections_opened: IntCounterVec,
    pub streams: IntCounterVec,
    pub streams_active: IntGaugeVec,
    pub pool: IntCounterVec,
    pub fallbacks: IntCounterVec,
    /// Tunnel connections closed after the handshake, by reason.
    pub connections_refused: IntCounterVec,
    /// The series every stream touches, resolved once per direction.
    pub inbound: StreamSeries,
    pub outbound: StreamSeries,
    /// `portcullis_tunnel_pool_requests_total{result="hit"}`.
    pub pool_hits: IntCounter,
}

/// A direction's `streams_total{result="ok"}` and `streams_active`.
pub struct StreamSeries {
    pub ok: IntCounter,
    pub active: IntGauge,
}

impl StreamSeries {
    fn new(streams: &IntCounterVec, active: &IntGaugeVec, direction: &str) -> Self {
        StreamSeries {
            ok: streams.with_label_values(&[direction, "ok"]),
            active: active.with_label_values(&[direction]),
        }
    }
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

impl TunnelMetrics {
    pub fn new(r: &Registry) -> Self {
        let streams = counter(
            r,
            "portcullis_tunnel_streams_total",
            "Tunnel streams (one per app connection) by result.",
            &["direction", "result"],
        );
        let streams_active = gauge(
            r,
            "portcullis_tunnel_streams_active",
            "Tunnel streams open now.",
            &["direction"],
        );
        let pool = counter(
            r,
            "portcullis_tunnel_pool_requests_total",
            "Outbound app connections that found a pooled tunnel connection with room (hit) or needed a new one (miss).",
            &["result"],
        );
        let m = TunnelMetrics {
            connections_open: gauge(
                r,
                "portcullis_tunnel_connections_open",
                "Tunnel (HTTP/2 over mesh mTLS) connections open now.",
                &["direction"],
            ),
            connections_opened: counter(
                r,
                "portcullis_tunnel_connections_opened_total",
                "Tunnel connections established (each one is one mTLS handshake).",
                &["direction"],
            ),
            inbound: StreamSeries::new(&streams, &streams_active, "inbound"),
            outbound: StreamSeries::new(&streams, &streams_active, "outbound"),
            pool_hits: pool.with_label_values(&["hit"]),
            streams,
            streams_active,
            pool,
            connections_refused: counter(
                r,
                "portcullis_tunnel_connections_refused_total",
                "Tunnel connections closed after their handshake (source_limit: the source address already held --tunnel-max-connections-per-source).",
                &["reason"],
            ),
            fallbacks: counter(
                r,
                "portcullis_tunnel_fallbacks_total",
                "Outbound app connections sent over per-connection mTLS because the peer has no tunnel (refused: nothing listens on its tunnel port; no_h2: the peer does not speak it; remembered: a recent refusal).",
                &["reason"],
            ),
        };
        for direction in ["inbound", "outbound"] {
            m.connections_open.with_label_values(&[direction]);
            m.connections_opened.with_label_values(&[direction]);
        }
        m.pool.with_label_values(&["miss"]);
        m.connections_refused.with_label_values(&["source_limit"]);
        for reason in ["refused", "timeout", "no_h2", "remembered"] {
            m.fallbacks.with_label_values(&[reason]);
        }
        m
    }
}
