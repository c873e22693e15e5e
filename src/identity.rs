//! Workload identity: SPIFFE ids, the local CA that signs leaf certificates,
//! and the rotator that keeps this sidecar's leaf fresh.

mod ca;
mod inspect;
mod pem;
mod remote;
mod rotate;
pub mod serve;
mod spiffe;

pub use ca::{pem_cert, pem_encode, write_file, CaFiles, Issuer, Leaf, LeafRequest, NewCa};
pub use inspect::{chains_to, inspect_files, rfc3339 as inspect_rfc3339, spiffe_uris, CertReport};
pub use pem::{parse_cert_chain, read_cert_chain, read_pem_file};
pub use remote::{check_answer, CaUrl, RemoteCa, RemoteError};
pub use rotate::{renewal_delay, retry_delay, Backoff, IssuerWatch, LeafSource, Rotator};
pub use spiffe::{SpiffeId, TrustDomain};

use std::path::PathBuf;

/// Everything that can go wrong while making, loading or checking identities.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("invalid SPIFFE id {id:?}: {reason}")]
    BadSpiffeId { id: String, reason: &'static str },
    #[error("invalid trust domain {0:?}: use lowercase letters, digits, '.', '-' and '_'")]
    BadTrustDomain(String),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

impl Error {
    pub(crate) fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            message: message.into(),
        }
    }
}
