//! Admission of one request head: the pure part of the inbound HTTP path.
//!
//! Everything the proxy decides about a request before it reaches the app
//! happens here, over the head alone and without I/O: the method, the host
//! (one parser, whose result both the rules and the app see), the path
//! (normalized once, and that normalized path is what the app receives),
//! malformed header values, the rule decision, and the rewrite of what the
//! app receives (hop-by-hop headers and any caller-supplied identity header
//! removed, our `x-forwarded-client-cert` added). Keeping it pure lets tests
//! and fuzzers drive it without a server.

use std::fmt::Write as _;

use http::request::Parts;
use http::uri::Uri;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

use super::ConnInfo;
use crate::authz::{
    authorize, normalize_path, Connection, Decision, DefaultPolicy, HttpRequest, PathError, RuleSet,
};
use crate::identity::TrustDomain;

#[cfg(test)]
mod tests;

/// The header that tells the app who called; callers cannot set it.
pub const XFCC: &str = "x-forwarded-client-cert";
const XFCC_NAME: HeaderName = HeaderName::from_static(XFCC);

/// Hop-by-hop names without a constant in `http::header`, made once rather
/// than parsed from a string on every request.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// What admission needs besides the rules and the connection (the
/// sidecar's `--trust-domain`, `--default-policy` and
/// `--allow-encoded-slash`).
#[derive(Debug, Clone, Copy)]
pub struct AdmitSettings<'a> {
    pub td: &'a TrustDomain,
    pub default: DefaultPolicy,
    pub allow_encoded_slash: bool,
}

/// Marks a request whose target had a `#fragment`, which the HTTP parser
/// removed before the URI was built (the connection reader saw it).
#[derive(Debug, Clone, Copy)]
pub struct FragmentSeen;

/// A request the rules allow, already rewritten for the app.
#[derive(Debug)]
pub struct Admitted {
    pub decision: Decision,
    /// The request asks to switch protocols (WebSocket); `Connection` and
    /// `Upgrade` were kept for the app.
    pub upgrade: bool,
}

/// Why a request head was refused; [`Refusal::status`] is the answer.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("bad method: {0}")]
    Method(&'static str),
    /// `CONNECT` asks for a tunnel, which an application port does not serve.
    #[error("CONNECT is not served on an application port")]
    Connect,
    #[error("bad request target: {0}")]
    Target(&'static str),
    #[error("bad path: {0}")]
    Path(#[from] PathError),
    #[error("bad host: {0}")]
    Host(&'static str),
    #[error("bad value of header {0}: {1}")]
    Header(HeaderName, &'static str),
    /// A header spelled with `_` that names, once `_` is read as `-`, a
    /// header the rules read (see [`RuleSet::underscore_twin`]).
    #[error("header {0} is an underscore spelling of a header the rules read")]
    HeaderTwin(HeaderName),
    /// The rules deny the request (the decision names the rule).
    #[error("denied by rule {}", .0.rule)]
    Denied(Decision),
}

impl Refusal {
    /// The HTTP status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Connect => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::Denied(_) => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The decision, when the rules were asked (to count and log it).
    pub fn decision(&self) -> Option<&Decision> {
        match self {
            Refusal::Denied(d) => Some(d),
            _ => None,
        }
    }
}

/// Admits (or refuses) one request head and rewrites it for the app.
///
/// Refused (see [`Refusal`]): `CONNECT` (405), a method with lowercase
/// letters, a scheme other than http(s), a request marked [`FragmentSeen`]
/// by the caller, a path [`normalize_path`] refuses,
/// a host [`normalize_host`] refuses or a missing or doubled `Host`, a
/// field value with whitespace at either end, a header whose name is an
/// underscore twin of one the rules read ([`RuleSet::underscore_twin`])
/// (400), and what the rules deny (403).
///
/// On `Ok`, `parts` is what the app must receive: its URI is absolute
/// (`http://HOST/normalized-path?query`, `HOST` being the normalized host
/// the rules saw, or the connection's target when an HTTP/1.0 request named
/// none: the caller's HTTP/1 client must then not add a `Host`), HTTP/1.x
/// carries that host in `Host` (HTTP/2 only in `:authority`), hop-by-hop
/// headers, `Trailer` and every spelling of `x-forwarded-client-cert` are
/// gone, and a mesh peer's identity is in
/// `x-forwarded-client-cert: URI=<id>`. The rules see these rewritten
/// headers, i.e. what the app will receive. The caller drops request
/// trailers. On `Err`, `parts` may be partly rewritten and must not be
/// forwarded. Nothing is logged or counted: the caller records the
/// decision.
///
/// Standalone use (a test or a fuzz target), with rules loaded from files:
///
/// ```no_run
/// use std::sync::Arc;
/// use portcullis::authz::{load_paths, DefaultPolicy, Peer};
/// use portcullis::identity::TrustDomain;
/// use portcullis::proxy::http::{admit_head, AdmitSettings, ConnInfo};
///
/// let rules = load_paths(&["rules/policy.yaml".into()]).unwrap();
/// let td = TrustDomain::new("cluster.local").unwrap();
/// let settings = AdmitSettings { td: &td, default: DefaultPolicy::Authenticated, allow_encoded_slash: false };
/// let conn = ConnInfo::new(
///     Arc::new(Peer::Unauthenticated),
///     "10.0.0.1:40000".parse().unwrap(),
///     "127.0.0.1:8080".parse().unwrap(),
/// );
/// let req = http::Request::get("/api/users").header("host", "api.example").body(()).unwrap();
/// let (mut parts, _body) = req.into_parts();
/// match admit_head(&mut parts, &conn, &rules, settings) {
///     Ok(admitted) => println!("allowed by {}: forward {}", admitted.decision.rule, parts.uri),
///     Err(refusal) => println!("{} {refusal}", refusal.status()),
/// }
/// ```
pub fn admit_head(
    parts: &mut Parts,
    conn: &ConnInfo,
    rules: &RuleSet,
    settings: AdmitSettings<'_>,
) -> Result<Admitted, Refusal> {
    check_method(&parts.method)?;
    if parts
        .uri
        .scheme()
        .is_some_and(|s| s != "http" && s != "https")
    {
        return Err(Refusal::Target("a scheme other than http or https"));
    }
    if parts.extensions.get::<FragmentSeen>().is_some() {
        return Err(Refusal::Path(PathError::Fragment));
    }
    let path = normalize_path(parts.uri.path(), settings.allow_encoded_slash)?;
    let host = request_host(parts).map_err(Refusal::Host)?;
    check_header_values(&parts.headers)?;
    // The rules see the headers exactly as the app will receive them.
    let upgrade = is_upgrade(&parts.headers);
    rewrite_headers(parts, conn, host.as_deref(), upgrade);
    check_header_twins(&parts.headers, rules)?;
    let decision = authorize(
        rules,
        settings.td,
        settings.default,
        &Connection {
            peer: &conn.peer,
            source: conn.source.ip().to_canonical(),
            port: conn.target.port(),
        },
        Some(&HttpRequest {
            method: parts.method.as_str(),
            path: &path,
            host: host.as_deref(),
            headers: &parts.headers,
        }),
    );
    if !decision.allowed {
        return Err(Refusal::Denied(decision));
    }
    let authority = host.unwrap_or_else(|| conn.target.to_string());
    let query = parts.uri.query();
    let query_len = query.map_or(0, |q| q.len() + 1);
    let mut target = String::with_capacity(7 + authority.len() + path.len() + query_len);
    target.push_str("http://");
    target.push_str(&authority);
    target.push_str(&path);
    if let Some(q) = query {
        target.push('?');
        target.push_str(q);
    }
    parts.uri =
        Uri::try_from(target).map_err(|_| Refusal::Target("the rewritten target is not a URI"))?;
    Ok(Admitted { decision, upgrade })
}

/// Prepares the headers for the app: hop-by-hop headers and `Trailer`
/// removed (request trailers are dropped, see `NoTrailers`), every
/// spelling of `x-forwarded-client-cert` replaced by ours for a mesh peer,
/// and the host carried as the rules saw it (`Host` on HTTP/1.x; HTTP/2
/// names it in `:authority`, so a `host` header is removed).
fn rewrite_headers(parts: &mut Parts, conn: &ConnInfo, host: Option<&str>, upgrade: bool) {
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers, upgrade);
    headers.remove(header::TRAILER);
    strip_client_cert_headers(headers);
    if let Some(v) = conn.xfcc() {
        headers.insert(XFCC_NAME, v.clone());
    }
    match (host, parts.version < Version::HTTP_2) {
        // For an absolute-form target the host is the URI's authority,
        // whatever `Host` said.
        (Some(h), true) => {
            if let Ok(v) = HeaderValue::from_str(h) {
                headers.insert(header::HOST, v);
            }
        }
        _ => {
            headers.remove(header::HOST);
        }
    }
}

/// Refuses `CONNECT` (a tunnel request, not something an application port
/// serves) and methods with lowercase letters: methods are case-sensitive
/// and rules compare them exactly, but some apps compare them ignoring
/// case, so `delete` could be run as `DELETE` past a rule denying `DELETE`.
fn check_method(method: &Method) -> Result<(), Refusal> {
    if method == Method::CONNECT {
        return Err(Refusal::Connect);
    }
    if method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(Refusal::Method("a method with lowercase letters"));
    }
    Ok(())
}

/// Refuses field values with whitespace at either end. HTTP/1 parsing
/// trims it, but HTTP/2 carries values as sent, and RFC 9113 §8.2.1 calls
/// such a request malformed: `" evil"` would not equal a rule's `evil`
/// while many apps trim it and read `evil`.
fn check_header_values(headers: &HeaderMap) -> Result<(), Refusal> {
    for (name, value) in headers {
        let b = value.as_bytes();
        let padded = |c: Option<&u8>| matches!(c, Some(b' ' | b'\t'));
        if padded(b.first()) || padded(b.last()) {
            return Err(Refusal::Header(
                name.clone(),
                "leading or trailing whitespace",
            ));
        }
    }
    Ok(())
}

/// Refuses a header spelled with `_` where a rule reads the `-` spelling
/// (`x_tenant` when a rule reads `x-tenant`): gateways that fold `_` into
/// `-` would hand the app a value no rule saw, past a deny rule or beside
/// the value an allow rule checked. Only names with `_` cost more than a
/// byte scan, and nothing at all when no rule reads a header.
fn check_header_twins(headers: &HeaderMap, rules: &RuleSet) -> Result<(), Refusal> {
    match headers.keys().find(|n| rules.underscore_twin(n.as_str())) {
        Some(name) => Err(Refusal::HeaderTwin(name.clone())),
        None => Ok(()),
    }
}

/// The host the client asked for, normalized by [`normalize_host`]: the
/// URI's authority (HTTP/2 `:authority`, or an HTTP/1 absolute-form
/// target), else the one `Host` header. An HTTP/1.1 or HTTP/2 request
/// must name one; only HTTP/1.0 may omit it (`None`). Two `Host` headers,
/// or a `Host` that is malformed or names another host than the URI, are
/// refused.
pub(crate) fn request_host(parts: &Parts) -> Result<Option<String>, &'static str> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    let header = header.map(|h| normalize_host(h.as_bytes())).transpose()?;
    let Some(authority) = parts.uri.authority() else {
        if header.is_none() && parts.version >= Version::HTTP_11 {
            return Err("no Host header");
        }
        return Ok(header);
    };
    let host = normalize_host(authority.as_str().as_bytes())?;
    // HTTP/1 absolute form: the target's host wins over `Host` (RFC 9112
    // §3.2.2). HTTP/2: `host` must name the same (RFC 9113 §8.3.1).
    if parts.version >= Version::HTTP_2 && header.as_ref().is_some_and(|h| *h != host) {
        return Err("a host header that differs from :authority");
    }
    Ok(Some(host))
}

/// The one parser of hosts: `name[:port]` or `[IPv6][:port]`, returned in
/// the one form both the rules and the app see: lowercase, without a
/// trailing dot, the port in plain decimal (`Api.Example.:080` →
/// `api.example:80`). Anything servers might read in two ways is refused:
/// user information, percent-escapes or other characters outside
/// `A-Z a-z 0-9 - . _`, empty labels, and a port that is not 1–5 ASCII
/// digits of at most 65535 (`+80`, `-80`, ` 80`, `80a` and an empty port
/// are all refused).
pub fn normalize_host(value: &[u8]) -> Result<String, &'static str> {
    let (name, port) = if value.first() == Some(&b'[') {
        let end = value
            .iter()
            .position(|&b| b == b']')
            .ok_or("an unclosed IPv6 literal")?;
        let inner = std::str::from_utf8(&value[1..end]).map_err(|_| "a malformed host")?;
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("a malformed IPv6 literal");
        }
        (&value[..=end], &value[end + 1..])
    } else {
        let colon = value.iter().position(|&b| b == b':').unwrap_or(value.len());
        let (name, port) = value.split_at(colon);
        let name = name.strip_suffix(b".").unwrap_or(name);
        let ok_byte = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_');
        if name.is_empty()
            || name
                .split(|&b| b == b'.')
                .any(|label| label.is_empty() || !label.iter().all(ok_byte))
        {
            return Err("a malformed host name");
        }
        (name, port)
    };
    let mut out = String::with_capacity(value.len());
    for &b in name {
        out.push(char::from(b.to_ascii_lowercase()));
    }
    if let Some(digits) = port.strip_prefix(b":") {
        let n = (1..=5)
            .contains(&digits.len())
            .then(|| std::str::from_utf8(digits).ok())
            .flatten()
            .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u16>().ok())
            .ok_or("a port that is not 1-5 digits up to 65535")?;
        // Into the same string (no second one for the number).
        let _ = write!(out, ":{n}");
    } else if !port.is_empty() {
        return Err("a malformed host");
    }
    Ok(out)
}

/// Removes every header that claims to say who called, including spellings
/// with `_` that CGI-style gateways fold into the real name.
pub(crate) fn strip_client_cert_headers(headers: &mut HeaderMap) {
    let spoof = |n: &HeaderName| {
        n.as_str().len() == XFCC.len()
            && n.as_str()
                .bytes()
                .zip(XFCC.bytes())
                .all(|(a, b)| a == b || (a == b'_' && b == b'-'))
    };
    // Found without allocating; the common case removes nothing.
    while let Some(name) = headers.keys().find(|n| spoof(n)).cloned() {
        headers.remove(name);
    }
}

/// Whether the request asks to switch protocols. `h2c` is never passed on:
/// after it the app would read HTTP/2 requests that no rule has seen.
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    let to_h2c = headers.get_all(header::UPGRADE).iter().any(|v| {
        v.to_str()
            .map_or(true, |s| s.to_ascii_lowercase().contains("h2c"))
    });
    headers.contains_key(header::UPGRADE)
        && !to_h2c
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Removes headers that describe one hop only (RFC 9110 §7.6.1), keeping
/// `Connection: upgrade` and `Upgrade` when passing an upgrade on, and
/// `te: trailers` (gRPC needs it).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Only names that are present are made into `HeaderName`s: the usual
    // `close` and `keep-alive` tokens name no header and cost nothing.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && headers.contains_key(*t))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in listed {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    // One pass over the names instead of a removal per hop-by-hop name:
    // most messages carry none but `Connection`.
    let hop = |n: &&HeaderName| {
        *n == header::TRANSFER_ENCODING
            || *n == header::PROXY_AUTHENTICATE
            || *n == header::PROXY_AUTHORIZATION
            || *n == KEEP_ALIVE
            || *n == PROXY_CONNECTION
            || (!keep_upgrade && (*n == header::CONNECTION || *n == header::UPGRADE))
            || (*n == header::TE && headers.get(header::TE).is_some_and(|v| v != "trailers"))
    };
    // Names are unique and only eight can match.
    let mut doomed: [Option<HeaderName>; 8] = Default::default();
    for (slot, name) in doomed.iter_mut().zip(headers.keys().filter(hop)) {
        *slot = Some(name.clone());
    }
    for name in doomed.into_iter().flatten() {
        headers.remove(name);
    }
}
