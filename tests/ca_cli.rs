//! `portcullis ca` from the command line: init, issue (leaf and
//! intermediate), inspect; and sidecars signing with an intermediate.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;

fn ca(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("ca")
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn init_issue_and_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let out = ca(&[
        "init",
        "--out",
        s(&root),
        "--trust-domain",
        "example.org",
        "--ttl",
        "48h",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let mode = std::fs::metadata(root.join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "key file is private");
    let again = ca(&["init", "--out", s(&root)]);
    assert!(!again.status.success(), "refuses to overwrite");
    assert!(text(&again).contains("--force"), "{}", text(&again));
    assert!(ca(&[
        "init",
        "--out",
        s(&root),
        "--trust-domain",
        "example.org",
        "--force"
    ])
    .status
    .success());

    let leaf = dir.path().join("leaf");
    let id = "spiffe://example.org/ns/shop/sa/cart";
    let out = ca(&[
        "issue",
        "--ca",
        s(&root),
        "--id",
        id,
        "--ttl",
        "10m",
        "--out",
        s(&leaf),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = ca(&[
        "inspect",
        s(&leaf.join("tls.crt")),
        "--bundle",
        s(&root.join("ca.crt")),
    ]);
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    for want in [
        id,
        "serial:",
        "not after:",
        "is CA:      no",
        "chains to bundle: yes",
        "portcullis root CA example.org",
    ] {
        assert!(report.contains(want), "{want:?} not in:\n{report}");
    }
    // The leaf file holds the leaf and then its issuer.
    assert!(report.contains("tls.crt [1]"), "{report}");

    let out = ca(&[
        "issue",
        "--ca",
        s(&root),
        "--id",
        "spiffe://other.org/ns/a/sa/b",
        "--out",
        s(&leaf),
        "--force",
    ]);
    assert!(
        !out.status.success(),
        "a CA of example.org does not sign for other.org"
    );
    assert!(
        text(&out).contains("not trust domain other.org"),
        "{}",
        text(&out)
    );

    let other = dir.path().join("other");
    assert!(
        ca(&["init", "--out", s(&other), "--trust-domain", "example.org"])
            .status
            .success()
    );
    let out = ca(&[
        "inspect",
        "--json",
        s(&leaf.join("tls.crt")),
        "--bundle",
        s(&other.join("ca.crt")),
    ]);
    assert!(!out.status.success(), "a chain to another root is reported");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["chains_to_bundle"], false);
    assert_eq!(json[0]["spiffe_ids"][0], id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_sign_with_an_intermediate() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let inter = dir.path().join("inter");
    assert!(ca(&["init", "--out", s(&root)]).status.success());
    let id = "spiffe://cluster.local/ns/default/sa/ignored";
    let out = ca(&[
        "issue",
        "--ca",
        s(&root),
        "--id",
        id,
        "--intermediate",
        "--ttl",
        "24h",
        "--out",
        s(&inter),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let report = text(&ca(&[
        "inspect",
        s(&inter.join("ca.crt")),
        "--bundle",
        s(&root.join("ca.crt")),
    ]));
    assert!(
        report.contains("portcullis intermediate CA") && report.contains("is CA:      yes"),
        "{report}"
    );

    // An intermediate may sign leaves only: a second level is refused
    // (peers would refuse every leaf under it).
    let deeper = dir.path().join("deeper");
    let out = ca(&[
        "issue",
        "--ca",
        s(&inter),
        "--id",
        id,
        "--intermediate",
        "--out",
        s(&deeper),
    ]);
    assert!(
        !out.status.success(),
        "an intermediate of an intermediate was made"
    );
    assert!(
        text(&out).contains("may sign leaves only"),
        "{}",
        text(&out)
    );
    assert!(!deeper.join("ca.key").exists());

    let issuer = Ca {
        files: portcullis::identity::CaFiles::in_dir(&inter),
        dir: inter.clone(),
    };
    // Peers trust only the root; the leaf chain carries the intermediate.
    let pair = Pair::start(&issuer, &root.join("ca.crt"), &[], &[]).await;
    assert!(pair.ping(b"via intermediate").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let pair = Pair::start(&ca, &ca.files.cert, &["--idle-timeout", "1s"], &[]).await;
    let mut s = tokio::net::TcpStream::connect(pair.a.upstream())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "closed, not data");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
}
