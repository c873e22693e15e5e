use super::*;

fn load(name: &str, text: &str) -> Result<RuleSet, Error> {
    compile(&[Source {
        path: name.into(),
        text: text.into(),
    }])
}

fn err(name: &str, text: &str) -> String {
    match load(name, text) {
        Ok(_) => panic!("{name} loaded:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// Each error is `file:line:column: message`, at the offending value.
#[test]
fn errors_are_located() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "a.yaml",
            "rules:\n  - name: x\n    action: allow\n    from:\n      identity: [a]\n",
            "a.yaml:5:7: rules[0].from: unknown field `identity`, expected one of `identities`, `namespaces`, `trust_domains`, `unauthenticated`, `cidrs`",
        ),
        (
            "a.yaml",
            "rules:\n  - name: x\n    action: allow\n    from:\n      cidrs: [\"10.0.0.0/8\", \"10.0.0.1/8\"]\n",
            "a.yaml:5:29: rules[0].from.cidrs[1]: invalid CIDR \"10.0.0.1/8\": host bits are set (did you mean 10.0.0.0/8?)",
        ),
        (
            "a.yaml",
            "rules:\n  - name: x\n    action: allow\n    from:\n      cidrs: [\"10.0.0.0/33\"]\n",
            "a.yaml:5:15: rules[0].from.cidrs[0]: invalid CIDR \"10.0.0.0/33\": the prefix length must be 0-32",
        ),
        (
            "a.yaml",
            "rules:\n  - name: x\n    action: allow\n    ports: [80, \"9100-9000\"]\n",
            "a.yaml:4:17: rules[0].ports[1]: invalid port range \"9100-9000\": the first port is above the last",
        ),
        (
            "a.yaml",
            "rules:\n  - name: x\n    action: allow\n    ports: [70000]\n",
            "a.yaml:4:13: rules[0].ports[0]: invalid port \"70000\": use a port 1-65535 or a range like \"9000-9100\"",
        ),
        (
            "a.yaml",
            "rules:\n  - name: x\n    action: permit\n",
            "a.yaml:3:13: rules[0].action: unknown variant `permit`, expected one of `allow`, `deny`, `audit`",
        ),
        (
            "a.yaml",
            "rules:\n  - name: x\n    action: allow\n    ports: []\n",
            "a.yaml:4:12: rules[0].ports: empty list matches nothing; leave the key out to match anything",
        ),
        ("a.yaml", "rules:\n  - action: allow\n", "a.yaml:2:5: rules[0]: missing field `name`"),
        ("a.yaml", "rulez: []\n", "a.yaml:1:1: unknown field `rulez`, expected `rules`"),
        (
            "a.yaml",
            "rules:\n  - name: default\n    action: allow\n",
            "a.yaml:2:11: rules[0].name: the rule name \"default\" is reserved",
        ),
        (
            "a.yaml",
            "rules:\n  - name: x\n    action: allow\n    http:\n      paths: [\"/api/*x\"]\n",
            "a.yaml:5:15: rules[0].http.paths[0]: invalid path \"/api/*x\": `*` must be a whole segment",
        ),
        (
            "a.yaml",
            "rules:\n  - name: x\n    action: allow\n    from:\n      identities: [\"spiffe://td/ns/a/*/b*\"]\n",
            "a.yaml:5:20: rules[0].from.identities[0]: invalid identity \"spiffe://td/ns/a/*/b*\": `*` is allowed only at the end",
        ),
        (
            "a.yaml",
            "rules:\n  - name: x\n    action: allow\n    http:\n      headers: {\"bad header\": x}\n",
            "a.yaml:5:16: rules[0].http.headers: invalid header name \"bad header\"",
        ),
        (
            "a.yaml",
            "rules:\n  - name: x\n    action: allow\n    http: {methods: [GET}\n",
            "a.yaml:4:25: did not find expected ',' or ']', while parsing a flow sequence",
        ),
        (
            "a.json",
            "{\"rules\": [{\"name\": \"x\", \"action\": \"allow\", \"ports\": [0]}]}",
            "a.json:1:55: invalid port \"0\": use a port 1-65535 or a range like \"9000-9100\"",
        ),
        (
            "a.json",
            "{\"rules\": [{\"name\": \"x\",\n \"action\": \"allow\", \"form\": {}}]}",
            "a.json:2:26: unknown field `form`, expected one of `name`, `action`, `ports`, `from`, `http`",
        ),
        (
            "a.yaml",
            "rules:\n  - name: x\n    action: allow\n  - name: y\n    action: deny\n  - name: x\n    action: deny\n",
            "a.yaml:6:11: duplicate rule name \"x\" (first defined at a.yaml:2:11); names must be unique across all files",
        ),
    ];
    for (name, text, want) in cases {
        assert_eq!(err(name, text), *want, "{text}");
    }
}

#[test]
fn duplicate_names_across_files() {
    let a = Source {
        path: "a.yaml".into(),
        text: "rules:\n  - name: shared\n    action: allow\n".into(),
    };
    let b = Source {
        path: "b.json".into(),
        text: "{\"rules\": [\n  {\"name\": \"other\", \"action\": \"deny\"},\n  {\"name\": \"shared\", \"action\": \"deny\"}\n]}".into(),
    };
    let e = compile(&[a, b]).unwrap_err().to_string();
    assert!(
        e.starts_with("b.json:3:19: duplicate rule name \"shared\" (first defined at a.yaml:2:11)"),
        "{e}"
    );
}

#[test]
fn blank_files_hold_no_rules() {
    for text in ["", "\n  \n", "# nothing yet\n---\n"] {
        assert_eq!(load("a.yaml", text).unwrap().len(), 0, "{text:?}");
    }
    assert_eq!(load("a.json", "").unwrap().len(), 0);
    assert_eq!(load("a.yaml", "rules: []\n").unwrap().len(), 0);
}

#[test]
fn rule_locations() {
    let text = "rules:\n  - name: a\n    action: allow\n  - action: deny\n    name: b\n";
    let loc = locate_rule(Path::new("r.yaml"), text, 1);
    assert_eq!(loc.to_string(), "r.yaml:5:11");
}

#[test]
fn a_directory_merges_rule_files_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::write(p.join("b.yaml"), "rules:\n  - name: b\n    action: deny\n").unwrap();
    std::fs::write(
        p.join("a.json"),
        r#"{"rules": [{"name": "a", "action": "allow"}]}"#,
    )
    .unwrap();
    std::fs::write(p.join("c.YML"), "rules:\n  - name: c\n    action: audit\n").unwrap();
    std::fs::write(p.join("notes.txt"), "not rules").unwrap();
    std::fs::write(p.join(".hidden.yaml"), "garbage: [").unwrap();
    std::fs::create_dir(p.join("sub.yaml")).unwrap();
    // Kubernetes style: the visible name is a symlink into a hidden dir.
    std::fs::create_dir(p.join("..data")).unwrap();
    std::fs::write(
        p.join("..data/d.yaml"),
        "rules:\n  - name: d\n    action: allow\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("..data/d.yaml", p.join("d.yaml")).unwrap();
    let set = load_dir(p).unwrap();
    let names: Vec<&str> = set.rules().iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "d"]);
    assert_eq!(set.files().len(), 4);
    assert_eq!(set.hash().len(), 16);
    // The hash depends on content only, not on when it was loaded.
    assert_eq!(load_dir(p).unwrap().hash(), set.hash());
    std::fs::write(p.join("b.yaml"), "rules:\n  - name: b\n    action: allow\n").unwrap();
    assert_ne!(load_dir(p).unwrap().hash(), set.hash());
}

#[test]
fn a_missing_path_is_an_io_error() {
    let e = load_paths(&["/nonexistent/rules.yaml".into()]).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

const RULE: &str = "rules:\n  - name: a\n    action: allow\n    ports: [80]\n";
const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgQv1WlVm3FhPrGy3V\nhRANCAAS8Y8J1k6eqoU2pK6w0s0fFxk0e1R3jlBqgTQ9c1xqV7p0xBR8m5PvZk0G\n-----END PRIVATE KEY-----\n";

fn no_key_material(text: &str) {
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    assert!(!text.contains("MIGHAgEAMBMG"), "{text}");
}

#[test]
fn a_symlink_out_of_the_directory_is_refused_naming_it() {
    let outside = tempfile::tempdir().unwrap();
    let key = outside.path().join("ca.key");
    std::fs::write(&key, KEY).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), RULE).unwrap();
    let link = dir.path().join("b.yaml");
    std::os::unix::fs::symlink(&key, &link).unwrap();
    let e = load_dir(dir.path()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: resolves outside the rules directory; refused",
            link.display()
        )
    );
    no_key_material(&e.to_string());
    assert_eq!(e.position().as_deref(), Some("b.yaml"));
    // `rules check` says the same.
    let errors = check_paths(&[dir.path().to_path_buf()]).unwrap_err();
    assert_eq!(errors[0].to_string(), e.to_string());
    // A link to a directory outside, under a hidden name, is refused too.
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("..data")).unwrap();
    std::fs::rename(&key, outside.path().join("c.yaml")).unwrap();
    std::os::unix::fs::symlink("..data/c.yaml", dir.path().join("c.yaml")).unwrap();
    assert!(matches!(load_dir(dir.path()), Err(Error::Outside { .. })));
}

#[test]
fn the_configmap_layout_inside_the_directory_loads() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("..2024_01_01_00_00_00.1");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("web.yaml"), RULE).unwrap();
    std::os::unix::fs::symlink("..2024_01_01_00_00_00.1", dir.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/web.yaml", dir.path().join("web.yaml")).unwrap();
    assert_eq!(load_dir(dir.path()).unwrap().len(), 1);
    // Reached through a symlinked path to the directory itself, too.
    let alias = tempfile::tempdir().unwrap();
    let via = alias.path().join("rules");
    std::os::unix::fs::symlink(dir.path(), &via).unwrap();
    assert_eq!(load_dir(&via).unwrap().len(), 1);
}

#[test]
fn a_pem_file_is_refused_without_quoting_it() {
    let e = err("key.yaml", KEY);
    assert_eq!(
        e,
        "key.yaml:1:1: this is a PEM file (a certificate or key), not a rule file; its content is not shown"
    );
    // A value the parser would quote in full is cut short.
    let secret = "s3cr3t".repeat(40);
    let e = err("a.yaml", &format!("{secret}\n"));
    assert!(!e.contains(&secret[..40]), "{e}");
    assert!(e.len() < 200, "{e}");
}

#[test]
fn deep_nesting_is_refused_before_parsing() {
    let deep = format!("http: {}{}\n", "[".repeat(80_000), "]".repeat(80_000));
    let started = std::time::Instant::now();
    let e = err("deep.yaml", &deep);
    assert_eq!(
        e,
        "deep.yaml:1:70: nested deeper than 64 levels; refused before parsing"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    let json = format!("{{\"rules\": {}{}}}", "[".repeat(70), "]".repeat(70));
    assert!(
        err("deep.json", &json).starts_with("deep.json:1:"),
        "{json}"
    );
}

#[test]
fn files_and_sets_over_their_limits_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.yaml");
    let padding = format!("#{}\n", "x".repeat(1023));
    let text = format!("{RULE}{}", padding.repeat(1025));
    std::fs::write(&big, &text).unwrap();
    let e = load_dir(dir.path()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: the file is larger than the limit of 1048576 bytes; refused",
            big.display()
        )
    );
    let errors = check_paths(std::slice::from_ref(&big)).unwrap_err();
    assert_eq!(errors[0].to_string(), e.to_string());
    // Nine files under the file limit are over the set limit together.
    std::fs::remove_file(&big).unwrap();
    for i in 0..9 {
        let text = format!(
            "rules:\n  - name: r{i}\n    action: allow\n{}",
            padding.repeat(1000)
        );
        std::fs::write(dir.path().join(format!("{i}.yaml")), text).unwrap();
    }
    let e = load_dir(dir.path()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: the rule set (all files together) is larger than the limit of 8388608 bytes; refused",
            dir.path().display()
        )
    );
    assert_eq!(
        check_paths(&[dir.path().to_path_buf()]).unwrap_err()[0].to_string(),
        e.to_string()
    );
}
