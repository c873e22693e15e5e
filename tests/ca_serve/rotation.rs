//! Test 6 of issue 5: the identity service's issuer rotates without a restart.

use std::time::Duration;

use crate::common::*;
use crate::harness::*;
use crate::{OffsetNow, CLIENT};
use portcullis::identity::chains_to;

/// Test 6: issuer rotation, refusal of bad issuers, 503 under an expired
/// one, and the hash poll catching a missed file event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_rotation_and_reload() {
    let f = Fixture::new().await;
    // The service watches `watched/`, whose files are symlinks into `real/`:
    // writing into `real/` raises no event where the service looks.
    let watched = f.dir.path().join("watched");
    let real = f.dir.path().join("real");
    std::fs::create_dir_all(&watched).unwrap();
    std::fs::create_dir_all(&real).unwrap();
    for name in ["ca.crt", "ca.key"] {
        std::fs::copy(f.issuer_cert.with_file_name(name), real.join(name)).unwrap();
        std::os::unix::fs::symlink(real.join(name), watched.join(name)).unwrap();
    }
    let (cert, key) = (watched.join("ca.crt"), watched.join("ca.key"));
    let mut args = f.args(&["--issuer-poll-interval", "1s"]);
    args[1] = cert.display().to_string();
    args[3] = key.display().to_string();
    let ca = Service::start(&args).await;
    let bundle = f.bundle_pem();
    let first_serving = Client::connect(ca.addr, Some(&bundle)).await.peer_chain;
    let reloads = |r: &'static str| {
        let m = ca.metrics.clone();
        move || {
            let m = m.clone();
            async move {
                metric_value(
                    &m.encode(),
                    "portcullis_ca_issuer_reloads_total",
                    &[("result", r)],
                )
            }
        }
    };
    let ok = reloads("ok");
    let err = reloads("error");

    // Missed event: only the poll can see this one.
    let next = f.intermediate(Duration::from_secs(7200));
    write_atomic(
        &real.join("ca.crt"),
        format!("{}{}", next.cert_pem, next.chain_pem).as_bytes(),
    );
    write_atomic(&real.join("ca.key"), next.key_pem.as_bytes());
    eventually(
        "the poll reloads the issuer",
        Duration::from_secs(5),
        || {
            let ok = ok.clone();
            async move { ok().await >= 1.0 }
        },
    )
    .await;
    let next_cert =
        portcullis::identity::parse_cert_chain(&cert, next.cert_pem.as_bytes()).unwrap();
    let mut c = Client::connect(ca.addr, Some(&bundle)).await;
    assert!(
        chains_to(&c.peer_chain[..1], &next_cert),
        "serving certificate re-minted by the new issuer"
    );
    assert_ne!(c.peer_chain[0], first_serving[0]);
    let (_, body) = body_for(CLIENT);
    let a = c.certify(Some("client-token"), &body).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(
        chains_to(&a.chain()[..1], &next_cert),
        "new leaves chain to the new issuer"
    );

    // Refused: not a CA (a leaf), and an issuer of another root.
    let leaf = Ca::root(f.dir.path(), "other", TD);
    let foreign = leaf
        .issuer()
        .issue(&portcullis::identity::LeafRequest {
            id: id("x"),
            ttl: Duration::from_secs(3600),
        })
        .unwrap();
    write_atomic(&cert, foreign.chain_pem().as_bytes());
    write_atomic(&key, foreign.key_pem().as_bytes());
    eventually("a non-CA issuer is refused", Duration::from_secs(5), || {
        let err = err.clone();
        async move { err().await >= 1.0 }
    })
    .await;
    write_atomic(&cert, &leaf.cert_pem());
    write_atomic(&key, &std::fs::read(&leaf.files.key).unwrap());
    eventually(
        "an issuer of another root is refused",
        Duration::from_secs(5),
        || {
            let err = err.clone();
            async move { err().await >= 2.0 }
        },
    )
    .await;
    let a = Client::connect(ca.addr, Some(&bundle))
        .await
        .certify(Some("client-token"), &body)
        .await;
    assert!(
        chains_to(&a.chain()[..1], &next_cert),
        "the previous issuer stays"
    );

    // A short-lived issuer: once it expires, 503 and never a signature.
    let short = f.intermediate(Duration::from_secs(3));
    write_atomic(
        &cert,
        format!("{}{}", short.cert_pem, short.chain_pem).as_bytes(),
    );
    write_atomic(&key, short.key_pem.as_bytes());
    eventually(
        "the short-lived issuer is in use",
        Duration::from_secs(5),
        || {
            let ok = ok.clone();
            async move { ok().await >= 2.0 }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut c = Client::connect(ca.addr, None).await;
    let a = c.certify(Some("client-token"), &body).await;
    assert_eq!(
        (a.status, a.code()),
        (503, "issuer_unavailable"),
        "{}",
        a.body
    );
    assert!(a.retry_after().is_some());
    assert_eq!(http_get(ca.admin, "/ready").await.unwrap().0, 503);
    assert!(
        ca.metric("portcullis_ca_issuer_expiry_timestamp_seconds", &[]) <= OffsetNow::secs() as f64
    );
}
