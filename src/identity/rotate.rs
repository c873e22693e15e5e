//! Keeping this sidecar's leaf certificate fresh: renewal scheduling and
//! backoff, shared by both leaf sources (a mounted issuer, or the identity
//! service).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::remote::RemoteCa;
use super::{Issuer, Leaf, LeafRequest};
use crate::metrics::Metrics;

/// How long to wait before renewing a leaf: half of its remaining lifetime,
/// moved by `jitter` (in -1..=1) by up to 5% of that lifetime, so a fleet
/// started together does not renew together.
pub fn renewal_delay(received_at: SystemTime, not_after: SystemTime, jitter: f64) -> Duration {
    let life = not_after.duration_since(received_at).unwrap_or_default();
    let fraction = 0.5 + 0.05 * jitter.clamp(-1.0, 1.0);
    life.mul_f64(fraction)
}

/// Capped exponential backoff with jitter, for retrying a failed renewal.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Self {
        Backoff {
            first,
            cap,
            next: first,
        }
    }

    /// The next delay: doubles each time up to the cap; `jitter` in 0..=1
    /// takes up to a fifth off.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.cap);
        base.mul_f64(1.0 - 0.2 * jitter.clamp(0.0, 1.0))
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// The longest `Retry-After` honoured, so a confused server cannot park a
/// sidecar for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The wait before retrying a failed renewal: the backoff, but never less
/// than what the server asked for with `Retry-After` (capped).
pub fn retry_delay(backoff: Duration, retry_after: Option<Duration>) -> Duration {
    match retry_after {
        Some(after) => backoff.max(after.min(MAX_RETRY_AFTER)),
        None => backoff,
    }
}

/// The issuer in use; the issuer file reloader writes it, the rotator reads it.
pub type IssuerWatch = watch::Receiver<Arc<Issuer>>;

/// Where leaves come from.
pub enum LeafSource {
    /// A mounted issuer signs in-process; a new issuer means renew at once.
    Issuer(IssuerWatch),
    /// The identity service (`--ca-url`) signs our CSR.
    Remote(Arc<RemoteCa>),
}

/// A failed attempt, as the rotator logs and counts it.
struct Failure {
    label: &'static str,
    error: String,
    retry_after: Option<Duration>,
}

impl LeafSource {
    async fn fetch(&mut self, request: &LeafRequest) -> Result<Leaf, Failure> {
        match self {
            LeafSource::Issuer(watch) => {
                let issuer = watch.borrow_and_update().clone();
                issuer.issue(request).map_err(|e| Failure {
                    label: "error",
                    error: e.to_string(),
                    retry_after: None,
                })
            }
            LeafSource::Remote(ca) => ca.fetch(request).await.map_err(|e| Failure {
                label: e.label(),
                retry_after: e.retry_after(),
                error: e.to_string(),
            }),
        }
    }

    /// Resolves when the source changed (a new issuer); `false` when it is gone.
    async fn changed(&mut self) -> bool {
        match self {
            LeafSource::Issuer(watch) => watch.changed().await.is_ok(),
            LeafSource::Remote(_) => std::future::pending().await,
        }
    }
}

/// Renews this sidecar's leaf from its source: on schedule, at once when
/// the issuer changes, and with backoff after a failure (the still-valid
/// leaf stays in use meanwhile; an expired one is replaced as soon as the
/// source answers again).
pub struct Rotator {
    pub request: LeafRequest,
    pub source: LeafSource,
    pub publish: Box<dyn Fn(Arc<Leaf>) + Send + Sync>,
    pub metrics: Arc<Metrics>,
}

/// While our leaf is expired every minute without one is an outage of
/// mesh traffic: retries are never spaced further apart than this.
const EXPIRED_RETRY_CAP: Duration = Duration::from_secs(5);

impl Rotator {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        // The published leaf's end of validity, and whether its expiry was logged.
        let mut expires: Option<SystemTime> = None;
        let mut expired_logged = false;
        let mut last_error = String::new();
        loop {
            let fetched = tokio::select! {
                f = self.source.fetch(&self.request) => f,
                _ = shutdown.cancelled() => return,
            };
            let delay = match fetched {
                Ok(mut leaf) => {
                    let delay = renewal_delay(
                        leaf.received_at,
                        leaf.not_after,
                        rand::random::<f64>() * 2.0 - 1.0,
                    );
                    leaf.renew_at = Some(SystemTime::now() + delay);
                    if expired_logged {
                        info!(id = %leaf.id, serial = %leaf.serial, "certificate issued after the old one expired; mesh handshakes resume");
                    } else {
                        info!(id = %leaf.id, serial = %leaf.serial, renew_in = ?delay, "certificate issued");
                    }
                    self.metrics.cert_rotations.with_label_values(&["ok"]).inc();
                    self.metrics.set_cert_expiry(leaf.not_after);
                    expires = Some(leaf.not_after);
                    expired_logged = false;
                    (self.publish)(Arc::new(leaf));
                    backoff.reset();
                    delay
                }
                Err(failure) => {
                    let mut wait = backoff.next_delay(rand::random());
                    if expires.is_some_and(|t| t <= SystemTime::now()) {
                        wait = wait.min(EXPIRED_RETRY_CAP);
                    }
                    let delay = retry_delay(wait, failure.retry_after);
                    warn!(error = %failure.error, result = failure.label, retry_in = ?delay, "certificate renewal failed; keeping the current one");
                    self.metrics
                        .cert_rotations
                        .with_label_values(&[failure.label])
                        .inc();
                    last_error = failure.error;
                    delay
                }
            };
            let mut wake = tokio::time::Instant::now() + delay;
            loop {
                // Wakes at the leaf's expiry (once) to say so, then sleeps on.
                let until_expiry = expires
                    .filter(|_| !expired_logged)
                    .map(|t| t.duration_since(SystemTime::now()).unwrap_or_default());
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    _ = tokio::time::sleep(until_expiry.unwrap_or_default()), if until_expiry.is_some() => {
                        expired_logged = true;
                        wake = wake.min(tokio::time::Instant::now() + EXPIRED_RETRY_CAP);
                        warn!(
                            last_error = %last_error,
                            retry_in = ?wake.saturating_duration_since(tokio::time::Instant::now()),
                            "certificate expired without renewal; mesh handshakes are refused until a new one is issued"
                        );
                    }
                    changed = self.source.changed() => if changed { break } else { return },
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_half_the_remaining_life_within_jitter() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let cases = [
            (3600, 0.0, 1800.0),
            (3600, 1.0, 1980.0),
            (3600, -1.0, 1620.0),
            (2, 0.0, 1.0),
            (0, 0.0, 0.0),
        ];
        for (life, jitter, want) in cases {
            let got = renewal_delay(t0, t0 + Duration::from_secs(life), jitter).as_secs_f64();
            assert!(
                (got - want).abs() < 1e-6,
                "life {life} jitter {jitter}: {got}"
            );
        }
        // Already expired: renew at once.
        assert_eq!(
            renewal_delay(t0, t0 - Duration::from_secs(5), 0.0),
            Duration::ZERO
        );
    }

    #[test]
    fn retry_after_is_honoured_within_a_cap() {
        let s = Duration::from_secs;
        let cases = [
            (s(1), None, s(1)),
            (s(1), Some(s(5)), s(5)),
            (s(10), Some(s(5)), s(10)),
            (s(1), Some(s(86400)), s(300)),
        ];
        for (backoff, after, want) in cases {
            assert_eq!(retry_delay(backoff, after), want, "{backoff:?} {after:?}");
        }
    }

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let got: Vec<u128> = (0..5).map(|_| b.next_delay(0.0).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 500, 500]);
        assert_eq!(b.next_delay(1.0).as_millis(), 400);
        b.reset();
        assert_eq!(b.next_delay(0.0).as_millis(), 100);
    }
}
