//! The rules really redirect, and really exempt the proxy UID, for IPv4
//! and IPv6 connections between two namespaces; the tunnel and admin ports
//! really reach their own listeners.

use super::backend::*;
use super::netns::{skip, Netns, Process};

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
            "::,15008,tunnel",
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
            "the admin port is excluded (IPv4)",
        ),
        (
            &peer,
            None,
            "fd99::1",
            15020,
            "admin",
            "the admin port is excluded (IPv6)",
        ),
        (
            &peer,
            None,
            "10.99.0.1",
            15008,
            "tunnel",
            "a peer sidecar's tunnel reaches :15008 itself (IPv4)",
        ),
        (
            &peer,
            None,
            "fd99::1",
            15008,
            "tunnel",
            "a peer sidecar's tunnel reaches :15008 itself (IPv6)",
        ),
        (
            &peer,
            None,
            "10.99.0.1",
            15009,
            "inbound",
            "the port next to the tunnel port is captured",
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
