use super::*;

/// (input, allow encoded slash, expected output or error)
#[test]
fn normalization_table() {
    use PathError::*;
    let cases: &[(&str, bool, Result<&str, PathError>)] = &[
        ("/", false, Ok("/")),
        ("/api", false, Ok("/api")),
        ("/api/", false, Ok("/api/")),
        ("/admin/../secret", false, Ok("/secret")),
        ("/admin/..", false, Ok("/")),
        ("/a/b/..", false, Ok("/a/")),
        ("/a/b/.", false, Ok("/a/b/")),
        ("/..", false, Ok("/")),
        ("/../../etc/passwd", false, Ok("/etc/passwd")),
        ("//api", false, Ok("/api")),
        ("///api//v1///x", false, Ok("/api/v1/x")),
        ("/a/./b", false, Ok("/a/b")),
        ("/./", false, Ok("/")),
        ("/%2e%2e/admin", false, Ok("/admin")),
        ("/%2E%2E/", false, Ok("/")),
        ("/x/%2e%2e/admin", false, Ok("/admin")),
        ("/x/%2e/admin", false, Ok("/x/admin")),
        ("/.%2e/admin", false, Ok("/admin")),
        ("/%61dmin", false, Ok("/admin")),
        ("/%41PI", false, Ok("/API")),
        ("/%7euser", false, Ok("/~user")),
        ("/a%20b", false, Ok("/a%20b")),
        ("/a%3fb", false, Ok("/a%3Fb")),
        ("/caf%c3%a9", false, Ok("/caf%C3%A9")),
        ("/café", false, Ok("/café")),
        ("/...", false, Ok("/...")),
        ("/a..b/c", false, Ok("/a..b/c")),
        ("/API%2f..", false, Err(EncodedSlash)),
        ("/API%2F..", false, Err(EncodedSlash)),
        ("/API%2f..", true, Ok("/API%2F..")),
        ("/a%2Fb/../c", true, Ok("/c")),
        ("/a%5cb", false, Err(Backslash)),
        ("/a\\b", false, Err(Backslash)),
        ("/a%5cb", true, Ok("/a%5Cb")),
        ("/a\\..\\b", true, Ok("/a%5C..%5Cb")),
        ("/%zz", false, Err(InvalidEncoding)),
        ("/%", false, Err(InvalidEncoding)),
        ("/%4", false, Err(InvalidEncoding)),
        ("/a%g1", false, Err(InvalidEncoding)),
        ("/a#frag", false, Err(Fragment)),
        ("/a%23b", false, Ok("/a%23b")),
        ("/a?x=1", false, Err(Query)),
        ("", false, Err(NotAbsolute)),
        ("api", false, Err(NotAbsolute)),
        ("*", false, Err(NotAbsolute)),
        ("http://x/a", false, Err(NotAbsolute)),
        // Forms servers disagree on are refused.
        ("/api/..;/secret", false, Err(PathError::Semicolon)),
        ("/api/%2e%2e;/secret", false, Err(PathError::Semicolon)),
        ("/api/.;x=1/secret", false, Err(PathError::Semicolon)),
        ("/api/admin;x", false, Err(PathError::Semicolon)),
        ("/api/admin%3Bx", true, Err(PathError::Semicolon)),
        ("/api/admin%3bx", false, Err(PathError::Semicolon)),
        ("/api/admin%3", false, Err(PathError::InvalidEncoding)),
        ("/api/%252e%252e/secret", false, Err(PathError::Ambiguous)),
        ("/api/..%00/secret", false, Err(PathError::Ambiguous)),
        // A refused form built from encoded parts is refused too.
        ("/%25%36%31dmin/x", false, Err(PathError::Ambiguous)),
        ("/%25%36%31dmin/x", true, Err(PathError::Ambiguous)),
        ("/%25%32%46", false, Err(PathError::Ambiguous)),
        ("/%25%32%66", true, Err(PathError::Ambiguous)),
        ("/%25%35%43", false, Err(PathError::Ambiguous)),
        ("/%25%33%42", false, Err(PathError::Ambiguous)),
        ("/%25%33%62", true, Err(PathError::Ambiguous)),
        ("/%25%30%30", false, Err(PathError::Ambiguous)),
        ("/%252%30", false, Err(PathError::Ambiguous)),
        ("/%25%325", false, Err(PathError::Ambiguous)),
        (
            "/public/%25%32%65%25%32%65/admin/x",
            false,
            Err(PathError::Ambiguous),
        ),
        ("/a%25%7A", false, Ok("/a%25z")),
        ("/a%25%2D1", false, Ok("/a%25-1")),
        // Matrix parameters are refused everywhere; a literal %25 stays.
        ("/api/items;v=2/x", false, Err(PathError::Semicolon)),
        ("/api/100%25", false, Ok("/api/100%25")),
    ];
    for (input, allow, want) in cases {
        let got = normalize_path(input, *allow);
        assert_eq!(
            got.as_deref().map_err(|e| *e),
            *want,
            "normalize_path({input:?}, {allow})"
        );
    }
}

#[test]
fn normalizing_twice_changes_nothing() {
    for p in ["/a/../b//c/./d/", "/%2e%2e/x%20y", "/a%2Fb", "/"] {
        let once = normalize_path(p, true).unwrap();
        assert_eq!(normalize_path(&once, true).unwrap(), once, "{p}");
    }
}

/// A path taken as already normal comes out of the full normalization
/// unchanged, and so does every path the full one produces: checked over
/// every path of up to six characters from an alphabet with each special
/// character, and the shortcut is taken for plain paths.
#[test]
fn the_already_normal_shortcut_agrees_with_full_normalization() {
    const ALPHABET: &[u8] = b"/a.%2F;\\#?e";
    let mut paths = vec![String::new()];
    let mut all = Vec::new();
    for _ in 0..6 {
        let mut longer = Vec::new();
        for p in &paths {
            for &c in ALPHABET {
                let mut q = p.clone();
                q.push(c as char);
                longer.push(q);
            }
        }
        all.extend(longer.iter().cloned());
        paths = longer;
    }
    let mut shortcut = 0;
    for raw in &all {
        for allow in [false, true] {
            if is_normal(raw) {
                shortcut += 1;
                assert_eq!(
                    normalize_in_full(raw, allow).as_deref(),
                    Ok(raw.as_str()),
                    "{raw:?}"
                );
            }
            if let Ok(normal) = normalize_in_full(raw, allow) {
                // The full result is normal unless it kept an escape.
                if !normal.contains('%') {
                    assert!(is_normal(&normal), "{raw:?} → {normal:?}");
                }
            }
        }
    }
    assert!(shortcut > 1000, "{shortcut}");
    for plain in ["/", "/api", "/api/", "/bench/load", "/a.b/.c/..d/"] {
        assert!(is_normal(plain), "{plain}");
    }
    for not in [
        "", "api", "//a", "/a//b", "/.", "/a/..", "/a/./", "/%61", "/a;b", "/a\\b",
    ] {
        assert!(!is_normal(not), "{not}");
    }
}
