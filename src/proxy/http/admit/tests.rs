//! Unit tests of request-head admission.

use http::{header, HeaderMap, HeaderValue};

use super::*;

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

#[test]
fn hosts_servers_read_alike_only() {
    let ok = ["api.example", "api.example:8080", "[::1]:80", "10.0.0.1"];
    for h in ok {
        assert_eq!(check_authority(h).as_deref(), Ok(h), "{h}");
    }
    for bad in [
        "admin.internal:abc",
        "x@admin.internal",
        "admin.internal:",
        "a b",
        "",
    ] {
        assert!(check_authority(bad).is_err(), "{bad:?}");
    }
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
