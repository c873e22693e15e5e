//! Request path normalization and the host/authority check, on their own
//! and through request admission with rules that allow everything (so only
//! the path and the host can refuse).
//!
//! Input: a mode byte, then the path, optionally `\n` and a host. Mode bit
//! 0: `--allow-encoded-slash`; bit 1: the host goes into an absolute-form
//! target instead of a `Host` header.
//!
//! Checked beyond "does not panic": a normalized path is absolute, has no
//! empty, `.` or `..` segment and no `\`, and normalizing it again changes
//! nothing and is not refused (what the app receives must be what the rules
//! saw, and a form refused as ambiguous must not come out of
//! normalization). A normalized host is lowercase, a valid authority, and
//! normalizing it again changes nothing. An admitted request carries the normalized path, and
//! one host, the same in its target and its `Host` header, with no user
//! information and a numeric port if any.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use portcullis::authz::{normalize_path, DefaultPolicy, Peer, RuleSet};
use portcullis::identity::TrustDomain;
use portcullis::proxy::http::{admit_head, normalize_host, AdmitSettings, ConnInfo};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let allow_encoded_slash = mode & 1 == 1;
    let (path, host) = match text.split_once('\n') {
        Some((p, h)) => (p, Some(h)),
        None => (text, None),
    };
    check_path(path, allow_encoded_slash);
    if let Some(h) = host {
        check_host(h);
    }
    // Also as a path after a leading '/', which most inputs lack.
    check_path(&format!("/{path}"), allow_encoded_slash);
    check_admission(path, host, mode & 2 == 2, allow_encoded_slash);
});

fn check_path(raw: &str, allow_encoded_slash: bool) {
    let Ok(path) = normalize_path(raw, allow_encoded_slash) else {
        return;
    };
    assert!(path.starts_with('/'), "{raw:?} -> {path:?}");
    let inner = path[1..].strip_suffix('/').unwrap_or(&path[1..]);
    if !inner.is_empty() {
        for seg in inner.split('/') {
            assert!(
                !matches!(seg, "" | "." | ".."),
                "{raw:?} -> {path:?}: segment {seg:?}"
            );
        }
    }
    assert!(!path.contains('\\'), "{raw:?} -> {path:?}");
    match normalize_path(&path, allow_encoded_slash) {
        Ok(again) => assert_eq!(again, path, "not idempotent for {raw:?}"),
        Err(e) => panic!("{raw:?} -> {path:?}, which is then refused: {e}"),
    }
}

fn check_host(raw: &str) {
    let Ok(host) = normalize_host(raw.as_bytes()) else {
        return;
    };
    assert!(!host.contains('@'), "{raw:?} -> {host:?}");
    assert_eq!(host, host.to_ascii_lowercase(), "{raw:?} -> {host:?}");
    match normalize_host(host.as_bytes()) {
        Ok(again) => assert_eq!(again, host, "not idempotent for {raw:?}"),
        Err(e) => panic!("{raw:?} -> {host:?}, which is then refused: {e}"),
    }
    let parsed: http::uri::Authority = host
        .parse()
        .unwrap_or_else(|e| panic!("{raw:?} -> {host:?}, not an authority: {e}"));
    assert_eq!(parsed.as_str(), host);
}

struct Fixed {
    rules: RuleSet,
    td: TrustDomain,
    conn: ConnInfo,
}

fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(|| Fixed {
        rules: RuleSet::empty(),
        td: TrustDomain::new("cluster.local").expect("a valid trust domain"),
        conn: ConnInfo::new(
            Arc::new(Peer::Unauthenticated),
            "10.0.0.1:40000".parse().expect("an address"),
            "127.0.0.1:8080".parse().expect("an address"),
        ),
    })
}

fn check_admission(path: &str, host: Option<&str>, absolute: bool, allow_encoded_slash: bool) {
    let mut builder = http::Request::builder();
    builder = match (host, absolute) {
        (Some(h), true) => builder.uri(format!("http://{h}{path}")),
        (Some(h), false) => builder.uri(path).header(http::header::HOST, h),
        (None, _) => builder.uri(path),
    };
    let Ok(request) = builder.body(()) else {
        return;
    };
    let (mut parts, ()) = request.into_parts();
    let raw_path = parts.uri.path().to_string();
    let f = fixed();
    let settings = AdmitSettings {
        td: &f.td,
        default: DefaultPolicy::Allow,
        allow_encoded_slash,
    };
    if admit_head(&mut parts, &f.conn, &f.rules, settings).is_err() {
        return;
    }
    let want = normalize_path(&raw_path, allow_encoded_slash).expect("admitted, so it normalizes");
    assert_eq!(
        parts.uri.path(),
        want,
        "the app gets the path the rules saw"
    );
    assert_eq!(parts.uri.scheme_str(), Some("http"));
    let authority = parts.uri.authority().expect("an absolute target").as_str();
    assert!(
        !authority.contains('@'),
        "user information in {authority:?}"
    );
    if let Some((_, port)) = authority
        .rsplit_once(':')
        .filter(|_| !authority.ends_with(']'))
    {
        assert!(port.parse::<u16>().is_ok(), "port of {authority:?}");
    }
    if host.is_some() {
        let hosts: Vec<_> = parts.headers.get_all(http::header::HOST).iter().collect();
        assert_eq!(hosts.len(), 1, "one Host for the app");
        assert_eq!(
            hosts[0].as_bytes(),
            authority.as_bytes(),
            "Host and target agree"
        );
    }
}
