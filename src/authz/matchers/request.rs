//! Matchers for HTTP request fields: hosts and headers.

use std::fmt;

/// A host name, or `*.suffix` for any name below it. Compared without the
/// request's port and case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// Lowercase, without the `*` (so `.example.com` for a wildcard).
    name: String,
    wildcard: bool,
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        let lower = s.trim_end_matches('.').to_ascii_lowercase();
        let (name, wildcard) = match lower.strip_prefix('*') {
            Some(rest) if rest.starts_with('.') && rest.len() > 1 => (rest.to_string(), true),
            Some(_) => {
                return Err(format!(
                    "invalid host {s:?}: a wildcard must look like \"*.example.com\""
                ))
            }
            None => (lower, false),
        };
        let bracketed = name.starts_with('[') && name.ends_with(']');
        let ok = !name.is_empty()
            && (bracketed
                || name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')));
        if !ok || name[1..].contains('*') {
            return Err(format!(
                "invalid host {s:?}: use a host name without port or scheme"
            ));
        }
        Ok(HostPattern { name, wildcard })
    }

    /// Matches a `Host` header value (`name`, `name:port`, `[v6]:port`).
    pub fn matches(&self, host: &str) -> bool {
        let host = strip_port(host).trim_end_matches('.');
        if self.wildcard {
            host.len() > self.name.len()
                && host.is_char_boundary(host.len() - self.name.len())
                && host[host.len() - self.name.len()..].eq_ignore_ascii_case(&self.name)
        } else {
            host.eq_ignore_ascii_case(&self.name)
        }
    }

    pub fn covers(&self, other: &HostPattern) -> bool {
        match (self.wildcard, other.wildcard) {
            (false, false) => self.name == other.name,
            (false, true) => false,
            (true, _) => other.name.len() > self.name.len() && other.name.ends_with(&self.name),
        }
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*")?;
        }
        f.write_str(&self.name)
    }
}

/// A condition on one request header (names are case-insensitive; values
/// are compared exactly).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    /// `true`: present, with any value.
    Present,
    /// `false`: must not be present.
    Absent,
    /// Values compared with the request's, see [`HeaderCond::matches`].
    OneOf(Vec<String>),
}

/// How a rule reads a header that has several values: several field
/// lines, or one line of comma-separated elements (the two mean the same
/// in HTTP, and apps pick one value in their own way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// `deny`, `audit`: any value listed is enough (denies more).
    Any,
    /// `allow`: every value must be listed (allows less).
    Every,
}

/// A header condition with its (lowercased) name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderCond {
    pub name: http::HeaderName,
    pub value: HeaderValue,
}

/// A value without optional whitespace (space, tab) around it.
fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = v.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    match (start, end) {
        (Some(s), Some(e)) => &v[s..=e],
        _ => &[],
    }
}

/// The comma-separated elements of a field line, trimmed, empty ones
/// skipped (quoted strings are not interpreted).
fn elements(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(|&b| b == b',')
        .map(trim_ows)
        .filter(|e| !e.is_empty())
}

impl HeaderCond {
    /// Whether the request's headers satisfy the condition. A field line
    /// "is listed" when it equals a listed value exactly, or when each of
    /// its comma-separated elements (trimmed, empty ones skipped) does.
    /// With [`Combine::Any`] one listed line or element is enough; with
    /// [`Combine::Every`] the header must be present and every line listed.
    pub fn matches(&self, headers: &http::HeaderMap, combine: Combine) -> bool {
        let values = match &self.value {
            HeaderValue::Present => return headers.contains_key(&self.name),
            HeaderValue::Absent => return !headers.contains_key(&self.name),
            HeaderValue::OneOf(values) => values,
        };
        let listed = |v: &[u8]| values.iter().any(|want| want.as_bytes() == v);
        let mut lines = headers.get_all(&self.name).iter().peekable();
        match combine {
            Combine::Any => lines.any(|line| {
                listed(trim_ows(line.as_bytes())) || elements(line.as_bytes()).any(&listed)
            }),
            Combine::Every => {
                lines.peek().is_some()
                    && lines.all(|line| {
                        listed(trim_ows(line.as_bytes()))
                            || (elements(line.as_bytes()).next().is_some()
                                && elements(line.as_bytes()).all(&listed))
                    })
            }
        }
    }

    /// Whether every header map `other` accepts is accepted by `self`.
    pub fn covers(&self, other: &HeaderCond) -> bool {
        self.name == other.name
            && match (&self.value, &other.value) {
                (HeaderValue::Present, HeaderValue::Present | HeaderValue::OneOf(_)) => true,
                (HeaderValue::Absent, HeaderValue::Absent) => true,
                (HeaderValue::OneOf(a), HeaderValue::OneOf(b)) => b.iter().all(|v| a.contains(v)),
                _ => false,
            }
    }
}

impl fmt::Display for HeaderCond {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            HeaderValue::Present => write!(f, "{} present", self.name),
            HeaderValue::Absent => write!(f, "{} absent", self.name),
            HeaderValue::OneOf(v) => write!(f, "{} = {}", self.name, v.join(" | ")),
        }
    }
}

/// Checks a header name (any case; stored lowercase).
pub fn parse_header_name(s: &str) -> Result<http::HeaderName, String> {
    http::HeaderName::from_bytes(s.to_ascii_lowercase().as_bytes())
        .map_err(|_| format!("invalid header name {s:?}"))
}
