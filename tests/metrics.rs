//! Test 7: `/metrics` is valid Prometheus exposition (`promtool check
//! metrics`), carries the contract's names, and the admin endpoints answer.

mod common;

use std::time::Duration;

use common::*;

/// The contract: names later issues, dashboards and alerts rely on.
const NAMES: &[&str] = &[
    "portcullis_tcp_connections_opened_total",
    "portcullis_tcp_connections_closed_total",
    "portcullis_tcp_connections_open",
    "portcullis_tcp_received_bytes_total",
    "portcullis_tcp_sent_bytes_total",
    "portcullis_tls_handshakes_total",
    "portcullis_tls_handshake_duration_seconds",
    "portcullis_tls_key_exchanges_total",
    "portcullis_cert_expiry_timestamp_seconds",
    "portcullis_cert_rotations_total",
    "portcullis_trust_bundle_reloads_total",
    "portcullis_build_info",
    "portcullis_rules_valid",
    "portcullis_ready",
    "portcullis_issuer_valid",
    "portcullis_trust_bundle_valid",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_admin_endpoints_answer() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let pair = Pair::start(&ca, &ca.files.cert, &[], &[]).await;
    assert!(pair.ping(b"hello").await);
    // A refused plaintext client, so a failure series exists too.
    let _ = round_trip(
        tokio::net::TcpStream::connect(pair.b.addrs.inbound)
            .await
            .unwrap(),
        b"plain",
    )
    .await;
    eventually("refusal counted", Duration::from_secs(5), || async {
        pair.b.metric(
            "portcullis_tls_handshakes_total",
            &[("result", "plaintext_refused")],
        ) == 1.0
    })
    .await;

    let admin = pair.b.addrs.admin;
    let (status, body) = http_get(admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for name in NAMES {
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "{name} missing from /metrics"
        );
    }
    promtool_check(&body);
    assert_eq!(metric_value(&body, "portcullis_ready", &[]), 1.0);

    let (status, body) = http_get(admin, "/live").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "live\n"));
    let (status, body) = http_get(admin, "/certs").await.unwrap();
    assert_eq!(status, 200);
    let certs: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        certs["certificate"]["identity"],
        "spiffe://cluster.local/ns/default/sa/server"
    );
    for key in ["serial", "not_before", "not_after", "next_renewal"] {
        assert!(
            certs["certificate"][key].is_string(),
            "/certs lacks {key}: {body}"
        );
    }
    assert_eq!(certs["trust_bundle"].as_array().unwrap().len(), 1);
    assert!(certs["trust_bundle"][0]["subject"]
        .as_str()
        .unwrap()
        .contains("portcullis root CA"));
    assert_eq!(http_get(admin, "/nope").await.unwrap().0, 404);
}

/// The `*_valid` gauges: 1 while the newest files are in force, 0 while a
/// bad new version is refused, 1 again once it is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validity_gauges_follow_refused_and_fixed_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, ca.cert_pem()).unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let good = "rules:\n  - name: anyone\n    action: allow\n";
    write_atomic(&rules.join("policy.yaml"), good.as_bytes());
    let mut args = issuer_args(&ca, &bundle, "server");
    args.extend([
        "--inbound-target".to_string(),
        echo_server().await.to_string(),
        "--rules-dir".to_string(),
        rules.display().to_string(),
        "--file-poll-interval".to_string(),
        "100ms".to_string(),
    ]);
    let b = Sidecar::start(&args).await;
    let admin = b.addrs.admin;
    let scrape = || async move { http_get(admin, "/metrics").await.unwrap().1 };
    let gauge = |text: &str, name: &str| metric_value(text, name, &[]);
    let text = scrape().await;
    for name in [
        "portcullis_rules_valid",
        "portcullis_issuer_valid",
        "portcullis_trust_bundle_valid",
    ] {
        assert_eq!(gauge(&text, name), 1.0, "{name} at start");
    }

    write_atomic(&rules.join("policy.yaml"), b"rules: [oops");
    write_atomic(&bundle, b"not a certificate");
    write_atomic(&ca.files.key, b"not a key");
    eventually("all three refused", Duration::from_secs(5), || async {
        let text = scrape().await;
        gauge(&text, "portcullis_rules_valid") == 0.0
            && gauge(&text, "portcullis_trust_bundle_valid") == 0.0
            && gauge(&text, "portcullis_issuer_valid") == 0.0
    })
    .await;
    promtool_check(&scrape().await);

    // Back to what is in force (rules) and to a new good version (bundle).
    write_atomic(&rules.join("policy.yaml"), good.as_bytes());
    write_atomic(&bundle, &[ca.cert_pem(), b"\n".to_vec()].concat());
    eventually(
        "rules and bundle valid again",
        Duration::from_secs(5),
        || async {
            let text = scrape().await;
            gauge(&text, "portcullis_rules_valid") == 1.0
                && gauge(&text, "portcullis_trust_bundle_valid") == 1.0
        },
    )
    .await;
    assert_eq!(gauge(&scrape().await, "portcullis_issuer_valid"), 0.0);
}
