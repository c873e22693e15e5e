//! Refused forms assembled from allowed parts: a double encoding built
//! from percent-escapes of its digits, and a header spelled with `_`
//! where a rule reads the `-` spelling.

use super::*;

/// Targets whose decoded path would be a double encoding: `%2561` (`a`),
/// `%252F` (`/`), `%255C` (`\`), `%253B` (`;`), `%2500` (NUL), `%252e`.
const ASSEMBLED: &[&str] = &[
    "/api/%25%36%31dmin/x",
    "/api%25%32%46admin/x",
    "/api%25%35%43admin/x",
    "/api/admin%25%33%42x",
    "/api/admin%25%30%30",
    "/api/public/%25%32%65%25%32%65/admin/x",
    "/api/%252%30admin",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_encodings_built_from_encoded_parts_are_refused() {
    let m = mesh().await;
    let t = "x-tenant: good\r\n";
    for target in ASSEMBLED {
        let (status, body) = get1(&m, target, "h", t).await;
        assert_eq!(status, 400, "h1 {target} -> {body}");
    }
    let mut c = h2(&m).await;
    for target in ASSEMBLED {
        let uri = format!("http://h{target}");
        let (status, body) = send2(&mut c, req2("GET", &uri, &[("x-tenant", "good")])).await;
        assert_eq!(status, 400, "h2 {target} -> {body}");
    }
    // Unreserved escapes are still decoded, and a literal %25 still passes.
    let (status, body) = get1(&m, "/api/%61dmin/x", "h", t).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = get1(&m, "/api/100%25%7A", "h", t).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("GET /api/100%25z "), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_twins_of_rule_headers_are_refused() {
    let m = mesh().await;
    // Past a deny rule on x-tenant, or beside a value the allow rule checked.
    for extra in [
        "x-tenant: good\r\nx_tenant: evil\r\n",
        "x-tenant: acme\r\nx_tenant: other\r\n",
        "x_tenant: good\r\n",
        "X_Tenant: good\r\nx-tenant: good\r\n",
    ] {
        let (status, body) = get1(&m, "/p", "h", extra).await;
        assert_eq!(status, 400, "h1 {extra:?} -> {body}");
    }
    let mut c = h2(&m).await;
    for headers in [
        &[("x-tenant", "good"), ("x_tenant", "evil")][..],
        &[("x-tenant", "acme"), ("x_tenant", "other")],
    ] {
        let (status, body) = send2(&mut c, req2("GET", "http://h/p", headers)).await;
        assert_eq!(status, 400, "h2 {headers:?} -> {body}");
    }
    // An underscore in a header no rule reads is passed on.
    let (status, body) = get1(&m, "/p", "h", "x-tenant: good\r\nx_request_id: 7\r\n").await;
    assert_eq!(status, 200, "{body}");
    let headers = [("x-tenant", "good"), ("x_request_id", "7")];
    let (status, body) = send2(&mut c, req2("GET", "http://h/p", &headers)).await;
    assert_eq!(status, 200, "{body}");
}
