//! Certificate verification for the mesh: the chain must reach the trust
//! bundle, and the peer's identity is its one `spiffe://` URI SAN inside our
//! trust domain.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use x509_parser::prelude::*;

use crate::identity::{SpiffeId, TrustDomain};

/// Why a certificate's identity is not acceptable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate has no spiffe:// URI SAN")]
    Missing,
    #[error("certificate has {0} URI SANs; exactly one is allowed")]
    Several(usize),
    #[error("certificate SPIFFE id is invalid: {0}")]
    Invalid(String),
    #[error("peer is in trust domain {0}, not ours")]
    WrongTrustDomain(String),
    #[error("peer is {got}, expected {want}")]
    Unexpected { got: String, want: String },
    #[error("certificate does not parse")]
    Unparsable,
}

/// The SPIFFE id of a peer certificate in trust domain `td`.
pub fn peer_identity(
    cert: &CertificateDer<'_>,
    td: &TrustDomain,
) -> Result<SpiffeId, IdentityError> {
    let (_, x) = X509Certificate::from_der(cert.as_ref()).map_err(|_| IdentityError::Unparsable)?;
    let san = x
        .subject_alternative_name()
        .map_err(|_| IdentityError::Unparsable)?;
    let uris: Vec<&str> = san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let uri = match uris.as_slice() {
        [] => return Err(IdentityError::Missing),
        [one] => *one,
        many => return Err(IdentityError::Several(many.len())),
    };
    if !uri.starts_with("spiffe://") {
        return Err(IdentityError::Missing);
    }
    let id = SpiffeId::parse(uri).map_err(|e| IdentityError::Invalid(e.to_string()))?;
    if id.trust_domain() != td {
        return Err(IdentityError::WrongTrustDomain(
            id.trust_domain().to_string(),
        ));
    }
    Ok(id)
}

fn identity_failure(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Verifies mesh peers in both directions against one trust bundle.
#[derive(Debug)]
pub struct MeshVerifier {
    roots: Arc<RootCertStore>,
    td: TrustDomain,
    algs: WebPkiSupportedAlgorithms,
    client: Arc<dyn ClientCertVerifier>,
}

impl MeshVerifier {
    pub fn new(roots: Arc<RootCertStore>, td: TrustDomain) -> Result<Self, super::Error> {
        let provider = super::provider();
        let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .clear_root_hint_subjects()
            .build()?;
        Ok(MeshVerifier {
            roots,
            td,
            algs: provider.signature_verification_algorithms,
            client,
        })
    }
}

impl ClientCertVerifier for MeshVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .client
            .verify_client_cert(end_entity, intermediates, now)?;
        peer_identity(end_entity, &self.td).map_err(identity_failure)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ServerCertVerifier for MeshVerifier {
    /// The server name is ignored: mesh servers are named by their SPIFFE id,
    /// which the connection checks against its expected peer after the handshake.
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        peer_identity(end_entity, &self.td).map_err(identity_failure)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Signs a throw-away leaf with `issuer` and verifies it the way peers will
/// (as a server and as a client certificate, against `roots`): an issuer
/// whose leaves every peer would refuse — not chaining to the bundle, or
/// past a path length — is never put in service. Used by the sidecar's
/// mounted issuer and by the identity service alike.
pub fn check_issuer(
    issuer: &crate::identity::Issuer,
    td: &TrustDomain,
    roots: Arc<RootCertStore>,
) -> Result<(), String> {
    let probe = issuer
        .issue(&crate::identity::LeafRequest {
            id: SpiffeId::workload(td, "portcullis", "issuer-check").map_err(|e| e.to_string())?,
            ttl: std::time::Duration::from_secs(60),
        })
        .map_err(|e| e.to_string())?;
    check_own_leaf(&probe.chain, roots, td).map_err(|e| {
        format!(
            "leaves signed by {} do not verify against the trust bundle ({e})",
            issuer.subject
        )
    })
}

/// Checks that a leaf chain verifies as a server and as a client certificate.
fn check_own_leaf(
    chain: &[CertificateDer<'_>],
    roots: Arc<RootCertStore>,
    td: &TrustDomain,
) -> Result<(), String> {
    let verifier = MeshVerifier::new(roots, td.clone()).map_err(|e| e.to_string())?;
    let now = UnixTime::now();
    let name = ServerName::try_from("portcullis.invalid").expect("a valid name");
    ServerCertVerifier::verify_server_cert(&verifier, &chain[0], &chain[1..], &name, &[], now)
        .map_err(|e| e.to_string())?;
    ClientCertVerifier::verify_client_cert(&verifier, &chain[0], &chain[1..], now)
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Whether a peer's chain (leaf first), verified earlier, still chains to
/// `roots` at `now`: a long-lived connection checks it when the trust
/// bundle changes, so a peer verified only by a removed root is retired.
pub fn chain_trusted(chain: &[CertificateDer<'_>], roots: &RootCertStore, now: UnixTime) -> bool {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return false;
    };
    let Ok(parsed) = ParsedCertificate::try_from(leaf) else {
        return false;
    };
    let algs = super::provider().signature_verification_algorithms;
    verify_server_cert_signed_by_trust_anchor(&parsed, roots, intermediates, now, algs.all).is_ok()
}
