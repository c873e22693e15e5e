//! `portcullis rules check|explain` run as the real binary on fixture files
//! (tests/fixtures/rules): exit codes and the exact diagnostics.

use std::process::{Command, Output};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rules");

fn portcullis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .current_dir(FIXTURES)
        .output()
        .expect("run portcullis")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_a_good_directory() {
    let out = portcullis(&["rules", "check", "good"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("ok: 4 rule(s) in 2 file(s), hash "),
        "{stdout}"
    );
    assert!(stdout.ends_with(", 0 warning(s)\n"), "{stdout}");
    assert_eq!(stderr, "");
}

#[test]
fn check_reports_every_bad_file_with_its_location() {
    let out = portcullis(&["rules", "check", "bad", "good/10-web.yaml"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            "bad/bad-range.json:2:64: invalid port range \"9100-9000\": the first port is above the last",
            "bad/bad-values.yaml:5:15: rules[0].from.cidrs[0]: invalid CIDR \"10.0.0.1/8\": host bits are set (did you mean 10.0.0.0/8?)",
            "bad/unknown-field.yaml:5:7: rules[0].from: unknown field `identity`, expected one of `identities`, `namespaces`, `trust_domains`, `unauthenticated`, `cidrs`",
            "3 error(s); the rules are not valid",
        ]
    );
}

#[test]
fn check_refuses_duplicate_names_across_files() {
    let out = portcullis(&["rules", "check", "dup"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.starts_with(
            "dup/b.yaml:5:11: duplicate rule name \"web\" (first defined at dup/a.yaml:2:11)"
        ),
        "{stderr}"
    );
}

#[test]
fn check_warns_about_shadowed_and_impossible_rules() {
    let out = portcullis(&["rules", "check", "warn/rules.yaml"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.ends_with(", 3 warning(s)\n"), "{stdout}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(lines[0].starts_with("warn/rules.yaml:6:11: warning: rule allow-debug-pprof: shadowed by deny rule block-debug"), "{stderr}");
    assert!(
        lines[1].starts_with("warn/rules.yaml:12:11: warning: rule impossible: can never match"),
        "{stderr}"
    );
    assert!(
        lines[2].starts_with("warn/rules.yaml:17:11: warning: rule lowercase: method \"get\""),
        "{stderr}"
    );
    let strict = portcullis(&["rules", "check", "--strict", "warn/rules.yaml"]);
    assert_eq!(strict.status.code(), Some(1));
}

#[test]
fn check_refuses_a_missing_path() {
    let out = portcullis(&["rules", "check", "no-such-dir/rules.yaml"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.starts_with("no-such-dir/rules.yaml: "), "{stderr}");
}

const FRONTEND: &str = "spiffe://cluster.local/ns/web/sa/frontend";

#[test]
fn explain_an_allowed_request() {
    let out = portcullis(&[
        "rules",
        "explain",
        "--rules",
        "good",
        "--from",
        FRONTEND,
        "--port",
        "8080",
        "--method",
        "GET",
        "--path",
        "/x/../api/users?page=2",
        "--host",
        "api.example.com",
        "--header",
        "x-tenant=acme",
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("path:     /x/../api/users is normalized to /api/users\n"),
        "{stdout}"
    );
    assert!(stdout.contains("decision: allow\n"), "{stdout}");
    assert!(
        stdout.contains("rule:     frontend-reads-api (allow)\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  allow frontend-reads-api (good/10-web.yaml)\n"),
        "{stdout}"
    );
}

#[test]
fn explain_a_denied_request_says_which_field_failed() {
    let out = portcullis(&[
        "rules",
        "explain",
        "--rules",
        "good",
        "--from",
        FRONTEND,
        "--port",
        "8080",
        "--method",
        "DELETE",
        "--path",
        "/api/users",
        "--host",
        "api.example.com",
        "--header",
        "x-tenant=acme",
    ]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("decision: deny\nrule:     default (implicit_deny)\n"),
        "{stdout}"
    );
    assert!(stdout.contains("audits:   audit-writes\n"), "{stdout}");
    assert!(
        stdout.contains("    http.methods: method DELETE is not one of [GET, HEAD] (methods are case-sensitive)\n"),
        "{stdout}"
    );
}

#[test]
fn explain_opaque_and_unauthenticated_as_json() {
    let out = portcullis(&[
        "rules",
        "explain",
        "--rules",
        "good/20-monitoring.json",
        "--from",
        "unauthenticated",
        "--port",
        "9090",
        "--source-ip",
        "10.1.2.3",
        "--json",
    ]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["action"], "implicit_deny");
    assert_eq!(v["peer"], "unauthenticated");
    assert_eq!(v["request"], serde_json::Value::Null);
    assert_eq!(v["near_misses"][0]["name"], "prometheus-scrapes");
    assert_eq!(
        v["near_misses"][0]["mismatches"][0]["field"],
        "from.namespaces"
    );

    // A port no allow rule covers gets the default policy.
    let out = portcullis(&[
        "rules",
        "explain",
        "--rules",
        "good",
        "--from",
        "unauthenticated",
        "--port",
        "5000",
        "--default-policy",
        "allow",
    ]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("rule:     default (default_allow)"),
        "{stdout}"
    );
}

#[test]
fn explain_refuses_a_bad_path_like_the_sidecar() {
    let out = portcullis(&[
        "rules",
        "explain",
        "--rules",
        "good",
        "--from",
        FRONTEND,
        "--port",
        "8080",
        "--path",
        "/api%2f..",
    ]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout.contains("400 Bad Request: the path contains an encoded '/' (%2F)"),
        "{stdout}"
    );
}

#[test]
fn explain_with_bad_rules_or_arguments_exits_2() {
    let out = portcullis(&[
        "rules", "explain", "--rules", "bad", "--from", FRONTEND, "--port", "80",
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("bad/unknown-field.yaml:5:7: "), "{stderr}");
    let out = portcullis(&[
        "rules", "explain", "--rules", "good", "--from", "bob", "--port", "80",
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.starts_with("portcullis: error: --from: "),
        "{stderr}"
    );
}
