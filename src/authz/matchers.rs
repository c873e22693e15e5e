//! The value matchers a rule is made of, parsed and checked once at load
//! time so that evaluation only compares (no parsing, no allocation).
//!
//! Each `parse` returns a human message on error; the loader attaches the
//! file location of the offending value.

use std::fmt;
use std::net::IpAddr;

use crate::identity::{SpiffeId, TrustDomain};

mod request;
#[cfg(test)]
mod tests;

pub use request::{parse_header_name, Combine, HeaderCond, HeaderValue, HostPattern};

/// An inclusive port range; a single port is `lo == hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    /// Parses `8080` or `9000-9100`. Port 0 is refused: it never carries traffic.
    pub fn parse(s: &str) -> Result<Self, String> {
        let port = |p: &str| -> Result<u16, String> {
            match p.trim().parse::<u16>() {
                Ok(0) | Err(_) => Err(format!(
                    "invalid port {s:?}: use a port 1-65535 or a range like \"9000-9100\""
                )),
                Ok(n) => Ok(n),
            }
        };
        let range = match s.split_once('-') {
            Some((a, b)) => PortRange {
                lo: port(a)?,
                hi: port(b)?,
            },
            None => {
                let p = port(s)?;
                PortRange { lo: p, hi: p }
            }
        };
        if range.lo > range.hi {
            return Err(format!(
                "invalid port range {s:?}: the first port is above the last"
            ));
        }
        Ok(range)
    }

    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// A source network such as `10.0.0.0/8`; a bare address is a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` or `addr`. Host bits must be zero, so that a typo
    /// such as `10.0.0.1/8` is caught rather than silently widened.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("invalid CIDR {s:?}: {a:?} is not an IP address"))?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => {
                    return Err(format!(
                        "invalid CIDR {s:?}: the prefix length must be 0-{max}"
                    ))
                }
            },
        };
        let cidr = Cidr { addr, prefix };
        if cidr.network() != bits(addr) {
            return Err(format!(
                "invalid CIDR {s:?}: host bits are set (did you mean {}?)",
                Cidr {
                    addr: from_bits(cidr.network(), addr.is_ipv4()),
                    prefix
                }
            ));
        }
        Ok(cidr)
    }

    fn mask(&self) -> u128 {
        let width = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == 0 {
            0
        } else {
            let ones = u128::MAX << (128 - u32::from(self.prefix));
            ones >> (128 - width)
        }
    }

    fn network(&self) -> u128 {
        bits(self.addr) & self.mask()
    }

    /// Whether `ip` (IPv4-mapped IPv6 counts as IPv4) is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && bits(ip) & self.mask() == self.network()
    }

    /// Whether every address of `other` is inside this network.
    pub fn contains_net(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_bits(b: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4((b as u32).into())
    } else {
        IpAddr::V6(b.into())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A peer identity: an exact SPIFFE id, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityPattern {
    Exact(SpiffeId),
    /// The text before the `*`; it starts with `spiffe://`.
    Prefix(String),
}

const SCHEME: &str = "spiffe://";

impl IdentityPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.strip_suffix('*') {
            Some(prefix) => {
                if prefix.contains('*') {
                    return Err(format!(
                        "invalid identity {s:?}: `*` is allowed only at the end"
                    ));
                }
                if !prefix.starts_with(SCHEME) {
                    return Err(format!("invalid identity {s:?}: must start with spiffe://"));
                }
                Ok(IdentityPattern::Prefix(prefix.to_string()))
            }
            None => SpiffeId::parse(s)
                .map(IdentityPattern::Exact)
                .map_err(|e| format!("invalid identity: {e}")),
        }
    }

    /// Compares without building the id's string form.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            IdentityPattern::Exact(want) => want == id,
            IdentityPattern::Prefix(prefix) => {
                let rest = &prefix[SCHEME.len()..];
                let td = id.trust_domain().as_str();
                if rest.len() <= td.len() {
                    td.starts_with(rest)
                } else {
                    rest.starts_with(td) && id.path().starts_with(&rest[td.len()..])
                }
            }
        }
    }

    /// Whether every id this pattern matches is also matched by `self`
    /// (used by the linter; exact when it says yes).
    pub fn covers(&self, other: &IdentityPattern) -> bool {
        match (self, other) {
            (IdentityPattern::Exact(a), IdentityPattern::Exact(b)) => a == b,
            (IdentityPattern::Exact(_), IdentityPattern::Prefix(_)) => false,
            (IdentityPattern::Prefix(_), IdentityPattern::Exact(b)) => self.matches(b),
            (IdentityPattern::Prefix(a), IdentityPattern::Prefix(b)) => b.starts_with(a.as_str()),
        }
    }

    /// The trust domain every matching id has, when the pattern fixes it.
    pub fn trust_domain(&self) -> Option<&str> {
        match self {
            IdentityPattern::Exact(id) => Some(id.trust_domain().as_str()),
            IdentityPattern::Prefix(p) => {
                let rest = &p[SCHEME.len()..];
                rest.split_once('/').map(|(td, _)| td)
            }
        }
    }
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityPattern::Exact(id) => write!(f, "{id}"),
            IdentityPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// Checks a Kubernetes namespace name.
pub fn parse_namespace(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid namespace {s:?}: use a Kubernetes name (a-z, 0-9, '-')"
        ))
    }
}

/// Checks a trust domain name.
pub fn parse_trust_domain(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(s).map_err(|e| e.to_string())
}

/// Checks an HTTP method: a token, compared case-sensitively.
pub fn parse_method(s: &str) -> Result<String, String> {
    let token = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if token {
        Ok(s.to_string())
    } else {
        Err(format!("invalid HTTP method {s:?}"))
    }
}

/// One segment of a path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(String),
    /// `*`: exactly one non-empty segment.
    Any,
}

/// A path pattern: exact (`/healthz`), a subtree (`/api/**` = `/api` and
/// everything below it), with `*` standing for exactly one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    raw: String,
    segs: Vec<Seg>,
    subtree: bool,
    /// No `*` segment: an exact or prefix compare is enough.
    literal: bool,
}

impl PathPattern {
    /// Parses a pattern. It must already be in normalized form (what
    /// [`super::normalize_path`] produces), since it is compared to
    /// normalized paths and anything else could never match.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = |why: &str| Err(format!("invalid path {s:?}: {why}"));
        if !s.starts_with('/') {
            return bad("must start with '/'");
        }
        if s.contains(['?', '#']) {
            return bad("'?' and '#' are not part of a path (the query is never matched)");
        }
        let (body, subtree) = match s.strip_suffix("/**") {
            Some(b) => (b, true),
            None => (s, false),
        };
        let mut segs = Vec::new();
        if !body.is_empty() {
            let parts: Vec<&str> = body[1..].split('/').collect();
            let last = parts.len() - 1;
            for (i, part) in parts.iter().enumerate() {
                if part.is_empty() && (i != last || subtree) {
                    return bad("empty segment ('//'); paths are matched after merging slashes");
                }
                if *part == "." || *part == ".." {
                    return bad("'.' and '..' segments are removed before matching");
                }
                if *part == "**" {
                    return bad("`**` is allowed only as the last segment, as `/**`");
                }
                if *part == "*" {
                    segs.push(Seg::Any);
                    continue;
                }
                if part.contains('*') {
                    return bad("`*` must be a whole segment");
                }
                if let Err(why) = check_escapes(part) {
                    return bad(&why);
                }
                segs.push(Seg::Lit(part.to_string()));
            }
        }
        let literal = segs.iter().all(|s| matches!(s, Seg::Lit(_)));
        Ok(PathPattern {
            raw: s.to_string(),
            segs,
            subtree,
            literal,
        })
    }

    /// Whether a normalized path matches.
    pub fn matches(&self, path: &str) -> bool {
        if self.literal {
            let body = if self.subtree {
                &self.raw[..self.raw.len() - 3]
            } else {
                return path == self.raw;
            };
            return match path.strip_prefix(body) {
                Some(rest) => rest.is_empty() || rest.starts_with('/'),
                None => false,
            };
        }
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        for seg in &self.segs {
            match (seg, parts.next()) {
                (_, None) => return false,
                (Seg::Lit(want), Some(got)) if want == got => {}
                (Seg::Any, Some(got)) if !got.is_empty() => {}
                _ => return false,
            }
        }
        self.subtree || parts.next().is_none()
    }

    /// Whether every path `other` matches is matched by `self` (linter;
    /// conservative: "no" may be wrong, "yes" never is).
    pub fn covers(&self, other: &PathPattern) -> bool {
        if self.segs.len() > other.segs.len() || (other.subtree && !self.subtree) {
            return false;
        }
        if !self.subtree && self.segs.len() != other.segs.len() {
            return false;
        }
        self.segs
            .iter()
            .zip(&other.segs)
            .all(|(a, b)| match (a, b) {
                (Seg::Any, _) => true,
                (Seg::Lit(x), Seg::Lit(y)) => x == y,
                (Seg::Lit(_), Seg::Any) => false,
            })
    }
}

/// Refuses percent-escapes in a pattern that normalization would have
/// decoded (or refused), since such a pattern could never match.
fn check_escapes(seg: &str) -> Result<(), String> {
    let b = seg.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                return Err("invalid percent-encoding".into());
            };
            if super::path::is_unreserved(v) {
                return Err(format!(
                    "write {:?} instead of %{}; unreserved characters are decoded before matching",
                    v as char,
                    hex.unwrap_or_default()
                ));
            }
            if hex.is_some_and(|h| h.bytes().any(|c| c.is_ascii_lowercase())) {
                return Err("write percent-escapes in uppercase (%2F, not %2f)".into());
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    Ok(())
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}
