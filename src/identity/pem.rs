//! Reading PEM files with errors that name the file.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::Error;

/// Reads a whole file, naming it in the error.
pub fn read_pem_file(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::Io(path.to_path_buf(), e))
}

/// Parses every CERTIFICATE block of a PEM file, in order; at least one.
pub fn parse_cert_chain(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| Error::file(path, format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(Error::file(path, "no PEM CERTIFICATE block found"));
    }
    Ok(certs)
}

/// Reads and parses a PEM certificate file.
pub fn read_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    parse_cert_chain(path, &read_pem_file(path)?)
}
