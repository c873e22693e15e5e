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
    /// One of these values (any of the header's values may match).
    OneOf(Vec<String>),
}

/// A header condition with its (lowercased) name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderCond {
    pub name: http::HeaderName,
    pub value: HeaderValue,
}

impl HeaderCond {
    pub fn matches(&self, headers: &http::HeaderMap) -> bool {
        match &self.value {
            HeaderValue::Present => headers.contains_key(&self.name),
            HeaderValue::Absent => !headers.contains_key(&self.name),
            HeaderValue::OneOf(values) => headers
                .get_all(&self.name)
                .iter()
                .any(|v| values.iter().any(|want| v.as_bytes() == want.as_bytes())),
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
