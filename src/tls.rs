//! Mesh TLS: TLS 1.3 only, ALPN `portcullis/1`, SPIFFE identities checked on
//! both sides, and configs that always carry the newest certificate and bundle.

mod bundle;
mod outcome;
mod pq;
mod state;
mod verify;

pub use bundle::{RootInfo, TrustBundle};
pub use outcome::handshake_result;
pub use pq::X25519MLKEM768;
pub use state::{mesh_configs, MeshTls, Snapshot, Unusable};
pub use verify::{chain_trusted, check_issuer, peer_identity, IdentityError, MeshVerifier};

use std::sync::Arc;

use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::{CommonState, NamedGroup};

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

/// The crypto provider: ring, TLS 1.3 suites only (AES-128-GCM first: the
/// suite every TLS 1.3 peer must have, and the cheapest per byte with AES
/// instructions, which bulk traffic between sidecars feels), and the key
/// exchange groups of [`KX_GROUPS`].
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    p.kx_groups = KX_GROUPS.to_vec();
    Arc::new(p)
}

/// Key exchange groups, most preferred first: the post-quantum hybrid
/// X25519MLKEM768, then the classical X25519, P-256 and P-384 for peers
/// without it. A client sends two key shares, the hybrid and its X25519 half,
/// so a classical-only server still completes in one round trip.
pub static KX_GROUPS: &[&dyn SupportedKxGroup] = &[
    X25519MLKEM768,
    rustls::crypto::ring::kx_group::X25519,
    rustls::crypto::ring::kx_group::SECP256R1,
    rustls::crypto::ring::kx_group::SECP384R1,
];

/// The `group` label of `portcullis_tls_key_exchanges_total` for a finished
/// handshake: one of a fixed few values (`other` for anything else, which
/// this provider never negotiates), so a peer cannot grow the label set.
pub fn kx_group_label(conn: &CommonState) -> &'static str {
    conn.negotiated_key_exchange_group()
        .map_or("other", |g| group_label(g.name()))
}

/// The label (and `/certs` name) of a key exchange group.
pub fn group_label(group: NamedGroup) -> &'static str {
    match group {
        NamedGroup::X25519MLKEM768 => "x25519mlkem768",
        NamedGroup::X25519 => "x25519",
        NamedGroup::secp256r1 => "secp256r1",
        NamedGroup::secp384r1 => "secp384r1",
        _ => "other",
    }
}
