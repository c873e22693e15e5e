//! Table tests of the certificate, clock and trust-bundle verdicts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::check::Status;

/// 2030-01-01T00:00:00Z, the tables' "now".
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_893_456_000)
}

fn at(offset_secs: i64) -> String {
    let t = time::OffsetDateTime::from(now()) + time::Duration::seconds(offset_secs);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn view(leaf: Option<(i64, i64)>, roots: &[i64]) -> CertsView {
    CertsView {
        trust_domain: "cluster.local".into(),
        certificate: leaf.map(|(nb, na)| LeafView {
            identity: "spiffe://cluster.local/ns/default/sa/web".into(),
            issuer: Some("O=portcullis".into()),
            not_before: at(nb),
            not_after: at(na),
            next_renewal: None,
        }),
        trust_bundle: roots
            .iter()
            .map(|na| RootView {
                subject: "CN=root".into(),
                not_after: at(*na),
            })
            .collect(),
    }
}

fn status(findings: &[Finding], check: &str) -> (Status, String) {
    let f = findings.iter().find(|f| f.check == check).unwrap();
    (f.status, f.detail.clone())
}

/// Leaf validity (seconds from now), then the certificate and clock
/// verdicts and a snippet of either detail.
type Case = (Option<(i64, i64)>, Status, Status, &'static str);

#[test]
fn certificate_expiry_and_clock_table() {
    let day = 86_400;
    // (leaf validity relative to now, certificate, clock, detail snippet)
    let cases: [Case; 7] = [
        (Some((-60, 3600)), Status::Ok, Status::Ok, "expires in 1h"),
        // 11% of 1h left: fine; 9% left: renewal has failed for long.
        (Some((-3204, 396)), Status::Ok, Status::Ok, "expires in"),
        (
            Some((-3276, 324)),
            Status::Fail,
            Status::Ok,
            "less than 10%",
        ),
        (Some((-3600, 0)), Status::Fail, Status::Ok, "expired at"),
        (Some((-7200, -3600)), Status::Fail, Status::Ok, "1h ago"),
        // Issued by a clock 2 minutes ahead (beyond the 60 s backdating).
        (
            Some((120, 3720)),
            Status::Ok,
            Status::Fail,
            "ahead of this clock",
        ),
        (None, Status::Fail, Status::Skip, "no certificate"),
    ];
    for (leaf, cert, clock, snippet) in cases {
        let f = certificate_findings(&view(leaf, &[day]), now());
        let (c, detail) = status(&f, "certificate");
        let (k, clock_detail) = status(&f, "clock");
        assert_eq!(c, cert, "{leaf:?}: {detail}");
        assert_eq!(k, clock, "{leaf:?}: {clock_detail}");
        assert!(
            detail.contains(snippet) || clock_detail.contains(snippet),
            "{leaf:?}: {detail} / {clock_detail}"
        );
        for failed in f.iter().filter(|f| f.status == Status::Fail) {
            assert!(failed.fix.is_some(), "{failed:?}");
        }
    }
}

#[test]
fn trust_bundle_table() {
    let cases: [(&[i64], Status); 4] = [
        (&[86_400], Status::Ok),
        (&[86_400, 3 * 86_400], Status::Ok),
        (&[86_400, -1], Status::Fail),
        (&[], Status::Fail),
    ];
    for (roots, want) in cases {
        let f = certificate_findings(&view(Some((-60, 3600)), roots), now());
        let (s, detail) = status(&f, "trust-bundle");
        assert_eq!(s, want, "{roots:?}: {detail}");
    }
}

#[test]
fn unreadable_times_fail_instead_of_passing() {
    let mut v = view(Some((-60, 3600)), &[86_400]);
    v.certificate.as_mut().unwrap().not_after = "soon".into();
    let f = certificate_findings(&v, now());
    assert_eq!(status(&f, "certificate").0, Status::Fail);
}
