//! Tests 7 and 8 of issue 5: sidecars run with `--ca-url` against the
//! identity service.

use std::time::Duration;

use crate::common::*;
use crate::harness::*;
use crate::OffsetNow;
use portcullis::config::CertSource;

/// Test 7: two sidecars get their certificates from the service, keep
/// working while it is down, and recover when it returns, even after their
/// certificates expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_with_ca_url_survive_an_outage() {
    let f = Fixture::new().await;
    let ca = Service::start(&f.args(&[])).await;
    let ca_addr = ca.addr;
    let url = format!("https://{HOST}:{}", ca_addr.port());
    let echo = echo_server().await;
    let tokens = f.dir.path();
    std::fs::write(tokens.join("server-token"), "server-token").unwrap();
    std::fs::write(tokens.join("client-token"), "client-token").unwrap();
    let bundle = f.bundle.display().to_string();
    let remote = |sa: &str| {
        let token = tokens.join(format!("{sa}-token")).display().to_string();
        vec![
            "--ca-url".to_string(),
            url.clone(),
            "--ca-token-file".into(),
            token,
            "--trust-bundle".into(),
            bundle.clone(),
            "--service-account".into(),
            sa.into(),
            "--cert-ttl".into(),
            "3s".into(),
        ]
    };
    let point = |s: &mut portcullis::config::Settings| {
        if let CertSource::Remote { connect_to, .. } = &mut s.cert_source {
            *connect_to = Some(ca_addr);
        }
    };
    let mut b_args = remote("server");
    b_args.extend(["--inbound-target".into(), echo.to_string()]);
    let b = Sidecar::spawn_with(&b_args, point).await;
    b.wait_ready().await;
    let mut a_args = remote("client");
    a_args.extend([
        "--upstream".into(),
        format!("127.0.0.1:0={}={}", b.addrs.inbound, id("server")),
    ]);
    let a = Sidecar::spawn_with(&a_args, point).await;
    a.wait_ready().await;
    let pair = Pair { a, b, app: echo };
    assert!(pair.ping(b"through the pair").await);

    // The service goes down.
    ca.stop().await;
    assert!(
        pair.ping(b"still valid").await,
        "traffic continues on the still-valid certificates"
    );
    for s in [&pair.a, &pair.b] {
        let m = s.metrics.clone();
        eventually(
            "the sidecar backs off and counts ca_unreachable",
            Duration::from_secs(10),
            || {
                let m = m.clone();
                async move {
                    metric_value(
                        &m.encode(),
                        "portcullis_cert_rotations_total",
                        &[("result", "ca_unreachable")],
                    ) >= 2.0
                }
            },
        )
        .await;
    }
    let expiry = pair
        .b
        .metric("portcullis_cert_expiry_timestamp_seconds", &[]);
    let wait = (expiry - OffsetNow::secs() as f64 + 1.0).max(0.0);
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    assert!(
        pair.b
            .metric("portcullis_cert_expiry_timestamp_seconds", &[])
            < OffsetNow::secs() as f64,
        "certificates expired"
    );
    assert_eq!(
        http_get(pair.b.addrs.admin, "/ready").await.unwrap().0,
        200,
        "ready stays true"
    );

    // It returns on the same address: both recover by themselves.
    let mut args = f.args(&[]);
    args[9] = ca_addr.to_string();
    let ok_before = pair
        .a
        .metric("portcullis_cert_rotations_total", &[("result", "ok")]);
    let ca = Service::start(&args).await;
    eventually("traffic flows again", Duration::from_secs(20), || {
        pair.ping(b"recovered")
    })
    .await;
    assert!(
        pair.a
            .metric("portcullis_cert_rotations_total", &[("result", "ok")])
            > ok_before
    );
    assert!(ca.requests("ok") >= 2.0);
    ca.stop().await;
}

/// Test 8: a service with a certificate from another root (or for another
/// name) never receives the sidecar's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_never_sends_its_token_to_an_untrusted_service() {
    let f = Fixture::new().await;
    // Another root, same trust domain, running a real identity service.
    let evil_root = Ca::root(f.dir.path(), "evil", TD);
    let mut evil_args = f.args(&[]);
    evil_args[1] = evil_root.files.cert.display().to_string();
    evil_args[3] = evil_root.files.key.display().to_string();
    evil_args[5] = evil_root.files.cert.display().to_string();
    let evil = Service::start(&evil_args).await;
    // The right root, but serving another name.
    let renamed = Service::start(&f.args(&["--service-name", "not-the-ca"])).await;
    let token = f.dir.path().join("token");
    std::fs::write(&token, "client-token").unwrap();
    let url = format!("https://{HOST}:15012");
    for target in [evil.addr, renamed.addr] {
        let args = [
            "--ca-url",
            &url,
            "--ca-token-file",
            token.to_str().unwrap(),
            "--trust-bundle",
            f.bundle.to_str().unwrap(),
            "--service-account",
            "client",
        ];
        let s = Sidecar::spawn_with(&args, |s| {
            if let CertSource::Remote { connect_to, .. } = &mut s.cert_source {
                *connect_to = Some(target);
            }
        })
        .await;
        let m = s.metrics.clone();
        eventually(
            "the sidecar refuses the service",
            Duration::from_secs(10),
            || {
                let m = m.clone();
                async move {
                    metric_value(
                        &m.encode(),
                        "portcullis_cert_rotations_total",
                        &[("result", "ca_untrusted")],
                    ) >= 2.0
                }
            },
        )
        .await;
        assert_eq!(http_get(s.addrs.admin, "/ready").await.unwrap().0, 503);
        s.drain.begin();
    }
    for svc in [&evil, &renamed] {
        let total: f64 = metric_value(&svc.metrics.encode(), "portcullis_ca_requests_total", &[]);
        assert_eq!(total, 0.0, "no request reached the service");
    }
    assert!(
        f.api.reviews().is_empty(),
        "the token was never reviewed, so never sent"
    );
}

/// Issue 6: a root rotation reaches running sidecars without a restart: the
/// sidecar fetches the service's bundle over a connection verified with the
/// bundle it already holds, and uses it for the next handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_refreshes_its_trust_bundle_from_the_service() {
    let f = Fixture::new().await;
    let ca = Service::start(&f.args(&["--issuer-poll-interval", "200ms"])).await;
    let ca_addr = ca.addr;
    let url = format!("https://{HOST}:{}", ca_addr.port());
    std::fs::write(f.dir.path().join("server-token"), "server-token").unwrap();
    // The sidecar's own bundle file is a copy: only the service changes.
    let own_bundle = f.dir.path().join("sidecar-bundle.pem");
    std::fs::write(&own_bundle, f.bundle_pem()).unwrap();
    let args = [
        "--ca-url".to_string(),
        url,
        "--ca-token-file".into(),
        f.dir.path().join("server-token").display().to_string(),
        "--trust-bundle".into(),
        own_bundle.display().to_string(),
        "--trust-bundle-refresh".into(),
        "200ms".into(),
        "--service-account".into(),
        "server".into(),
        "--inbound-target".into(),
        "127.0.0.1:9".into(),
    ];
    let b = Sidecar::spawn_with(&args, |s| {
        if let CertSource::Remote { connect_to, .. } = &mut s.cert_source {
            *connect_to = Some(ca_addr);
        }
    })
    .await;
    b.wait_ready().await;
    let admin = b.addrs.admin;
    let roots = move || async move {
        let (_, body) = http_get(admin, "/certs").await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["trust_bundle"].as_array().map(|a| a.len()).unwrap_or(0)
    };
    assert_eq!(roots().await, 1);

    // The operator adds a second root at the service.
    let td = portcullis::identity::TrustDomain::new(TD).unwrap();
    let new_root = portcullis::identity::NewCa::root(&td, Duration::from_secs(3600)).unwrap();
    let both = [f.bundle_pem(), new_root.cert_pem.into_bytes()].concat();
    write_atomic(&f.bundle, &both);
    eventually(
        "the sidecar holds both roots",
        Duration::from_secs(10),
        || async { roots().await == 2 },
    )
    .await;
    assert!(b.metric("portcullis_trust_bundle_reloads_total", &[("result", "ok")]) >= 1.0);
    ca.stop().await;
}
