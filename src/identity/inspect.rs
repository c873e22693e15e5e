//! `ca inspect`: a readable report of certificates, and chain checks against a bundle.

use std::path::Path;
use std::time::SystemTime;

use rustls::pki_types::CertificateDer;
use serde::Serialize;
use x509_parser::prelude::*;

use super::pem::read_cert_chain;
use super::Error;

/// The `spiffe://` URI SANs of a certificate.
pub fn spiffe_uris(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// Whether `chain[0]` chains, through the rest of `chain`, to a root in `bundle`.
/// Signatures and the CA flag of every issuer are checked; dates are not (the
/// report shows them).
pub fn chains_to(chain: &[CertificateDer<'_>], bundle: &[CertificateDer<'_>]) -> bool {
    let roots: Vec<_> = bundle.iter().filter_map(|c| parse(c)).collect();
    let others: Vec<_> = chain.iter().skip(1).filter_map(|c| parse(c)).collect();
    let Some(mut current) = chain.first().and_then(|c| parse(c)) else {
        return false;
    };
    for _ in 0..8 {
        let signed_by = |issuer: &X509Certificate<'_>| {
            issuer.subject() == current.issuer()
                && issuer.is_ca()
                && current.verify_signature(Some(issuer.public_key())).is_ok()
        };
        if roots.iter().any(signed_by) || roots.iter().any(|r| r.as_ref() == current.as_ref()) {
            return true;
        }
        match others.iter().find(|c| signed_by(c)) {
            Some(next) => current = next.clone(),
            None => return false,
        }
    }
    false
}

fn parse<'a>(c: &'a CertificateDer<'_>) -> Option<X509Certificate<'a>> {
    X509Certificate::from_der(c.as_ref()).ok().map(|(_, x)| x)
}

/// One certificate, described for people and for `/certs`.
#[derive(Debug, Serialize)]
pub struct CertReport {
    pub file: String,
    pub index: usize,
    pub subject: String,
    pub issuer: String,
    pub spiffe_ids: Vec<String>,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    pub seconds_left: i64,
    pub is_ca: bool,
    pub chains_to_bundle: Option<bool>,
}

impl CertReport {
    pub fn new(
        file: &str,
        index: usize,
        chain: &[CertificateDer<'_>],
        bundle: Option<&[CertificateDer<'_>]>,
    ) -> Result<Self, Error> {
        let (_, x) = X509Certificate::from_der(chain[0].as_ref())
            .map_err(|e| Error::file(file, format!("certificate {index} does not parse ({e})")))?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Ok(CertReport {
            file: file.to_string(),
            index,
            subject: x.subject().to_string(),
            issuer: x.issuer().to_string(),
            spiffe_ids: spiffe_uris(&x),
            serial: x.raw_serial_as_string(),
            not_before: rfc3339(x.validity().not_before),
            not_after: rfc3339(x.validity().not_after),
            seconds_left: x.validity().not_after.timestamp() - now,
            is_ca: x.is_ca(),
            chains_to_bundle: bundle.map(|b| chains_to(chain, b)),
        })
    }

    /// Human-readable lines for the terminal.
    pub fn render(&self) -> String {
        let left = if self.seconds_left >= 0 {
            format!(
                "{} left",
                humantime::format_duration(std::time::Duration::from_secs(
                    self.seconds_left as u64
                ))
            )
        } else {
            "EXPIRED".to_string()
        };
        let mut out = format!(
            "{} [{}]\n  subject:    {}\n  spiffe ids: {}\n  serial:     {}\n  not before: {}\n  not after:  {} ({left})\n  issuer:     {}\n  is CA:      {}\n",
            self.file,
            self.index,
            self.subject,
            if self.spiffe_ids.is_empty() { "-".to_string() } else { self.spiffe_ids.join(", ") },
            self.serial,
            self.not_before,
            self.not_after,
            self.issuer,
            if self.is_ca { "yes" } else { "no" },
        );
        if let Some(ok) = self.chains_to_bundle {
            out.push_str(&format!(
                "  chains to bundle: {}\n",
                if ok { "yes" } else { "NO" }
            ));
        }
        out
    }
}

/// RFC 3339 text of an ASN.1 time.
pub fn rfc3339(t: ASN1Time) -> String {
    t.to_datetime()
        .format(&::time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// Reports on every certificate in `files`; each is checked against the
/// bundle with the certificates after it in its file as intermediates.
pub fn inspect_files(files: &[&Path], bundle: Option<&Path>) -> Result<Vec<CertReport>, Error> {
    let bundle = bundle.map(read_cert_chain).transpose()?;
    let mut reports = Vec::new();
    for path in files {
        let chain = read_cert_chain(path)?;
        for i in 0..chain.len() {
            reports.push(CertReport::new(
                &path.display().to_string(),
                i,
                &chain[i..],
                bundle.as_deref(),
            )?);
        }
    }
    Ok(reports)
}
