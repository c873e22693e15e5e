//! Warnings for `rules check`: rules that can never match, and rules whose
//! every match is already decided by another rule (an `allow` inside a
//! `deny`, or a rule repeating an earlier one). These are valid sets, so
//! they are warnings, not errors.
//!
//! Coverage is checked field by field and conservatively: a warning is
//! only given when it is certainly right; some overlaps go unreported.

use std::path::PathBuf;

use super::load::{locate_rule, Location};
use super::matchers::IdentityPattern;
use super::ruleset::{FromCond, HttpCond, Rule};
use super::{Action, RuleSet};
use crate::identity::TrustDomain;

#[cfg(test)]
mod tests;

/// One warning about one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub rule: String,
    pub file: PathBuf,
    pub index: usize,
    pub message: String,
}

impl Warning {
    /// Where the rule is (re-reads its file; for the CLI).
    pub fn locate(&self) -> Location {
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        locate_rule(&self.file, &text, self.index)
    }
}

/// Checks a set. `td` is the sidecar's trust domain, when known: peers of
/// other trust domains are refused at the handshake, so rules naming only
/// them can never match.
pub fn lint(set: &RuleSet, td: Option<&TrustDomain>) -> Vec<Warning> {
    let mut out = Vec::new();
    let rules = set.rules();
    for (i, rule) in rules.iter().enumerate() {
        let mut warn = |message: String| {
            out.push(Warning {
                rule: rule.name.clone(),
                file: rule.file.to_path_buf(),
                index: rule.index,
                message,
            })
        };
        if let Some(why) = never_matches(rule, td) {
            warn(format!("can never match: {why}"));
            continue;
        }
        for m in rule.http.iter().flat_map(|h| h.methods.iter().flatten()) {
            if m.bytes().any(|b| b.is_ascii_lowercase()) {
                warn(format!(
                    "method {m:?} has lowercase letters; methods are case-sensitive (did you mean {:?}?)",
                    m.to_ascii_uppercase()
                ));
            }
        }
        if rule.action == Action::Allow {
            if let Some(d) = rules
                .iter()
                .find(|d| d.action == Action::Deny && covers(d, rule))
            {
                warn(format!(
                    "shadowed by deny rule {}: everything it allows is denied",
                    d.name
                ));
                continue;
            }
        }
        if let Some(e) = rules[..i]
            .iter()
            .find(|e| e.action == rule.action && covers(e, rule))
        {
            warn(format!(
                "redundant: the earlier {} rule {} already matches everything it matches",
                e.action, e.name
            ));
        }
    }
    out
}

fn never_matches(rule: &Rule, td: Option<&TrustDomain>) -> Option<String> {
    let f = &rule.from;
    let mesh_fields = f.identities.is_some() || f.namespaces.is_some() || f.trust_domains.is_some();
    if f.unauthenticated == Some(true) && mesh_fields {
        return Some("from.unauthenticated is true, but identities, namespaces or trust_domains need an authenticated peer".into());
    }
    if let (Some(ids), Some(tds)) = (&f.identities, &f.trust_domains) {
        let possible = ids.iter().any(|p| {
            p.trust_domain()
                .is_none_or(|t| tds.iter().any(|d| d.as_str() == t))
        });
        if !possible {
            return Some("no identity is in one of the listed trust_domains".into());
        }
    }
    if let (Some(ids), Some(nss)) = (&f.identities, &f.namespaces) {
        let possible = ids.iter().any(|p| match p {
            IdentityPattern::Exact(id) => {
                id.namespace().is_some_and(|ns| nss.iter().any(|n| n == ns))
            }
            IdentityPattern::Prefix(_) => true,
        });
        if !possible {
            return Some("no identity is in one of the listed namespaces".into());
        }
    }
    if let Some(td) = td {
        if let Some(ids) = &f.identities {
            if ids
                .iter()
                .all(|p| p.trust_domain().is_some_and(|t| t != td.as_str()))
            {
                return Some(format!(
                    "every identity is outside trust domain {td}, and such peers are refused at the handshake"
                ));
            }
        }
        if let Some(tds) = &f.trust_domains {
            if !tds.contains(td) {
                return Some(format!(
                    "from.trust_domains does not include our trust domain {td}"
                ));
            }
        }
    }
    None
}

/// Whether every connection or request `a` matches is also matched by `d`.
pub(crate) fn covers(d: &Rule, a: &Rule) -> bool {
    ports_cover(d, a) && from_covers(&d.from, &a.from) && http_covers(d, a)
}

fn ports_cover(d: &Rule, a: &Rule) -> bool {
    let Some(dp) = &d.ports else { return true };
    let full = [super::matchers::PortRange {
        lo: 1,
        hi: u16::MAX,
    }];
    let ap: &[super::matchers::PortRange] = a.ports.as_deref().unwrap_or(&full);
    ap.iter()
        .all(|r| dp.iter().any(|q| q.lo <= r.lo && r.hi <= q.hi))
}

/// `d`'s list is absent, or every value of `a`'s list is covered.
fn list_covers<T>(d: &Option<Vec<T>>, a: &Option<Vec<T>>, c: impl Fn(&T, &T) -> bool) -> bool {
    match (d, a) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(d), Some(a)) => a.iter().all(|x| d.iter().any(|y| c(y, x))),
    }
}

fn from_covers(d: &FromCond, a: &FromCond) -> bool {
    let exact_ids = |f: &dyn Fn(&crate::identity::SpiffeId) -> bool| {
        a.identities.as_ref().is_some_and(|ids| {
            ids.iter()
                .all(|p| matches!(p, IdentityPattern::Exact(id) if f(id)))
        })
    };
    let ids = list_covers(&d.identities, &a.identities, |x, y| x.covers(y));
    let nss = list_covers(&d.namespaces, &a.namespaces, |x, y| x == y)
        || exact_ids(&|id| {
            id.namespace()
                .is_some_and(|ns| d.namespaces.iter().flatten().any(|n| n == ns))
        });
    let tds = list_covers(&d.trust_domains, &a.trust_domains, |x, y| x == y)
        || exact_ids(&|id| {
            d.trust_domains
                .iter()
                .flatten()
                .any(|t| t == id.trust_domain())
        });
    let a_mesh = a.identities.is_some() || a.namespaces.is_some() || a.trust_domains.is_some();
    let unauth = match d.unauthenticated {
        None => true,
        Some(b) => a.unauthenticated == Some(b) || (!b && a_mesh),
    };
    let cidrs = list_covers(&d.cidrs, &a.cidrs, |x, y| x.contains_net(y));
    ids && nss && tds && unauth && cidrs
}

fn http_covers(d: &Rule, a: &Rule) -> bool {
    match (&d.http, &a.http) {
        (None, _) => true,
        // `a` also matches opaque connections: only a deny with no request
        // conditions at all matches everything `a` does.
        (Some(dh), None) => d.action == Action::Deny && unconstrained(dh),
        (Some(dh), Some(ah)) => {
            list_covers(&dh.methods, &ah.methods, |x, y| x == y)
                && list_covers(&dh.paths, &ah.paths, |x, y| x.covers(y))
                && list_covers(&dh.hosts, &ah.hosts, |x, y| x.covers(y))
                && headers_cover(dh, ah)
        }
    }
}

fn unconstrained(h: &HttpCond) -> bool {
    h.methods.is_none() && h.paths.is_none() && h.hosts.is_none() && h.headers.is_none()
}

/// Header conditions all hold together: `d`'s are implied by `a`'s when
/// each of them covers one of `a`'s.
fn headers_cover(d: &HttpCond, a: &HttpCond) -> bool {
    match (&d.headers, &a.headers) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(d), Some(a)) => d.iter().all(|dc| a.iter().any(|ac| dc.covers(ac))),
    }
}
