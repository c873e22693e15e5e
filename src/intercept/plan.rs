//! The rule plan: which new TCP connections go to the sidecar and which are
//! left alone, independent of the netfilter front end that installs it.
//!
//! Two chains, each evaluated top to bottom for the first packet of a
//! connection (NAT only ever looks at new connections):
//!
//! - **inbound** (from PREROUTING): connections arriving from outside the
//!   pod. Excluded sources and ports return; the rest is redirected to the
//!   inbound listener. The default exclusions are the sidecar's own
//!   tunnel port (15008: peer sidecars open their pooled mTLS tunnels
//!   there, and it must reach the tunnel listener, not the inbound one) and
//!   its admin port (15020: probes and Prometheus).
//! - **outbound** (from OUTPUT): connections the pod itself opens.
//!   1. The sidecar's own UID/GID return first: its upstream connections
//!      (and its forwarding to the app) must never come back to it.
//!   2. Loopback destinations (127.0.0.0/8, ::1) return: localhost is the
//!      pod's private business, and the redirect targets live there.
//!   3. Anything else leaving through `lo` returns: that is the app calling
//!      its own pod IP, which is delivered locally and never seen by
//!      PREROUTING. Redirecting it would send it through the outbound side,
//!      which would wrap it in mTLS towards an app that speaks plaintext.
//!      A Service IP is not local, so a pod calling itself through its
//!      Service still goes out through the sidecar (and back in through the
//!      inbound side once kube-proxy has turned it into the pod IP).
//!   4. Excluded destination networks and ports return.
//!   5. Everything else is redirected to the outbound listener; the kernel
//!      sends a redirected local connection to 127.0.0.1 or ::1.

use super::options::{Cidr, InboundPorts, InitOptions, PortRange};
use super::Family;

/// What `init` installs, as data. Renderers turn it into nft or iptables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulePlan {
    /// IPv6 is intercepted too (else only IPv4 is, and IPv6 rules are absent).
    pub ipv6: bool,
    pub inbound: Vec<Rule>,
    pub outbound: Vec<Rule>,
}

impl RulePlan {
    /// The families that get rules, IPv4 first.
    pub fn families(&self) -> Vec<Family> {
        if self.ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }
}

/// One rule: all matches must hold, then the verdict applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `Some` when the rule only concerns one family (it matches addresses).
    pub family: Option<Family>,
    pub matches: Vec<Match>,
    pub verdict: Verdict,
    /// Shown in the kernel's rule listing, so a reader of `nft list ruleset`
    /// or `iptables-save` sees why the rule is there. No double quotes.
    pub comment: String,
}

/// A condition on a new TCP connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// The socket belongs to this UID.
    SkUid(u32),
    /// The socket belongs to this GID.
    SkGid(u32),
    /// The packet leaves through `lo`: its destination is this pod.
    OutLoopback,
    /// The destination is not an address of this pod (network namespace).
    NotLocalDaddr,
    /// The destination is in one of these networks (all of one family).
    Daddr(Vec<Cidr>),
    /// The source is in one of these networks (all of one family).
    Saddr(Vec<Cidr>),
    /// The destination port is in one of these ranges.
    Dport(Vec<PortRange>),
}

/// What happens to a matching connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Leave it alone: stop evaluating our chain.
    Return,
    /// Send it to this local port.
    Redirect(u16),
}

/// The destination is the family's loopback network.
fn to_loopback(family: Family) -> Match {
    let net = match family {
        Family::V4 => "127.0.0.0/8",
        Family::V6 => "::1/128",
    };
    Match::Daddr(vec![Cidr::parse(net).expect("constant")])
}

/// Builds the rule plan for `opts`. Pure: the same options always give the
/// same plan, which is what makes dry runs and idempotency trustworthy.
pub fn plan(opts: &InitOptions) -> RulePlan {
    let families = if opts.ipv6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    };
    let rule = |family, matches, verdict, comment: String| Rule {
        family,
        matches,
        verdict,
        comment: format!("portcullis: {comment}"),
    };
    let per_family = |cidrs: &[Cidr], family: Family| -> Vec<Cidr> {
        cidrs
            .iter()
            .copied()
            .filter(|c| c.family() == family)
            .collect()
    };

    let mut inbound = Vec::new();
    let capture_inbound = opts.include_inbound_ports != InboundPorts::Only(vec![]);
    if capture_inbound {
        inbound.push(rule(
            None,
            vec![Match::NotLocalDaddr],
            Verdict::Return,
            "only connections to an address of this pod are redirected (no proxy for packets routed through it)"
                .into(),
        ));
        for &family in &families {
            inbound.push(rule(
                Some(family),
                vec![to_loopback(family)],
                Verdict::Return,
                "loopback is never a destination from outside the pod (routing drops it)".into(),
            ));
        }
        for &family in &families {
            let sources = per_family(&opts.exclude_inbound_cidrs, family);
            if !sources.is_empty() {
                inbound.push(rule(
                    Some(family),
                    vec![Match::Saddr(sources)],
                    Verdict::Return,
                    "excluded source networks (--exclude-inbound-cidrs) go straight to the app"
                        .into(),
                ));
            }
        }
        if !opts.exclude_inbound_ports.is_empty() {
            inbound.push(rule(
                None,
                vec![Match::Dport(opts.exclude_inbound_ports.clone())],
                Verdict::Return,
                "excluded inbound ports (--exclude-inbound-ports, by default the tunnel and admin ports) are not redirected"
                    .into(),
            ));
        }
        let (matches, what) = match &opts.include_inbound_ports {
            InboundPorts::All => (vec![], "all other inbound TCP"),
            InboundPorts::Only(ports) => (
                vec![Match::Dport(ports.clone())],
                "inbound TCP to --include-inbound-ports",
            ),
        };
        inbound.push(rule(
            None,
            matches,
            Verdict::Redirect(opts.inbound_port),
            format!("{what} goes to the sidecar inbound listener"),
        ));
    }

    let mut outbound = vec![
        rule(
            None,
            vec![Match::SkUid(opts.proxy_uid)],
            Verdict::Return,
            format!(
                "the sidecar (uid {}) is never redirected, or its own connections would loop",
                opts.proxy_uid
            ),
        ),
        rule(
            None,
            vec![Match::SkGid(opts.proxy_gid)],
            Verdict::Return,
            format!(
                "the sidecar (gid {}) is never redirected, or its own connections would loop",
                opts.proxy_gid
            ),
        ),
    ];
    for &family in &families {
        outbound.push(rule(
            Some(family),
            vec![to_loopback(family)],
            Verdict::Return,
            "loopback destinations stay local".into(),
        ));
    }
    outbound.push(rule(
        None,
        vec![Match::OutLoopback],
        Verdict::Return,
        "the app calling its own pod IP stays on lo (Service IPs still go through the sidecar)"
            .into(),
    ));
    for &family in &families {
        let dests = per_family(&opts.exclude_outbound_cidrs, family);
        if !dests.is_empty() {
            outbound.push(rule(
                Some(family),
                vec![Match::Daddr(dests)],
                Verdict::Return,
                "excluded destination networks (--exclude-outbound-cidrs) bypass the sidecar"
                    .into(),
            ));
        }
    }
    if !opts.exclude_outbound_ports.is_empty() {
        outbound.push(rule(
            None,
            vec![Match::Dport(opts.exclude_outbound_ports.clone())],
            Verdict::Return,
            "excluded destination ports (--exclude-outbound-ports) bypass the sidecar".into(),
        ));
    }
    outbound.push(rule(
        None,
        vec![],
        Verdict::Redirect(opts.outbound_port),
        "all other outbound TCP goes to the sidecar outbound listener".into(),
    ));

    RulePlan {
        ipv6: opts.ipv6,
        inbound,
        outbound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compact one-line view of a rule, for tables.
    fn show(r: &Rule) -> String {
        let mut parts = vec![];
        if let Some(f) = r.family {
            parts.push(f.name().to_string());
        }
        for m in &r.matches {
            parts.push(match m {
                Match::SkUid(u) => format!("uid={u}"),
                Match::SkGid(g) => format!("gid={g}"),
                Match::OutLoopback => "oif=lo".into(),
                Match::NotLocalDaddr => "dst!=local".into(),
                Match::Daddr(c) => format!("dst={}", join(c)),
                Match::Saddr(c) => format!("src={}", join(c)),
                Match::Dport(p) => format!("dport={}", join(p)),
            });
        }
        parts.push(match r.verdict {
            Verdict::Return => "return".into(),
            Verdict::Redirect(p) => format!("redirect:{p}"),
        });
        parts.join(" ")
    }

    fn join<T: ToString>(v: &[T]) -> String {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| Cidr::parse(c).unwrap()).collect()
    }

    #[test]
    fn plans() {
        struct Case {
            name: &'static str,
            opts: InitOptions,
            inbound: &'static [&'static str],
            outbound: &'static [&'static str],
        }
        let base_out: &[&str] = &[
            "uid=1500 return",
            "gid=1500 return",
            "IPv4 dst=127.0.0.0/8 return",
            "IPv6 dst=::1/128 return",
            "oif=lo return",
            "redirect:15001",
        ];
        let cases = [
            Case {
                name: "defaults",
                opts: InitOptions::default(),
                inbound: &[
                    "dst!=local return",
                    "IPv4 dst=127.0.0.0/8 return",
                    "IPv6 dst=::1/128 return",
                    "dport=15008,15020 return",
                    "redirect:15006",
                ],
                outbound: base_out,
            },
            Case {
                name: "ipv4 only, custom ids and ports",
                opts: InitOptions {
                    ipv6: false,
                    proxy_uid: 7,
                    proxy_gid: 8,
                    inbound_port: 1006,
                    outbound_port: 1001,
                    exclude_inbound_ports: vec![],
                    ..InitOptions::default()
                },
                inbound: &[
                    "dst!=local return",
                    "IPv4 dst=127.0.0.0/8 return",
                    "redirect:1006",
                ],
                outbound: &[
                    "uid=7 return",
                    "gid=8 return",
                    "IPv4 dst=127.0.0.0/8 return",
                    "oif=lo return",
                    "redirect:1001",
                ],
            },
            Case {
                name: "every exclusion, both families",
                opts: InitOptions {
                    include_inbound_ports: InboundPorts::Only(vec![
                        PortRange::single(8080),
                        PortRange {
                            first: 9000,
                            last: 9100,
                        },
                    ]),
                    exclude_outbound_ports: vec![PortRange::single(5432)],
                    exclude_inbound_cidrs: cidrs(&["10.0.0.0/8", "fd00::/8"]),
                    exclude_outbound_cidrs: cidrs(&["169.254.169.254/32", "fd01::/16"]),
                    ..InitOptions::default()
                },
                inbound: &[
                    "dst!=local return",
                    "IPv4 dst=127.0.0.0/8 return",
                    "IPv6 dst=::1/128 return",
                    "IPv4 src=10.0.0.0/8 return",
                    "IPv6 src=fd00::/8 return",
                    "dport=15008,15020 return",
                    "dport=8080,9000-9100 redirect:15006",
                ],
                outbound: &[
                    "uid=1500 return",
                    "gid=1500 return",
                    "IPv4 dst=127.0.0.0/8 return",
                    "IPv6 dst=::1/128 return",
                    "oif=lo return",
                    "IPv4 dst=169.254.169.254/32 return",
                    "IPv6 dst=fd01::/16 return",
                    "dport=5432 return",
                    "redirect:15001",
                ],
            },
            Case {
                name: "ipv6 off drops ipv6 exclusions",
                opts: InitOptions {
                    ipv6: false,
                    exclude_outbound_cidrs: cidrs(&["fd01::/16"]),
                    ..InitOptions::default()
                },
                inbound: &[
                    "dst!=local return",
                    "IPv4 dst=127.0.0.0/8 return",
                    "dport=15008,15020 return",
                    "redirect:15006",
                ],
                outbound: &[
                    "uid=1500 return",
                    "gid=1500 return",
                    "IPv4 dst=127.0.0.0/8 return",
                    "oif=lo return",
                    "redirect:15001",
                ],
            },
            Case {
                name: "no inbound capture",
                opts: InitOptions {
                    include_inbound_ports: InboundPorts::Only(vec![]),
                    ..InitOptions::default()
                },
                inbound: &[],
                outbound: base_out,
            },
        ];
        for case in cases {
            let p = plan(&case.opts);
            let inbound: Vec<String> = p.inbound.iter().map(show).collect();
            let outbound: Vec<String> = p.outbound.iter().map(show).collect();
            assert_eq!(inbound, case.inbound, "{}: inbound", case.name);
            assert_eq!(outbound, case.outbound, "{}: outbound", case.name);
            for r in p.inbound.iter().chain(&p.outbound) {
                assert!(r.comment.starts_with("portcullis: "), "{}", r.comment);
                assert!(!r.comment.contains(['"', '\'']), "{}", r.comment);
                // nft refuses comments of more than 128 bytes.
                assert!(r.comment.len() <= 128, "{}", r.comment);
            }
        }
    }

    /// What the inbound chain does with a new connection to `dport` from
    /// `src`, walking the plan as the kernel walks the chain: the first
    /// matching rule decides, and falling off the end leaves it alone.
    fn inbound_verdict(p: &RulePlan, src: &str, dport: u16) -> Verdict {
        let src = Cidr::parse(src).unwrap();
        let family = src.family();
        for r in &p.inbound {
            if r.family.is_some_and(|f| f != family) || !p.families().contains(&family) {
                continue;
            }
            let hit = r.matches.iter().all(|m| match m {
                Match::Saddr(c) => c.iter().any(|c| c.contains(&src)),
                Match::Dport(ports) => ports.iter().any(|r| r.first <= dport && dport <= r.last),
                _ => false,
            });
            if hit {
                return r.verdict;
            }
        }
        Verdict::Return
    }

    /// Peer sidecars open their tunnels to <pod ip>:15008: that port must
    /// reach the sidecar's tunnel listener, never the inbound redirect, in
    /// both families, even when the inbound capture list names it.
    #[test]
    fn tunnel_and_admin_ports_are_never_redirected_by_default() {
        let some_ports = InitOptions {
            include_inbound_ports: InboundPorts::Only(vec![PortRange {
                first: 15000,
                last: 15030,
            }]),
            ..InitOptions::default()
        };
        let v4_only = InitOptions {
            ipv6: false,
            ..InitOptions::default()
        };
        let to_sidecar = Verdict::Redirect(15006);
        let cases: &[(&str, &InitOptions, &str, u16, Verdict)] = &[
            (
                "defaults",
                &InitOptions::default(),
                "10.1.2.3",
                15008,
                Verdict::Return,
            ),
            (
                "defaults",
                &InitOptions::default(),
                "fd00::3",
                15008,
                Verdict::Return,
            ),
            (
                "defaults",
                &InitOptions::default(),
                "10.1.2.3",
                15020,
                Verdict::Return,
            ),
            (
                "defaults",
                &InitOptions::default(),
                "fd00::3",
                15020,
                Verdict::Return,
            ),
            (
                "defaults",
                &InitOptions::default(),
                "10.1.2.3",
                15007,
                to_sidecar,
            ),
            (
                "defaults",
                &InitOptions::default(),
                "fd00::3",
                15009,
                to_sidecar,
            ),
            (
                "defaults",
                &InitOptions::default(),
                "10.1.2.3",
                8080,
                to_sidecar,
            ),
            (
                "defaults",
                &InitOptions::default(),
                "fd00::3",
                8080,
                to_sidecar,
            ),
            (
                "capture list",
                &some_ports,
                "10.1.2.3",
                15008,
                Verdict::Return,
            ),
            (
                "capture list",
                &some_ports,
                "fd00::3",
                15008,
                Verdict::Return,
            ),
            ("capture list", &some_ports, "fd00::3", 15010, to_sidecar),
            (
                "capture list",
                &some_ports,
                "10.1.2.3",
                8080,
                Verdict::Return,
            ),
            ("ipv4 only", &v4_only, "10.1.2.3", 15008, Verdict::Return),
            ("ipv4 only", &v4_only, "10.1.2.3", 8080, to_sidecar),
        ];
        for (name, opts, src, dport, want) in cases {
            let got = inbound_verdict(&plan(opts), src, *dport);
            assert_eq!(got, *want, "{name}: from {src} to port {dport}");
        }
    }

    #[test]
    fn sidecar_exemption_comes_before_any_redirect() {
        let p = plan(&InitOptions::default());
        let first_redirect = p
            .outbound
            .iter()
            .position(|r| matches!(r.verdict, Verdict::Redirect(_)))
            .unwrap();
        assert_eq!(first_redirect, p.outbound.len() - 1);
        assert_eq!(p.outbound[0].matches, vec![Match::SkUid(1500)]);
    }
}
