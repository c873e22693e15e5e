//! `portcullis init` against the real kernel: each test gets fresh network
//! namespaces (as root; skipped LOUDLY otherwise or when a tool is missing).
//!
//! Per backend (nft, iptables-nft, iptables-legacy): apply installs our
//! chains, a second run leaves one set, `--cleanup` restores the ruleset
//! exactly (next to a user rule that must survive), `--dry-run` changes
//! nothing and prints input the loader accepts, a refused IPv6 load rolls
//! IPv4 back, and the rules really redirect (and really exempt the proxy
//! UID) for IPv4 and IPv6 connections between two namespaces.

mod netns;

use netns::{skip, Netns, Process};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backend {
    Nft,
    IptablesNft,
    IptablesLegacy,
}

impl Backend {
    fn flag(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::IptablesNft => "iptables-nft",
            Backend::IptablesLegacy => "iptables-legacy",
        }
    }

    fn programs(self) -> &'static [&'static str] {
        match self {
            Backend::Nft => &["ip", "nft"],
            Backend::IptablesNft => &["ip", "nft", "iptables-nft-restore", "ip6tables-nft-save"],
            Backend::IptablesLegacy => &["ip", "iptables-legacy-restore", "ip6tables-legacy-save"],
        }
    }

    fn iptables(self, family6: bool) -> String {
        let fam = if family6 { "ip6tables" } else { "iptables" };
        match self {
            Backend::Nft => unreachable!("no iptables for nft"),
            Backend::IptablesNft => format!("{fam}-nft"),
            Backend::IptablesLegacy => format!("{fam}-legacy"),
        }
    }

    /// The namespace's whole ruleset as this backend shows it (for iptables,
    /// both families, without the comment and timestamp lines); for
    /// iptables-nft the nft view is included too.
    fn snapshot(self, ns: &Netns) -> String {
        let nft = || ns.ok(&["nft", "list", "ruleset"]);
        let save = |six| {
            ns.ok(&[&format!("{}-save", self.iptables(six))])
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        };
        match self {
            Backend::Nft => nft(),
            Backend::IptablesNft => format!("{}{}{}", save(false), save(true), nft()),
            Backend::IptablesLegacy => format!("{}{}", save(false), save(true)),
        }
    }

    /// Puts a user's own rules in the namespace (in the nat chains we use),
    /// which every portcullis operation must leave alone.
    fn seed(self, ns: &Netns) {
        match self {
            Backend::Nft => {
                ns.sh("nft add table ip user && \
                     nft add chain ip user out '{ type nat hook output priority 0; }' && \
                     nft add rule ip user out ip daddr 192.0.2.1 udp dport 53 return");
            }
            _ => {
                for (six, dst) in [(false, "192.0.2.1"), (true, "2001:db8::1")] {
                    let ipt = self.iptables(six);
                    for chain in ["OUTPUT", "PREROUTING"] {
                        ns.ok(&[
                            &ipt, "-t", "nat", "-A", chain, "-d", dst, "-p", "udp", "-j", "RETURN",
                        ]);
                    }
                    ns.ok(&[&ipt, "-A", "INPUT", "-s", dst, "-j", "ACCEPT"]);
                }
            }
        }
    }

    /// How many copies of our rules the namespace shows.
    fn copies(self, ns: &Netns) -> Vec<usize> {
        match self {
            Backend::Nft => {
                let rs = ns.ok(&["nft", "list", "ruleset"]);
                vec![
                    rs.matches("table inet portcullis").count(),
                    rs.matches("redirect to :15001").count(),
                ]
            }
            _ => [false, true]
                .iter()
                .flat_map(|&six| {
                    let save = ns.ok(&[&format!("{}-save", self.iptables(six))]);
                    [
                        save.matches("-j PORTCULLIS_INBOUND").count(),
                        save.matches("-j PORTCULLIS_OUTBOUND").count(),
                        save.matches("--to-ports 15001").count(),
                    ]
                })
                .collect(),
        }
    }
}

/// Runs `portcullis init ARGS` inside `ns`.
fn init(ns: &Netns, args: &[&str]) -> std::process::Output {
    let mut argv = vec![BIN, "init"];
    argv.extend_from_slice(args);
    ns.run(&argv)
}

fn init_ok(ns: &Netns, args: &[&str]) -> String {
    let out = init(ns, args);
    assert!(
        out.status.success(),
        "init {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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

/// Tiny TCP servers: each `ADDR,PORT,TAG` listens and answers every
/// connection with TAG and a newline. `::` listens on IPv4 and IPv6.
const SERVER: &str = r#"
import socket, sys, threading
def serve(addr, port, tag):
    fam = socket.AF_INET6 if ':' in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if addr != '::' else 0)
    s.bind((addr, int(port)))
    s.listen(16)
    def loop():
        while True:
            c, _ = s.accept()
            c.sendall(tag.encode() + b'\n')
            c.close()
    threading.Thread(target=loop, daemon=True).start()
for spec in sys.argv[1:]:
    serve(*spec.split(','))
print('ready', flush=True)
threading.Event().wait()
"#;

/// Connects, prints the first line received (or `error: …`).
const CLIENT: &str = r#"
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print(s.makefile().readline().strip())
except Exception as e:
    print('error: %s' % e)
"#;

/// A python3 that any user can run (not a shim in root's home).
fn python() -> &'static str {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("python3")
}

fn servers(ns: &Netns, specs: &[&str]) -> Process {
    let mut argv = vec![python(), "-c", SERVER];
    argv.extend_from_slice(specs);
    let mut p = ns.spawn(&argv);
    p.wait_for_line("ready");
    p
}

/// Which server answers a connection from `ns` (as root, or as `uid`).
fn who_answers(ns: &Netns, uid: Option<u32>, addr: &str, port: u16) -> String {
    let id = uid.map(|u| u.to_string()).unwrap_or_default();
    let port = port.to_string();
    let mut argv: Vec<&str> = Vec::new();
    if uid.is_some() {
        argv.extend(["setpriv", "--reuid", &id, "--regid", &id, "--clear-groups"]);
    }
    argv.extend([python(), "-c", CLIENT, addr, &port]);
    ns.ok(&argv).trim().to_string()
}

/// A connection to try: from which namespace, as which uid (None = root),
/// to which address and port, which server must answer, and what it shows.
type Conn<'a> = (&'a Netns, Option<u32>, &'a str, u16, &'a str, &'a str);

fn redirects_and_exempts_the_proxy(b: Backend, test: &str) {
    let mut needs = b.programs().to_vec();
    needs.extend(["setpriv", "python3"]);
    if skip(test, &needs) {
        return;
    }
    let pod = Netns::new("pod");
    let peer = Netns::new("peer");
    pod.link("eth0", &peer, "eth0");
    pod.addr("eth0", "10.99.0.1/24");
    pod.addr("eth0", "fd99::1/64");
    peer.addr("eth0", "10.99.0.2/24");
    peer.addr("eth0", "fd99::2/64");
    let _peer_app = servers(&peer, &["::,8080,peer"]);
    let _sidecar = servers(
        &pod,
        &[
            "127.0.0.1,15001,outbound",
            "::1,15001,outbound",
            "::,15006,inbound",
            "::,15020,admin",
        ],
    );
    assert_eq!(
        who_answers(&pod, None, "10.99.0.2", 8080),
        "peer",
        "before init"
    );

    init_ok(&pod, &["--backend", b.flag()]);
    let cases: &[Conn] = &[
        (
            &pod,
            None,
            "10.99.0.2",
            8080,
            "outbound",
            "app to a peer (IPv4)",
        ),
        (
            &pod,
            None,
            "fd99::2",
            8080,
            "outbound",
            "app to a peer (IPv6 goes to [::1]:15001)",
        ),
        (
            &pod,
            Some(1500),
            "10.99.0.2",
            8080,
            "peer",
            "the proxy uid is exempt (IPv4)",
        ),
        (
            &pod,
            Some(1500),
            "fd99::2",
            8080,
            "peer",
            "the proxy uid is exempt (IPv6)",
        ),
        (
            &pod,
            None,
            "10.99.0.1",
            15020,
            "admin",
            "the pod calling its own pod IP",
        ),
        (&pod, None, "127.0.0.1", 15020, "admin", "loopback (IPv4)"),
        (&pod, None, "::1", 15020, "admin", "loopback (IPv6)"),
        (
            &peer,
            None,
            "10.99.0.1",
            8080,
            "inbound",
            "a peer to the pod (IPv4)",
        ),
        (
            &peer,
            None,
            "fd99::1",
            8080,
            "inbound",
            "a peer to the pod (IPv6)",
        ),
        (
            &peer,
            None,
            "10.99.0.1",
            15020,
            "admin",
            "the admin port is excluded",
        ),
    ];
    for (ns, uid, addr, port, want, what) in cases {
        assert_eq!(
            who_answers(ns, *uid, addr, *port),
            *want,
            "{what}: {addr} port {port}"
        );
    }

    init_ok(&pod, &["--cleanup"]);
    assert_eq!(
        who_answers(&pod, None, "10.99.0.2", 8080),
        "peer",
        "after cleanup"
    );
    assert!(
        who_answers(&peer, None, "10.99.0.1", 8080).starts_with("error"),
        "after cleanup"
    );
}

#[test]
fn nft_redirects_and_exempts_the_proxy() {
    redirects_and_exempts_the_proxy(Backend::Nft, "nft_redirects_and_exempts_the_proxy");
}

#[test]
fn iptables_nft_redirects_and_exempts_the_proxy() {
    redirects_and_exempts_the_proxy(
        Backend::IptablesNft,
        "iptables_nft_redirects_and_exempts_the_proxy",
    );
}

#[test]
fn iptables_legacy_redirects_and_exempts_the_proxy() {
    redirects_and_exempts_the_proxy(
        Backend::IptablesLegacy,
        "iptables_legacy_redirects_and_exempts_the_proxy",
    );
}
