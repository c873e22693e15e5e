//! Mesh TLS: TLS 1.3 only, ALPN `portcullis/1`, SPIFFE identities checked on
//! both sides, and configs that always carry the newest certificate and bundle.

mod bundle;
mod outcome;
mod state;
mod verify;

pub use bundle::{RootInfo, TrustBundle};
pub use outcome::handshake_result;
pub use state::{MeshTls, Snapshot, Unusable};
pub use verify::{chain_trusted, check_issuer, peer_identity, IdentityError, MeshVerifier};

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The ALPN protocol sidecars speak to each other.
pub const ALPN: &[u8] = b"portcullis/1";
/// The ALPN protocol of the mesh tunnel: HTTP/2, whose CONNECT streams each
/// carry one app connection.
pub const TUNNEL_ALPN: &[u8] = b"h2";

/// Errors building TLS state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("trust bundle: {0}")]
    Bundle(String),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The crypto provider: ring, TLS 1.3 suites only.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .retain(|s| s.version() == &rustls::version::TLS13);
    Arc::new(p)
}
