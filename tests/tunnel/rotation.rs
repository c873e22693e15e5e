//! Certificates and trust bundles change under a long-lived tunnel: no
//! stream may ride a connection whose certificate has expired, or whose
//! peer only a removed root vouches for.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::common::*;
use crate::support::*;

const LOAD_FOR: Duration = Duration::from_secs(20);
const WORKERS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_second_certificates_under_steady_new_connections_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let ttl = ["--cert-ttl", "2s"];
    let pair = Pair::start(&ca, &ca.files.cert, &ttl, &ttl).await;
    let upstream = pair.a.upstream();
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let deadline = Instant::now() + LOAD_FOR;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..WORKERS {
        let (ok, failed) = (ok.clone(), failed.clone());
        workers.spawn(async move {
            while Instant::now() < deadline {
                let good = match TcpStream::connect(upstream).await {
                    Ok(mut s) => echo_once(&mut s, b"tick").await,
                    Err(_) => false,
                };
                let counter = if good { &ok } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} of {} connections failed", ok + failed);
    assert!(ok > 200, "only {ok} connections in {LOAD_FOR:?}");
    // Certificates lived 2 s, so connections were replaced many times...
    let handshakes = pair.a.metric(
        "portcullis_tls_handshakes_total",
        &[("direction", "outbound"), ("result", "ok")],
    );
    assert!(
        handshakes >= 8.0,
        "only {handshakes} handshakes in 20 s of 2 s certificates"
    );
    // ...and the server never saw a stream on a connection whose client
    // certificate had expired.
    assert_eq!(
        pair.b.metric(
            "portcullis_tunnel_streams_total",
            &[("direction", "inbound"), ("result", "stale")]
        ),
        0.0
    );
}

/// Overwrites the issuer files of every sidecar issued by `from` with `to`'s.
fn swap_issuer(from: &Ca, to: &Ca) {
    write_atomic(&from.files.key, &std::fs::read(&to.files.key).unwrap());
    write_atomic(&from.files.cert, &std::fs::read(&to.files.cert).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_bundle_rotation_retires_connections_only_the_old_root_vouches_for() {
    let dir = tempfile::tempdir().unwrap();
    let r1 = Ca::root(dir.path(), "r1", TD);
    let r2 = Ca::root(dir.path(), "r2", TD);
    // The sidecars' issuer files start as R1; the bundle file is separate.
    let issuer = Ca::root(dir.path(), "issuer", TD);
    swap_issuer(&issuer, &r1);
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, r1.cert_pem()).unwrap();
    let fast = ["--file-poll-interval", "200ms"];
    let pair = Pair::start(&issuer, &bundle, &fast, &fast).await;
    let handshakes = |p: &Pair| {
        p.a.metric(
            "portcullis_tls_handshakes_total",
            &[("direction", "outbound"), ("result", "ok")],
        )
    };
    let reloads =
        |s: &Sidecar| s.metric("portcullis_trust_bundle_reloads_total", &[("result", "ok")]);
    assert!(pair.ping(b"r1").await);
    assert_eq!(handshakes(&pair), 1.0);

    // R1 + R2: the connection R1 verified is still vouched for.
    let both = [r1.cert_pem(), r2.cert_pem()].concat();
    let before = (reloads(&pair.a), reloads(&pair.b));
    write_atomic(&bundle, &both);
    eventually(
        "both sidecars load R1+R2",
        Duration::from_secs(10),
        || async { reloads(&pair.a) > before.0 && reloads(&pair.b) > before.1 },
    )
    .await;
    assert!(pair.ping(b"r1+r2").await);
    assert_eq!(handshakes(&pair), 1.0, "the tunnel stays");

    // New leaves from R2 (a new issuer is used at once).
    let rotations = |s: &Sidecar| s.metric("portcullis_cert_rotations_total", &[("result", "ok")]);
    let before = (rotations(&pair.a), rotations(&pair.b));
    swap_issuer(&issuer, &r2);
    eventually(
        "both sidecars hold R2 leaves",
        Duration::from_secs(10),
        || async { rotations(&pair.a) > before.0 && rotations(&pair.b) > before.1 },
    )
    .await;
    assert!(pair.ping(b"r2 leaves").await);
    assert_eq!(handshakes(&pair), 1.0, "still the connection R1 verified");

    // R2 only: that connection is retired, a new one is verified by R2.
    let before = (reloads(&pair.a), reloads(&pair.b));
    write_atomic(&bundle, &r2.cert_pem());
    eventually("both sidecars load R2", Duration::from_secs(10), || async {
        reloads(&pair.a) > before.0 && reloads(&pair.b) > before.1
    })
    .await;
    assert!(pair.ping(b"r2 only").await);
    assert_eq!(handshakes(&pair), 2.0, "a new handshake, verified by R2");
    assert_eq!(
        pair.a.metric(
            "portcullis_tunnel_connections_opened_total",
            &[("direction", "outbound")]
        ),
        2.0
    );
}
