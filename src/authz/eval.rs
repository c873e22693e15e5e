//! The decision: a pure function of the rules, the default policy, the
//! connection and (for HTTP) the request.
//!
//! Precedence: any matching `deny` → denied; else any matching `allow` →
//! allowed; else, on a port some `allow` rule covers → denied; else the
//! default policy. `audit` rules are only reported. A rule with HTTP
//! conditions never allows an opaque (non-HTTP) connection, and a `deny`
//! rule with HTTP conditions denies one outright (fail closed).

use super::matchers::Combine;
use super::ruleset::Rule;
use super::{Action, Connection, DecidedBy, Decision, DefaultPolicy, HttpRequest, Peer, RuleSet};
use crate::identity::TrustDomain;

/// Decides one connection (`http` = `None`) or one HTTP request.
pub fn authorize(
    rules: &RuleSet,
    td: &TrustDomain,
    default: DefaultPolicy,
    conn: &Connection,
    http: Option<&HttpRequest>,
) -> Decision {
    let audits: Vec<String> = rules
        .audits(conn.port)
        .filter(|r| r.matches(conn, http))
        .map(|r| r.name.clone())
        .collect();
    let decided = rules
        .denies(conn.port)
        .find(|r| r.matches(conn, http))
        .map(|r| (false, r, DecidedBy::Deny))
        .or_else(|| {
            rules
                .allows(conn.port)
                .find(|r| r.matches(conn, http))
                .map(|r| (true, r, DecidedBy::Allow))
        });
    if let Some((allowed, rule, action)) = decided {
        return Decision {
            allowed,
            rule: rule.name.clone(),
            action,
            audits,
        };
    }
    let (allowed, action) = fallback(rules, td, default, conn);
    Decision {
        allowed,
        rule: super::DEFAULT_RULE.to_string(),
        action,
        audits,
    }
}

/// The decision when no deny or allow rule matched.
pub(crate) fn fallback(
    rules: &RuleSet,
    td: &TrustDomain,
    default: DefaultPolicy,
    conn: &Connection,
) -> (bool, DecidedBy) {
    if rules.allow_covers_port(conn.port) {
        return (false, DecidedBy::ImplicitDeny);
    }
    let allowed = match default {
        DefaultPolicy::Allow => true,
        DefaultPolicy::Authenticated => {
            matches!(conn.peer, Peer::Mesh(id) if id.trust_domain() == td)
        }
        DefaultPolicy::Deny => false,
    };
    (allowed, DecidedBy::Default(default))
}

/// One condition of a rule, for explanations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    Ports,
    Identities,
    Namespaces,
    TrustDomains,
    Unauthenticated,
    Cidrs,
    Http,
    Methods,
    Paths,
    Hosts,
    Headers,
}

impl Field {
    pub const ALL: [Field; 11] = [
        Field::Ports,
        Field::Identities,
        Field::Namespaces,
        Field::TrustDomains,
        Field::Unauthenticated,
        Field::Cidrs,
        Field::Http,
        Field::Methods,
        Field::Paths,
        Field::Hosts,
        Field::Headers,
    ];

    /// The key as written in a rule file.
    pub fn key(self) -> &'static str {
        match self {
            Field::Ports => "ports",
            Field::Identities => "from.identities",
            Field::Namespaces => "from.namespaces",
            Field::TrustDomains => "from.trust_domains",
            Field::Unauthenticated => "from.unauthenticated",
            Field::Cidrs => "from.cidrs",
            Field::Http => "http",
            Field::Methods => "http.methods",
            Field::Paths => "http.paths",
            Field::Hosts => "http.hosts",
            Field::Headers => "http.headers",
        }
    }
}

/// `None` (not constrained) matches; otherwise any listed value may match.
fn any<T>(list: &Option<Vec<T>>, f: impl Fn(&T) -> bool) -> bool {
    list.as_ref().is_none_or(|l| l.iter().any(f))
}

impl Rule {
    /// How header values are read: a `deny` or `audit` rule matches when any
    /// value is listed, an `allow` rule only when every value is, so that
    /// sending several values (or `a, b` in one line) never widens access.
    pub(crate) fn combine(&self) -> Combine {
        match self.action {
            Action::Allow => Combine::Every,
            Action::Deny | Action::Audit => Combine::Any,
        }
    }

    /// Whether every condition of the rule holds (cheapest first).
    pub(crate) fn matches(&self, conn: &Connection, http: Option<&HttpRequest>) -> bool {
        Field::ALL
            .iter()
            .all(|&f| self.field_matches(f, conn, http))
    }

    /// Whether one condition holds. Request conditions hold vacuously on
    /// an opaque connection: there [`Field::Http`] decides alone.
    pub(crate) fn field_matches(
        &self,
        field: Field,
        conn: &Connection,
        http: Option<&HttpRequest>,
    ) -> bool {
        let id = match conn.peer {
            Peer::Mesh(id) => Some(id),
            Peer::Unauthenticated => None,
        };
        let from = &self.from;
        let h = self.http.as_ref();
        match field {
            Field::Ports => self.covers_port(conn.port),
            Field::Identities => {
                from.identities.is_none()
                    || id.is_some_and(|id| any(&from.identities, |p| p.matches(id)))
            }
            Field::Namespaces => {
                from.namespaces.is_none()
                    || id
                        .and_then(|id| id.namespace())
                        .is_some_and(|ns| any(&from.namespaces, |n| n == ns))
            }
            Field::TrustDomains => {
                from.trust_domains.is_none()
                    || id.is_some_and(|id| any(&from.trust_domains, |t| t == id.trust_domain()))
            }
            Field::Unauthenticated => from.unauthenticated.is_none_or(|want| want == id.is_none()),
            Field::Cidrs => any(&from.cidrs, |c| c.contains(conn.source)),
            Field::Http => h.is_none() || http.is_some() || self.action == Action::Deny,
            Field::Methods => match (h, http) {
                (Some(h), Some(req)) => any(&h.methods, |m| m == req.method),
                _ => true,
            },
            Field::Paths => match (h, http) {
                (Some(h), Some(req)) => any(&h.paths, |p| p.matches(req.path)),
                _ => true,
            },
            Field::Hosts => match (h, http) {
                (Some(h), Some(req)) => {
                    h.hosts.is_none()
                        || req
                            .host
                            .is_some_and(|host| any(&h.hosts, |p| p.matches(host)))
                }
                _ => true,
            },
            Field::Headers => match (h, http) {
                (Some(h), Some(req)) => h.headers.as_ref().is_none_or(|conds| {
                    conds.iter().all(|c| c.matches(req.headers, self.combine()))
                }),
                _ => true,
            },
        }
    }
}
