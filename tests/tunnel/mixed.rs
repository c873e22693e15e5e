//! Rolling upgrades: a client with the tunnel off, and a server without
//! one, both still get through (over per-connection mTLS), and the
//! fallback is counted.

use crate::common::*;

fn metric(s: &Sidecar, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.metric(name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_the_tunnel_off_uses_a_connection_per_app_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let pair = Pair::start(&ca, &ca.files.cert, &["--tunnel", "off"], &[]).await;
    for _ in 0..3 {
        assert!(pair.ping(b"old client").await);
    }
    let handshakes = [("direction", "inbound"), ("result", "ok")];
    assert_eq!(
        metric(&pair.b, "portcullis_tls_handshakes_total", &handshakes),
        3.0
    );
    assert_eq!(
        metric(
            &pair.b,
            "portcullis_tunnel_connections_opened_total",
            &[("direction", "inbound")]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_a_tunnel_gets_per_connection_mtls_and_the_fallback_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let pair = Pair::start(&ca, &ca.files.cert, &[], &["--tunnel-listen", "off"]).await;
    for _ in 0..3 {
        assert!(pair.ping(b"old server").await);
    }
    let fallbacks = |reason| {
        metric(
            &pair.a,
            "portcullis_tunnel_fallbacks_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(fallbacks("no_h2"), 1.0, "the first connection learns it");
    assert_eq!(fallbacks("remembered"), 2.0, "the next ones remember it");
    assert_eq!(
        metric(
            &pair.b,
            "portcullis_tunnel_connections_opened_total",
            &[("direction", "inbound")]
        ),
        0.0
    );
    // The first connection was the fallback handshake itself: three app
    // connections, three handshakes, none wasted.
    assert_eq!(
        metric(
            &pair.a,
            "portcullis_tls_handshakes_total",
            &[("direction", "outbound"), ("result", "ok")]
        ),
        3.0
    );
}
