//! Unit tests of request-head admission.

use http::{header, HeaderMap, HeaderValue};

use super::*;
use crate::authz::{DefaultPolicy, Peer};

#[test]
fn hop_by_hop_headers_are_removed() {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONNECTION,
        HeaderValue::from_static("keep-alive, x-secret"),
    );
    h.insert("x-secret", HeaderValue::from_static("1"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    h.insert("x-kept", HeaderValue::from_static("1"));
    strip_hop_by_hop(&mut h, false);
    let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    names.sort();
    assert_eq!(names, ["te", "x-kept"]);

    let mut h = HeaderMap::new();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    assert!(is_upgrade(&h));
    strip_hop_by_hop(&mut h, true);
    assert!(h.contains_key(header::UPGRADE) && h.contains_key(header::CONNECTION));

    // h2c would hand the app HTTP/2 requests no rule has seen: dropped.
    let mut h = HeaderMap::new();
    h.insert(
        header::CONNECTION,
        HeaderValue::from_static("Upgrade, HTTP2-Settings"),
    );
    h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
    h.insert(
        "http2-settings",
        HeaderValue::from_static("AAMAAABkAAQAoAAAAAIAAAAA"),
    );
    assert!(!is_upgrade(&h));
    strip_hop_by_hop(&mut h, false);
    assert!(h.is_empty(), "{h:?}");
}

/// Every hop-by-hop name goes, however many of them a message carries;
/// `te` stays only as `trailers`.
#[test]
fn every_hop_by_hop_name_is_removed() {
    let hop = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "transfer-encoding",
        "upgrade",
        "te",
    ];
    // All of them, then all but one in turn.
    for left_out in 0..=hop.len() {
        let mut h = HeaderMap::new();
        for (i, name) in hop.iter().enumerate() {
            if i != left_out {
                h.insert(*name, HeaderValue::from_static("gzip"));
            }
        }
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"], "{left_out}");
    }
    let mut h = HeaderMap::new();
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    h.insert(
        "proxy-authorization",
        HeaderValue::from_static("Basic eA=="),
    );
    strip_hop_by_hop(&mut h, false);
    let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    assert_eq!(names, ["te"]);
}

#[test]
fn one_host_form_for_rules_and_app() {
    let cases = [
        ("api.example", "api.example"),
        ("api.example:8080", "api.example:8080"),
        ("Api.Example.:0080", "api.example:80"),
        ("[::1]:80", "[::1]:80"),
        ("[::1]", "[::1]"),
        ("10.0.0.1", "10.0.0.1"),
        ("under_score.example:65535", "under_score.example:65535"),
        ("x:1", "x:1"),
        ("x:10", "x:10"),
        ("x:00000", "x:0"),
        ("x:09", "x:9"),
    ];
    for (h, want) in cases {
        assert_eq!(normalize_host(h.as_bytes()).as_deref(), Ok(want), "{h}");
    }
    for bad in [
        "admin.internal:abc",
        "admin.internal:+80",
        "admin.internal:-80",
        "admin.internal: 80",
        "admin.internal:80 ",
        "admin.internal:123456",
        "admin.internal:65536",
        "admin.internal:",
        "admin.internal:80:80",
        "x@admin.internal",
        "admin%2einternal",
        "admin..internal",
        ".admin.internal",
        "admin.internal..",
        ".",
        "a b",
        "",
        ":80",
        "[::1",
        "[::1]x",
        "[fe80::1%25eth0]",
        "[v1.x]",
        "admin.internal\u{e9}",
    ] {
        assert!(normalize_host(bad.as_bytes()).is_err(), "{bad:?}");
    }
}

fn rules(yaml: &str) -> (tempfile::TempDir, RuleSet) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.yaml");
    std::fs::write(&file, yaml).unwrap();
    let set = crate::authz::load_paths(&[file]).unwrap();
    (dir, set)
}

fn conn() -> ConnInfo {
    let id =
        crate::identity::SpiffeId::parse("spiffe://cluster.local/ns/default/sa/client").unwrap();
    ConnInfo::new(
        std::sync::Arc::new(Peer::Mesh(id)),
        "10.0.0.1:40000".parse().unwrap(),
        "127.0.0.1:8080".parse().unwrap(),
    )
}

/// Admits a request built by `build` against `yaml`: the status the
/// client would get, and the request the app would get.
fn admit(yaml: &str, req: http::request::Builder) -> (StatusCode, Parts) {
    let (_dir, set) = rules(yaml);
    let td = TrustDomain::new("cluster.local").unwrap();
    let settings = AdmitSettings {
        td: &td,
        default: DefaultPolicy::Authenticated,
        allow_encoded_slash: false,
    };
    let (mut parts, ()) = req.body(()).unwrap().into_parts();
    let status = match admit_head(&mut parts, &conn(), &set, settings) {
        Ok(_) => StatusCode::OK,
        Err(r) => r.status(),
    };
    (status, parts)
}

const DENIES: &str = r#"rules:
  - {name: no-internal, action: deny, http: {hosts: [internal.example]}}
  - {name: no-admin, action: deny, http: {paths: ["/admin/**"]}}
  - {name: no-evil, action: deny, http: {headers: {x-tenant: evil}}}
  - {name: no-delete, action: deny, http: {methods: [DELETE]}}
"#;

#[test]
fn request_heads_are_refused_denied_or_rewritten() {
    let get = |uri: &str| http::Request::get(uri).header("host", "h");
    let h2 = |method: &str, uri: &str| {
        http::Request::builder()
            .method(method)
            .uri(uri)
            .version(Version::HTTP_2)
    };
    let cases: Vec<(&str, http::request::Builder, u16)> = vec![
        ("plain", get("/x"), 200),
        ("denied path", get("/admin/x"), 403),
        ("path parameter", get("/admin;x"), 400),
        ("encoded parameter", get("/admin%3bx"), 400),
        (
            "plus port",
            get("/x").header("host", "internal.example:+80"),
            400,
        ),
        ("two hosts", get("/x").header("host", "h2"), 400),
        (
            "absolute plus port",
            get("http://internal.example:+80/x"),
            400,
        ),
        ("absolute denied", get("http://Internal.Example.:80/x"), 403),
        ("other scheme", get("ftp://h/x"), 400),
        ("no host 1.1", http::Request::get("/x"), 400),
        (
            "no host 1.0",
            http::Request::get("/x").version(Version::HTTP_10),
            200,
        ),
        (
            "h2 plus port",
            h2("GET", "http://internal.example:+80/x"),
            400,
        ),
        (
            "h2 denied host",
            h2("GET", "http://INTERNAL.example/x"),
            403,
        ),
        (
            "h2 host differs",
            h2("GET", "http://h/x").header("host", "internal.example"),
            400,
        ),
        (
            "h2 host same",
            h2("GET", "http://h/x").header("host", "H:"),
            400,
        ),
        ("h2 no authority", h2("GET", "/x"), 400),
        ("h2 lowercase method", h2("delete", "http://h/x"), 400),
        ("h2 mixed-case method", h2("Delete", "http://h/x"), 400),
        ("h2 DELETE", h2("DELETE", "http://h/x"), 403),
        ("h2 extension method", h2("PURGE", "http://h/x"), 200),
        (
            "CONNECT",
            http::Request::connect("h:80").header("host", "h:80"),
            405,
        ),
        ("leading space", get("/x").header("x-tenant", " evil"), 400),
        (
            "trailing tab",
            h2("GET", "http://h/x").header("x-tenant", "evil\t"),
            400,
        ),
        (
            "any other header padded",
            get("/x").header("x-a", "1 "),
            400,
        ),
        (
            "comma-joined deny",
            get("/x").header("x-tenant", "good, evil"),
            403,
        ),
        (
            "comma-joined deny, no space",
            get("/x").header("x-tenant", "good,evil"),
            403,
        ),
        (
            "two lines deny",
            get("/x")
                .header("x-tenant", "good")
                .header("x-tenant", "evil"),
            403,
        ),
        (
            "comma-joined other",
            get("/x").header("x-tenant", "good, other"),
            200,
        ),
        (
            "underscore twin of a rule header",
            get("/x").header("x_tenant", "evil"),
            400,
        ),
        (
            "h2 underscore twin",
            h2("GET", "http://h/x").header("X_Tenant", "evil"),
            400,
        ),
        (
            "underscore twin beside the real header",
            get("/x")
                .header("x-tenant", "good")
                .header("x_tenant", "ok"),
            400,
        ),
        (
            "underscore in a header no rule reads",
            get("/x").header("x_other", "1"),
            200,
        ),
        (
            "underscore elsewhere",
            get("/x").header("x_ten_ant", "1"),
            200,
        ),
    ];
    for (what, req, want) in cases {
        assert_eq!(admit(DENIES, req).0.as_u16(), want, "{what}");
    }
}

#[test]
fn the_app_gets_what_the_rules_saw() {
    let req = http::Request::get("http://Api.Example.:0080/a/./b/%7Euser?q=1;2")
        .header("host", "other.example")
        .header("x-forwarded-client-cert", "URI=spiffe://evil/x")
        .header("x_forwarded_client_cert", "URI=spiffe://evil/x")
        .header("trailer", "x-forwarded-client-cert")
        .header("connection", "x-drop")
        .header("x-drop", "1")
        .header("x-keep", "1");
    let (status, parts) = admit(DENIES, req);
    assert_eq!(status, 200);
    assert_eq!(parts.uri, "http://api.example:80/a/b/~user?q=1;2");
    assert_eq!(parts.headers["host"], "api.example:80");
    assert_eq!(
        parts.headers["x-forwarded-client-cert"],
        "URI=spiffe://cluster.local/ns/default/sa/client"
    );
    let mut names: Vec<&str> = parts.headers.keys().map(|k| k.as_str()).collect();
    names.sort();
    assert_eq!(names, ["host", "x-forwarded-client-cert", "x-keep"]);

    let h2 = http::Request::get("http://API.example/x").version(Version::HTTP_2);
    let (status, parts) = admit(DENIES, h2.header("host", "api.example"));
    assert_eq!(status, 200);
    assert_eq!(parts.uri, "http://api.example/x");
    assert!(
        !parts.headers.contains_key("host"),
        "HTTP/2: :authority only"
    );

    let h10 = http::Request::get("/x").version(Version::HTTP_10);
    let (status, parts) = admit(DENIES, h10);
    assert_eq!(status, 200);
    assert!(
        !parts.headers.contains_key("host"),
        "no host was seen, none is added"
    );
}

#[test]
fn rules_see_the_headers_the_app_gets() {
    // A forged identity header is gone before the rules look.
    let yaml = "rules:\n  - {name: admin, action: allow, http: {headers: {x-forwarded-client-cert: \"URI=spiffe://cluster.local/ns/default/sa/admin\"}}}\n";
    let forged = http::Request::get("/x").header("host", "h").header(
        "x-forwarded-client-cert",
        "URI=spiffe://cluster.local/ns/default/sa/admin",
    );
    assert_eq!(admit(yaml, forged).0, StatusCode::FORBIDDEN);
    let yaml = "rules:\n  - {name: client, action: allow, http: {headers: {x-forwarded-client-cert: \"URI=spiffe://cluster.local/ns/default/sa/client\"}}}\n";
    let plain = http::Request::get("/x").header("host", "h");
    assert_eq!(admit(yaml, plain).0, StatusCode::OK);
}

#[test]
fn allow_rules_need_every_header_value_listed() {
    let yaml =
        "rules:\n  - {name: tenants, action: allow, http: {headers: {x-tenant: [good, acme]}}}\n";
    let get = |values: &[&str]| {
        let mut b = http::Request::get("/x").header("host", "h");
        for v in values {
            b = b.header("x-tenant", *v);
        }
        b
    };
    for (values, want) in [
        (&["good"][..], 200),
        (&["good, acme"], 200),
        (&["good", "acme"], 200),
        (&["good, other"], 403),
        (&["good", "other"], 403),
        (&["good,"], 200),
        (&[","], 403),
        (&[][..], 403),
    ] {
        assert_eq!(admit(yaml, get(values)).0.as_u16(), want, "{values:?}");
    }
    // An allowed value beside an underscore spelling the app may read too.
    let twin = get(&["acme"]).header("x_tenant", "other");
    assert_eq!(admit(yaml, twin).0.as_u16(), 400);
    // A rule that names the header with `_` reads that exact spelling.
    let yaml = "rules:\n  - {name: t, action: allow, http: {headers: {x_tenant: [good]}}}\n";
    let exact = http::Request::get("/x")
        .header("host", "h")
        .header("x_tenant", "good");
    assert_eq!(admit(yaml, exact).0.as_u16(), 200);
}

#[test]
fn every_spelling_of_the_client_cert_header_is_removed() {
    let mut h = HeaderMap::new();
    h.insert(
        "x-forwarded-client-cert",
        HeaderValue::from_static("URI=evil"),
    );
    h.insert(
        "x_forwarded_client_cert",
        HeaderValue::from_static("URI=evil"),
    );
    h.insert(
        "x-forwarded_client-cert",
        HeaderValue::from_static("URI=evil"),
    );
    h.insert("x-other", HeaderValue::from_static("1"));
    strip_client_cert_headers(&mut h);
    assert_eq!(h.len(), 1);
    assert!(h.contains_key("x-other"));
}
