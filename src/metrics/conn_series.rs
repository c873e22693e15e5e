//! The labelled series a connection touches, resolved once per (direction,
//! app port, peer) and shared by every connection with those labels.
//! Looking a series up hashes all its label values under a lock; a
//! connection through the mesh would otherwise do that five to nine times
//! as it opens, which a client opening a connection per request pays on
//! every request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use http::StatusCode;
use prometheus::{Histogram, IntCounter, IntGauge};

use super::peers::PeerLabel;
use super::Metrics;

/// Label sets kept at most; past this the cache starts again (it holds
/// handles only: the series and their values stay in the registry).
const MAX_CACHED: usize = 4096;

/// The most (method, status) request counters one label set keeps at hand.
const MAX_REQUEST_COUNTERS: usize = 16;

/// The series of one (direction, port, peer).
pub struct ConnSeries {
    pub direction: &'static str,
    /// The app's port, as a label value.
    pub port: String,
    pub peer: Arc<PeerLabel>,
    pub opened: IntCounter,
    pub open: IntGauge,
    pub closed: IntCounter,
    pub received: IntCounter,
    pub sent: IntCounter,
    http: OnceLock<HttpSeries>,
}

/// The HTTP series of one (direction, port, peer), for connections served
/// as HTTP.
pub struct HttpSeries {
    pub request_size: Histogram,
    pub response_size: Histogram,
    pub duration: Histogram,
    /// `portcullis_http_requests_total` by the (method, status) pairs seen.
    requests: Mutex<Vec<(&'static str, StatusCode, IntCounter)>>,
}

/// The cache key: the peer's labels by identity (a [`ConnSeries`] in the
/// map holds its `Arc`, so no other label can take that address meanwhile).
#[derive(PartialEq, Eq, Hash)]
struct Key {
    direction: &'static str,
    port: u16,
    peer: usize,
}

#[derive(Default)]
pub struct ConnSeriesCache {
    map: Mutex<HashMap<Key, Arc<ConnSeries>>>,
}

impl ConnSeriesCache {
    /// The series of connections in `direction` to `port` with `peer`.
    pub fn get(
        &self,
        metrics: &Metrics,
        direction: &'static str,
        port: u16,
        peer: Arc<PeerLabel>,
    ) -> Arc<ConnSeries> {
        let key = Key {
            direction,
            port,
            peer: Arc::as_ptr(&peer) as usize,
        };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(series) = map.get(&key) {
            return series.clone();
        }
        if map.len() >= MAX_CACHED {
            map.clear();
        }
        let series = Arc::new(ConnSeries::resolve(metrics, direction, port, peer));
        map.insert(key, series.clone());
        series
    }
}

impl ConnSeries {
    fn resolve(
        metrics: &Metrics,
        direction: &'static str,
        port: u16,
        peer: Arc<PeerLabel>,
    ) -> Self {
        let port = port.to_string();
        let [td, ns, sa] = peer.values();
        let labels = [direction, port.as_str(), td, ns, sa];
        ConnSeries {
            opened: metrics.connections_opened.with_label_values(&labels),
            open: metrics.connections_open.with_label_values(&labels),
            closed: metrics.connections_closed.with_label_values(&labels),
            received: metrics.received_bytes.with_label_values(&labels),
            sent: metrics.sent_bytes.with_label_values(&labels),
            http: OnceLock::new(),
            direction,
            port,
            peer,
        }
    }

    /// The HTTP series, resolved at the first HTTP connection.
    pub fn http(&self, metrics: &Metrics) -> &HttpSeries {
        self.http.get_or_init(|| {
            let [td, ns, sa] = self.peer.values();
            let sizes = [self.direction, self.port.as_str()];
            HttpSeries {
                request_size: metrics.http_request_size.with_label_values(&sizes),
                response_size: metrics.http_response_size.with_label_values(&sizes),
                duration: metrics.http_request_duration.with_label_values(&[
                    self.direction,
                    &self.port,
                    td,
                    ns,
                    sa,
                ]),
                requests: Mutex::default(),
            }
        })
    }

    /// Counts one request in `portcullis_http_requests_total`.
    pub fn count_request(&self, metrics: &Metrics, method: &'static str, status: StatusCode) {
        let http = self.http(metrics);
        let mut cached = http.requests.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, counter)) = cached.iter().find(|(m, s, _)| *m == method && *s == status)
        {
            return counter.inc();
        }
        let [td, ns, sa] = self.peer.values();
        let counter = metrics.http_requests.with_label_values(&[
            self.direction,
            &self.port,
            method,
            status.as_str(),
            td,
            ns,
            sa,
        ]);
        counter.inc();
        if cached.len() < MAX_REQUEST_COUNTERS {
            cached.push((method, status, counter));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::Peer;
    use crate::identity::SpiffeId;

    fn value(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = metrics.encode();
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| {
                labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    }

    #[test]
    fn connections_with_the_same_labels_share_series_and_others_do_not() {
        let metrics = Metrics::new();
        let web = Peer::Mesh(SpiffeId::parse("spiffe://cluster.local/ns/web/sa/a").unwrap());
        let db = Peer::Mesh(SpiffeId::parse("spiffe://cluster.local/ns/db/sa/b").unwrap());
        let get = |dir, port, peer: &Peer| {
            let label = metrics.peers.label(peer);
            metrics.conn_series.get(&metrics, dir, port, label)
        };
        let a = get("inbound", 8080, &web);
        assert!(Arc::ptr_eq(&a, &get("inbound", 8080, &web)));
        for other in [
            get("outbound", 8080, &web),
            get("inbound", 8081, &web),
            get("inbound", 8080, &db),
        ] {
            assert!(!Arc::ptr_eq(&a, &other));
        }
        a.opened.inc();
        get("inbound", 8080, &web).opened.inc();
        get("inbound", 8080, &db).opened.inc();
        let total = "portcullis_tcp_connections_opened_total";
        let web_8080 = [
            ("direction", "inbound"),
            ("port", "8080"),
            ("peer_namespace", "web"),
        ];
        assert_eq!(value(&metrics, total, &web_8080), 2.0);
        assert_eq!(value(&metrics, total, &[("peer_namespace", "db")]), 1.0);
    }

    #[test]
    fn request_counters_are_labelled_by_method_and_status_past_the_cached_ones() {
        let metrics = Metrics::new();
        let label = metrics.peers.label(&Peer::Unauthenticated);
        let series = metrics.conn_series.get(&metrics, "inbound", 80, label);
        // More (method, status) pairs than are kept at hand: all counted.
        for code in 200..(200 + MAX_REQUEST_COUNTERS as u16 + 4) {
            let status = StatusCode::from_u16(code).unwrap();
            series.count_request(&metrics, "GET", status);
            series.count_request(&metrics, "GET", status);
        }
        let requests = "portcullis_http_requests_total";
        let ok = [("method", "GET"), ("status_code", "200")];
        assert_eq!(value(&metrics, requests, &ok), 2.0);
        let last = [("method", "GET"), ("status_code", "219")];
        assert_eq!(value(&metrics, requests, &last), 2.0);
        let all = [("direction", "inbound"), ("port", "80")];
        assert_eq!(value(&metrics, requests, &all), 40.0);
    }

    #[test]
    fn the_cache_is_bounded_and_starts_again_without_losing_counts() {
        let metrics = Metrics::new();
        let label = metrics.peers.label(&Peer::Unauthenticated);
        let first = metrics
            .conn_series
            .get(&metrics, "outbound", 1, label.clone());
        first.sent.inc_by(7);
        for port in 2..=(MAX_CACHED as u16 + 1) {
            metrics
                .conn_series
                .get(&metrics, "outbound", port, label.clone());
        }
        assert!(metrics.conn_series.map.lock().unwrap().len() <= MAX_CACHED);
        let again = metrics.conn_series.get(&metrics, "outbound", 1, label);
        assert!(!Arc::ptr_eq(&first, &again), "the full cache started again");
        again.sent.inc_by(3);
        let sent = "portcullis_tcp_sent_bytes_total";
        assert_eq!(value(&metrics, sent, &[("port", "1")]), 10.0);
    }
}
