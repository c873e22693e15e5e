//! The compiled, immutable rule set: what [`super::authorize`] reads.
//!
//! Rules are split by action once and each action's rules are indexed by
//! the ports they list, so a decision walks only the rules that can apply
//! on its port, each at most once, and never allocates beyond its result.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::matchers::{Cidr, HeaderCond, HostPattern, IdentityPattern, PathPattern, PortRange};
use super::model::{FromModel, HttpModel, RuleModel};
use super::port_index::PortIndex;
use super::Action;
use crate::identity::TrustDomain;

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    /// The file the rule came from, and its position in that file's list.
    pub file: Arc<Path>,
    pub index: usize,
    pub(crate) ports: Option<Vec<PortRange>>,
    pub(crate) from: FromCond,
    pub(crate) http: Option<HttpCond>,
}

/// The peer conditions; `None` = not constrained.
#[derive(Debug, Clone, Default)]
pub(crate) struct FromCond {
    pub identities: Option<Vec<IdentityPattern>>,
    pub namespaces: Option<Vec<String>>,
    pub trust_domains: Option<Vec<TrustDomain>>,
    pub unauthenticated: Option<bool>,
    pub cidrs: Option<Vec<Cidr>>,
}

/// The request conditions; `None` = not constrained.
#[derive(Debug, Clone, Default)]
pub(crate) struct HttpCond {
    pub methods: Option<Vec<String>>,
    pub paths: Option<Vec<PathPattern>>,
    pub hosts: Option<Vec<HostPattern>>,
    pub headers: Option<Vec<HeaderCond>>,
}

impl Rule {
    pub(crate) fn from_model(m: RuleModel, file: Arc<Path>, index: usize) -> Self {
        fn list<T, U>(
            l: Option<super::model::List<super::model::Parsed<T>>>,
            f: impl Fn(T) -> U,
        ) -> Option<Vec<U>> {
            l.map(|l| l.0.into_iter().map(|p| f(p.0)).collect())
        }
        let from = m.from.unwrap_or_default();
        let FromModel {
            identities,
            namespaces,
            trust_domains,
            unauthenticated,
            cidrs,
        } = from;
        Rule {
            name: m.name.0 .0,
            action: m.action,
            file,
            index,
            ports: list(m.ports, |p| p),
            from: FromCond {
                identities: list(identities, |i| i),
                namespaces: list(namespaces, |n| n.0),
                trust_domains: list(trust_domains, |t| t),
                unauthenticated,
                cidrs: list(cidrs, |c| c),
            },
            http: m.http.map(|h| {
                let HttpModel {
                    methods,
                    paths,
                    hosts,
                    headers,
                } = h;
                HttpCond {
                    methods: list(methods, |m| m.0),
                    paths: list(paths, |p| p),
                    hosts: list(hosts, |h| h),
                    headers: headers.map(|h| h.0),
                }
            }),
        }
    }

    /// Whether the rule applies to `port` at all.
    pub fn covers_port(&self, port: u16) -> bool {
        match &self.ports {
            None => true,
            Some(ranges) => ranges.iter().any(|r| r.contains(port)),
        }
    }

    /// Whether the rule has HTTP conditions (and so never allows opaque TCP).
    pub fn is_http(&self) -> bool {
        self.http.is_some()
    }
}

/// A validated, immutable set of rules, with what identifies it.
#[derive(Debug, Clone)]
pub struct RuleSet {
    rules: Vec<Rule>,
    denies: PortIndex,
    allows: PortIndex,
    audits: PortIndex,
    /// Every header name some rule reads, sorted and deduplicated: as
    /// written, and with `_` folded to `-` (see [`RuleSet::underscore_twin`]).
    header_names: Vec<String>,
    folded_header_names: Vec<String>,
    hash: String,
    loaded_at: SystemTime,
    files: Vec<PathBuf>,
}

impl RuleSet {
    /// A set with no rules: every decision is the default policy.
    pub fn empty() -> Self {
        Self::new(Vec::new(), crate::filewatch::content_hash(&[]), Vec::new())
    }

    pub(crate) fn new(rules: Vec<Rule>, hash: String, files: Vec<PathBuf>) -> Self {
        let pick = |a: Action| -> Vec<usize> {
            (0..rules.len()).filter(|&i| rules[i].action == a).collect()
        };
        let (denies, allows, audits) =
            (pick(Action::Deny), pick(Action::Allow), pick(Action::Audit));
        let index = |ids: &[usize]| PortIndex::new(ids, |i| rules[i].ports.as_deref());
        let (denies, allows, audits) = (index(&denies), index(&allows), index(&audits));
        let mut header_names: Vec<String> = rules
            .iter()
            .filter_map(|r| r.http.as_ref()?.headers.as_ref())
            .flatten()
            .map(|c| c.name.as_str().to_owned())
            .collect();
        header_names.sort();
        header_names.dedup();
        let mut folded_header_names: Vec<String> =
            header_names.iter().map(|n| fold_underscores(n)).collect();
        folded_header_names.sort();
        folded_header_names.dedup();
        RuleSet {
            rules,
            denies,
            allows,
            audits,
            header_names,
            folded_header_names,
            hash,
            loaded_at: SystemTime::now(),
            files,
        }
    }

    /// Every rule, in file order (files sorted by name).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// A short hash of the files' names and contents.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn loaded_at(&self) -> SystemTime {
        self.loaded_at
    }

    /// The files the rules were read from.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Whether some `allow` rule covers `port` (then anything not allowed
    /// on it is denied, whatever the default policy).
    pub fn allow_covers_port(&self, port: u16) -> bool {
        // The index hands out the rules that list the port (every rule,
        // past its size limit), so the check is what decides.
        self.allows(port).any(|r| r.covers_port(port))
    }

    /// Whether `name` is an underscore twin of a header some rule reads:
    /// it contains `_`, is not spelled exactly as in the rule, and names the
    /// rule's header once every `_` is read as `-` (CGI-style gateways fold
    /// `x_tenant` into `x-tenant`, so the app could read a value no rule
    /// saw). Names without `_` cost one byte scan.
    pub fn underscore_twin(&self, name: &str) -> bool {
        if self.header_names.is_empty() || !name.contains('_') {
            return false;
        }
        let name = name.to_ascii_lowercase();
        self.folded_header_names
            .binary_search(&fold_underscores(&name))
            .is_ok()
            && self.header_names.binary_search(&name).is_err()
    }

    /// The `deny` rules that can apply on `port`, in file order.
    pub(crate) fn denies(&self, port: u16) -> impl Iterator<Item = &Rule> {
        self.denies.on_port(port).map(|i| &self.rules[i])
    }

    /// The `allow` rules that can apply on `port`, in file order.
    pub(crate) fn allows(&self, port: u16) -> impl Iterator<Item = &Rule> {
        self.allows.on_port(port).map(|i| &self.rules[i])
    }

    /// The `audit` rules that can apply on `port`, in file order.
    pub(crate) fn audits(&self, port: u16) -> impl Iterator<Item = &Rule> {
        self.audits.on_port(port).map(|i| &self.rules[i])
    }
}

/// `name` with every `_` replaced by `-`.
fn fold_underscores(name: &str) -> String {
    name.replace('_', "-")
}

impl Default for RuleSet {
    fn default() -> Self {
        Self::empty()
    }
}
