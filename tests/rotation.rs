//! Tests 3 and 4: certificates rotate every second under load with no
//! failed connection, and a trust root is replaced without a restart.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_second_certificates_rotate_under_load_without_failures() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let bundle = ca.cert_pem();
    let ttl = ["--cert-ttl", "2s"];
    let pair = Pair::start(&ca, &ca.files.cert, &ttl, &ttl).await;
    let probe = client_config(ca.leaf("probe"), &bundle);

    // One long-lived stream through the pair for the whole run.
    let long = TcpStream::connect(pair.a.upstream()).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let long_task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut long = long;
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let msg = format!("ping {n:08}");
                long.write_all(msg.as_bytes())
                    .await
                    .expect("long stream write");
                let mut buf = vec![0u8; msg.len()];
                tokio::time::timeout(Duration::from_secs(5), long.read_exact(&mut buf))
                    .await
                    .expect("long stream echo in time")
                    .expect("long stream read");
                assert_eq!(buf, msg.as_bytes());
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            n
        })
    };

    let mut serials = HashSet::new();
    let mut connections = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        assert!(
            pair.ping(b"through the pair").await,
            "connection {connections} through the pair failed"
        );
        let direct = tls_connect(probe.clone(), pair.b.addrs.inbound)
            .await
            .expect("direct handshake");
        let serial = {
            let certs = direct.get_ref().1.peer_certificates().unwrap();
            let (_, x) = x509_parser::parse_x509_certificate(certs[0].as_ref()).unwrap();
            x.raw_serial_as_string()
        };
        assert_eq!(round_trip(direct, b"direct").await.unwrap(), b"direct");
        serials.insert(serial);
        connections += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let pings = long_task.await.expect("long-lived stream never failed");
    assert!(pings > 100, "long stream kept going ({pings} pings)");
    assert!(
        serials.len() >= 8,
        "saw {} distinct server serials in {connections} connections",
        serials.len()
    );
    let rotations = pair
        .b
        .metric("portcullis_cert_rotations_total", &[("result", "ok")]);
    assert!(rotations >= 10.0, "server rotated {rotations} times");
    assert_eq!(
        pair.b
            .metric("portcullis_cert_rotations_total", &[("result", "error")]),
        0.0
    );
}

/// Counts failed pings through `pair` until `stop` is set.
fn keep_pinging(pair: Arc<Pair>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, usize)> {
    tokio::spawn(async move {
        let ok = AtomicUsize::new(0);
        let failed = AtomicUsize::new(0);
        while !stop.load(Ordering::Relaxed) {
            if pair.ping(b"trust rotation").await {
                ok.fetch_add(1, Ordering::Relaxed);
            } else {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (ok.into_inner(), failed.into_inner())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_root_rotates_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let r1 = Ca::root(dir.path(), "r1", TD);
    let r2 = Ca::root(dir.path(), "r2", TD);
    // The files the sidecars use, changed in place as an operator would.
    let issuer_dir = dir.path().join("issuer");
    std::fs::create_dir(&issuer_dir).unwrap();
    let issuer = Ca {
        files: portcullis::identity::CaFiles::in_dir(&issuer_dir),
        dir: issuer_dir.clone(),
    };
    std::fs::copy(&r1.files.cert, &issuer.files.cert).unwrap();
    std::fs::copy(&r1.files.key, &issuer.files.key).unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, r1.cert_pem()).unwrap();
    let pair = Arc::new(Pair::start(&issuer, &bundle, &[], &[]).await);
    let stop = Arc::new(AtomicBool::new(false));
    let pinger = keep_pinging(pair.clone(), stop.clone());
    let both = |name: &'static str, result: &'static str, want: f64| {
        let pair = pair.clone();
        async move {
            let what = format!("{name}{{result={result}}} >= {want} on both sidecars");
            eventually(&what, Duration::from_secs(10), || async {
                pair.a.metric(name, &[("result", result)]) >= want
                    && pair.b.metric(name, &[("result", result)]) >= want
            })
            .await;
        }
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 1. Trust both roots.
    write_atomic(&bundle, &[r1.cert_pem(), r2.cert_pem()].concat());
    both("portcullis_trust_bundle_reloads_total", "ok", 1.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 2. Issue from the new root: both sidecars re-issue at once.
    write_atomic(&issuer.files.key, &std::fs::read(&r2.files.key).unwrap());
    write_atomic(&issuer.files.cert, &r2.cert_pem());
    both("portcullis_issuer_reloads_total", "ok", 1.0).await;
    both("portcullis_cert_rotations_total", "ok", 2.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 3. Drop the old root.
    write_atomic(&bundle, &r2.cert_pem());
    both("portcullis_trust_bundle_reloads_total", "ok", 2.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = pinger.await.unwrap();
    assert_eq!(
        failed,
        0,
        "{failed} of {} connections failed during the rotation",
        ok + failed
    );
    assert!(ok > 20, "only {ok} connections were tried");

    // A peer that chains only to the old root is now refused; one under the new root is served.
    // (It trusts both roots itself, so the refusal is the server's.)
    let old_peer = client_config(r1.leaf("old"), &[r1.cert_pem(), r2.cert_pem()].concat());
    let refused = match tls_connect(old_peer, pair.b.addrs.inbound).await {
        Err(_) => true,
        Ok(s) => round_trip(s, b"x")
            .await
            .map(|o| o.is_empty())
            .unwrap_or(true),
    };
    assert!(refused, "a peer under the dropped root was served");
    eventually(
        "refusal counted as untrusted",
        Duration::from_secs(5),
        || async {
            pair.b.metric(
                "portcullis_tls_handshakes_total",
                &[("result", "untrusted")],
            ) == 1.0
        },
    )
    .await;
    let new_peer = client_config(r2.leaf("new"), &r2.cert_pem());
    let s = tls_connect(new_peer, pair.b.addrs.inbound).await.unwrap();
    assert_eq!(round_trip(s, b"new root").await.unwrap(), b"new root");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_issuer_or_bundle_file_is_refused_and_the_old_one_stays() {
    let dir = tempfile::tempdir().unwrap();
    let r1 = Ca::root(dir.path(), "r1", TD);
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, r1.cert_pem()).unwrap();
    let pair = Pair::start(&r1, &bundle, &[], &[]).await;
    let rotations_before = pair
        .b
        .metric("portcullis_cert_rotations_total", &[("result", "ok")]);

    write_atomic(
        &bundle,
        b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    );
    write_atomic(&r1.files.key, b"not a key");
    eventually("both refusals counted", Duration::from_secs(10), || async {
        pair.b.metric(
            "portcullis_trust_bundle_reloads_total",
            &[("result", "error")],
        ) >= 1.0
            && pair
                .b
                .metric("portcullis_issuer_reloads_total", &[("result", "error")])
                >= 1.0
    })
    .await;
    assert!(
        pair.ping(b"still fine").await,
        "old issuer and bundle still in use"
    );
    assert_eq!(
        pair.b
            .metric("portcullis_cert_rotations_total", &[("result", "ok")]),
        rotations_before
    );
}
