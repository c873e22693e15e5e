//! The identity service's request checks: the certify body (JSON), the
//! requested identity (check 3), the CSR (PEM, DER, signature, key type,
//! names: checks 5 and 6) and the TokenReview verdict (checks 8 to 11).
//!
//! The first input byte picks what the rest is: 0 a certify body, 1 a CSR
//! in DER, 2 a TokenReview status, 3 a CSR in PEM. Checked beyond "does not
//! panic": an identity accepted by check 3 prints back exactly as sent, and
//! a review that passes is authenticated, for our audience, and names the
//! requested identity's service account.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::identity::serve::{check_csr, judge, workload_id, CertifyRequest, ReviewStatus};
use portcullis::identity::{pem_encode, SpiffeId, TrustDomain};

const ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const AUDIENCE: &str = "portcullis-ca";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let td = TrustDomain::new("cluster.local").expect("a valid trust domain");
    let id = SpiffeId::parse(ID).expect("a valid id");
    match mode % 4 {
        0 => {
            let Ok(request) = serde_json::from_slice::<CertifyRequest>(rest) else {
                return;
            };
            let Ok(requested) = workload_id(&request.identity, &td) else {
                return;
            };
            assert_eq!(
                requested.to_string(),
                request.identity,
                "only canonical ids"
            );
            let _ = check_csr(&request.csr, &requested);
        }
        1 => {
            let _ = check_csr(&pem_encode("CERTIFICATE REQUEST", rest), &id);
        }
        2 => {
            let Ok(status) = serde_json::from_slice::<ReviewStatus>(rest) else {
                return;
            };
            if judge(&status, AUDIENCE, &id).is_ok() {
                assert!(status.authenticated && status.error.is_empty());
                assert_eq!(status.user.username, "system:serviceaccount:default:client");
                let audiences = status.audiences.unwrap_or_default();
                assert!(audiences.iter().any(|a| a == AUDIENCE));
            }
        }
        _ => {
            let Ok(pem) = std::str::from_utf8(rest) else {
                return;
            };
            let _ = check_csr(pem, &id);
        }
    }
});
