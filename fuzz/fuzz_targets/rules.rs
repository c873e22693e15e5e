//! Rule files: the YAML and JSON parsers, the compiler (names unique across
//! files), error locations, the linter and the decision over whatever set
//! compiles. The same text is read as YAML and as JSON.
//!
//! Checked beyond "does not panic": a set that compiles, loaded twice from
//! two files, must be refused as a duplicate; every located error points
//! inside its text.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use portcullis::authz::{
    authorize, compile, explain, lint, locate_rule, Connection, DefaultPolicy, Error, HttpRequest,
    Peer, Source,
};
use portcullis::identity::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for name in ["a.yaml", "a.json"] {
        one_format(name, text);
    }
});

fn source(name: &str, text: &str) -> Source {
    Source {
        path: PathBuf::from(name),
        text: text.to_string(),
    }
}

fn one_format(name: &str, text: &str) {
    let set = match compile(&[source(name, text)]) {
        Ok(set) => set,
        Err(e) => {
            check_location(&e, text);
            return;
        }
    };
    for (i, rule) in set.rules().iter().enumerate() {
        assert_eq!(rule.index, i, "rules keep their file order");
        let at = locate_rule(&rule.file, text, rule.index);
        assert!(at.line >= 1 && at.column >= 1);
    }
    if !set.is_empty() {
        let other = name.replacen('a', "b", 1);
        match compile(&[source(name, text), source(&other, text)]) {
            Err(Error::Invalid { message, .. }) => {
                assert!(message.contains("duplicate rule name"), "{message}")
            }
            Err(e) => panic!("the same rules twice: unexpected error {e}"),
            Ok(_) => panic!("the same rules in two files were accepted"),
        }
    }
    let td = TrustDomain::new("cluster.local").expect("a valid trust domain");
    let _ = lint(&set, Some(&td));
    let _ = lint(&set, None);
    let mesh = Peer::Mesh(SpiffeId::parse("spiffe://cluster.local/ns/web/sa/frontend").unwrap());
    let headers = {
        let mut h = http::HeaderMap::new();
        h.insert("x-tenant", http::HeaderValue::from_static("acme"));
        h
    };
    let request = HttpRequest {
        method: "GET",
        path: "/api/v1/users",
        host: Some("api.example.com:8080"),
        headers: &headers,
    };
    for peer in [&mesh, &Peer::Unauthenticated] {
        for port in [80, 8080, 9090] {
            let conn = Connection {
                peer,
                source: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
                port,
            };
            for http in [None, Some(&request)] {
                for default in [DefaultPolicy::Allow, DefaultPolicy::Deny] {
                    let d = authorize(&set, &td, default, &conn, http);
                    let e = explain(&set, &td, default, &conn, http);
                    assert_eq!(d.allowed, e.allowed, "explain agrees with authorize");
                    assert_eq!(d.rule, e.rule, "explain names the deciding rule");
                }
            }
        }
    }
}

/// An error's location is inside the text: a line that exists, or the one
/// past the end (libyaml reports an error at the end of a text without a
/// final line break on the next line). YAML counts `\r`, `\r\n`, NEL, LS
/// and PS as line breaks too, so every one of them is counted here.
fn check_location(e: &Error, text: &str) {
    if let Error::Invalid { at, .. } = e {
        let breaks = text
            .replace("\r\n", "\n")
            .matches(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'])
            .count();
        let lines = breaks + 2;
        assert!(
            at.line >= 1 && at.line <= lines.max(1),
            "{e} ({lines} lines)"
        );
        assert!(at.column >= 1);
    }
}
