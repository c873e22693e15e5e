//! HTTP/1 request heads up to the authorization decision: the bytes are
//! parsed as a request head (httparse, the parser hyper uses), turned into
//! `http::request::Parts` as hyper would, and admitted by
//! `proxy::http::admit_head` against a small fixed rule set, for a mesh
//! peer and an unauthenticated one, with `--allow-encoded-slash` off and on.
//!
//! Checked beyond "does not panic", for every admitted request: the app's
//! target is absolute and carries the normalized path; HTTP/1 carries one
//! `Host`, equal to the target's authority; no hop-by-hop header survives
//! (except `Connection`/`Upgrade` on an upgrade); the only
//! `x-forwarded-client-cert` (in any spelling) is ours, naming the mesh
//! peer; and the rewritten request, sent through admission again, is
//! allowed by the same rule (the app gets what the rules judged).
#![no_main]

use std::sync::{Arc, OnceLock};

use http::{header, HeaderName, HeaderValue, Method, Version};
use libfuzzer_sys::fuzz_target;
use portcullis::authz::{compile, normalize_path, DefaultPolicy, Peer, RuleSet, Source};
use portcullis::identity::{SpiffeId, TrustDomain};
use portcullis::proxy::http::{admit_head, AdmitSettings, ConnInfo, FragmentSeen, XFCC};

const RULES: &str = r#"
rules:
  - name: frontend-reads-api
    action: allow
    ports: [8080]
    from:
      identities: ["spiffe://cluster.local/ns/web/sa/frontend"]
    http:
      methods: [GET, HEAD, POST]
      paths: ["/api/**", "/healthz", "/chat"]
      hosts: ["api.example.com"]
  - name: anyone-healthz
    action: allow
    ports: [8080]
    http:
      methods: [GET]
      paths: ["/healthz"]
  - name: no-admin
    action: deny
    http:
      paths: ["/admin/**", "/api/internal/**"]
  - name: audit-writes
    action: audit
    http:
      methods: [POST, PUT, DELETE]
"#;

struct Fixed {
    rules: RuleSet,
    td: TrustDomain,
    peers: [ConnInfo; 2],
}

fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(|| {
        let source = Source {
            path: "rules.yaml".into(),
            text: RULES.into(),
        };
        let conn = |peer: Peer| {
            ConnInfo::new(
                Arc::new(peer),
                "10.0.0.1:40000".parse().expect("an address"),
                "127.0.0.1:8080".parse().expect("an address"),
            )
        };
        let frontend =
            SpiffeId::parse("spiffe://cluster.local/ns/web/sa/frontend").expect("a valid id");
        Fixed {
            rules: compile(&[source]).expect("the fixed rules compile"),
            td: TrustDomain::new("cluster.local").expect("a valid trust domain"),
            peers: [conn(Peer::Mesh(frontend)), conn(Peer::Unauthenticated)],
        }
    })
}

/// The head as hyper hands it over, or `None` where hyper answers 400.
fn parts(data: &[u8]) -> Option<http::request::Parts> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(_) = req.parse(data).ok()? else {
        return None;
    };
    let target = req.path?;
    let mut b = http::Request::builder()
        .method(Method::from_bytes(req.method?.as_bytes()).ok()?)
        .uri(target)
        .version(match req.version? {
            0 => Version::HTTP_10,
            _ => Version::HTTP_11,
        });
    for h in req.headers.iter() {
        b = b.header(
            HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(h.value).ok()?,
        );
    }
    if target.contains('#') {
        // The URI parser drops the fragment; the proxy's connection reader
        // sees it in the bytes and marks the request (proxy/http/fragment.rs).
        b = b.extension(FragmentSeen);
    }
    Some(b.body(()).ok()?.into_parts().0)
}

fuzz_target!(|data: &[u8]| {
    let f = fixed();
    for conn in &f.peers {
        for allow_encoded_slash in [false, true] {
            let Some(mut p) = parts(data) else {
                return;
            };
            let settings = AdmitSettings {
                td: &f.td,
                default: DefaultPolicy::Deny,
                allow_encoded_slash,
            };
            let raw_path = p.uri.path().to_string();
            let Ok(admitted) = admit_head(&mut p, conn, &f.rules, settings) else {
                continue;
            };
            assert!(admitted.decision.allowed);
            check_rewritten(&p, conn, &raw_path, allow_encoded_slash, admitted.upgrade);
            // What the app receives, judged again (the fixed rules have no
            // header conditions, so removed headers cannot change this).
            let again = admit_head(&mut p, conn, &f.rules, settings)
                .unwrap_or_else(|e| panic!("the rewritten request is refused: {e}"));
            assert_eq!(again.decision.rule, admitted.decision.rule);
        }
    }
});

fn check_rewritten(
    p: &http::request::Parts,
    conn: &ConnInfo,
    raw_path: &str,
    allow_encoded_slash: bool,
    upgrade: bool,
) {
    let want = normalize_path(raw_path, allow_encoded_slash).expect("admitted, so it normalizes");
    assert_eq!(p.uri.path(), want);
    assert_eq!(p.uri.scheme_str(), Some("http"));
    let authority = p.uri.authority().expect("an absolute target").as_str();
    let hosts: Vec<_> = p.headers.get_all(header::HOST).iter().collect();
    assert!(hosts.len() <= 1, "{} Host headers", hosts.len());
    if let Some(h) = hosts.first() {
        assert_eq!(h.as_bytes(), authority.as_bytes(), "Host and target agree");
    }
    for name in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        assert!(!p.headers.contains_key(name), "{name} reached the app");
    }
    if !upgrade {
        assert!(!p.headers.contains_key(header::CONNECTION));
        assert!(!p.headers.contains_key(header::UPGRADE));
    }
    let xfcc: Vec<_> = p
        .headers
        .iter()
        .filter(|(n, _)| n.as_str().replace('_', "-") == XFCC)
        .collect();
    match conn.peer.as_ref() {
        Peer::Mesh(id) => {
            assert_eq!(xfcc.len(), 1, "one {XFCC}");
            assert_eq!(xfcc[0].0.as_str(), XFCC);
            assert_eq!(xfcc[0].1.as_bytes(), format!("URI={id}").as_bytes());
        }
        Peer::Unauthenticated => assert!(xfcc.is_empty(), "a caller-set {XFCC} got through"),
    }
}
