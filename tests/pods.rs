//! Pods as network namespaces, end to end: a bridge "node", pods with an
//! IPv4 and an IPv6 address, meshed pods set up with the real
//! `portcullis init` and `portcullis run` (as UID/GID 1500), and apps and
//! clients that know nothing about the mesh. Runs as root; skipped LOUDLY
//! otherwise or when a tool is missing.
//!
//! Pods: `a` and `b` are meshed (inside `--mesh-cidrs`), `c` is not (it is
//! numbered outside the meshed range). Every scenario runs over IPv4 and
//! IPv6.
//!
//! 1/5. a → b is mTLS (per backend): b's app gets the request with a's
//!      identity, both sidecars count the handshake, and a capture on b's
//!      veth never shows the request's marker (while it does show the
//!      marker of c's plaintext attempt, so the capture works);
//! 2.   c → b: refused in strict mode (above), served as unauthenticated in
//!      permissive mode;
//! 3.   a → c (outside the mesh): plaintext through a's sidecar;
//! 4.   excluded ports and networks bypass both sidecars;
//! 6.   a server-speaks-first protocol greets through both sidecars fast;
//! 7.   a calls its own pod IP;
//! 8.   init twice leaves one set of rules; --cleanup restores the ruleset;
//! 9.   b's sidecar killed: nothing gets through to b's app (fail closed);
//!      restarted, traffic resumes within 2 s of its `/ready`;
//! 10.  c routes packets for another host through b: b's sidecar never
//!      connects there (the rules leave them alone, and the sidecar refuses
//!      such a destination should a rule send it one).

mod netns;

#[path = "pods/apps.rs"]
mod apps;
#[path = "pods/capture.rs"]
mod capture;
#[path = "pods/node.rs"]
mod node;

use std::time::Duration;

use apps::{greeting, post, start_app, GREET_PORT, HTTP_PORT, OTHER_HTTP_PORT};
use capture::Capture;
use netns::skip;
use node::{Node, Pod, Sidecar};

const HANDSHAKES: &str = "portcullis_tls_handshakes_total";
const OPENED: &str = "portcullis_tcp_connections_opened_total";

/// Pod numbers: `a` and `b` inside the meshed range, `c` outside it.
const A: u16 = 2;
const B: u16 = 3;
const C: u16 = 100;

/// Programs every scenario uses (`make deps` installs them).
const TOOLS: [&str; 5] = ["ip", "setpriv", "curl", "tcpdump", "python3"];

fn tools(extra: &[&'static str]) -> Vec<&'static str> {
    let mut all = TOOLS.to_vec();
    all.extend_from_slice(extra);
    all
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `a`'s SPIFFE identity as the server side's app sees it.
const A_XFCC: &str = "xfcc=URI=spiffe://cluster.local/ns/pods/sa/a ";

/// A marker for one request: unique to this test run, scenario and family.
fn marker(what: &str, v6: bool) -> String {
    let family = if v6 { "ipv6" } else { "ipv4" };
    format!("marker-{what}-{family}-{}", std::process::id())
}

fn family(v6: bool) -> &'static str {
    if v6 {
        "IPv6"
    } else {
        "IPv4"
    }
}

fn handshakes(pod: &Pod, direction: &str, result: &str) -> f64 {
    pod.metric(HANDSHAKES, &[("direction", direction), ("result", result)])
}

/// Streams the pod's tunnel carried (`outbound`: sent, `inbound`: served).
fn tunnel_streams(pod: &Pod, direction: &str) -> f64 {
    pod.metric(
        "portcullis_tunnel_streams_total",
        &[("direction", direction), ("result", "ok")],
    )
}

/// How many copies of the outbound redirect `backend` shows in the pod:
/// one set of rules is one copy with nft (an `inet` table) and two with
/// iptables (one per family).
fn redirects(pod: &Pod, backend: &str) -> usize {
    if backend == "nft" {
        let ruleset = pod.ns.ok(&["nft", "list", "ruleset"]);
        return ruleset.matches("redirect to :15001").count();
    }
    let flavour = backend.trim_start_matches("iptables-");
    ["iptables", "ip6tables"]
        .iter()
        .map(|tool| {
            let save = pod.ns.ok(&[&format!("{tool}-{flavour}-save")]);
            save.matches("--to-ports 15001").count()
        })
        .sum()
}

/// Scenarios 1, 2 (strict), 5 and 8 with one netfilter backend.
fn meshed_pods_talk_only_mtls(backend: &'static str, test: &str) {
    let needs = match backend {
        "nft" => tools(&["nft"]),
        "iptables-nft" => tools(&["iptables-nft-restore", "ip6tables-nft-save"]),
        _ => tools(&["iptables-legacy-restore", "ip6tables-legacy-save"]),
    };
    if skip(test, &needs) {
        return;
    }
    let node = Node::new();
    let sidecar = Sidecar {
        backend: Some(backend),
        ..Sidecar::default()
    };
    let mut a = node.plain_pod("a", A);
    let ruleset = |pod: &Pod| pod.ns.ok(&["nft", "list", "ruleset"]);
    let ruleset_before = (backend == "nft").then(|| ruleset(&a));
    node.mesh(&mut a, &sidecar);
    let one_set = if backend == "nft" { 1 } else { 2 };
    assert_eq!(
        redirects(&a, backend),
        one_set,
        "init twice: one set of rules"
    );
    let b = node.meshed_pod("b", B, &sidecar);
    let c = node.plain_pod("c", C);
    let capture = Capture::start(node.bridge(), &b.veth);

    for v6 in [false, true] {
        let fam = family(v6);
        let secret = marker("mesh", v6);
        let (a_ok, b_ok) = (
            handshakes(&a, "outbound", "ok"),
            handshakes(&b, "inbound", "ok"),
        );
        let (a_streams, b_streams) = (
            tunnel_streams(&a, "outbound"),
            tunnel_streams(&b, "inbound"),
        );
        let reply = post(&a.ns, b.ip(v6), HTTP_PORT, &secret);
        assert!(reply.ok(), "{fam}: a → b: {reply:?}");
        assert!(reply.body.starts_with("pod=b "), "{fam}: {reply:?}");
        assert!(
            reply.body.contains(A_XFCC),
            "{fam}: a's identity: {reply:?}"
        );
        assert!(b.app_log().contains(&secret), "{fam}: b's app got it");
        assert_eq!(handshakes(&a, "outbound", "ok"), a_ok + 1.0, "{fam}: a");
        assert_eq!(handshakes(&b, "inbound", "ok"), b_ok + 1.0, "{fam}: b");
        // Through the tunnel (a → b's :15008), one stream each way.
        assert_eq!(
            tunnel_streams(&a, "outbound"),
            a_streams + 1.0,
            "{fam}: a's tunnel"
        );
        assert_eq!(
            tunnel_streams(&b, "inbound"),
            b_streams + 1.0,
            "{fam}: b's tunnel"
        );
        // A second request reuses the tunnel connection: no handshake.
        let reply = post(&a.ns, b.ip(v6), HTTP_PORT, &marker("again", v6));
        assert!(reply.ok(), "{fam}: a → b again: {reply:?}");
        assert_eq!(
            handshakes(&a, "outbound", "ok"),
            a_ok + 1.0,
            "{fam}: reused"
        );

        // c has no sidecar: its plaintext crosses the wire and is refused.
        let refused_before = handshakes(&b, "inbound", "plaintext_refused");
        let plain = marker("plaintext", v6);
        let reply = post(&c.ns, b.ip(v6), HTTP_PORT, &plain);
        assert!(!reply.ok(), "{fam}: strict b served plaintext: {reply:?}");
        assert!(!b.app_log().contains(&plain), "{fam}: reached b's app");
        assert_eq!(
            handshakes(&b, "inbound", "plaintext_refused"),
            refused_before + 1.0,
            "{fam}"
        );
        // Packets are captured in order: once c's marker is seen, a's
        // request (sent before it) has been seen too.
        assert!(
            capture.wait_for(&plain, Duration::from_secs(5)),
            "{fam}: the capture missed plaintext ({} bytes captured)",
            capture.len()
        );
        assert!(
            !capture.contains(&secret),
            "{fam}: a's request crossed the bridge in plaintext"
        );
    }

    // Scenario 8: cleanup removes every rule, and with nft the ruleset is
    // exactly what it was (iptables keeps its empty built-in nat chains).
    a.init(None, &["--cleanup"]);
    assert_eq!(redirects(&a, backend), 0, "after --cleanup");
    if let Some(before) = ruleset_before {
        assert_eq!(ruleset(&a), before, "--cleanup did not restore the ruleset");
    }
}

#[test]
fn nft_meshed_pods_talk_only_mtls() {
    meshed_pods_talk_only_mtls("nft", "nft_meshed_pods_talk_only_mtls");
}

#[test]
fn iptables_nft_meshed_pods_talk_only_mtls() {
    meshed_pods_talk_only_mtls("iptables-nft", "iptables_nft_meshed_pods_talk_only_mtls");
}

#[test]
fn iptables_legacy_meshed_pods_talk_only_mtls() {
    meshed_pods_talk_only_mtls(
        "iptables-legacy",
        "iptables_legacy_meshed_pods_talk_only_mtls",
    );
}

/// Scenario 2: a permissive pod serves a client without a sidecar, as an
/// unauthenticated peer (no identity header), and still speaks mTLS to a
/// meshed client.
#[test]
fn permissive_pod_serves_unmeshed_client_as_unauthenticated() {
    let test = "permissive_pod_serves_unmeshed_client_as_unauthenticated";
    if skip(test, &tools(&[])) {
        return;
    }
    let node = Node::new();
    let a = node.meshed_pod("a", A, &Sidecar::default());
    let permissive = Sidecar {
        run: strings(&["--inbound-mode", "permissive", "--default-policy", "allow"]),
        ..Sidecar::default()
    };
    let b = node.meshed_pod("b", B, &permissive);
    let c = node.plain_pod("c", C);
    let port = HTTP_PORT.to_string();
    // A plaintext caller is counted as unauthenticated.
    let inbound = [
        ("direction", "inbound"),
        ("port", port.as_str()),
        ("peer_service_account", "unauthenticated"),
    ];

    for v6 in [false, true] {
        let fam = family(v6);
        let (opened, tls) = (b.metric(OPENED, &inbound), handshakes(&b, "inbound", "ok"));
        let plain = marker("permissive", v6);
        let reply = post(&c.ns, b.ip(v6), HTTP_PORT, &plain);
        assert!(reply.ok(), "{fam}: c → permissive b: {reply:?}");
        assert!(
            reply.body.contains("xfcc=- "),
            "{fam}: no identity: {reply:?}"
        );
        assert!(b.app_log().contains(&plain), "{fam}");
        assert_eq!(
            b.metric(OPENED, &inbound),
            opened + 1.0,
            "{fam}: via b's sidecar"
        );
        assert_eq!(handshakes(&b, "inbound", "ok"), tls, "{fam}: no mTLS");

        let reply = post(&a.ns, b.ip(v6), HTTP_PORT, &marker("meshed", v6));
        assert!(reply.ok(), "{fam}: a → permissive b: {reply:?}");
        assert!(reply.body.contains(A_XFCC), "{fam}: {reply:?}");
        assert_eq!(handshakes(&b, "inbound", "ok"), tls + 1.0, "{fam}: mTLS");
    }
}

/// Scenario 3: a destination outside `--mesh-cidrs` is reached in
/// plaintext, through the sidecar (counted) but without TLS.
#[test]
fn meshed_pod_reaches_unmeshed_pod_in_plaintext() {
    if skip("meshed_pod_reaches_unmeshed_pod_in_plaintext", &tools(&[])) {
        return;
    }
    let node = Node::new();
    let a = node.meshed_pod("a", A, &Sidecar::default());
    let c = node.plain_pod("c", C);
    let capture = Capture::start(node.bridge(), &c.veth);
    let port = HTTP_PORT.to_string();
    // Plain TCP outside the mesh: nobody verified, so unauthenticated.
    let outbound = [
        ("direction", "outbound"),
        ("port", port.as_str()),
        ("peer_service_account", "unauthenticated"),
    ];

    for v6 in [false, true] {
        let fam = family(v6);
        let opened = a.metric(OPENED, &outbound);
        let tls = a.metric(HANDSHAKES, &[("direction", "outbound")]);
        let plain = marker("to-unmeshed", v6);
        let reply = post(&a.ns, c.ip(v6), HTTP_PORT, &plain);
        assert!(reply.ok(), "{fam}: a → c: {reply:?}");
        assert!(reply.body.starts_with("pod=c "), "{fam}: {reply:?}");
        assert!(reply.body.contains("xfcc=- "), "{fam}: {reply:?}");
        assert!(
            capture.wait_for(&plain, Duration::from_secs(5)),
            "{fam}: not plaintext on c's veth"
        );
        assert_eq!(
            a.metric(OPENED, &outbound),
            opened + 1.0,
            "{fam}: via a's sidecar"
        );
        assert_eq!(
            a.metric(HANDSHAKES, &[("direction", "outbound")]),
            tls,
            "{fam}: no TLS"
        );
    }
}

/// Scenario 4: `--exclude-outbound-ports`, `--exclude-outbound-cidrs` (on
/// a) and `--exclude-inbound-ports` (on b) bypass the sidecars entirely:
/// the connections work and neither sidecar counts anything.
#[test]
fn excluded_ports_and_cidrs_bypass_the_sidecars() {
    if skip("excluded_ports_and_cidrs_bypass_the_sidecars", &tools(&[])) {
        return;
    }
    let node = Node::new();
    let other = OTHER_HTTP_PORT.to_string();
    let excluded_c = format!("10.89.0.{C}/32,fd89::{C:x}/128");
    let a_sidecar = Sidecar {
        init: strings(&[
            "--exclude-outbound-ports",
            &other,
            "--exclude-outbound-cidrs",
            &excluded_c,
        ]),
        ..Sidecar::default()
    };
    let a = node.meshed_pod("a", A, &a_sidecar);
    let b_sidecar = Sidecar {
        // A list given here replaces the default: keep the tunnel and
        // admin ports in it.
        init: strings(&[
            "--exclude-inbound-ports",
            "15008,15020",
            "--exclude-inbound-ports",
            &other,
        ]),
        ..Sidecar::default()
    };
    let b = node.meshed_pod("b", B, &b_sidecar);
    let c = node.plain_pod("c", C);

    // The counters do move for traffic that is not excluded.
    let (a0, b0) = (a.activity(), b.activity());
    let reply = post(&a.ns, &b.v4, HTTP_PORT, "counted");
    assert!(reply.ok() && reply.body.contains(A_XFCC), "{reply:?}");
    assert!(a.activity() > a0 && b.activity() > b0, "the counters moved");

    for v6 in [false, true] {
        let fam = family(v6);
        let (a0, b0) = (a.activity(), b.activity());
        let reply = post(&a.ns, b.ip(v6), OTHER_HTTP_PORT, "excluded-port");
        assert!(reply.ok(), "{fam}: a → b:{other}: {reply:?}");
        assert!(
            reply.body.contains("xfcc=- "),
            "{fam}: plaintext: {reply:?}"
        );
        let reply = post(&a.ns, c.ip(v6), HTTP_PORT, "excluded-cidr");
        assert!(
            reply.ok() && reply.body.starts_with("pod=c "),
            "{fam}: a → c: {reply:?}"
        );
        let reply = post(&c.ns, b.ip(v6), OTHER_HTTP_PORT, "excluded-inbound");
        assert!(reply.ok(), "{fam}: c → b:{other}: {reply:?}");
        assert_eq!(a.activity(), a0, "{fam}: a's sidecar saw excluded traffic");
        assert_eq!(b.activity(), b0, "{fam}: b's sidecar saw excluded traffic");
    }
}

/// Scenario 6: the server speaks first on an opaque port (3306): the client
/// reads the greeting through both sidecars in well under 100 ms.
#[test]
fn server_first_protocol_greets_through_both_sidecars_fast() {
    let test = "server_first_protocol_greets_through_both_sidecars_fast";
    if skip(test, &tools(&[])) {
        return;
    }
    let node = Node::new();
    let a = node.meshed_pod("a", A, &Sidecar::default());
    let b = node.meshed_pod("b", B, &Sidecar::default());

    for v6 in [false, true] {
        let fam = family(v6);
        let (a_ok, b_ok) = (
            handshakes(&a, "outbound", "ok"),
            handshakes(&b, "inbound", "ok"),
        );
        let (ms, line) = greeting(&a.ns, b.ip(v6), GREET_PORT)
            .unwrap_or_else(|e| panic!("{fam}: no greeting: {e}"));
        assert_eq!(line, "HELLO from b", "{fam}");
        assert!(
            tunnel_streams(&b, "inbound") >= 1.0,
            "{fam}: over the tunnel"
        );
        eprintln!("{fam}: greeting after {ms} ms");
        assert!(ms < 100.0, "{fam}: first byte after {ms} ms");
        assert_eq!(handshakes(&a, "outbound", "ok"), a_ok + 1.0, "{fam}: a");
        assert_eq!(handshakes(&b, "inbound", "ok"), b_ok + 1.0, "{fam}: b");
    }
}

/// Rolling upgrade: b's sidecar serves no tunnel (as an older release):
/// a falls back to per-connection mTLS to the original destination,
/// counts it, and remembers it.
#[test]
fn a_peer_without_a_tunnel_is_reached_over_per_connection_mtls() {
    if skip(
        "a_peer_without_a_tunnel_is_reached_over_per_connection_mtls",
        &tools(&[]),
    ) {
        return;
    }
    let node = Node::new();
    let a = node.meshed_pod("a", A, &Sidecar::default());
    let old = Sidecar {
        run: strings(&["--tunnel-listen", "off"]),
        ..Sidecar::default()
    };
    let b = node.meshed_pod("b", B, &old);
    for v6 in [false, true] {
        let fam = family(v6);
        for round in 0..2 {
            let reply = post(&a.ns, b.ip(v6), HTTP_PORT, &marker("old peer", v6));
            assert!(reply.ok(), "{fam} {round}: a → b: {reply:?}");
            assert!(
                reply.body.contains(A_XFCC),
                "{fam}: a's identity: {reply:?}"
            );
        }
    }
    let fallbacks = a.metric("portcullis_tunnel_fallbacks_total", &[]);
    assert_eq!(
        fallbacks, 4.0,
        "every connection to b went without a tunnel"
    );
    assert!(
        a.metric(
            "portcullis_tunnel_fallbacks_total",
            &[("reason", "remembered")]
        ) >= 2.0,
        "the second connection of each family remembered it"
    );
    assert_eq!(tunnel_streams(&b, "inbound"), 0.0);
}

/// Scenario 7: a pod calling its own pod IP reaches its own app.
#[test]
fn pod_calls_itself_through_its_own_pod_ip() {
    if skip("pod_calls_itself_through_its_own_pod_ip", &tools(&[])) {
        return;
    }
    let node = Node::new();
    let a = node.meshed_pod("a", A, &Sidecar::default());
    for v6 in [false, true] {
        let reply = post(&a.ns, a.ip(v6), HTTP_PORT, &marker("self", v6));
        assert!(reply.ok(), "{}: a → a: {reply:?}", family(v6));
        assert!(reply.body.starts_with("pod=a "), "{reply:?}");
    }
}

/// Scenario 9: with b's sidecar gone, connections to b fail — from a meshed
/// pod and from a plain one — and nothing reaches b's app (fail closed).
#[test]
fn killed_sidecar_fails_closed() {
    if skip("killed_sidecar_fails_closed", &tools(&[])) {
        return;
    }
    let node = Node::new();
    let a = node.meshed_pod("a", A, &Sidecar::default());
    let mut b = node.meshed_pod("b", B, &Sidecar::default());
    let c = node.plain_pod("c", C);
    let reply = post(&a.ns, &b.v4, HTTP_PORT, "before");
    assert!(reply.ok(), "before the kill: {reply:?}");

    b.kill_sidecar();
    let served = b.app_log();
    for v6 in [false, true] {
        let fam = family(v6);
        let reply = post(&a.ns, b.ip(v6), HTTP_PORT, &marker("after-kill", v6));
        assert!(!reply.ok(), "{fam}: a → b without b's sidecar: {reply:?}");
        let reply = post(&c.ns, b.ip(v6), HTTP_PORT, &marker("plain-after-kill", v6));
        assert!(!reply.ok(), "{fam}: c → b without b's sidecar: {reply:?}");
        let greeted = greeting(&a.ns, b.ip(v6), GREET_PORT);
        assert!(
            greeted.is_err(),
            "{fam}: greeting without b's sidecar: {greeted:?}"
        );
    }
    assert_eq!(b.app_log(), served, "something reached b's app");

    // Restarted in place (same pod, same interception rules): a → b works
    // again within 2 s of its /ready.
    node.start_sidecar(&mut b, &Sidecar::default());
    let ready = std::time::Instant::now();
    node::eventually("a → b after the restart", Duration::from_secs(10), || {
        post(&a.ns, &b.v4, HTTP_PORT, "after restart").ok()
    });
    let resumed = ready.elapsed();
    eprintln!("interception: a → b resumed {resumed:?} after the restarted sidecar's /ready");
    assert!(
        resumed < Duration::from_secs(2),
        "resumed after {resumed:?}"
    );
}

/// Scenario 10: a pod is no proxy. `c` routes its packets for the node's
/// address through `b`, whose sidecar is permissive and allows all (the
/// easiest to misuse): `b`'s rules leave such packets alone (forwarding is
/// off in a pod, so they go nowhere), and when another rule redirects them
/// to the sidecar anyway, it refuses the foreign destination. The node's
/// app never hears of `c`.
#[test]
fn packets_routed_through_a_pod_to_another_host_are_not_proxied() {
    let test = "packets_routed_through_a_pod_to_another_host_are_not_proxied";
    if skip(test, &tools(&["nft"])) {
        return;
    }
    let node = Node::new();
    let permissive = Sidecar {
        run: strings(&["--inbound-mode", "permissive", "--default-policy", "allow"]),
        ..Sidecar::default()
    };
    let b = node.meshed_pod("b", B, &permissive);
    let c = node.plain_pod("c", C);
    let host = node.node_ip();
    let host_log = node.dir().join("host-app.log");
    let _host_app = start_app(node.bridge(), "host", &host_log);
    let direct = post(&c.ns, host, HTTP_PORT, "direct");
    assert!(direct.ok(), "c reaches the host's app directly: {direct:?}");

    c.ns.ok(&[
        "ip",
        "route",
        "replace",
        &format!("{host}/32"),
        "via",
        &b.v4,
    ]);
    let opened = b.metric(OPENED, &[("direction", "inbound")]);
    // Not redirected: dropped, or forwarded by the kernel where the pod's
    // settings forward (then it arrives from c itself), never proxied.
    let routed = post(&c.ns, host, HTTP_PORT, "through-b-rules");
    if routed.ok() {
        assert!(
            routed.body.contains(&format!("client=::ffff:{} ", c.v4)),
            "{routed:?}"
        );
    }
    let foreign = [("direction", "inbound"), ("result", "foreign_destination")];
    assert_eq!(b.metric(OPENED, &[("direction", "inbound")]), opened);
    assert_eq!(b.metric(HANDSHAKES, &foreign), 0.0, "the rules sent it on");

    // A rule ahead of portcullis's that redirects everything to port
    // HTTP_PORT, whatever its destination: the sidecar itself refuses.
    let redirect = format!(
        "table inet widen {{\n chain pre {{\n  type nat hook prerouting priority -150;\n  tcp dport {HTTP_PORT} redirect to :15006\n }}\n}}\n"
    );
    let added = b.ns.run_with_input(&["nft", "-f", "-"], &redirect);
    assert!(added.status.success(), "{added:?}");
    let refused = post(&c.ns, host, HTTP_PORT, "through-b-sidecar");
    assert!(!refused.ok(), "b's sidecar must refuse it: {refused:?}");
    node::eventually("the refusal is counted", Duration::from_secs(5), || {
        b.metric(HANDSHAKES, &foreign) == 1.0
    });
    let heard = std::fs::read_to_string(&host_log).unwrap_or_default();
    assert!(heard.contains("direct"), "{heard}");
    assert!(
        !heard.contains("through-b-sidecar"),
        "proxied by b: {heard}"
    );
    assert_eq!(b.metric(OPENED, &[("direction", "inbound")]), opened);
}
