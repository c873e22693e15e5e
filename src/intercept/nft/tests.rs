//! Exact nft scripts for a few option sets: the text is the contract with
//! the kernel, so it is pinned whole.

use super::*;
use crate::intercept::options::{Cidr, InboundPorts, InitOptions, PortRange};
use crate::intercept::plan;

const DEFAULTS: &str = r#"# portcullis interception rules, applied by `nft -f -` in one transaction.
# The next two lines replace an earlier copy: create-if-missing, then delete.
table inet portcullis
delete table inet portcullis
table inet portcullis {
	chain prerouting {
		type nat hook prerouting priority -100; policy accept;
		meta l4proto tcp jump inbound comment "portcullis: inbound TCP interception"
	}
	chain output {
		type nat hook output priority -100; policy accept;
		meta l4proto tcp jump outbound comment "portcullis: outbound TCP interception"
	}
	chain inbound {
		fib daddr type != local return comment "portcullis: only connections to an address of this pod are redirected (no proxy for packets routed through it)"
		ip daddr 127.0.0.0/8 return comment "portcullis: loopback is never a destination from outside the pod (routing drops it)"
		ip6 daddr ::1/128 return comment "portcullis: loopback is never a destination from outside the pod (routing drops it)"
		tcp dport { 15008, 15020 } return comment "portcullis: excluded inbound ports (--exclude-inbound-ports, by default the tunnel and admin ports) are not redirected"
		meta l4proto tcp redirect to :15006 comment "portcullis: all other inbound TCP goes to the sidecar inbound listener"
	}
	chain outbound {
		meta skuid 1500 return comment "portcullis: the sidecar (uid 1500) is never redirected, or its own connections would loop"
		meta skgid 1500 return comment "portcullis: the sidecar (gid 1500) is never redirected, or its own connections would loop"
		ip daddr 127.0.0.0/8 return comment "portcullis: loopback destinations stay local"
		ip6 daddr ::1/128 return comment "portcullis: loopback destinations stay local"
		oifname "lo" return comment "portcullis: the app calling its own pod IP stays on lo (Service IPs still go through the sidecar)"
		meta l4proto tcp redirect to :15001 comment "portcullis: all other outbound TCP goes to the sidecar outbound listener"
	}
}
"#;

const IPV4_EXCLUSIONS: &str = r#"# portcullis interception rules, applied by `nft -f -` in one transaction.
# The next two lines replace an earlier copy: create-if-missing, then delete.
table inet portcullis
delete table inet portcullis
table inet portcullis {
	chain prerouting {
		type nat hook prerouting priority -100; policy accept;
		meta nfproto ipv4 meta l4proto tcp jump inbound comment "portcullis: inbound TCP interception (IPv6 is not intercepted: --ipv6 off)"
	}
	chain output {
		type nat hook output priority -100; policy accept;
		meta nfproto ipv4 meta l4proto tcp jump outbound comment "portcullis: outbound TCP interception (IPv6 is not intercepted: --ipv6 off)"
	}
	chain inbound {
		fib daddr type != local return comment "portcullis: only connections to an address of this pod are redirected (no proxy for packets routed through it)"
		ip daddr 127.0.0.0/8 return comment "portcullis: loopback is never a destination from outside the pod (routing drops it)"
		ip saddr { 10.0.0.0/8, 192.168.0.0/16 } return comment "portcullis: excluded source networks (--exclude-inbound-cidrs) go straight to the app"
		tcp dport { 22, 15008, 15020 } return comment "portcullis: excluded inbound ports (--exclude-inbound-ports, by default the tunnel and admin ports) are not redirected"
		tcp dport { 8080, 9000-9100 } redirect to :7006 comment "portcullis: inbound TCP to --include-inbound-ports goes to the sidecar inbound listener"
	}
	chain outbound {
		meta skuid 1337 return comment "portcullis: the sidecar (uid 1337) is never redirected, or its own connections would loop"
		meta skgid 1338 return comment "portcullis: the sidecar (gid 1338) is never redirected, or its own connections would loop"
		ip daddr 127.0.0.0/8 return comment "portcullis: loopback destinations stay local"
		oifname "lo" return comment "portcullis: the app calling its own pod IP stays on lo (Service IPs still go through the sidecar)"
		ip daddr 169.254.169.254/32 return comment "portcullis: excluded destination networks (--exclude-outbound-cidrs) bypass the sidecar"
		tcp dport { 53, 5432-5433 } return comment "portcullis: excluded destination ports (--exclude-outbound-ports) bypass the sidecar"
		meta l4proto tcp redirect to :7001 comment "portcullis: all other outbound TCP goes to the sidecar outbound listener"
	}
}
"#;

const IPV6_EXCLUSIONS_NO_INBOUND: &str = r#"# portcullis interception rules, applied by `nft -f -` in one transaction.
# The next two lines replace an earlier copy: create-if-missing, then delete.
table inet portcullis
delete table inet portcullis
table inet portcullis {
	chain prerouting {
		type nat hook prerouting priority -100; policy accept;
		meta l4proto tcp jump inbound comment "portcullis: inbound TCP interception"
	}
	chain output {
		type nat hook output priority -100; policy accept;
		meta l4proto tcp jump outbound comment "portcullis: outbound TCP interception"
	}
	chain inbound {
	}
	chain outbound {
		meta skuid 1500 return comment "portcullis: the sidecar (uid 1500) is never redirected, or its own connections would loop"
		meta skgid 1500 return comment "portcullis: the sidecar (gid 1500) is never redirected, or its own connections would loop"
		ip daddr 127.0.0.0/8 return comment "portcullis: loopback destinations stay local"
		ip6 daddr ::1/128 return comment "portcullis: loopback destinations stay local"
		oifname "lo" return comment "portcullis: the app calling its own pod IP stays on lo (Service IPs still go through the sidecar)"
		ip daddr 10.96.0.0/12 return comment "portcullis: excluded destination networks (--exclude-outbound-cidrs) bypass the sidecar"
		ip6 daddr { fd00::/8, fe80::/10 } return comment "portcullis: excluded destination networks (--exclude-outbound-cidrs) bypass the sidecar"
		meta l4proto tcp redirect to :15001 comment "portcullis: all other outbound TCP goes to the sidecar outbound listener"
	}
}
"#;

fn cidrs(list: &[&str]) -> Vec<Cidr> {
    list.iter().map(|c| Cidr::parse(c).unwrap()).collect()
}

#[test]
fn scripts() {
    let cases = [
        ("defaults", InitOptions::default(), DEFAULTS),
        (
            "ipv4 only, every exclusion",
            InitOptions {
                ipv6: false,
                inbound_port: 7006,
                outbound_port: 7001,
                proxy_uid: 1337,
                proxy_gid: 1338,
                include_inbound_ports: InboundPorts::Only(vec![
                    PortRange::single(8080),
                    PortRange {
                        first: 9000,
                        last: 9100,
                    },
                ]),
                exclude_inbound_ports: vec![
                    PortRange::single(22),
                    PortRange::single(15008),
                    PortRange::single(15020),
                ],
                exclude_outbound_ports: vec![
                    PortRange::single(53),
                    PortRange {
                        first: 5432,
                        last: 5433,
                    },
                ],
                exclude_inbound_cidrs: cidrs(&["10.0.0.0/8", "192.168.0.0/16"]),
                exclude_outbound_cidrs: cidrs(&["169.254.169.254", "fd00::/8"]),
            },
            IPV4_EXCLUSIONS,
        ),
        (
            "ipv6 exclusions, no inbound capture",
            InitOptions {
                include_inbound_ports: InboundPorts::Only(vec![]),
                exclude_outbound_cidrs: cidrs(&["10.96.0.0/12", "fd00::/8", "fe80::/10"]),
                ..InitOptions::default()
            },
            IPV6_EXCLUSIONS_NO_INBOUND,
        ),
    ];
    for (name, opts, want) in cases {
        let got = apply_script(&plan(&opts));
        if got != want {
            panic!("{name}: script differs\n--- got\n{got}--- want\n{want}");
        }
    }
}

#[test]
fn cleanup_touches_only_our_table() {
    let script = cleanup_script();
    let commands: Vec<&str> = script.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        commands,
        ["table inet portcullis", "delete table inet portcullis"]
    );
}
