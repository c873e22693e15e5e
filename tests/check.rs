//! `portcullis check` against real sidecars: every failure line is
//! provoked for real (no certificate because the identity service is
//! down, a certificate running out, a bad rule file, the admin port
//! closed, interception missing or for other ports, no permission) and the
//! all-good case in a network namespace set up like a pod exits 0.

mod common;
mod netns;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use portcullis::check::{certificate_findings, CertsView, Status};
use portcullis::identity::{NewCa, TrustDomain};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// Runs `portcullis check --json ARGS`; returns the exit code and report.
async fn check_json(args: &[String]) -> (i32, Value) {
    let out = tokio::process::Command::new(BIN)
        .arg("check")
        .arg("--json")
        .args(args)
        .env_remove("PORTCULLIS_CA_URL")
        .env_remove("PORTCULLIS_RULES_DIR")
        .env_remove("PORTCULLIS_TRUST_BUNDLE")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

/// The finding named `check`: (status, detail, fix).
fn finding(report: &Value, check: &str) -> (String, String, String) {
    let f = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check} in {report:#}"));
    let s = |k: &str| f[k].as_str().unwrap_or_default().to_string();
    (s("status"), s("detail"), s("fix"))
}

/// Asserts `check` failed with `snippet` in its detail and has a fix.
fn assert_fails(report: &Value, check: &str, snippet: &str) {
    let (status, detail, fix) = finding(report, check);
    assert_eq!(status, "fail", "{check}: {report:#}");
    assert!(
        detail.contains(snippet),
        "{check}: {detail:?} lacks {snippet:?}"
    );
    assert!(!fix.is_empty(), "{check} has no fix: {report:#}");
}

fn admin_args(sidecar: &Sidecar) -> Vec<String> {
    vec![
        "--admin".into(),
        sidecar.addrs.admin.to_string(),
        "--no-interception".into(),
    ]
}

/// A port where nothing listens.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn admin_port_unreachable_fails_and_skips_what_depends_on_it() {
    let args = vec![
        "--admin".to_string(),
        format!("127.0.0.1:{}", closed_port()),
        "--no-interception".into(),
    ];
    let (code, report) = check_json(&args).await;
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["ok"], false);
    assert_fails(&report, "admin", "cannot connect");
    assert_eq!(finding(&report, "ready").0, "skip");
    // The table says the same, with a `fix:` line under the failure.
    let out = std::process::Command::new(BIN)
        .arg("check")
        .args(&args)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<&str> = table.lines().collect();
    let at = lines.iter().position(|l| l.starts_with("admin ")).unwrap();
    assert!(lines[at].contains("FAIL"), "{table}");
    assert!(lines[at + 1].trim_start().starts_with("fix: "), "{table}");
}

/// `--admin` takes http://HOST:PORT as `await --admin` does.
#[tokio::test]
async fn admin_takes_a_url_too() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let sidecar = Sidecar::start(&issuer_args(&ca, &ca.files.cert, "web")).await;
    let port = sidecar.addrs.admin.port();
    for admin in [
        format!("http://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{port}/"),
    ] {
        let args = vec![admin.clone(), "--no-interception".into()];
        let (_, report) = check_json(&[vec!["--admin".into()], args].concat()).await;
        assert_eq!(finding(&report, "admin").0, "ok", "{admin}: {report:#}");
        assert_eq!(finding(&report, "ready").0, "ok", "{admin}: {report:#}");
    }
    let out = std::process::Command::new(BIN)
        .args(["check", "--admin", "https://127.0.0.1:1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("use HOST:PORT or http://HOST:PORT"),
        "{stderr}"
    );
}

#[tokio::test]
async fn not_ready_while_the_identity_service_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let token = dir.path().join("token");
    std::fs::write(&token, "token").unwrap();
    let url = format!("https://127.0.0.1:{}", closed_port());
    let bundle = ca.files.cert.display().to_string();
    let sidecar = Sidecar::spawn_with(
        &[
            "--ca-url",
            &url,
            "--ca-token-file",
            token.to_str().unwrap(),
            "--trust-bundle",
            &bundle,
        ],
        |_| {},
    )
    .await;
    let mut args = admin_args(&sidecar);
    args.extend(["--ca-url".into(), url, "--trust-bundle".into(), bundle]);
    let (code, report) = check_json(&args).await;
    assert_eq!(code, 1, "{report:#}");
    assert_fails(&report, "ready", "no certificate yet");
    assert_fails(&report, "certificate", "no certificate yet");
    assert_fails(&report, "identity-service", "Connection refused");
    assert_eq!(finding(&report, "clock").0, "skip");
    assert_eq!(finding(&report, "admin").0, "ok");
}

#[tokio::test]
async fn a_certificate_running_out_then_expired_fails() {
    // An issuer that ends in 6 s caps the leaf there: with the 60 s
    // backdating the leaf has < 10% of its life left at once, and expires
    // (the issuer with it) 6 s later while the sidecar keeps serving it.
    let dir = tempfile::tempdir().unwrap();
    let files = NewCa::root(&TrustDomain::new(TD).unwrap(), Duration::from_secs(6))
        .unwrap()
        .write(&dir.path().join("ca"), false)
        .unwrap();
    let ca = Ca {
        dir: dir.path().join("ca"),
        files,
    };
    let sidecar = Sidecar::start(&issuer_args(&ca, &ca.files.cert, "web")).await;
    let (code, report) = check_json(&admin_args(&sidecar)).await;
    assert_eq!(code, 1, "{report:#}");
    assert_fails(&report, "certificate", "less than 10% of its");
    assert_eq!(finding(&report, "ready").0, "ok");
    let args = admin_args(&sidecar);
    let last = std::sync::Mutex::new(Value::Null);
    eventually(
        "check reports the expired certificate",
        Duration::from_secs(20),
        || {
            let args = args.clone();
            let last = &last;
            async move {
                let (code, report) = check_json(&args).await;
                let expired = code == 1 && finding(&report, "certificate").1.contains("expired at");
                *last.lock().unwrap() = report;
                expired
            }
        },
    )
    .await;
    let last = last.into_inner().unwrap();
    assert_fails(
        &last,
        "certificate",
        "spiffe://cluster.local/ns/default/sa/web",
    );
    assert_fails(&last, "trust-bundle", "expired at");
}

#[tokio::test]
async fn an_invalid_rule_file_fails_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let good = "rules:\n  - name: web\n    action: allow\n    ports: [8080]\n";
    write_atomic(&rules.join("policy.yaml"), good.as_bytes());
    let mut args = issuer_args(&ca, &ca.files.cert, "web");
    args.extend(["--rules-dir".into(), rules.display().to_string()]);
    let sidecar = Sidecar::start(&args).await;
    let (code, report) = check_json(&admin_args(&sidecar)).await;
    assert_eq!(code, 0, "{report:#}");
    assert!(
        finding(&report, "rules").1.contains("1 rule(s) in force"),
        "{report:#}"
    );

    write_atomic(&rules.join("broken.yaml"), b"rules:\n  - name: [oops\n");
    let (code, report) = check_json(&admin_args(&sidecar)).await;
    assert_eq!(code, 1, "{report:#}");
    assert_fails(&report, "rules", "broken.yaml");
    let (_, _, fix) = finding(&report, "rules");
    assert!(fix.contains("portcullis rules check"), "{fix}");
}

/// The real `/certs` of a running sidecar, read by a clock that is two
/// minutes behind the issuer's (past the 60 s backdating): the leaf is not
/// valid yet there, which `check` reports as clock skew. (The table of
/// cases is in the unit tests of `check::certs`.)
#[tokio::test]
async fn a_clock_behind_the_issuer_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let sidecar = Sidecar::start(&issuer_args(&ca, &ca.files.cert, "web")).await;
    let (status, body) = http_get(sidecar.addrs.admin, "/certs").await.unwrap();
    assert_eq!(status, 200);
    let view: CertsView = serde_json::from_str(&body).unwrap();
    let leaf = view.certificate.as_ref().unwrap();
    assert!(
        leaf.issuer
            .as_deref()
            .unwrap_or_default()
            .contains("portcullis"),
        "{body}"
    );
    let issued = SystemTime::now() - Duration::from_secs(60);
    let behind = issued - Duration::from_secs(120);
    let findings = certificate_findings(&view, behind);
    let clock = findings.iter().find(|f| f.check == "clock").unwrap();
    assert_eq!(clock.status, Status::Fail, "{clock:?}");
    assert!(clock.detail.contains("ahead of this clock"), "{clock:?}");
    let now = certificate_findings(&view, SystemTime::now());
    assert!(now.iter().all(|f| f.status == Status::Ok), "{now:?}");
}

/// Makes `path` (and everything under it) belong to `uid`.
fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            chown_tree(&e.unwrap().path(), uid);
        }
    }
}

/// A pod: a network namespace with the sidecar on its default ports as
/// UID 1500, checked without rules, with rules for other ports, with the
/// rules `portcullis init` installs (all good, exit 0), and by a user who
/// may not read the rules (skipped; a failure only with --strict).
#[test]
fn interception_in_a_pod_namespace() {
    if netns::skip("interception_in_a_pod_namespace", &["ip", "nft", "setpriv"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(
        rules.join("policy.yaml"),
        "rules:\n  - name: web\n    action: allow\n    ports: [8080]\n",
    )
    .unwrap();
    chown_tree(dir.path(), 1500);
    let ns = netns::Netns::new("check");
    let (cert, key) = (
        ca.files.cert.display().to_string(),
        ca.files.key.display().to_string(),
    );
    let rules_dir = rules.display().to_string();
    let _sidecar = ns.spawn(&[
        "setpriv",
        "--reuid",
        "1500",
        "--regid",
        "1500",
        "--clear-groups",
        BIN,
        "run",
        "--ca-cert",
        &cert,
        "--ca-key",
        &key,
        "--trust-bundle",
        &cert,
        "--rules-dir",
        &rules_dir,
    ]);
    ns.ok(&[BIN, "await", "--timeout", "20s"]);
    let check = |prefix: &[&str], extra: &[&str]| {
        let mut argv: Vec<&str> = prefix.to_vec();
        argv.extend([BIN, "check", "--json"]);
        argv.extend_from_slice(extra);
        let out = ns.run(&argv);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let report: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), report)
    };

    let (code, report) = check(&[], &[]);
    assert_eq!(code, 1, "{report:#}");
    assert_fails(&report, "interception", "no portcullis interception rules");

    ns.ok(&[
        BIN,
        "init",
        "--inbound-port",
        "16006",
        "--outbound-port",
        "16001",
    ]);
    let (code, report) = check(&[], &[]);
    assert_eq!(code, 1, "{report:#}");
    assert_fails(
        &report,
        "interception",
        "redirected to :16001, the sidecar's outbound port is :15001",
    );
    assert_fails(&report, "interception", "redirected to :16006");

    // Only the admin port excluded: peers' tunnels to :15008 would land on
    // the inbound listener.
    ns.ok(&[BIN, "init", "--exclude-inbound-ports", "15020"]);
    let (code, report) = check(&[], &[]);
    assert_eq!(code, 1, "{report:#}");
    assert_fails(
        &report,
        "interception",
        "the tunnel port :15008 is redirected",
    );

    ns.ok(&[BIN, "init"]);
    let (code, report) = check(&[], &[]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["ok"], true);
    for f in report["checks"].as_array().unwrap() {
        assert_eq!(f["status"], "ok", "{report:#}");
    }
    let detail = finding(&report, "interception").1;
    assert!(detail.contains("outbound → :15001"), "{detail}");
    assert!(
        detail.contains("tunnel :15008 and admin :15020 not redirected"),
        "{detail}"
    );

    let nobody = [
        "setpriv",
        "--reuid",
        "1501",
        "--regid",
        "1501",
        "--clear-groups",
    ];
    let (code, report) = check(&nobody, &[]);
    assert_eq!(code, 0, "{report:#}");
    let (status, detail, fix) = finding(&report, "interception");
    assert_eq!(status, "skip", "{report:#}");
    assert!(detail.contains("skipped: no permission"), "{detail}");
    assert!(fix.contains("kubectl debug"), "{fix}");
    let (code, report) = check(&nobody, &["--strict"]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["ok"], false);

    // The same through the iptables front ends: what iptables-save shows.
    ns.ok(&[BIN, "init", "--cleanup", "--backend", "nft"]);
    for (backend, save) in [
        ("iptables-nft", "iptables-nft-save"),
        ("iptables-legacy", "iptables-legacy-save"),
    ] {
        if netns::find(save).is_none() {
            eprintln!("no {save}: the {backend} case is not run");
            continue;
        }
        let other_uid = ["init", "--backend", backend, "--proxy-uid", "1501"];
        ns.ok(&[&[BIN][..], &other_uid[..]].concat());
        let (code, report) = check(&[], &[]);
        assert_eq!(code, 1, "{backend}: {report:#}");
        assert_fails(&report, "interception", "UID 1500 is not exempt");
        ns.ok(&[BIN, "init", "--backend", backend]);
        let (code, report) = check(&[], &[]);
        assert_eq!(code, 0, "{backend}: {report:#}");
        let detail = finding(&report, "interception").1;
        assert!(detail.starts_with("iptables"), "{backend}: {detail}");
        ns.ok(&[BIN, "init", "--cleanup", "--backend", backend]);
    }
}

/// `GET /` on the admin port lists the endpoints (it used to answer 404).
#[tokio::test]
async fn admin_index_lists_the_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let sidecar = Sidecar::start(&issuer_args(&ca, &ca.files.cert, "web")).await;
    let (status, body) = http_get(sidecar.addrs.admin, "/").await.unwrap();
    assert_eq!(status, 200, "{body}");
    for path in [
        "/ready",
        "/live",
        "/metrics",
        "/certs",
        "/rules",
        "/authz/explain",
        "/shutdown",
        "/logging",
    ] {
        assert!(body.contains(path), "{path} missing from:\n{body}");
        let (status, _) = http_get(sidecar.addrs.admin, path).await.unwrap();
        assert_ne!(status, 404, "{path} is listed but not served");
    }
    let (status, _) = http_get(sidecar.addrs.admin, "/nothing-here")
        .await
        .unwrap();
    assert_eq!(status, 404);
}
