//! Authorization rules: the rule file model, its loader, the compiled
//! [`RuleSet`], the pure [`authorize`] decision, explanations, and the live
//! set that is hot-reloaded from a mounted directory.
//!
//! Policy lives in plain files so that no control plane is needed; the
//! decision is a pure function over plain data so that it can be tested with
//! tables and explained on request. See docs/rules.md for the format and the
//! exact semantics.

mod eval;
mod explain;
mod lint;
mod live;
mod load;
mod matchers;
mod metrics;
mod model;
mod path;
mod port_index;
mod ruleset;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

pub use eval::authorize;
pub use explain::{explain, Explanation, MatchedRule, Mismatch, NearMiss};
pub use lint::{lint, Warning};
pub use live::{LiveRules, ReloadError, ReloadOutcome, RulesStatus};
pub(crate) use load::list_dir;
pub use load::{check_paths, compile, load_dir, load_paths, locate_rule, Location, Source};
pub use metrics::AuthzMetrics;
pub use path::{normalize_path, PathError};
pub use ruleset::{Rule, RuleSet};

use crate::identity::SpiffeId;

/// Everything that can go wrong while loading rules.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read (or a directory listed).
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file's content is wrong; `at` says where, as `file:line:column`.
    #[error("{at}: {message}")]
    Invalid { at: Location, message: String },
    /// A file, or the whole set, is larger than its limit.
    #[error("{}: {what} is larger than the limit of {limit} bytes; refused", path.display())]
    TooLarge {
        path: PathBuf,
        what: &'static str,
        limit: u64,
    },
    /// A directory entry resolves to a file outside the directory (a
    /// symlink to elsewhere); only the ConfigMap layout's links inside the
    /// directory are followed.
    #[error("{}: resolves outside the rules directory; refused", path.display())]
    Outside { path: PathBuf },
    /// The user asked for rules and there are none.
    #[error("{}: {reason}", path.display())]
    NoRules { path: PathBuf, reason: String },
    /// The directory could not be watched.
    #[error("watching {}: {source}", path.display())]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

impl Error {
    /// Where the error is, as `file-name:line:column` (or the file name
    /// alone): what `GET /rules` shows to clients that may not see the text.
    pub fn position(&self) -> Option<String> {
        let name = |p: &std::path::Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string())
        };
        match self {
            Error::Invalid { at, .. } => {
                Some(format!("{}:{}:{}", name(&at.file), at.line, at.column))
            }
            Error::Io { path, .. } | Error::TooLarge { path, .. } | Error::Outside { path } => {
                Some(name(path))
            }
            Error::NoRules { .. } | Error::Watch { .. } => None,
        }
    }
}

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    /// Log and count what would have matched; never changes the decision.
    Audit,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Audit => "audit",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens on a port that no `allow` rule covers and no rule decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultPolicy {
    /// Everyone, unauthenticated peers included.
    Allow,
    /// Any peer with an identity of our trust domain.
    #[default]
    Authenticated,
    /// Nobody.
    Deny,
}

impl DefaultPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::Allow => "allow",
            DefaultPolicy::Authenticated => "authenticated",
            DefaultPolicy::Deny => "deny",
        }
    }
}

impl fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A sidecar that presented a verified certificate.
    Mesh(SpiffeId),
    /// A plaintext client (permissive mode only).
    Unauthenticated,
}

impl Peer {
    /// Parses the CLI's `--from`: a SPIFFE id or `unauthenticated`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "unauthenticated" {
            return Ok(Peer::Unauthenticated);
        }
        SpiffeId::parse(s)
            .map(Peer::Mesh)
            .map_err(|e| e.to_string())
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Mesh(id) => fmt::Display::fmt(id, f),
            Peer::Unauthenticated => f.write_str("unauthenticated"),
        }
    }
}

/// The connection-level facts every decision uses.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    pub peer: &'a Peer,
    /// The client's address (an IPv4-mapped IPv6 address counts as IPv4).
    pub source: IpAddr,
    /// The original destination port, or the `--inbound-target` port.
    pub port: u16,
}

/// One HTTP request on a connection. `path` must already be normalized with
/// [`normalize_path`] (and is what the app receives); the query string is
/// not part of it.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The `Host` header or HTTP/2 `:authority`, possibly with a port.
    pub host: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
}

/// How a decision was reached; also the `action` label of
/// `portcullis_authz_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecidedBy {
    /// A matching `deny` rule.
    Deny,
    /// A matching `allow` rule (and no matching deny).
    Allow,
    /// No rule matched, but an `allow` rule covers the port: denied.
    ImplicitDeny,
    /// No rule matched and no `allow` rule covers the port: the default policy.
    Default(DefaultPolicy),
}

impl DecidedBy {
    /// A bounded label value.
    pub fn label(self) -> &'static str {
        match self {
            DecidedBy::Deny => "deny",
            DecidedBy::Allow => "allow",
            DecidedBy::ImplicitDeny => "implicit_deny",
            DecidedBy::Default(DefaultPolicy::Allow) => "default_allow",
            DecidedBy::Default(DefaultPolicy::Authenticated) => "default_authenticated",
            DecidedBy::Default(DefaultPolicy::Deny) => "default_deny",
        }
    }
}

impl fmt::Display for DecidedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The rule name used when no rule decided.
pub const DEFAULT_RULE: &str = "default";

/// The outcome of [`authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The deciding rule's name, or `"default"` (implicit deny, default policy).
    pub rule: String,
    pub action: DecidedBy,
    /// Names of the `audit` rules that matched, in rule order.
    pub audits: Vec<String>,
}

impl Decision {
    /// `"allow"` or `"deny"`, the `decision` label.
    pub fn verdict(&self) -> &'static str {
        if self.allowed {
            "allow"
        } else {
            "deny"
        }
    }
}
