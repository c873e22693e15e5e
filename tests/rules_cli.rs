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

/// `rules check` applies the sidecar's limits with the sidecar's words:
/// nesting, file size, and links out of the directory.
#[test]
fn check_applies_the_sidecars_file_limits() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let deep = rules.join("deep.yaml");
    let nested = format!("http: {}{}\n", "[".repeat(80_000), "]".repeat(80_000));
    std::fs::write(&deep, nested).unwrap();
    let big = rules.join("big.json");
    std::fs::write(&big, format!("{{\"rules\": []}}{}", " ".repeat(1 << 20))).unwrap();
    let out = portcullis(&["rules", "check", rules.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains(&format!(
            "{}: the file is larger than the limit of 1048576 bytes; refused",
            big.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{}:1:70: nested deeper than 64 levels; refused before parsing",
            deep.display()
        )),
        "{stderr}"
    );
    std::fs::remove_file(&big).unwrap();
    std::fs::remove_file(&deep).unwrap();
    let key = dir.path().join("ca.key");
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(&key, rules.join("key.yaml")).unwrap();
    let out = portcullis(&["rules", "check", rules.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("key.yaml: resolves outside the rules directory; refused"),
        "{stderr}"
    );
    assert!(!format!("{stdout}{stderr}").contains("MIGH"), "{stderr}");
}

/// An alias bomb gets the sidecar's refusal, at once and before parsing;
/// `*` and `&` inside scalars are text.
#[test]
fn check_refuses_yaml_anchors_and_aliases_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let bomb = dir.path().join("42-alias.yaml");
    let paths = vec!["\"/a\""; 20_000].join(", ");
    let mut yaml = format!(
        "rules:\n  - &r {{name: r0, action: allow, ports: [1], http: {{paths: [{paths}]}}}}\n"
    );
    yaml.push_str(&"  - *r\n".repeat(4_000));
    std::fs::write(&bomb, yaml).unwrap();
    let started = std::time::Instant::now();
    let out = portcullis(&["rules", "check", bomb.to_str().unwrap()]);
    let took = started.elapsed();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:2:5: YAML anchors and aliases are not allowed in rule files; refused before parsing",
            bomb.display()
        )),
        "{stderr}"
    );
    assert!(took < std::time::Duration::from_secs(2), "took {took:?}");

    let fine = dir.path().join("fine.yaml");
    std::fs::write(
        &fine,
        "rules:\n  - name: web\n    action: allow\n    ports: [80]\n    from: {identities: [\"spiffe://cluster.local/ns/a/sa/*\"]}\n    http: {paths: [/api/**, \"/v1/*\"], headers: {x-q: [a&b, '*']}}\n",
    )
    .unwrap();
    let out = portcullis(&["rules", "check", fine.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
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

/// Runs the binary in `dir` (for files made by the test).
fn portcullis_in(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run portcullis")
}

#[test]
fn check_warns_about_a_directory_that_run_would_refuse() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("empty")).unwrap();
    std::fs::write(tmp.path().join("empty/notes.txt"), "not a rule file").unwrap();
    let warning = "empty: warning: no *.yaml, *.yml or *.json file: `run --rules-dir` refuses this directory\n";

    let out = portcullis_in(tmp.path(), &["rules", "check", "empty"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(stderr, warning);
    assert!(
        stdout.starts_with("ok: 0 rule(s) in 0 file(s), hash "),
        "{stdout}"
    );
    assert!(stdout.ends_with(", 1 warning(s)\n"), "{stdout}");

    let out = portcullis_in(tmp.path(), &["rules", "check", "--strict", "empty"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert_eq!(stdout, "", "no `ok:` line when --strict fails");
    assert!(stderr.starts_with(warning), "{stderr}");
    assert!(
        stderr.ends_with(", 1 warning(s), and --strict makes warnings errors\n"),
        "{stderr}"
    );
}

#[test]
fn check_strict_summary_says_it_failed() {
    let out = portcullis(&["rules", "check", "--strict", "warn/rules.yaml"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout, "");
    let last = stderr.lines().last().unwrap();
    assert!(
        last.starts_with("failed: 4 rule(s) in 1 file(s), hash "),
        "{stderr}"
    );
    assert!(
        last.ends_with(", 3 warning(s), and --strict makes warnings errors"),
        "{stderr}"
    );
}

#[test]
fn a_bare_list_of_rules_says_what_the_file_must_be() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("list.yaml"),
        "# forgot `rules:`\n- name: a\n  action: allow\n",
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("list.json"),
        "[{\"name\": \"a\", \"action\": \"allow\"}]",
    )
    .unwrap();
    let out = portcullis_in(tmp.path(), &["rules", "check", "list.yaml", "list.json"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            "list.yaml:2:1: invalid type: sequence, expected a map with the key \"rules\"",
            "list.json:1:1: invalid type: sequence, expected a map with the key \"rules\"",
            "2 error(s); the rules are not valid",
        ]
    );
    assert!(!stderr.contains("FileModel"), "{stderr}");
}

/// docs/rules.md, checked against the binary so its examples cannot drift.
const RULES_DOC: &str = include_str!("../docs/rules.md");

/// Saves the doc's first YAML block as `rules/10-web.yaml`, as the doc
/// tells the reader to, in a fresh directory.
fn doc_rules() -> tempfile::TempDir {
    let start = RULES_DOC.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
    let len = RULES_DOC[start..].find("```\n").expect("the block's end");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("rules")).unwrap();
    std::fs::write(
        tmp.path().join("rules/10-web.yaml"),
        &RULES_DOC[start..start + len],
    )
    .unwrap();
    let out = portcullis_in(tmp.path(), &["rules", "check", "--strict", "rules/"]);
    assert!(out.status.success(), "the doc's rules: {:?}", text(&out));
    tmp
}

/// A table cell's value: `—` is "not given", else the text in backticks.
fn cell(c: &str) -> Option<&str> {
    let c = c.trim();
    (c != "—").then(|| c.trim_matches('`'))
}

#[test]
fn rules_doc_example_table_is_what_explain_says() {
    let tmp = doc_rules();
    let header = "| `--from` | `--source-ip` | `--port` | request | decision | `rule:` | why |\n";
    let at = RULES_DOC.find(header).expect("the examples table") + header.len();
    let rows: Vec<&str> = RULES_DOC[at..]
        .lines()
        .skip(1) // | --- | --- | …
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(rows.len() >= 7, "{rows:?}");
    for row in rows {
        let cells: Vec<&str> = row.trim_matches('|').split(" | ").collect();
        assert_eq!(cells.len(), 7, "{row}");
        let mut args = vec!["rules", "explain", "--rules", "rules/"];
        args.extend(["--from", cell(cells[0]).expect("--from")]);
        if let Some(ip) = cell(cells[1]) {
            args.extend(["--source-ip", ip]);
        }
        args.extend(["--port", cell(cells[2]).expect("--port")]);
        if let Some(request) = cell(cells[3]) {
            args.extend(request.split_whitespace());
        }
        let (decision, rule) = (cells[4].trim(), cell(cells[5]).expect("rule"));
        let out = portcullis_in(tmp.path(), &args);
        let (stdout, stderr) = text(&out);
        let code = if decision == "allow" { 0 } else { 1 };
        assert_eq!(out.status.code(), Some(code), "{row}\n{stdout}{stderr}");
        assert!(
            stdout.starts_with(&format!("decision: {decision}\nrule:     {rule}\n")),
            "{row}\n{stdout}"
        );
    }
}

#[test]
fn rules_doc_explain_example_is_the_real_output() {
    let tmp = doc_rules();
    let start = RULES_DOC
        .find("$ portcullis rules explain ")
        .expect("the explain example");
    let block = &RULES_DOC[start..start + RULES_DOC[start..].find("```").unwrap()];
    let mut lines = block.lines();
    let mut command = String::new();
    for line in lines.by_ref() {
        command.push_str(line.trim_end_matches('\\'));
        if !line.ends_with('\\') {
            break;
        }
    }
    let want: String = lines.map(|l| format!("{l}\n")).collect();
    let args: Vec<&str> = command.split_whitespace().skip(2).collect(); // `$ portcullis`
    let out = portcullis_in(tmp.path(), &args);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stdout, want, "docs/rules.md's explain example is stale");
}
