//! Whether a long-lived tunnel connection may still carry a new stream. A
//! per-connection link is judged once, at its handshake; a tunnel lives on,
//! so each new stream asks again: has the peer's certificate (or ours)
//! expired or nearly so, and does the peer still chain to the trust bundle
//! in force?

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::tls::{chain_trusted, MeshTls, TrustBundle};

/// Never closer to a certificate's expiry than this when starting a stream
/// (or a quarter of the time it had left when the connection was made, for
/// very short-lived certificates): a stream started just before the
/// deadline would reach the peer after the certificate expired.
const EXPIRY_MARGIN: Duration = Duration::from_secs(5);

/// Why a tunnel connection takes no new stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// The peer's certificate expires (or has expired) within the margin.
    PeerExpiring,
    /// Our own certificate on this connection does.
    OwnExpiring,
    /// The trust bundle changed and no longer holds the peer's root.
    Untrusted,
}

impl Stale {
    pub fn label(self) -> &'static str {
        match self {
            Stale::PeerExpiring => "peer_expiring",
            Stale::OwnExpiring => "own_expiring",
            Stale::Untrusted => "untrusted",
        }
    }
}

/// The certificate facts of one tunnel connection, taken at its handshake.
pub struct ConnHealth {
    peer_chain: Vec<CertificateDer<'static>>,
    peer_deadline: SystemTime,
    /// Our leaf's deadline; `None` on the server side, where a rotation
    /// does not matter to a peer that already verified us.
    own_deadline: Option<SystemTime>,
    /// The bundle the peer was last checked against.
    checked_with: Mutex<Arc<TrustBundle>>,
}

/// When a connection made at `made` with a certificate valid until
/// `not_after` stops taking new streams. Not from the certificate's
/// `notBefore`: issuers backdate it for clock skew, which would make a
/// short-lived certificate look long-lived.
fn deadline(made: SystemTime, not_after: SystemTime) -> SystemTime {
    let left = not_after.duration_since(made).unwrap_or_default();
    not_after - EXPIRY_MARGIN.min(left / 4)
}

/// A certificate's `notAfter`, `None` if it does not parse.
fn validity(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, x) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let to = u64::try_from(x.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(to))
}

impl ConnHealth {
    /// The client side's view of a connection whose server presented
    /// `chain` (already verified against `bundle`), made with our leaf
    /// valid until `own_not_after`: it stops a margin before either expires, so no
    /// stream it starts reaches the server after the expiry.
    pub fn for_client(
        chain: &[CertificateDer<'static>],
        bundle: Arc<TrustBundle>,
        own_not_after: Option<SystemTime>,
    ) -> Option<Self> {
        let to = validity(chain.first()?)?;
        let made = SystemTime::now();
        Some(ConnHealth {
            peer_chain: chain.to_vec(),
            peer_deadline: deadline(made, to),
            own_deadline: own_not_after.map(|to| deadline(made, to)),
            checked_with: Mutex::new(bundle),
        })
    }

    /// The server side's view: a client's stream is refused once its
    /// certificate has expired (clients stop earlier, with a margin).
    pub fn for_server(chain: &[CertificateDer<'static>], bundle: Arc<TrustBundle>) -> Option<Self> {
        let to = validity(chain.first()?)?;
        Some(ConnHealth {
            peer_chain: chain.to_vec(),
            peer_deadline: to,
            own_deadline: None,
            checked_with: Mutex::new(bundle),
        })
    }

    /// Whether a new stream may start on this connection `now`.
    pub fn check(&self, tls: &MeshTls, now: SystemTime) -> Result<(), Stale> {
        if now >= self.peer_deadline {
            return Err(Stale::PeerExpiring);
        }
        if self.own_deadline.is_some_and(|d| now >= d) {
            return Err(Stale::OwnExpiring);
        }
        let current = tls.snapshot().bundle.clone();
        let mut checked = self.checked_with.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&checked, &current) {
            return Ok(());
        }
        // Once per bundle change per connection: a signature check or two.
        let unix = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        if !chain_trusted(&self.peer_chain, &current.roots, unix) {
            return Err(Stale::Untrusted);
        }
        *checked = current;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_margin_is_a_quarter_of_what_a_short_lived_certificate_had_left() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(
            deadline(t0, t0 + Duration::from_secs(2)),
            t0 + Duration::from_millis(1_500)
        );
        assert_eq!(
            deadline(t0, t0 + Duration::from_secs(3_600)),
            t0 + Duration::from_secs(3_595)
        );
    }
}
