use super::*;
use crate::authz::tests::set_from_yaml;

fn warnings(yaml: &str) -> Vec<(String, String)> {
    let td = TrustDomain::new("cluster.local").unwrap();
    lint(&set_from_yaml(yaml), Some(&td))
        .into_iter()
        .map(|w| (w.rule, w.message))
        .collect()
}

fn rule(name: &str, action: &str, body: &str) -> String {
    let mut s = format!("  - name: {name}\n    action: {action}\n");
    for line in body.lines() {
        s.push_str("    ");
        s.push_str(line);
        s.push('\n');
    }
    s
}

/// Rules, and the expected warnings as (rule, start of message).
type Case = (Vec<String>, Vec<(&'static str, &'static str)>);

#[test]
fn lint_table() {
    let cases: Vec<Case> = vec![
        // an allow inside a wider deny
        (
            vec![
                rule("d", "deny", "from: {namespaces: [web]}"),
                rule(
                    "a",
                    "allow",
                    "ports: [80]\nfrom: {identities: [\"spiffe://cluster.local/ns/web/sa/x\"]}",
                ),
            ],
            vec![("a", "shadowed by deny rule d")],
        ),
        // a deny on fewer ports does not shadow
        (
            vec![
                rule("d", "deny", "ports: [80]"),
                rule("a", "allow", "ports: [80, 81]"),
            ],
            vec![],
        ),
        // an HTTP deny does not cover an allow that also matches opaque TCP...
        (
            vec![
                rule("d", "deny", "http: {methods: [POST]}"),
                rule("a", "allow", "ports: [80]"),
            ],
            vec![],
        ),
        // ...but an HTTP deny with no conditions does (it denies opaque outright)
        (
            vec![
                rule("d", "deny", "http: {}"),
                rule("a", "allow", "ports: [80]"),
            ],
            vec![("a", "shadowed by deny rule d")],
        ),
        // paths and ranges
        (
            vec![
                rule(
                    "d",
                    "deny",
                    "ports: [\"1-1000\"]\nhttp: {paths: [\"/admin/**\"]}",
                ),
                rule(
                    "a",
                    "allow",
                    "ports: [80]\nhttp: {paths: [\"/admin/*/x\"], methods: [GET]}",
                ),
            ],
            vec![("a", "shadowed by deny rule d")],
        ),
        // redundant with an earlier rule of the same action
        (
            vec![
                rule("a1", "allow", "ports: [80]"),
                rule(
                    "a2",
                    "allow",
                    "ports: [80]\nfrom: {cidrs: [\"10.0.0.0/8\"]}",
                ),
            ],
            vec![("a2", "redundant: the earlier allow rule a1")],
        ),
        // rules that can never match
        (
            vec![rule(
                "x",
                "allow",
                "from: {unauthenticated: true, identities: [\"spiffe://cluster.local/ns/a/sa/b\"]}",
            )],
            vec![("x", "can never match: from.unauthenticated is true")],
        ),
        (
            vec![rule(
                "x",
                "allow",
                "from: {identities: [\"spiffe://other.td/ns/a/sa/b\"]}",
            )],
            vec![(
                "x",
                "can never match: every identity is outside trust domain cluster.local",
            )],
        ),
        (
            vec![rule(
                "x",
                "allow",
                "from: {identities: [\"spiffe://cluster.local/ns/a/sa/b\"], namespaces: [c]}",
            )],
            vec![(
                "x",
                "can never match: no identity is in one of the listed namespaces",
            )],
        ),
        (
            vec![rule("x", "deny", "http: {methods: [get]}")],
            vec![("x", "method \"get\" has lowercase letters")],
        ),
    ];
    for (rules, want) in cases {
        let yaml = format!("rules:\n{}", rules.concat());
        let got = warnings(&yaml);
        assert_eq!(got.len(), want.len(), "{yaml}\n{got:?}");
        for ((rule, msg), (want_rule, want_msg)) in got.iter().zip(&want) {
            assert_eq!(rule, want_rule, "{yaml}");
            assert!(msg.starts_with(want_msg), "{yaml}\n{msg}");
        }
    }
}
