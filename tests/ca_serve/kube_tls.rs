//! When the API server's certificate fails verification, the identity
//! service says why (unknown issuer, a CA as the end entity, a name
//! mismatch, expiry) in its 503 to the sidecar and in its log, instead of
//! hyper's bare "client error (Connect)".

use crate::apiserver::ServingCert;
use crate::harness::*;
use crate::CLIENT;

/// Each bad certificate, and the words the answer must contain.
const CASES: &[(ServingCert, &str)] = &[
    (ServingCert::UnknownIssuer, "unknown issuer"),
    (
        ServingCert::CaAsEndEntity,
        "CA certificate used as the server's own",
    ),
    (ServingCert::WrongName, "name mismatch"),
    (ServingCert::Expired, "expired"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_certificate_failures_are_named() {
    for (cert, words) in CASES {
        let f = Fixture::with_api_cert(*cert).await;
        let ca = Service::start(&f.args(&[])).await;
        let mut c = Client::connect(ca.addr, Some(&f.bundle_pem())).await;
        let (_, body) = body_for(CLIENT);
        let a = c.certify(Some("client-token"), &body).await;
        assert_eq!(
            (a.status, a.code()),
            (503, "tokenreview_unavailable"),
            "{cert:?}: {}",
            a.body
        );
        let message = a.body["message"].as_str().unwrap_or_default();
        eprintln!("{cert:?}: {message}");
        assert!(
            message.contains(words) && message.contains("certificate"),
            "{cert:?}: the answer names the reason ({words:?}): {message}"
        );
        assert!(
            !message.contains("client error (Connect)"),
            "{cert:?}: {message}"
        );
        assert!(f.api.reviews().is_empty(), "no review got through");
        ca.stop().await;
    }
}
