//! Verdicts on what `/certs` reports: the leaf (identity, issuer, time
//! left), the clock (a leaf not valid yet means this machine's clock is
//! behind the issuer's), and the trust bundle's roots. Pure: the time is
//! an argument, so every case is a table row.

use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::Finding;

/// Below this share of its lifetime left, a leaf counts as about to
/// expire: renewal starts at about half, so by now it has failed for long.
const LOW_LIFETIME_SHARE: f64 = 0.10;

/// The body of `/certs`, as far as `check` reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct CertsView {
    pub trust_domain: String,
    pub certificate: Option<LeafView>,
    #[serde(default)]
    pub trust_bundle: Vec<RootView>,
}

/// The sidecar's leaf certificate.
#[derive(Debug, Clone, Deserialize)]
pub struct LeafView {
    pub identity: String,
    /// The issuer's subject (absent from older sidecars).
    #[serde(default)]
    pub issuer: Option<String>,
    pub not_before: String,
    pub not_after: String,
    #[serde(default)]
    pub next_renewal: Option<String>,
}

/// One trust-bundle root.
#[derive(Debug, Clone, Deserialize)]
pub struct RootView {
    pub subject: String,
    pub not_after: String,
}

/// Parses an RFC 3339 time as `/certs` writes it.
fn parse_time(s: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// `3m 20s`; whole minutes past an hour, whole days past two.
fn human(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        s if s >= 2 * 86_400 => format!("{}d", s / 86_400),
        s if s >= 3_600 => humantime::format_duration(Duration::from_secs(s / 60 * 60)).to_string(),
        s => humantime::format_duration(Duration::from_secs(s)).to_string(),
    }
}

/// `in 3m` or `5s ago`.
fn relative(t: SystemTime, now: SystemTime) -> String {
    match t.duration_since(now) {
        Ok(ahead) => format!("in {}", human(ahead)),
        Err(e) => format!("{} ago", human(e.duration())),
    }
}

const RENEWAL_FIX: &str = "renewal is failing: the sidecar's log says why (\"certificate renewal failed\"); check identity-service below, or the mounted issuer's own expiry";

/// The `certificate`, `clock` and `trust-bundle` findings at `now`.
pub fn certificate_findings(view: &CertsView, now: SystemTime) -> Vec<Finding> {
    let mut out = Vec::new();
    match &view.certificate {
        None => {
            out.push(Finding::fail(
                "certificate",
                "no certificate yet",
                "see identity-service below and the sidecar's log (kubectl logs POD -c portcullis)",
            ));
            out.push(Finding::skip(
                "clock",
                "no certificate to compare with",
                None,
            ));
        }
        Some(leaf) => {
            out.push(leaf_finding(leaf, now));
            out.push(clock_finding(leaf, now));
        }
    }
    out.push(bundle_finding(&view.trust_bundle, now));
    out
}

fn leaf_finding(leaf: &LeafView, now: SystemTime) -> Finding {
    let (Some(nb), Some(na)) = (parse_time(&leaf.not_before), parse_time(&leaf.not_after)) else {
        return Finding::fail(
            "certificate",
            format!(
                "unreadable validity {:?} .. {:?}",
                leaf.not_before, leaf.not_after
            ),
            "use a `check` from the same release as the sidecar",
        );
    };
    let issuer = leaf
        .issuer
        .as_deref()
        .map(|i| format!(", issued by {i}"))
        .unwrap_or_default();
    let who = format!("{}{issuer}", leaf.identity);
    if now >= na {
        return Finding::fail(
            "certificate",
            format!(
                "{who}: expired at {} ({})",
                leaf.not_after,
                relative(na, now)
            ),
            RENEWAL_FIX,
        );
    }
    let lifetime = na.duration_since(nb).unwrap_or_default();
    let left = na.duration_since(now).unwrap_or_default();
    if left.as_secs_f64() < lifetime.as_secs_f64() * LOW_LIFETIME_SHARE {
        return Finding::fail(
            "certificate",
            format!(
                "{who}: expires at {} ({}), less than 10% of its {} lifetime left",
                leaf.not_after,
                relative(na, now),
                human(lifetime)
            ),
            RENEWAL_FIX,
        );
    }
    let renewal = leaf
        .next_renewal
        .as_deref()
        .map(|r| format!(", renewal at {r}"))
        .unwrap_or_default();
    Finding::ok(
        "certificate",
        format!("{who}; expires {}{renewal}", relative(na, now)),
    )
}

/// A leaf whose notBefore is still ahead: this machine's clock is behind
/// the issuer's by more than the issuer's backdating, and peers with the
/// same clock refuse the certificate.
fn clock_finding(leaf: &LeafView, now: SystemTime) -> Finding {
    let Some(nb) = parse_time(&leaf.not_before) else {
        return Finding::skip("clock", "unreadable notBefore", None);
    };
    match nb.duration_since(now) {
        Ok(ahead) if !ahead.is_zero() => Finding::fail(
            "clock",
            format!(
                "the certificate is valid from {} only, {} ahead of this clock",
                leaf.not_before,
                human(ahead)
            ),
            "the clocks disagree: sync this node's clock and the issuer's (NTP, chrony)",
        ),
        _ => Finding::ok(
            "clock",
            format!("certificate valid since {}", leaf.not_before),
        ),
    }
}

fn bundle_finding(roots: &[RootView], now: SystemTime) -> Finding {
    if roots.is_empty() {
        return Finding::fail(
            "trust-bundle",
            "no roots",
            "mount a trust bundle with the mesh's root (--trust-bundle)",
        );
    }
    let mut expired = Vec::new();
    let mut listed = Vec::new();
    for r in roots {
        match parse_time(&r.not_after) {
            Some(t) if t <= now => {
                expired.push(format!("{} expired at {}", r.subject, r.not_after))
            }
            Some(t) => listed.push(format!("{} (expires {})", r.subject, relative(t, now))),
            None => expired.push(format!(
                "{}: unreadable expiry {:?}",
                r.subject, r.not_after
            )),
        }
    }
    if expired.is_empty() {
        Finding::ok(
            "trust-bundle",
            format!("{} root(s): {}", roots.len(), listed.join("; ")),
        )
    } else {
        Finding::fail(
            "trust-bundle",
            expired.join("; "),
            "rotate the root: add the new root to the trust bundle, issue from it, then drop the old one (docs/kubernetes.md, section Rotate the issuer and the root)",
        )
    }
}

#[cfg(test)]
mod tests;
