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
/// (or a quarter of its lifetime, for very short-lived certificates): a
/// stream started just before the deadline would outlive the certificate
/// that authenticated it.
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

/// When a certificate valid from `not_before` to `not_after` stops being
/// used for new streams.
fn deadline(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    not_after - EXPIRY_MARGIN.min(lifetime / 4)
}

/// A certificate's validity window, `None` if it does not parse.
fn validity(cert: &CertificateDer<'_>) -> Option<(SystemTime, SystemTime)> {
    let (_, x) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let from = u64::try_from(x.validity().not_before.timestamp()).ok()?;
    let to = u64::try_from(x.validity().not_after.timestamp()).ok()?;
    Some((
        SystemTime::UNIX_EPOCH + Duration::from_secs(from),
        SystemTime::UNIX_EPOCH + Duration::from_secs(to),
    ))
}

impl ConnHealth {
    /// Facts of a connection whose peer presented `chain` (already
    /// verified), checked against `bundle`; `own` is our leaf's validity on
    /// the client side. `None` when the peer's certificate does not parse.
    pub fn new(
        chain: &[CertificateDer<'static>],
        bundle: Arc<TrustBundle>,
        own: Option<(SystemTime, SystemTime)>,
    ) -> Option<Self> {
        let (from, to) = validity(chain.first()?)?;
        Some(ConnHealth {
            peer_chain: chain.to_vec(),
            peer_deadline: deadline(from, to),
            own_deadline: own.map(|(from, to)| deadline(from, to)),
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
        let mut checked = self
            .checked_with
            .lock()
            .unwrap_or_else(|p| p.into_inner());
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
    fn the_margin_is_a_quarter_of_a_short_lifetime() {
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
