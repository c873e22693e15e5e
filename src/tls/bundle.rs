//! The trust bundle: the PEM roots a peer's chain must reach.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use serde::Serialize;
use x509_parser::prelude::*;

use crate::identity::inspect_rfc3339;

/// One root, as `/certs` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RootInfo {
    pub subject: String,
    pub not_after: String,
}

/// A parsed trust bundle.
#[derive(Debug)]
pub struct TrustBundle {
    pub roots: Arc<RootCertStore>,
    pub certs: Vec<CertificateDer<'static>>,
    pub info: Vec<RootInfo>,
}

impl TrustBundle {
    /// Parses PEM roots: at least one, every one a CA certificate.
    pub fn from_pem(path: &Path, pem: &[u8]) -> Result<Self, String> {
        let certs = crate::identity::parse_cert_chain(path, pem).map_err(|e| e.to_string())?;
        let mut roots = RootCertStore::empty();
        let mut info = Vec::new();
        for (i, cert) in certs.iter().enumerate() {
            let (_, x) = X509Certificate::from_der(cert.as_ref())
                .map_err(|e| format!("{}: certificate {i} does not parse ({e})", path.display()))?;
            if !x.is_ca() {
                return Err(format!(
                    "{}: certificate {i} ({}) is not a CA",
                    path.display(),
                    x.subject()
                ));
            }
            info.push(RootInfo {
                subject: x.subject().to_string(),
                not_after: inspect_rfc3339(x.validity().not_after),
            });
            roots.add(cert.clone()).map_err(|e| {
                format!(
                    "{}: certificate {i} is not a usable root ({e})",
                    path.display()
                )
            })?;
        }
        Ok(TrustBundle {
            roots: Arc::new(roots),
            certs,
            info,
        })
    }

    /// Reads and parses a bundle file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let pem = crate::file_limits::read_capped(path, crate::file_limits::PEM_FILE_MAX_BYTES)
            .map_err(|e| e.to_string())?;
        Self::from_pem(path, &pem)
    }
}
