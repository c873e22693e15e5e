//! The evaluation table: every precedence and matching rule of
//! docs/rules.md, one line each.

use std::net::IpAddr;

use super::load::{compile, Source};
use super::*;
use crate::identity::TrustDomain;

pub(crate) fn set_from_yaml(text: &str) -> RuleSet {
    compile(&[Source {
        path: "rules.yaml".into(),
        text: text.to_string(),
    }])
    .unwrap_or_else(|e| panic!("{e}"))
}

const RULES: &str = r#"
rules:
  - name: deny-debug
    action: deny
    ports: [8080]
    http:
      paths: ["/debug/**"]
  - name: frontend-reads-api
    action: allow
    ports: [8080, "9000-9100"]
    from:
      identities: ["spiffe://cluster.local/ns/web/sa/frontend", "spiffe://cluster.local/ns/ops/*"]
    http:
      methods: [GET, HEAD]
      paths: ["/healthz", "/api/**", "/users/*/profile"]
  - name: monitoring-metrics
    action: allow
    ports: [9090]
    from:
      namespaces: [monitoring]
  - name: tenant-acme
    action: allow
    ports: [8081]
    http:
      headers: {X-Tenant: acme}
      hosts: ["api.example.com", "*.acme.example"]
  - name: legacy-plaintext
    action: allow
    ports: [7000]
    from:
      unauthenticated: true
      cidrs: ["10.0.0.0/8", "fd00::/8"]
  - name: block-bad-net
    action: deny
    from:
      cidrs: ["192.0.2.0/24"]
  - name: db-from-backend
    action: allow
    ports: [5432]
    from:
      identities: ["spiffe://cluster.local/ns/backend/sa/api"]
  - name: deny-posts-6000
    action: deny
    ports: [6000]
    http:
      methods: [POST]
  - name: audit-writes
    action: audit
    ports: [8080]
    http:
      methods: [POST, PUT, DELETE]
  - name: audit-plaintext
    action: audit
    from:
      unauthenticated: true
  - name: partner-td
    action: allow
    ports: [7100]
    from:
      trust_domains: [partner.example]
"#;

fn peer(short: &str) -> Peer {
    let id = match short {
        "plain" => return Peer::Unauthenticated,
        "fe" => "spiffe://cluster.local/ns/web/sa/frontend",
        "ops" => "spiffe://cluster.local/ns/ops/sa/deployer",
        "opsx" => "spiffe://cluster.local/ns/ops-team/sa/deployer",
        "mon" => "spiffe://cluster.local/ns/monitoring/sa/prometheus",
        "be" => "spiffe://cluster.local/ns/backend/sa/api",
        "partner" => "spiffe://partner.example/ns/x/sa/y",
        "odd" => "spiffe://cluster.local/custom/monitoring",
        other => panic!("unknown peer {other}"),
    };
    Peer::Mesh(crate::identity::SpiffeId::parse(id).unwrap())
}

/// An HTTP request: method, path, host, headers.
type Req = (
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static [(&'static str, &'static str)],
);

struct Case {
    peer: &'static str,
    source: &'static str,
    port: u16,
    http: Option<Req>,
    default: DefaultPolicy,
    allowed: bool,
    rule: &'static str,
    action: &'static str,
    audits: &'static [&'static str],
}

const A: DefaultPolicy = DefaultPolicy::Authenticated;
const IP: &str = "10.9.9.9";

#[rustfmt::skip]
fn cases() -> Vec<Case> {
    let c = |peer, source, port, http, default, allowed, rule, action, audits| Case {
        peer, source, port, http, default, allowed, rule, action, audits,
    };
    let get = |path| Some(("GET", path, None, &[][..]));
    use DefaultPolicy::{Allow as DA, Deny as DD};
    vec![
        // allow rules, exact / subtree / one-segment paths
        c("fe", IP, 8080, get("/api/users"), A, true, "frontend-reads-api", "allow", &[]),
        c("fe", IP, 8080, get("/api"), A, true, "frontend-reads-api", "allow", &[]),
        c("fe", IP, 8080, get("/api/"), A, true, "frontend-reads-api", "allow", &[]),
        c("fe", IP, 8080, get("/apix"), A, false, "default", "implicit_deny", &[]),
        c("fe", IP, 8080, get("/users/42/profile"), A, true, "frontend-reads-api", "allow", &[]),
        c("fe", IP, 8080, get("/users/42/43/profile"), A, false, "default", "implicit_deny", &[]),
        c("fe", IP, 8080, get("/users/42/profile/"), A, false, "default", "implicit_deny", &[]),
        c("fe", IP, 8080, get("/healthz"), A, true, "frontend-reads-api", "allow", &[]),
        c("fe", IP, 8080, get("/healthz/x"), A, false, "default", "implicit_deny", &[]),
        // methods are case-sensitive; audits never change the decision
        c("fe", IP, 8080, Some(("HEAD", "/api", None, &[])), A, true, "frontend-reads-api", "allow", &[]),
        c("fe", IP, 8080, Some(("get", "/api", None, &[])), A, false, "default", "implicit_deny", &[]),
        c("fe", IP, 8080, Some(("POST", "/api/x", None, &[])), A, false, "default", "implicit_deny", &["audit-writes"]),
        c("fe", IP, 8080, Some(("POST", "/debug/x", None, &[])), A, false, "deny-debug", "deny", &["audit-writes"]),
        // deny beats allow
        c("fe", IP, 8080, get("/debug/pprof"), A, false, "deny-debug", "deny", &[]),
        c("fe", IP, 8080, get("/debug"), A, false, "deny-debug", "deny", &[]),
        c("fe", IP, 8080, get("/debugger"), A, false, "default", "implicit_deny", &[]),
        c("fe", "192.0.2.5", 8080, get("/api"), A, false, "block-bad-net", "deny", &[]),
        c("plain", "192.0.2.5", 1234, None, DA, false, "block-bad-net", "deny", &["audit-plaintext"]),
        // identity wildcards
        c("ops", IP, 8080, get("/api/x"), A, true, "frontend-reads-api", "allow", &[]),
        c("opsx", IP, 8080, get("/api/x"), A, false, "default", "implicit_deny", &[]),
        // ports and ranges
        c("fe", IP, 9000, get("/api"), A, true, "frontend-reads-api", "allow", &[]),
        c("fe", IP, 9050, get("/api"), A, true, "frontend-reads-api", "allow", &[]),
        c("fe", IP, 9100, get("/api"), A, true, "frontend-reads-api", "allow", &[]),
        c("fe", IP, 9101, get("/api"), A, true, "default", "default_authenticated", &[]),
        c("fe", IP, 8999, get("/api"), DD, false, "default", "default_deny", &[]),
        // HTTP rules on opaque connections: never allow; a deny denies outright
        c("fe", IP, 8080, None, A, false, "deny-debug", "deny", &[]),
        c("fe", IP, 9050, None, A, false, "default", "implicit_deny", &[]),
        c("be", IP, 6000, None, DA, false, "deny-posts-6000", "deny", &[]),
        c("be", IP, 6000, get("/"), A, true, "default", "default_authenticated", &[]),
        c("be", IP, 6000, Some(("POST", "/", None, &[])), DA, false, "deny-posts-6000", "deny", &[]),
        // namespaces
        c("mon", IP, 9090, None, A, true, "monitoring-metrics", "allow", &[]),
        c("mon", IP, 9090, get("/metrics"), A, true, "monitoring-metrics", "allow", &[]),
        c("fe", IP, 9090, None, A, false, "default", "implicit_deny", &[]),
        c("odd", IP, 9090, None, A, false, "default", "implicit_deny", &[]),
        // unauthenticated peers and CIDRs (IPv4-mapped IPv6 counts as IPv4)
        c("plain", "10.1.2.3", 7000, None, A, true, "legacy-plaintext", "allow", &["audit-plaintext"]),
        c("plain", "::ffff:10.1.2.3", 7000, None, A, true, "legacy-plaintext", "allow", &["audit-plaintext"]),
        c("plain", "fd00::1", 7000, None, A, true, "legacy-plaintext", "allow", &["audit-plaintext"]),
        c("plain", "172.16.0.1", 7000, None, A, false, "default", "implicit_deny", &["audit-plaintext"]),
        c("fe", "10.1.2.3", 7000, None, DA, false, "default", "implicit_deny", &[]),
        c("plain", IP, 8080, get("/api"), DA, false, "default", "implicit_deny", &["audit-plaintext"]),
        // trust domains
        c("partner", IP, 7100, None, A, true, "partner-td", "allow", &[]),
        c("fe", IP, 7100, None, A, false, "default", "implicit_deny", &[]),
        c("be", IP, 5432, None, A, true, "db-from-backend", "allow", &[]),
        c("fe", IP, 5432, None, DA, false, "default", "implicit_deny", &[]),
        // default policies on ports no allow rule covers
        c("plain", IP, 1234, None, A, false, "default", "default_authenticated", &["audit-plaintext"]),
        c("plain", IP, 1234, None, DA, true, "default", "default_allow", &["audit-plaintext"]),
        c("fe", IP, 1234, None, DD, false, "default", "default_deny", &[]),
        c("fe", IP, 1234, None, A, true, "default", "default_authenticated", &[]),
        c("partner", IP, 1234, None, A, false, "default", "default_authenticated", &[]),
        c("partner", IP, 1234, None, DA, true, "default", "default_allow", &[]),
        // hosts (case-insensitive, port ignored, wildcards) and headers
        c("fe", IP, 8081, Some(("GET", "/", Some("api.example.com"), &[("x-tenant", "acme")])), A, true, "tenant-acme", "allow", &[]),
        c("fe", IP, 8081, Some(("GET", "/", Some("API.Example.com:8443"), &[("X-TENANT", "acme")])), A, true, "tenant-acme", "allow", &[]),
        c("plain", IP, 8081, Some(("GET", "/", Some("shop.acme.example"), &[("x-tenant", "acme")])), A, true, "tenant-acme", "allow", &["audit-plaintext"]),
        c("fe", IP, 8081, Some(("GET", "/", Some("acme.example"), &[("x-tenant", "acme")])), A, false, "default", "implicit_deny", &[]),
        c("fe", IP, 8081, Some(("GET", "/", Some("api.example.com"), &[("x-tenant", "ACME")])), A, false, "default", "implicit_deny", &[]),
        c("fe", IP, 8081, Some(("GET", "/", Some("api.example.com"), &[])), A, false, "default", "implicit_deny", &[]),
        // An allow rule needs every value listed: another value, in its own
        // line or comma-joined, could be the one the app reads.
        c("fe", IP, 8081, Some(("GET", "/", Some("api.example.com"), &[("x-tenant", "other"), ("x-tenant", "acme")])), A, false, "default", "implicit_deny", &[]),
        c("fe", IP, 8081, Some(("GET", "/", Some("api.example.com"), &[("x-tenant", "acme, other")])), A, false, "default", "implicit_deny", &[]),
        c("fe", IP, 8081, Some(("GET", "/", Some("api.example.com"), &[("x-tenant", "acme"), ("x-tenant", "acme,acme")])), A, true, "tenant-acme", "allow", &[]),
        c("fe", IP, 8081, Some(("GET", "/", None, &[("x-tenant", "acme")])), A, false, "default", "implicit_deny", &[]),
        c("fe", IP, 8081, None, DA, false, "default", "implicit_deny", &[]),
    ]
}

fn headers(list: &[(&str, &str)]) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (k, v) in list {
        map.append(
            http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    map
}

#[test]
fn evaluation_table() {
    let set = set_from_yaml(RULES);
    let td = TrustDomain::new("cluster.local").unwrap();
    let cases = cases();
    assert!(cases.len() >= 40);
    for (i, case) in cases.iter().enumerate() {
        let peer = peer(case.peer);
        let conn = Connection {
            peer: &peer,
            source: case.source.parse::<IpAddr>().unwrap(),
            port: case.port,
        };
        let map = case.http.map(|h| headers(h.3)).unwrap_or_default();
        let req = case.http.map(|(method, path, host, _)| HttpRequest {
            method,
            path,
            host,
            headers: &map,
        });
        let d = authorize(&set, &td, case.default, &conn, req.as_ref());
        let what = format!(
            "case {i}: {} from {} to {} {:?} default {}",
            case.peer,
            case.source,
            case.port,
            case.http.map(|h| (h.0, h.1, h.2)),
            case.default
        );
        assert_eq!(
            (d.allowed, d.rule.as_str(), d.action.label()),
            (case.allowed, case.rule, case.action),
            "{what}"
        );
        assert_eq!(d.audits, case.audits, "{what}");
        // The explanation agrees with the decision, and lists the decider.
        let e = explain(&set, &td, case.default, &conn, req.as_ref());
        assert_eq!(
            (e.allowed, e.rule.as_str()),
            (case.allowed, case.rule),
            "{what}"
        );
        if case.rule != DEFAULT_RULE {
            assert!(e.matched.iter().any(|m| m.name == case.rule), "{what}: {e}");
        }
        for a in case.audits {
            assert!(e.matched.iter().any(|m| m.name == *a), "{what}: {e}");
        }
    }
}

#[test]
fn empty_set_is_the_default_policy() {
    let set = RuleSet::empty();
    let td = TrustDomain::new("cluster.local").unwrap();
    let fe = peer("fe");
    let plain = Peer::Unauthenticated;
    let conn = |p| Connection {
        peer: p,
        source: IP.parse().unwrap(),
        port: 80,
    };
    let d = authorize(&set, &td, DefaultPolicy::Authenticated, &conn(&fe), None);
    assert!(d.allowed && d.rule == "default");
    let d = authorize(&set, &td, DefaultPolicy::Authenticated, &conn(&plain), None);
    assert!(!d.allowed);
    assert!(authorize(&set, &td, DefaultPolicy::Allow, &conn(&plain), None).allowed);
    assert!(!authorize(&set, &td, DefaultPolicy::Deny, &conn(&fe), None).allowed);
}

#[test]
fn an_allow_without_ports_covers_every_port() {
    let set = set_from_yaml(
        "rules:\n  - name: web-only\n    action: allow\n    from: {namespaces: [web]}\n",
    );
    let td = TrustDomain::new("cluster.local").unwrap();
    let be = peer("be");
    let conn = Connection {
        peer: &be,
        source: IP.parse().unwrap(),
        port: 31337,
    };
    let d = authorize(&set, &td, DefaultPolicy::Allow, &conn, None);
    assert_eq!((d.allowed, d.action), (false, DecidedBy::ImplicitDeny));
}

#[test]
fn explanation_names_the_failed_fields() {
    let set = set_from_yaml(RULES);
    let td = TrustDomain::new("cluster.local").unwrap();
    let fe = peer("fe");
    let conn = Connection {
        peer: &fe,
        source: IP.parse().unwrap(),
        port: 8080,
    };
    let map = http::HeaderMap::new();
    let req = HttpRequest {
        method: "DELETE",
        path: "/api/x",
        host: None,
        headers: &map,
    };
    let e = explain(&set, &td, DefaultPolicy::Authenticated, &conn, Some(&req));
    assert!(!e.allowed);
    assert_eq!(e.action, "implicit_deny");
    let near = e
        .near_misses
        .iter()
        .find(|m| m.name == "frontend-reads-api")
        .expect("a near miss");
    assert_eq!(near.mismatches.len(), 1);
    assert_eq!(near.mismatches[0].field, "http.methods");
    assert!(near.mismatches[0]
        .reason
        .contains("DELETE is not one of [GET, HEAD]"));
    let text = e.to_string();
    assert!(text.contains("decision: deny"), "{text}");
    assert!(text.contains("audit audit-writes"), "{text}");
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(
        json["near_misses"][0]["mismatches"][0]["field"],
        "http.paths"
    );
    assert_eq!(json["decision"], "deny");
}

/// (header name in a request, whether it is an underscore twin of a header
/// that some deny, allow or audit rule reads)
#[test]
fn underscore_twins_of_rule_headers() {
    let set = set_from_yaml(
        r#"
rules:
  - {name: d, action: deny, http: {headers: {x-tenant: evil}}}
  - {name: a, action: allow, http: {headers: {X-Team: [core]}}}
  - {name: u, action: audit, http: {headers: {x-trace-id: true}}}
  - {name: e, action: deny, http: {headers: {x_exact: "1"}}}
"#,
    );
    for (name, twin) in [
        ("x_tenant", true),
        ("X_TENANT", true),
        ("x_team", true),
        ("x_trace_id", true),
        ("x-trace_id", true),
        ("x-tenant", false),
        ("x_other", false),
        ("x__tenant", false),
        ("x_exact", false),
        ("x-exact", false),
        ("x-ex_act", false),
    ] {
        assert_eq!(set.underscore_twin(name), twin, "{name}");
    }
    assert!(!RuleSet::empty().underscore_twin("x_tenant"));
}
