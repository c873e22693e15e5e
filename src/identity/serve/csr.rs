//! Checks 5 and 6 of a certify request, as pure functions: the CSR parses,
//! its self-signature verifies, its key is ECDSA P-256, and it asks for
//! exactly one name, the requested SPIFFE id. Only the public key is taken
//! from it; the certificate is built from our own template.

use rcgen::SubjectPublicKeyInfo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

use crate::identity::SpiffeId;

/// Why a CSR was refused: it is broken (`bad_csr`) or asks for something we
/// do not grant (`csr_policy`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("{0}")]
    Bad(String),
    #[error("{0}")]
    Policy(String),
}

/// The public key of `pem` if the CSR passes checks 5 and 6 for `id`.
pub fn check_csr(pem: &str, id: &SpiffeId) -> Result<SubjectPublicKeyInfo, CsrError> {
    let bad = |m: String| CsrError::Bad(m);
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| bad(format!("csr is not a PEM CERTIFICATE REQUEST ({e})")))?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| bad(format!("csr does not parse ({e})")))?;
    if !rest.is_empty() {
        return Err(bad("csr has trailing bytes".into()));
    }
    csr.verify_signature()
        .map_err(|e| bad(format!("csr signature does not verify ({e})")))?;
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err(bad(format!(
            "csr key must be ECDSA P-256 (got algorithm {}{})",
            spki.algorithm.algorithm,
            curve.map(|c| format!(", curve {c}")).unwrap_or_default()
        )));
    }
    let key = SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|e| bad(format!("csr public key is unusable ({e})")))?;

    let policy = |m: String| CsrError::Policy(m);
    let mut sans: Option<Vec<String>> = None;
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                if sans.is_some() {
                    return Err(policy("csr has two subjectAltName extensions".into()));
                }
                sans = Some(san.general_names.iter().map(describe).collect());
            }
            ParsedExtension::BasicConstraints(bc) if bc.ca => {
                return Err(policy("csr asks for a CA certificate".into()));
            }
            _ => {}
        }
    }
    let want = format!("URI:{id}");
    match sans.as_deref() {
        Some([one]) if *one == want => Ok(key),
        Some(names) => Err(policy(format!(
            "csr must name exactly {want}, not [{}]",
            names.join(", ")
        ))),
        None => Err(policy(format!("csr must name {want} in subjectAltName"))),
    }
}

fn describe(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(u) => format!("URI:{u}"),
        GeneralName::DNSName(d) => format!("DNS:{d}"),
        GeneralName::RFC822Name(e) => format!("email:{e}"),
        GeneralName::IPAddress(_) => "IP".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    const ID: &str = "spiffe://cluster.local/ns/default/sa/client";

    fn csr(alg: &'static rcgen::SignatureAlgorithm, sans: Vec<SanType>, ca: bool) -> String {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        if ca {
            // rcgen will not put CA:TRUE in a CSR; a custom extension will.
            let mut bc = rcgen::CustomExtension::from_oid_content(
                &[2, 5, 29, 19],
                vec![0x30, 0x03, 0x01, 0x01, 0xff],
            );
            bc.set_criticality(true);
            params.custom_extensions = vec![bc];
        }
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn uri(u: &str) -> SanType {
        SanType::URI(u.try_into().unwrap())
    }

    #[test]
    fn csr_table() {
        let p256 = &rcgen::PKCS_ECDSA_P256_SHA256;
        let good = csr(p256, vec![uri(ID)], false);
        // Flip one byte of the signature (the last bytes of the DER).
        let mut der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let n = der.len();
        der[n - 3] ^= 0x55;
        let tampered = crate::identity::pem_encode("CERTIFICATE REQUEST", &der);
        type Want = fn(&Result<SubjectPublicKeyInfo, CsrError>) -> bool;
        let ok: Want = |r| r.is_ok();
        let bad: Want = |r| matches!(r, Err(CsrError::Bad(_)));
        let policy: Want = |r| matches!(r, Err(CsrError::Policy(_)));
        let cases: Vec<(&str, String, Want)> = vec![
            ("good", good.clone(), ok),
            (
                "extra dns",
                csr(
                    p256,
                    vec![uri(ID), SanType::DnsName("a.b".try_into().unwrap())],
                    false,
                ),
                policy,
            ),
            (
                "extra ip",
                csr(
                    p256,
                    vec![uri(ID), SanType::IpAddress([127, 0, 0, 1].into())],
                    false,
                ),
                policy,
            ),
            (
                "extra email",
                csr(
                    p256,
                    vec![uri(ID), SanType::Rfc822Name("a@b.c".try_into().unwrap())],
                    false,
                ),
                policy,
            ),
            (
                "second uri",
                csr(
                    p256,
                    vec![uri(ID), uri("spiffe://cluster.local/ns/default/sa/x")],
                    false,
                ),
                policy,
            ),
            (
                "other uri",
                csr(p256, vec![uri("spiffe://cluster.local/ns/a/sa/b")], false),
                policy,
            ),
            ("no san", csr(p256, vec![], false), policy),
            ("ca", csr(p256, vec![uri(ID)], true), policy),
            (
                "p384",
                csr(&rcgen::PKCS_ECDSA_P384_SHA384, vec![uri(ID)], false),
                bad,
            ),
            (
                "ed25519",
                csr(&rcgen::PKCS_ED25519, vec![uri(ID)], false),
                bad,
            ),
            (
                "rsa",
                include_str!("../../../tests/fixtures/ca_serve/rsa.csr").to_string(),
                bad,
            ),
            ("bad signature", tampered, bad),
            ("garbage", "hello".into(), bad),
            (
                "certificate, not csr",
                crate::identity::pem_encode("CERTIFICATE", b"x"),
                bad,
            ),
        ];
        let id = SpiffeId::parse(ID).unwrap();
        for (name, pem, want) in cases {
            let got = check_csr(&pem, &id);
            assert!(want(&got), "{name}: {:?}", got.as_ref().err());
        }
    }
}
