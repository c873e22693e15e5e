//! Inputs the fuzz targets in `fuzz/` found (`make fuzz`), fed to the same
//! functions with the same checks, so that what was fixed stays fixed. Each
//! input file is under `tests/fuzz_regressions/<target>/`, in the format
//! of that target.

use std::path::PathBuf;
use std::sync::Arc;

use portcullis::authz::{normalize_path, DefaultPolicy, PathError, Peer, RuleSet};
use portcullis::identity::TrustDomain;
use portcullis::proxy::http::{admit_head, AdmitSettings, ConnInfo, Refusal};

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_regressions")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no inputs in {}", dir.display());
    files
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(&f).expect("readable input");
            (f, bytes)
        })
        .collect()
}

/// The `path_host` target's path check: a path that normalizes is
/// normalized for good (normalizing it again neither changes nor refuses
/// it), so the app receives exactly what the rules judged.
fn check_path(raw: &str, allow_encoded_slash: bool) {
    let Ok(path) = normalize_path(raw, allow_encoded_slash) else {
        return;
    };
    assert_eq!(
        normalize_path(&path, allow_encoded_slash),
        Ok(path.clone()),
        "{raw:?} normalized to {path:?}"
    );
}

#[test]
fn path_host_findings_stay_fixed() {
    for (file, bytes) in inputs("path_host") {
        let (mode, rest) = bytes.split_first().expect("a mode byte");
        let text = std::str::from_utf8(rest).expect("UTF-8 input");
        let path = text.split_once('\n').map_or(text, |(p, _)| p);
        eprintln!("{}", file.display());
        check_path(path, mode & 1 == 1);
        check_path(&format!("/{path}"), mode & 1 == 1);
    }
}

/// Found by `path_host`: decoding `%34%31` after a `%25` built `%2541`, the
/// double encoding a path sent as such is refused for, and the app was
/// handed `/%2541` (an app decoding twice reads `/A`). A deny rule on
/// `/admin/**` was passed by `/%25%36%31dmin/`.
#[test]
fn a_double_encoding_built_by_decoding_is_refused() {
    for raw in ["/%25%34%31", "/%25%36%31dmin/", "/x/%25%33%30%30"] {
        for allow in [false, true] {
            assert_eq!(
                normalize_path(raw, allow),
                Err(PathError::Ambiguous),
                "{raw}"
            );
        }
    }
    let td = TrustDomain::new("cluster.local").unwrap();
    let conn = ConnInfo::new(
        Arc::new(Peer::Unauthenticated),
        "10.0.0.1:40000".parse().unwrap(),
        "127.0.0.1:8080".parse().unwrap(),
    );
    let settings = AdmitSettings {
        td: &td,
        default: DefaultPolicy::Allow,
        allow_encoded_slash: false,
    };
    let request = http::Request::get("/%25%36%31dmin/users")
        .header("host", "api.example")
        .body(())
        .unwrap();
    let (mut parts, ()) = request.into_parts();
    let got = admit_head(&mut parts, &conn, &RuleSet::empty(), settings);
    assert!(
        matches!(got, Err(Refusal::Path(PathError::Ambiguous))),
        "{got:?}"
    );
}
