//! "Why was this allowed or denied?": the decision, the deciding rule,
//! every rule that matched, and for the closest rules that did not match,
//! which condition failed. Used by `rules explain` and the admin endpoint.

use std::fmt::{self, Write as _};

use serde::Serialize;

use super::eval::Field;
use super::ruleset::Rule;
use super::{authorize, Action, Connection, DecidedBy, DefaultPolicy, HttpRequest, Peer, RuleSet};
use crate::identity::TrustDomain;

/// How many non-matching rules an explanation describes.
const NEAR_MISSES: usize = 5;

/// A decision with its reasons; serializes to the admin endpoint's JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub allowed: bool,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// The deciding rule, or `default`.
    pub rule: String,
    /// How the decision was reached (`deny`, `allow`, `implicit_deny`, `default_…`).
    pub action: &'static str,
    pub reason: String,
    pub peer: String,
    pub source: String,
    pub port: u16,
    /// `None` for an opaque (non-HTTP) connection.
    pub request: Option<RequestFacts>,
    pub audits: Vec<String>,
    /// Every rule that matched, in rule order.
    pub matched: Vec<MatchedRule>,
    /// The rules that came closest to matching, fewest failed conditions first.
    pub near_misses: Vec<NearMiss>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RequestFacts {
    pub method: String,
    pub path: String,
    pub host: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MatchedRule {
    pub name: String,
    pub action: Action,
    pub file: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct NearMiss {
    pub name: String,
    pub action: Action,
    pub file: String,
    pub mismatches: Vec<Mismatch>,
}

/// One condition that did not hold.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    /// The key as written in rule files, e.g. `http.methods`.
    pub field: &'static str,
    pub reason: String,
}

/// Explains the decision [`authorize`] makes for the same inputs.
pub fn explain(
    rules: &RuleSet,
    td: &TrustDomain,
    default: DefaultPolicy,
    conn: &Connection,
    http: Option<&HttpRequest>,
) -> Explanation {
    let decision = authorize(rules, td, default, conn, http);
    let mut matched = Vec::new();
    let mut misses: Vec<NearMiss> = Vec::new();
    for rule in rules.rules() {
        let failed: Vec<Mismatch> = Field::ALL
            .iter()
            .filter(|&&f| !rule.field_matches(f, conn, http))
            .map(|&f| Mismatch {
                field: f.key(),
                reason: why_not(rule, f, conn, http),
            })
            .collect();
        let file = rule.file.display().to_string();
        if failed.is_empty() {
            matched.push(MatchedRule {
                name: rule.name.clone(),
                action: rule.action,
                file,
            });
        } else {
            misses.push(NearMiss {
                name: rule.name.clone(),
                action: rule.action,
                file,
                mismatches: failed,
            });
        }
    }
    misses.sort_by_key(|m| m.mismatches.len());
    misses.truncate(NEAR_MISSES);
    let reason = reason(rules, td, &decision.action, &decision.rule, conn, http);
    Explanation {
        allowed: decision.allowed,
        decision: decision.verdict(),
        rule: decision.rule,
        action: decision.action.label(),
        reason,
        peer: conn.peer.to_string(),
        source: conn.source.to_canonical().to_string(),
        port: conn.port,
        request: http.map(|r| RequestFacts {
            method: r.method.to_string(),
            path: r.path.to_string(),
            host: r.host.map(str::to_string),
        }),
        audits: decision.audits,
        matched,
        near_misses: misses,
    }
}

fn reason(
    rules: &RuleSet,
    td: &TrustDomain,
    by: &DecidedBy,
    rule: &str,
    conn: &Connection,
    http: Option<&HttpRequest>,
) -> String {
    let port = conn.port;
    let nobody = format!("no rule matched and no allow rule covers port {port}");
    match by {
        DecidedBy::Deny => {
            let opaque_http = http.is_none()
                && rules.rules().iter().any(|r| r.name == rule && r.is_http());
            if opaque_http {
                format!("denied by deny rule {rule}: it has http conditions and the connection is not HTTP, so it denies outright (fail closed)")
            } else {
                format!("denied by deny rule {rule}")
            }
        }
        DecidedBy::Allow => format!("allowed by allow rule {rule}"),
        DecidedBy::ImplicitDeny => format!(
            "denied: no rule matched, and allow rules cover port {port}, so only what they allow is allowed on it"
        ),
        DecidedBy::Default(DefaultPolicy::Allow) => format!("allowed: {nobody}; the default policy is allow"),
        DecidedBy::Default(DefaultPolicy::Deny) => format!("denied: {nobody}; the default policy is deny"),
        DecidedBy::Default(DefaultPolicy::Authenticated) => match conn.peer {
            Peer::Mesh(id) if id.trust_domain() == td => format!(
                "allowed: {nobody}; the default policy authenticated allows any identity of trust domain {td}"
            ),
            Peer::Mesh(id) => format!(
                "denied: {nobody}; the default policy authenticated allows only trust domain {td}, and the peer is from {}",
                id.trust_domain()
            ),
            Peer::Unauthenticated => format!(
                "denied: {nobody}; the default policy authenticated refuses unauthenticated peers"
            ),
        },
    }
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    let mut s = String::from("[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{item}");
    }
    s.push(']');
    s
}

/// A human sentence for one failed condition.
fn why_not(rule: &Rule, field: Field, conn: &Connection, http: Option<&HttpRequest>) -> String {
    let from = &rule.from;
    let h = rule.http.as_ref();
    let unauth = "the peer is unauthenticated (it has no identity)".to_string();
    let opt = |o: &Option<Vec<String>>| list(o.as_deref().unwrap_or_default());
    match (field, conn.peer) {
        (Field::Ports, _) => format!(
            "port {} is not in {}",
            conn.port,
            list(rule.ports.as_deref().unwrap_or_default())
        ),
        (Field::Identities | Field::Namespaces | Field::TrustDomains, Peer::Unauthenticated) => {
            unauth
        }
        (Field::Identities, Peer::Mesh(id)) => format!(
            "{id} matches none of {}",
            list(from.identities.as_deref().unwrap_or_default())
        ),
        (Field::Namespaces, Peer::Mesh(id)) => match id.namespace() {
            Some(ns) => format!("namespace {ns} is not one of {}", opt(&from.namespaces)),
            None => format!("{id} is not of the form spiffe://TD/ns/NS/sa/SA, so it has no namespace"),
        },
        (Field::TrustDomains, Peer::Mesh(id)) => format!(
            "trust domain {} is not one of {}",
            id.trust_domain(),
            list(from.trust_domains.as_deref().unwrap_or_default())
        ),
        (Field::Unauthenticated, Peer::Mesh(id)) => {
            format!("the rule is for unauthenticated peers only, and the peer is {id}")
        }
        (Field::Unauthenticated, Peer::Unauthenticated) => {
            "the rule is for authenticated peers only, and the peer is unauthenticated".into()
        }
        (Field::Cidrs, _) => format!(
            "source {} is in none of {}",
            conn.source.to_canonical(),
            list(from.cidrs.as_deref().unwrap_or_default())
        ),
        (Field::Http, _) => {
            "the connection is not HTTP, and a rule with http conditions never allows (or audits) opaque TCP".into()
        }
        _ => why_not_http(rule, h, field, http),
    }
}

fn why_not_http(
    rule: &Rule,
    h: Option<&super::ruleset::HttpCond>,
    field: Field,
    http: Option<&HttpRequest>,
) -> String {
    let (Some(h), Some(req)) = (h, http) else {
        return "does not match".into();
    };
    match field {
        Field::Methods => format!(
            "method {} is not one of {} (methods are case-sensitive)",
            req.method,
            list(h.methods.as_deref().unwrap_or_default())
        ),
        Field::Paths => format!(
            "path {} matches none of {}",
            req.path,
            list(h.paths.as_deref().unwrap_or_default())
        ),
        Field::Hosts => match req.host {
            Some(host) => format!(
                "host {host} matches none of {}",
                list(h.hosts.as_deref().unwrap_or_default())
            ),
            None => "the request has no host".into(),
        },
        Field::Headers => {
            let failed: Vec<String> = h
                .headers
                .iter()
                .flatten()
                .filter(|c| !c.matches(req.headers, rule.combine()))
                .map(|c| {
                    let got: Vec<String> = req
                        .headers
                        .get_all(&c.name)
                        .iter()
                        .map(|v| format!("{:?}", String::from_utf8_lossy(v.as_bytes())))
                        .collect();
                    if got.is_empty() {
                        format!("wanted {c}, but it is missing")
                    } else {
                        format!("wanted {c}, got {}", got.join(", "))
                    }
                })
                .collect();
            failed.join("; ")
        }
        _ => "does not match".into(),
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "decision: {}", self.decision)?;
        writeln!(f, "rule:     {} ({})", self.rule, self.action)?;
        writeln!(f, "reason:   {}", self.reason)?;
        write!(
            f,
            "request:  peer {} from {} to port {}",
            self.peer, self.source, self.port
        )?;
        match &self.request {
            Some(r) => writeln!(
                f,
                ", HTTP {} {}{}",
                r.method,
                r.path,
                r.host
                    .as_deref()
                    .map(|h| format!(" (host {h})"))
                    .unwrap_or_default()
            )?,
            None => writeln!(f, ", not HTTP")?,
        }
        if !self.audits.is_empty() {
            writeln!(f, "audits:   {}", self.audits.join(", "))?;
        }
        if self.matched.is_empty() {
            writeln!(f, "matched:  no rule")?;
        } else {
            writeln!(f, "matched:")?;
            for m in &self.matched {
                writeln!(f, "  {} {} ({})", m.action, m.name, m.file)?;
            }
        }
        if !self.near_misses.is_empty() {
            writeln!(f, "closest rules that did not match:")?;
            for m in &self.near_misses {
                writeln!(f, "  {} {} ({})", m.action, m.name, m.file)?;
                for x in &m.mismatches {
                    writeln!(f, "    {}: {}", x.field, x.reason)?;
                }
            }
        }
        Ok(())
    }
}
