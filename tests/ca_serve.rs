//! The identity service (`portcullis ca serve`) and the sidecar as its
//! client (`run --ca-url`): issue 5's tests 1 to 8. The Kubernetes API
//! server is played by the stand-in in `ca_serve/apiserver.rs`.

#[path = "ca_serve/apiserver.rs"]
mod apiserver;
mod common;
#[path = "ca_serve/harness.rs"]
mod harness;
/// The API server's certificate failures, named.
#[path = "ca_serve/kube_tls.rs"]
mod kube_tls;
/// Test 6: issuer rotation.
#[path = "ca_serve/rotation.rs"]
mod rotation;
/// Tests 7 and 8: sidecars as clients.
#[path = "ca_serve/sidecar.rs"]
mod sidecar;

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use apiserver::{Faults, TokenInfo};
use common::*;
use harness::*;
use portcullis::identity::chains_to;
use serde_json::json;
use x509_parser::prelude::*;

pub const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";

/// Test 1: the leaf is minimal and correct, and serials never repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_leaf_is_minimal_and_serials_are_distinct() {
    let f = Fixture::new().await;
    let ca = Service::start(&f.args(&[])).await;
    let bundle = f.bundle_pem();
    let mut c = Client::connect(ca.addr, Some(&bundle)).await;
    let (key, mut body) = body_for(CLIENT);
    body["ttl_seconds"] = json!(86400); // more than the issuer's 2 h left
    let a = c.certify(Some("client-token"), &body).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["identity"], CLIENT);
    let chain = a.chain();
    let roots = portcullis::identity::read_cert_chain(&f.bundle).unwrap();
    assert!(chains_to(&chain, &roots), "chains to the bundle");
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let (_, issuer) = X509Certificate::from_der(&chain[1]).unwrap();
    assert!(!leaf.is_ca());
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1);
    assert!(matches!(san.value.general_names[0], GeneralName::URI(u) if u == CLIENT));
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.code_signing && eku.other.is_empty());
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    assert_eq!(leaf.public_key().raw, key.public_key_der().as_slice());
    assert!(leaf.validity().not_after <= issuer.validity().not_after);
    assert!(leaf.validity().not_after.timestamp() > OffsetNow::secs() + 3600);
    let backdated = OffsetNow::secs() - leaf.validity().not_before.timestamp();
    assert!(
        (50..=70).contains(&backdated),
        "not-before now-60s ({backdated})"
    );
    assert_eq!(a.body["serial"], leaf.raw_serial_as_string());

    // 1,000 issues over 4 connections: 1,000 distinct serials.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let bundle = bundle.clone();
        let addr = ca.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr, Some(&bundle)).await;
            let mut serials = Vec::new();
            for _ in 0..250 {
                let (_, body) = body_for(CLIENT);
                let a = c.certify(Some("client-token"), &body).await;
                assert_eq!(a.status, 200, "{}", a.body);
                serials.push(a.body["serial"].as_str().unwrap().to_string());
            }
            serials
        }));
    }
    let mut all = HashSet::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 1000);
    assert_eq!(ca.requests("ok"), 1001.0);
    assert!(f.api.reviews().iter().all(|a| a == &["portcullis-ca"]));
}

/// Seconds since the epoch, now.
pub struct OffsetNow;
impl OffsetNow {
    pub fn secs() -> i64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }
}

/// Test 2: what the TokenReview says decides 401 or 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_reviews_decide_401_and_403() {
    let f = Fixture::new().await;
    let mut expired = TokenInfo::bound("default", "client");
    expired.expires = SystemTime::now() - Duration::from_secs(1);
    f.api.add_token("expired", expired);
    let mut other_aud = TokenInfo::bound("default", "client");
    other_aud.audiences = vec!["https://kubernetes.default.svc.cluster.local".into()];
    f.api.add_token("api-audience", other_aud);
    let mut legacy = TokenInfo::bound("default", "client");
    legacy.pod = None;
    f.api.add_token("legacy", legacy);
    let ca = Service::start(&f.args(&[])).await;
    let mut c = Client::connect(ca.addr, Some(&f.bundle_pem())).await;
    let (_, body) = body_for(CLIENT);

    let a = c.certify(Some("expired"), &body).await;
    assert_eq!((a.status, a.code()), (401, "token_rejected"), "{}", a.body);
    assert!(a.body["message"]
        .as_str()
        .unwrap()
        .contains("token is expired"));

    let before = f.api.reviews().len();
    let a = c.certify(Some("api-audience"), &body).await;
    assert_eq!(a.status, 401, "{}", a.body);
    let reviews = f.api.reviews();
    assert_eq!(
        reviews.len(),
        before + 1,
        "exactly one review, never one without the audience"
    );
    assert_eq!(reviews.last().unwrap(), &["portcullis-ca"]);

    let a = c.certify(Some("server-token"), &body).await;
    assert_eq!(
        (a.status, a.code()),
        (403, "identity_mismatch"),
        "{}",
        a.body
    );

    let a = c.certify(Some("legacy"), &body).await;
    assert_eq!(
        (a.status, a.code()),
        (403, "not_bound_service_account"),
        "{}",
        a.body
    );

    let a = c.certify(Some("no-such-token"), &body).await;
    assert_eq!((a.status, a.code()), (401, "token_rejected"), "{}", a.body);

    f.api.set_faults(Faults {
        audience_unaware: true,
        ..Default::default()
    });
    let a = c.certify(Some("client-token"), &body).await;
    assert_eq!(
        (a.status, a.code()),
        (401, "audience_mismatch"),
        "{}",
        a.body
    );
    f.api.set_faults(Faults::default());
    let a = c.certify(Some("client-token"), &body).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(ca.requests("token_rejected"), 3.0);
    assert_eq!(ca.requests("identity_mismatch"), 1.0);
}

/// Test 3: bad CSRs are refused with 400 before any TokenReview.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_csrs_are_refused_before_any_review() {
    let f = Fixture::new().await;
    let ca = Service::start(&f.args(&["--max-ttl", "2h"])).await;
    let mut c = Client::connect(ca.addr, Some(&f.bundle_pem())).await;
    let san_csr =
        |sans: Vec<rcgen::SanType>, ca_flag: bool, alg: &'static rcgen::SignatureAlgorithm| {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let mut p = rcgen::CertificateParams::default();
            p.subject_alt_names = sans;
            if ca_flag {
                // rcgen will not put CA:TRUE in a CSR; a custom extension will.
                let mut bc = rcgen::CustomExtension::from_oid_content(
                    &[2, 5, 29, 19],
                    vec![0x30, 0x03, 0x01, 0x01, 0xff],
                );
                bc.set_criticality(true);
                p.custom_extensions = vec![bc];
            }
            p.serialize_request(&key).unwrap().pem().unwrap()
        };
    let uri = |u: &str| rcgen::SanType::URI(u.try_into().unwrap());
    let p256 = &rcgen::PKCS_ECDSA_P256_SHA256;
    let good = san_csr(vec![uri(CLIENT)], false, p256);
    let mut der = rustls::pki_types::pem::PemObject::from_pem_slice(good.as_bytes())
        .map(|d: rustls::pki_types::CertificateSigningRequestDer| d.as_ref().to_vec())
        .unwrap();
    let n = der.len();
    der[n - 3] ^= 0x55;
    let tampered = portcullis::identity::pem_encode("CERTIFICATE REQUEST", &der);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "extra DNS",
            san_csr(
                vec![
                    uri(CLIENT),
                    rcgen::SanType::DnsName("x.svc".try_into().unwrap()),
                ],
                false,
                p256,
            ),
            "csr_policy",
        ),
        (
            "extra IP",
            san_csr(
                vec![uri(CLIENT), rcgen::SanType::IpAddress([10, 0, 0, 1].into())],
                false,
                p256,
            ),
            "csr_policy",
        ),
        (
            "extra email",
            san_csr(
                vec![
                    uri(CLIENT),
                    rcgen::SanType::Rfc822Name("a@b.c".try_into().unwrap()),
                ],
                false,
                p256,
            ),
            "csr_policy",
        ),
        (
            "second URI",
            san_csr(
                vec![uri(CLIENT), uri("spiffe://cluster.local/ns/default/sa/x")],
                false,
                p256,
            ),
            "csr_policy",
        ),
        (
            "CA:TRUE",
            san_csr(vec![uri(CLIENT)], true, p256),
            "csr_policy",
        ),
        ("bad signature", tampered, "bad_csr"),
        (
            "RSA",
            include_str!("fixtures/ca_serve/rsa.csr").to_string(),
            "bad_csr",
        ),
        (
            "P-384",
            san_csr(vec![uri(CLIENT)], false, &rcgen::PKCS_ECDSA_P384_SHA384),
            "bad_csr",
        ),
        ("not PEM", "hello".into(), "bad_csr"),
    ];
    for (name, pem, code) in cases {
        let body = json!({"identity": CLIENT, "csr": pem, "ttl_seconds": 3600});
        let a = c.certify(Some("client-token"), &body).await;
        assert_eq!((a.status, a.code()), (400, code), "{name}: {}", a.body);
    }
    let too_long = json!({"identity": CLIENT, "csr": good, "ttl_seconds": 3 * 3600});
    let a = c.certify(Some("client-token"), &too_long).await;
    assert_eq!((a.status, a.code()), (400, "csr_policy"), "ttl: {}", a.body);
    for bad_id in [
        "spiffe://other.org/ns/default/sa/client",
        "spiffe://cluster.local/client",
        "x",
    ] {
        let body = json!({"identity": bad_id, "csr": good});
        let a = c.certify(Some("client-token"), &body).await;
        assert_eq!((a.status, a.code()), (400, "bad_request"), "{bad_id}");
    }
    assert!(
        f.api.reviews().is_empty(),
        "no request reached the TokenReview endpoint"
    );
}

/// Test 4: a missing token and malformed HTTP never reach the API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_and_malformed_requests() {
    let f = Fixture::new().await;
    let ca = Service::start(&f.args(&[])).await;
    let mut c = Client::connect(ca.addr, Some(&f.bundle_pem())).await;
    let (_, body) = body_for(CLIENT);
    let a = c.certify(None, &body).await;
    assert_eq!((a.status, a.code()), (401, "missing_token"));
    assert_eq!(a.headers["www-authenticate"], "Bearer");
    let huge = "a".repeat(9000);
    let a = c.certify(Some(&huge), &body).await;
    assert_eq!((a.status, a.code()), (401, "missing_token"));
    let json_ct = [("content-type", "application/json")];
    let a = c.request("GET", "/v1/certify", &json_ct, vec![]).await;
    assert_eq!((a.status, a.code()), (405, "method_not_allowed"));
    let a = c.request("POST", "/v1/other", &json_ct, vec![]).await;
    assert_eq!((a.status, a.code()), (404, "not_found"));
    let body_bytes = serde_json::to_vec(&body).unwrap();
    let a = c
        .request(
            "POST",
            "/v1/certify",
            &[
                ("content-type", "text/plain"),
                ("authorization", "Bearer client-token"),
            ],
            body_bytes,
        )
        .await;
    assert_eq!((a.status, a.code()), (415, "unsupported_media_type"));
    let a = c
        .request(
            "POST",
            "/v1/certify",
            &[
                ("content-type", "application/json"),
                ("authorization", "Bearer client-token"),
            ],
            vec![b' '; 17 * 1024],
        )
        .await;
    assert_eq!((a.status, a.code()), (413, "payload_too_large"));
    let a = c.request("GET", "/v1/trust-bundle", &[], vec![]).await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.body.as_str().unwrap().as_bytes(),
        f.bundle_pem().as_slice()
    );
    assert!(f.api.reviews().is_empty());
    assert_eq!(ca.requests("missing_token"), 2.0);

    // The admin server: /live, /ready, and metrics that promtool accepts.
    assert_eq!(http_get(ca.admin, "/live").await.unwrap().0, 200);
    assert_eq!(http_get(ca.admin, "/ready").await.unwrap().0, 200);
    let (status, text) = http_get(ca.admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for name in [
        "portcullis_ca_requests_total",
        "portcullis_ca_tokenreview_duration_seconds",
        "portcullis_ca_issuer_expiry_timestamp_seconds",
        "portcullis_ca_issuer_reloads_total",
        "portcullis_ca_issuer_valid",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    promtool_check(&text);
}

/// Test 5: API server trouble is 503 with Retry-After; the in-flight cap
/// answers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_trouble_is_503_with_retry_after() {
    let f = Fixture::new().await;
    let ca = Service::start(&f.args(&[
        "--tokenreview-timeout",
        "1s",
        "--max-reviews-in-flight",
        "1",
    ]))
    .await;
    let bundle = f.bundle_pem();
    let mut c = Client::connect(ca.addr, Some(&bundle)).await;
    let (_, body) = body_for(CLIENT);
    let unavailable = |a: &Answer, what: &str| {
        assert_eq!(
            (a.status, a.code()),
            (503, "tokenreview_unavailable"),
            "{what}: {}",
            a.body
        );
        assert!(
            a.retry_after().is_some_and(|s| s >= 1),
            "{what}: Retry-After"
        );
    };
    let cases: Vec<(&str, Faults)> = vec![
        (
            "slow",
            Faults {
                latency: Duration::from_secs(3),
                ..Default::default()
            },
        ),
        (
            "500",
            Faults {
                status_500: true,
                ..Default::default()
            },
        ),
        (
            "dropped",
            Faults {
                drop_connections: true,
                ..Default::default()
            },
        ),
    ];
    for (what, faults) in cases {
        f.api.set_faults(faults);
        let started = Instant::now();
        let a = c.certify(Some("client-token"), &body).await;
        unavailable(&a, what);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{what}: bounded by the timeout"
        );
    }
    f.api.set_faults(Faults {
        throttle: Some(7),
        ..Default::default()
    });
    let a = c.certify(Some("client-token"), &body).await;
    unavailable(&a, "429");
    assert_eq!(
        a.retry_after(),
        Some(7),
        "the API server's Retry-After is passed on"
    );

    // The API server refuses our own token: 503; once the file holds the
    // token it accepts, a 401 makes the service re-read it and succeed.
    f.api.set_faults(Faults::default());
    f.api.set_ca_token("rotated-ca-token");
    let a = c.certify(Some("client-token"), &body).await;
    unavailable(&a, "our token refused");
    write_atomic(&f.kube_token, b"rotated-ca-token");
    let a = c.certify(Some("client-token"), &body).await;
    assert_eq!(a.status, 200, "after re-reading our token: {}", a.body);

    // In-flight cap of 1: a second request while one review hangs gets 503 at once.
    f.api.set_faults(Faults {
        latency: Duration::from_millis(800),
        ..Default::default()
    });
    let addr = ca.addr;
    // Counted before the slow request starts: it may reach the API server
    // before this task runs again.
    let n = f.api.arrivals();
    let slow = {
        let (bundle, body) = (bundle.clone(), body.clone());
        tokio::spawn(async move {
            let mut c = Client::connect(addr, Some(&bundle)).await;
            c.certify(Some("client-token"), &body).await.status
        })
    };
    let api = f.api.clone();
    eventually(
        "the slow review reached the API server",
        Duration::from_secs(5),
        || {
            let api = api.clone();
            async move { api.arrivals() > n }
        },
    )
    .await;
    let started = Instant::now();
    let a = c.certify(Some("client-token"), &body).await;
    unavailable(&a, "in-flight cap");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "refused at once"
    );
    assert_eq!(slow.await.unwrap(), 200);

    // API server down altogether.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("https://{dead}");
    let mut args = f.args(&[]);
    args[13] = url;
    let down = Service::start(&args).await;
    let mut c = Client::connect(down.addr, Some(&bundle)).await;
    let a = c.certify(Some("client-token"), &body).await;
    unavailable(&a, "down");
    assert!(ca.metric("portcullis_ca_tokenreview_duration_seconds_count", &[]) >= 6.0);
}
