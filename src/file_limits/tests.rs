use std::time::Duration;

use super::*;

fn depth_ok(text: &str, json: bool) -> bool {
    check_nesting(text, json, MAX_NESTING).is_ok()
}

#[test]
fn deep_flow_nesting_is_refused_where_it_crosses_the_limit() {
    let deep = format!("http: {}{}\n", "[".repeat(80_000), "]".repeat(80_000));
    let e = check_nesting(&deep, false, 64).unwrap_err();
    // The top-level map is one level, so the 64th bracket is the 65th level.
    assert_eq!((e.line, e.column), (1, 6 + 64));
    let json = format!("{{\"rules\": {}{}}}", "[".repeat(100), "]".repeat(100));
    assert_eq!(check_nesting(&json, true, 64).unwrap_err().line, 1);
    assert!(depth_ok(
        &format!("a: {}{}", "[".repeat(60), "]".repeat(60)),
        false
    ));
}

#[test]
fn deep_block_nesting_is_refused() {
    // One `- ` per level on one line, and one indentation step per line.
    let dashes = format!("{}x\n", "- ".repeat(100));
    assert!(check_nesting(&dashes, false, 64).is_err());
    let mut indented = String::new();
    for i in 0..100 {
        indented.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
    }
    let e = check_nesting(&indented, false, 64).unwrap_err();
    assert_eq!(e.line, 65);
}

#[test]
fn brackets_in_strings_comments_and_plain_scalars_do_not_count() {
    let many = "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[";
    let texts = [
        format!("a: \"{many}\"\n"),
        format!("a: '{many}'\n"),
        format!("a: x{many}\n"),
        format!("# {many}\na: 1\n"),
        format!("a: 1 # {many}\n"),
        format!("a: |\n  {many}\n  more\nb: 2\n"),
        format!("- name: x\n  text: >\n    {many}\n  other: 1\n"),
        format!("a: \"multi\n  line {many}\"\n"),
        format!("a: 'it''s {many}'\n"),
    ];
    for t in &texts {
        assert!(depth_ok(t, false), "{t}");
    }
    assert!(depth_ok(&format!("{{\"a\": \"{many}\\\"\"}}"), true));
}

#[test]
fn quotes_that_yaml_reads_as_text_do_not_hide_nesting() {
    let open = "[".repeat(100);
    // An apostrophe inside a flow plain scalar is not a quote.
    assert!(!depth_ok(&format!("a: [don't, {open}"), false));
    // A block scalar ends where the indentation does.
    assert!(!depth_ok(
        &format!("- k: |\n    'x\n  other: {open}\n"),
        false
    ));
    // A quote inside a block plain scalar is text.
    assert!(!depth_ok(&format!("a: b 'c\nd: {open}\n"), false));
}

fn alias_at(text: &str) -> Option<(usize, usize)> {
    match check_nesting(text, false, MAX_NESTING) {
        Err(e) if e.alias => Some((e.line, e.column)),
        _ => None,
    }
}

#[test]
fn anchors_and_aliases_are_refused_where_they_start_a_node() {
    let cases = [
        ("a: &x 1\nb: *x\n", (1, 4)),
        ("rules:\n  - &r {name: r0}\n  - *r\n", (2, 5)),
        ("- *r\n", (1, 3)),
        ("*r\n", (1, 1)),
        ("  &r a: 1\n", (1, 3)),
        ("a: [1, *x]\n", (1, 8)),
        ("a: [*x]\n", (1, 5)),
        ("a: {k: *x}\n", (1, 8)),
        ("a: {*x : 1}\n", (1, 5)),
        ("? *x\n: 1\n", (1, 3)),
        ("a: !!str &x 1\n", (1, 10)),
        ("--- &x [1]\n", (1, 5)),
        ("a: \"q\"\nb: [\n  *x]\n", (3, 3)),
    ];
    for (text, at) in cases {
        assert_eq!(alias_at(text), Some(at), "{text:?}");
    }
    // The same file as JSON has no anchors: `*` and `&` are then text.
    assert!(depth_ok(r#"{"a": ["*x", "&y"]}"#, true));
}

#[test]
fn star_and_ampersand_inside_scalars_and_comments_are_text() {
    let texts = [
        "paths: [/api/**, /a*b, \"*\", '&x']\n",
        "a: a&b\nb: x*y\n",
        "a: b *c &d\n",
        "a: \"*x\"\nb: '&y'\n",
        "a: 1 # *x &y\n# &z\n",
        "a: |\n  *x\n  &y\nb: 2\n",
        "a: \"multi\n  *line\"\n",
        "identities: [\"spiffe://cluster.local/ns/a/sa/*\"]\n",
        "a: [x*, y&]\n",
    ];
    for t in texts {
        assert_eq!(alias_at(t), None, "{t:?}");
        assert!(
            serde_norway::from_str::<serde_norway::Value>(t).is_ok(),
            "{t:?}"
        );
    }
}

#[test]
fn ordinary_rule_files_pass() {
    let text = "rules:\n  - name: web\n    action: allow\n    ports: [80, \"9000-9100\"]\n    from:\n      identities: [\"spiffe://cluster.local/ns/a/sa/*\"]\n    http:\n      - methods: [GET]\n        paths: [\"/api/**\"]\n        headers: {x-env: [prod]}\n";
    assert!(depth_ok(text, false));
    assert!(depth_ok(
        r#"{"rules": [{"name": "a", "action": "allow", "ports": [80]}]}"#,
        true
    ));
}

#[test]
fn scrub_shortens_quotes_and_hides_pem() {
    let long = "x".repeat(200);
    let msg = scrub(&format!("invalid type: string \"{long}\", expected a map"));
    assert_eq!(
        msg,
        format!(
            "invalid type: string \"{}…\", expected a map",
            "x".repeat(32)
        )
    );
    let pem =
        scrub("invalid type: string \"-----BEGIN PRIVATE KEY----- MIGHAgEAMBMG\", expected a map");
    assert!(
        !pem.contains("PRIVATE KEY") && !pem.contains("MIGH"),
        "{pem}"
    );
    assert_eq!(scrub("unknown field `nmae`"), "unknown field `nmae`");
    assert_eq!(scrub("bad \"a\u{1b}b\""), "bad \"a\\u{1b}b\"");
    assert!(!scrub("oops -----BEGIN CERTIFICATE----- MIIB").contains("MIIB"));
}

#[test]
fn read_capped_refuses_large_files_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("big");
    std::fs::write(&f, vec![b'a'; 101]).unwrap();
    let e = read_capped(&f, 100).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: the file is larger than the limit of 100 bytes; refused",
            f.display()
        )
    );
    assert_eq!(read_capped(&f, 101).unwrap().len(), 101);
}

/// A parse that never ends until `wait` gets a message.
fn stuck(wait: std::sync::mpsc::Receiver<()>) -> impl FnOnce() + Send + 'static {
    move || {
        let _ = wait.recv();
    }
}

#[tokio::test]
async fn slot_starts_one_parse_beside_an_overrun_and_no_more() {
    let slot = ParseSlot::new();
    let short = Duration::from_millis(50);
    assert_eq!(slot.run(Duration::from_secs(5), || 7).await, Ok(7));
    let (release_a, wait_a) = std::sync::mpsc::channel::<()>();
    assert_eq!(
        slot.run(short, stuck(wait_a)).await,
        Err(SlotError::TimedOut(short))
    );
    // One overrun: the next parse still runs, beside it.
    assert_eq!(slot.alive(), 1);
    assert!(!slot.is_busy());
    assert_eq!(slot.run(Duration::from_secs(5), || 1).await, Ok(1));
    // A second overrun: now later parses wait.
    let (release_b, wait_b) = std::sync::mpsc::channel::<()>();
    assert_eq!(
        slot.run(short, stuck(wait_b)).await,
        Err(SlotError::TimedOut(short))
    );
    assert_eq!(slot.alive(), MAX_ALIVE);
    assert!(slot.is_busy());
    assert_eq!(
        slot.run(Duration::from_secs(5), || 1).await,
        Err(SlotError::Busy)
    );
    release_a.send(()).unwrap();
    let start = std::time::Instant::now();
    while slot.is_busy() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the slot was never freed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(slot.run(Duration::from_secs(5), || 2).await, Ok(2));
    release_b.send(()).unwrap();
}

/// The nesting of a parsed YAML value (a scalar is 0).
fn value_depth(v: &serde_norway::Value) -> usize {
    match v {
        serde_norway::Value::Sequence(s) => 1 + s.iter().map(value_depth).max().unwrap_or(0),
        serde_norway::Value::Mapping(m) => {
            1 + m
                .iter()
                .map(|(k, v)| value_depth(k).max(value_depth(v)))
                .max()
                .unwrap_or(0)
        }
        serde_norway::Value::Tagged(t) => value_depth(&t.value),
        _ => 0,
    }
}

/// Random texts of YAML's significant pieces: whenever the parser accepts
/// one, the scan must count at least the depth the parser built.
#[test]
fn the_scan_never_counts_less_than_the_parser_builds_nor_misses_an_alias() {
    use rand::{Rng, SeedableRng};
    const PIECES: &[&str] = &[
        "[",
        "]",
        "{",
        "}",
        ", ",
        "'",
        "\"",
        " #",
        "\n",
        "a",
        "b",
        ": ",
        "- ",
        "|",
        ">",
        "  ",
        "\n  ",
        "\n    ",
        "?",
        "&x ",
        "*x",
        "!t ",
        "\\",
        "''",
        ":",
        "--- ",
        "&x a",
        "*x ",
        "[&x a, *x]",
        "- *x",
        "&x a: *x",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut parsed, mut aliased) = (0, 0);
    for _ in 0..30_000 {
        let n = rng.gen_range(1..60);
        let text: String = (0..n)
            .map(|_| PIECES[rng.gen_range(0..PIECES.len())])
            .collect();
        let Ok(value) = serde_norway::from_str::<serde_norway::Value>(&text) else {
            continue;
        };
        parsed += 1;
        // An alias the parser resolved (renaming its anchor breaks the
        // text) is refused by the scan.
        if serde_norway::from_str::<serde_norway::Value>(&text.replace("&x", "&y")).is_err() {
            assert!(
                check_nesting(&text, false, MAX_NESTING).is_err_and(|e| e.alias),
                "the scan missed an alias in {text:?}"
            );
            aliased += 1;
        }
        let depth = value_depth(&value);
        if depth > 0 {
            assert!(
                check_nesting(&text, false, depth - 1).is_err(),
                "the scan counted less than {depth} in {text:?}"
            );
        }
    }
    assert!(parsed > 1000, "only {parsed} texts parsed");
    assert!(aliased > 20, "only {aliased} texts used an alias");
}
