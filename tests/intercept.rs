//! `portcullis init` against the real kernel: each test gets fresh network
//! namespaces (as root; skipped LOUDLY otherwise or when a tool is missing).
//!
//! Per backend (nft, iptables-nft, iptables-legacy): apply installs our
//! chains, a second run leaves one set, `--cleanup` restores the ruleset
//! exactly (next to a user rule that must survive), `--dry-run` changes
//! nothing and prints input the loader accepts, a refused IPv6 load rolls
//! IPv4 back, and the rules really redirect (and really exempt the proxy
//! UID) for IPv4 and IPv6 connections between two namespaces.

#[path = "intercept/backend.rs"]
mod backend;
mod netns;
#[path = "intercept/redirect.rs"]
mod redirect;

use backend::*;
use netns::{skip, Netns};

fn apply_twice_then_cleanup(b: Backend, test: &str) {
    if skip(test, b.programs()) {
        return;
    }
    let ns = Netns::new("init");
    b.seed(&ns);
    let before = b.snapshot(&ns);

    let out = init_ok(&ns, &["--backend", b.flag()]);
    assert!(out.contains(&format!("backend {}", b.flag())), "{out}");
    let once = b.snapshot(&ns);
    match b {
        Backend::Nft => assert!(once.contains("table inet portcullis {"), "{once}"),
        _ => {
            for chain in [":PORTCULLIS_INBOUND", ":PORTCULLIS_OUTBOUND"] {
                assert_eq!(
                    once.matches(chain).count(),
                    2,
                    "{chain} in both families:\n{once}"
                );
            }
        }
    }
    for needle in [
        "portcullis: the sidecar (uid 1500)",
        "portcullis: loopback destinations",
    ] {
        assert!(once.contains(needle), "comment {needle:?} missing:\n{once}");
    }
    let one_set = b.copies(&ns);
    assert!(one_set.iter().all(|&n| n == 1), "{one_set:?}\n{once}");

    // Twice: the same single set. `auto` must find our rules and keep the backend.
    let out = init_ok(&ns, &[]);
    assert!(
        out.contains(&format!(
            "backend {} (portcullis rules are already installed",
            b.flag()
        )),
        "{out}"
    );
    assert_eq!(b.copies(&ns), one_set);
    assert_eq!(b.snapshot(&ns), once, "a second run changed the rules");

    // Cleanup (auto finds the backend) restores everything exactly.
    init_ok(&ns, &["--cleanup"]);
    assert_eq!(
        b.snapshot(&ns),
        before,
        "cleanup did not restore the ruleset"
    );
    // A second cleanup has nothing to do and changes nothing.
    let out = init_ok(&ns, &["--cleanup"]);
    assert!(out.contains("nothing to remove"), "{out}");
    assert_eq!(b.snapshot(&ns), before);
}

fn dry_run_changes_nothing(b: Backend, test: &str) {
    if skip(test, b.programs()) {
        return;
    }
    let ns = Netns::new("dry");
    b.seed(&ns);
    let before = b.snapshot(&ns);
    let script = init_ok(
        &ns,
        &[
            "--backend",
            b.flag(),
            "--dry-run",
            "--exclude-outbound-ports",
            "5432,8000-8100",
        ],
    );
    assert_eq!(b.snapshot(&ns), before, "--dry-run changed the ruleset");
    // What was printed is exactly what the loader takes: check it with the
    // loader's own test mode (which commits nothing).
    let checked = match b {
        Backend::Nft => {
            assert!(script.contains("table inet portcullis {"), "{script}");
            assert!(
                script.contains("tcp dport { 5432, 8000-8100 } return"),
                "{script}"
            );
            ns.run_with_input(&["nft", "-c", "-f", "-"], &script)
        }
        _ => {
            assert!(script.contains("--dports 5432,8000:8100"), "{script}");
            let at = script
                .find("# portcullis interception rules (IPv6)")
                .expect("both families printed");
            let (v4, v6) = script.split_at(at);
            let restore = format!("{}-restore", b.iptables(false));
            let out = ns.run_with_input(&[&restore, "--test", "--noflush"], v4);
            assert!(
                out.status.success(),
                "{restore} --test refused IPv4: {out:?}\n{v4}"
            );
            let restore6 = format!("{}-restore", b.iptables(true));
            ns.run_with_input(&[&restore6, "--test", "--noflush"], v6)
        }
    };
    assert!(
        checked.status.success(),
        "the loader refused the dry-run output: {checked:?}\n{script}"
    );
    assert_eq!(
        b.snapshot(&ns),
        before,
        "checking the script changed the ruleset"
    );
}

#[test]
fn nft_apply_twice_then_cleanup_restores_exactly() {
    apply_twice_then_cleanup(
        Backend::Nft,
        "nft_apply_twice_then_cleanup_restores_exactly",
    );
}

#[test]
fn iptables_nft_apply_twice_then_cleanup_restores_exactly() {
    apply_twice_then_cleanup(
        Backend::IptablesNft,
        "iptables_nft_apply_twice_then_cleanup_restores_exactly",
    );
}

#[test]
fn iptables_legacy_apply_twice_then_cleanup_restores_exactly() {
    apply_twice_then_cleanup(
        Backend::IptablesLegacy,
        "iptables_legacy_apply_twice_then_cleanup_restores_exactly",
    );
}

#[test]
fn nft_dry_run_changes_nothing() {
    dry_run_changes_nothing(Backend::Nft, "nft_dry_run_changes_nothing");
}

#[test]
fn iptables_nft_dry_run_changes_nothing() {
    dry_run_changes_nothing(Backend::IptablesNft, "iptables_nft_dry_run_changes_nothing");
}

#[test]
fn iptables_legacy_dry_run_changes_nothing() {
    dry_run_changes_nothing(
        Backend::IptablesLegacy,
        "iptables_legacy_dry_run_changes_nothing",
    );
}

/// Everything every installed backend shows, to prove nothing changed.
fn whole_state(ns: &Netns) -> String {
    let mut all = String::new();
    for b in [Backend::Nft, Backend::IptablesNft, Backend::IptablesLegacy] {
        if b.programs().iter().all(|p| netns::find(p).is_some()) {
            all.push_str(&b.snapshot(ns));
        }
    }
    all
}

/// Asserts a failed run: non-zero exit, exactly one line on stderr that
/// contains `needle`.
fn assert_one_line_failure(out: &std::process::Output, needle: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected a failure, got {out:?}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
    stderr
}

#[test]
fn bad_option_is_one_line_and_applies_nothing() {
    if skip("bad_option_is_one_line_and_applies_nothing", &["ip", "nft"]) {
        return;
    }
    let ns = Netns::new("bad");
    let before = whole_state(&ns);
    for args in [
        &["--exclude-outbound-cidrs", "10.0.0.0/33"][..],
        &["--exclude-inbound-ports", "70000"],
        &["--include-inbound-ports", "*,80"],
        &["--proxy-uid", "0"],
        &["--proxy-gid", "0"],
        &["--exclude-outbound-cidrs", "10.0.0.1/8"],
    ] {
        let out = init(&ns, args);
        let line = assert_one_line_failure(&out, args[0]);
        assert!(line.starts_with("portcullis: error: "), "{line}");
        assert!(
            out.stdout.is_empty(),
            "printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(whole_state(&ns), before);
    let out = init(&ns, &["--exclude-inbound-cidrs", "10.0.0.1/8"]);
    assert_one_line_failure(
        &out,
        "--exclude-inbound-cidrs: \"10.0.0.1/8\": host bits are set (did you mean 10.0.0.0/8?)",
    );
}

/// Without CAP_NET_ADMIN (dropped from the bounding set, so even root lacks
/// it) every backend fails with one line that says what is missing.
#[test]
fn missing_capability_is_one_line_and_applies_nothing() {
    let test = "missing_capability_is_one_line_and_applies_nothing";
    if skip(test, &["ip", "setpriv"]) {
        return;
    }
    for b in [Backend::Nft, Backend::IptablesNft, Backend::IptablesLegacy] {
        if skip(&format!("{test} ({})", b.flag()), b.programs()) {
            continue;
        }
        let ns = Netns::new("nocap");
        b.seed(&ns);
        let before = b.snapshot(&ns);
        let out = ns.run(&[
            "setpriv",
            "--bounding-set",
            "-net_admin",
            "--inh-caps",
            "-net_admin",
            BIN,
            "init",
            "--backend",
            b.flag(),
        ]);
        assert_one_line_failure(&out, "CAP_NET_ADMIN");
        assert_eq!(b.snapshot(&ns), before, "{}", b.flag());
    }
}

/// The program is missing: hide the sbin directory in a private mount
/// namespace and ask for it by name, then let `auto` find nothing.
#[test]
fn missing_binary_is_one_line() {
    if skip("missing_binary_is_one_line", &["ip", "unshare", "nft"]) {
        return;
    }
    let ns = Netns::new("nobin");
    let empty = tempfile::tempdir().unwrap();
    let hide = format!(
        "for d in /usr/sbin /usr/local/sbin /usr/bin/nft; do [ -d $d ] && mount --bind {} $d; done; exec \"$@\"",
        empty.path().display()
    );
    let run = |args: &[&str]| {
        let mut argv = vec!["unshare", "-m", "sh", "-c", &hide, "sh", BIN, "init"];
        argv.extend_from_slice(args);
        ns.run(&argv)
    };
    let out = run(&["--backend", "nft"]);
    assert_one_line_failure(&out, "nft not found");
    if netns::find("iptables-legacy-restore").is_some_and(|p| p.starts_with("/usr/sbin")) {
        let out = run(&[]);
        assert_one_line_failure(&out, "no netfilter tool found");
    }
}

/// A refused IPv6 load after IPv4 succeeded: IPv4 is put back as it was,
/// on a first run and on a rerun over an installed set.
fn ipv6_refusal_rolls_ipv4_back(b: Backend, test: &str) {
    if skip(test, b.programs()) {
        return;
    }
    let ns = Netns::new("rollback");
    b.seed(&ns);
    let fake = tempfile::tempdir().unwrap();
    let fake_restore = fake.path().join(format!("{}-restore", b.iptables(true)));
    std::fs::write(
        &fake_restore,
        "#!/bin/sh\ncat >/dev/null\necho 'ip6tables-restore: line 4 failed' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake_restore, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        fake.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let failing_init = || {
        ns.command(BIN)
            .args(["init", "--backend", b.flag(), "--ipv6", "on"])
            .env("PATH", &path)
            .output()
            .unwrap()
    };

    let before = b.snapshot(&ns);
    assert_one_line_failure(&failing_init(), "line 4 failed");
    assert_eq!(
        b.snapshot(&ns),
        before,
        "first run: IPv4 was not rolled back"
    );

    init_ok(&ns, &["--backend", b.flag(), "--ipv6", "on"]);
    let installed = b.snapshot(&ns);
    assert_one_line_failure(&failing_init(), "refused the rules");
    assert_eq!(b.snapshot(&ns), installed, "rerun: IPv4 was not put back");
}

#[test]
fn iptables_nft_ipv6_refusal_rolls_ipv4_back() {
    ipv6_refusal_rolls_ipv4_back(
        Backend::IptablesNft,
        "iptables_nft_ipv6_refusal_rolls_ipv4_back",
    );
}

#[test]
fn iptables_legacy_ipv6_refusal_rolls_ipv4_back() {
    ipv6_refusal_rolls_ipv4_back(
        Backend::IptablesLegacy,
        "iptables_legacy_ipv6_refusal_rolls_ipv4_back",
    );
}
