//! Table tests of the rules verdict and of what makes a report pass.

use super::*;

fn view(hash: &str, last_error: Option<&str>) -> RulesView {
    RulesView {
        dir: Some("/etc/portcullis/rules".into()),
        hash: hash.into(),
        rule_count: 3,
        last_error: last_error.map(|m| RulesErrorView {
            message: m.into(),
            at: "2030-01-01T00:00:00Z".into(),
        }),
    }
}

/// What `/rules` says, what the files say, the verdict, a detail snippet.
type Case = (RulesView, Option<(PathBuf, OnDisk)>, Status, &'static str);

#[test]
fn rules_table() {
    let dir = || PathBuf::from("/etc/portcullis/rules");
    let cases: [Case; 6] = [
        (
            view("abc", None),
            Some((dir(), Ok("abc".into()))),
            Status::Ok,
            "the same as the files",
        ),
        (
            view("abc", None),
            Some((dir(), Ok("def".into()))),
            Status::Fail,
            "are not the rules in force",
        ),
        (
            view("abc", Some("bad.yaml:1:1: oops")),
            Some((dir(), Err("bad.yaml:1:1: oops".into()))),
            Status::Fail,
            "not valid: bad.yaml:1:1",
        ),
        // Files fixed on disk but not reloaded yet: the hash says so.
        (
            view("abc", Some("bad.yaml:1:1: oops")),
            Some((dir(), Ok("new".into()))),
            Status::Fail,
            "not the rules in force",
        ),
        // Files not mounted here: only /rules is read.
        (view("abc", None), None, Status::Ok, "not readable here"),
        (
            view("abc", Some("bad.yaml:1:1: oops")),
            None,
            Status::Fail,
            "reload was refused",
        ),
    ];
    for (v, disk, want, snippet) in cases {
        let f = rules_finding(&v, disk.clone());
        assert_eq!(f.status, want, "{disk:?}: {f:?}");
        assert!(f.detail.contains(snippet), "{disk:?}: {}", f.detail);
        assert_eq!(f.fix.is_some(), want == Status::Fail, "{f:?}");
    }
}

#[test]
fn skips_pass_unless_strict() {
    let ok = Finding::ok("a", "fine");
    let skip = Finding::skip("b", "no permission", None);
    let fail = Finding::fail("c", "broken", "fix it");
    assert!(passes(&[ok.clone(), skip.clone()], false));
    assert!(!passes(&[ok.clone(), skip], true));
    assert!(!passes(&[ok, fail], false));
}
