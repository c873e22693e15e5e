//! Naming handshake failures for the `result` label of
//! `portcullis_tls_handshakes_total`, so an operator can tell a foreign CA
//! from an expired certificate at a glance.

use rustls::{AlertDescription, CertificateError, Error};

use super::IdentityError;

/// The metric label for a failed handshake.
pub fn handshake_result(err: &std::io::Error) -> &'static str {
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        };
    };
    match tls {
        Error::NoCertificatesPresented => "no_client_cert",
        Error::InvalidCertificate(c) => certificate_result(c),
        Error::PeerIncompatible(_) => "protocol",
        Error::InvalidMessage(_)
        | Error::InappropriateMessage { .. }
        | Error::InappropriateHandshakeMessage { .. } => "protocol",
        Error::NoApplicationProtocol => "no_alpn",
        Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => "no_client_cert",
            AlertDescription::ProtocolVersion | AlertDescription::HandshakeFailure => "protocol",
            AlertDescription::NoApplicationProtocol => "no_alpn",
            _ => "rejected_by_peer",
        },
        _ => "protocol",
    }
}

fn certificate_result(c: &CertificateError) -> &'static str {
    match c {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "not_yet_valid"
        }
        CertificateError::UnknownIssuer | CertificateError::BadSignature => "untrusted",
        CertificateError::Other(other) => match other.0.downcast_ref::<IdentityError>() {
            Some(IdentityError::WrongTrustDomain(_)) => "wrong_trust_domain",
            Some(IdentityError::Unexpected { .. }) => "wrong_identity",
            Some(_) => "bad_identity",
            None => "bad_certificate",
        },
        _ => "bad_certificate",
    }
}
