//! User documentation speaks to users: no references to how the project is
//! worked on (issue numbers, "the issue", sessions, helpers, development
//! machines). Scans README.md, docs/*.md, benches/README.md, and the text
//! and YAML under charts/ and deploy/.

use std::path::{Path, PathBuf};

/// The user-facing files.
fn user_docs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md"), root.join("benches/README.md")];
    let mut dirs = vec![root.join("docs"), root.join("charts"), root.join("deploy")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ["md", "txt", "yaml", "yml", "tpl"].contains(&e))
            {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Byte offsets where `word` occurs as whole words in `text` (lowercase).
fn whole_words<'a>(text: &'a str, word: &'a str) -> impl Iterator<Item = usize> + 'a {
    text.match_indices(word).map(|(i, _)| i).filter(move |&i| {
        let before = text[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !is_word_char(c));
        let after = text[i + word.len()..]
            .chars()
            .next()
            .is_none_or(|c| !is_word_char(c));
        before && after
    })
}

/// The planning references in one line, as the words found.
fn references(line: &str) -> Vec<String> {
    let l = line.to_lowercase();
    let mut found = Vec::new();
    for phrase in [
        "the issue",
        "the issues",
        "in the issue",
        "development machine",
        "development machines",
        "helper",
        "helpers",
    ] {
        if whole_words(&l, phrase).next().is_some() {
            found.push(phrase.to_string());
        }
    }
    if l.contains("issues'") || l.contains("issue's") {
        found.push("issue's".into());
    }
    // "issue 3", "issues 5/6"
    for i in whole_words(&l, "issue").chain(whole_words(&l, "issues")) {
        let rest = l[i..].split_once(' ').map(|(_, r)| r).unwrap_or("");
        if rest.starts_with(|c: char| c.is_ascii_digit() || c == '#') {
            found.push(format!(
                "issue {}",
                rest.chars().take(3).collect::<String>()
            ));
        }
    }
    // A working session, not a TLS one.
    for i in whole_words(&l, "session").chain(whole_words(&l, "sessions")) {
        let tls = l[..i].trim_end().ends_with("tls");
        let resumption =
            l[i..].contains("session resumption") || l[i..].starts_with("session ticket");
        if !tls && !resumption {
            found.push("session".into());
        }
    }
    found
}

#[test]
fn the_checker_finds_what_it_should() {
    let bad = [
        "named `portcullis_rules_count` in the issue",
        "issue 3: the original port",
        "see issues 5/6",
        "there is no cluster on the development machines",
        "at the end of the first session",
        "the issues' notes say why",
        "a helper wrote this",
    ];
    for line in bad {
        assert!(!references(line).is_empty(), "missed: {line}");
    }
    let good = [
        "the issuer signs the leaf",
        "`portcullis ca issue --ca DIR`",
        "TLS session resumption is off",
        "session resumption is not used",
        "issue a certificate with 3 SANs",
    ];
    for line in good {
        assert!(
            references(line).is_empty(),
            "false alarm: {line}: {:?}",
            references(line)
        );
    }
}

#[test]
fn user_docs_have_no_planning_references() {
    let mut hits = Vec::new();
    let files = user_docs();
    assert!(files.len() > 5, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            for r in references(line) {
                hits.push(format!(
                    "{}:{}: {r:?}: {}",
                    file.display(),
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(
        hits.is_empty(),
        "user docs mention how the work is organised:\n{}",
        hits.join("\n")
    );
}
