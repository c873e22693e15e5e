//! Reading PEM files with errors that name the file.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::Error;
use crate::file_limits::{describe_pem_error, read_capped, PEM_FILE_MAX_BYTES};

/// Reads a whole file (within [`PEM_FILE_MAX_BYTES`]), naming it in the error.
pub fn read_pem_file(path: &Path) -> Result<Vec<u8>, Error> {
    read_capped(path, PEM_FILE_MAX_BYTES).map_err(|e| Error::Io(path.to_path_buf(), e.into_io()))
}

/// Parses every CERTIFICATE block of a PEM file, in order; at least one.
pub fn parse_cert_chain(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            // Never the PEM reader's own message: it can quote a line of the file.
            Error::file(
                path,
                format!("not a PEM certificate file ({})", describe_pem_error(&e)),
            )
        })?;
    if certs.is_empty() {
        return Err(Error::file(path, "no PEM CERTIFICATE block found"));
    }
    Ok(certs)
}

/// Reads and parses a PEM certificate file.
pub fn read_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    parse_cert_chain(path, &read_pem_file(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_errors_never_quote_the_file() {
        for bad in [
            "-----BEGIN CERTIFICATE SECRETSTUFF\nMIIBsecret\n",
            "-----BEGIN CERTIFICATE-----\nMIIBSECRETSTUFF\n",
            "-----BEGIN CERTIFICATE-----\n!!SECRETSTUFF!!\n-----END CERTIFICATE-----\n",
        ] {
            let e = parse_cert_chain(Path::new("x.pem"), bad.as_bytes()).unwrap_err();
            let e = e.to_string();
            assert!(e.starts_with("x.pem: "), "{e}");
            assert!(!e.contains("SECRET"), "{e}");
        }
    }
}
