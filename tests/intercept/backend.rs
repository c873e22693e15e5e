//! The backends under test and how to run `portcullis init` in a namespace.

use super::netns::Netns;

pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Backend {
    Nft,
    IptablesNft,
    IptablesLegacy,
}

impl Backend {
    pub fn flag(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::IptablesNft => "iptables-nft",
            Backend::IptablesLegacy => "iptables-legacy",
        }
    }

    pub fn programs(self) -> &'static [&'static str] {
        match self {
            Backend::Nft => &["ip", "nft"],
            Backend::IptablesNft => &["ip", "nft", "iptables-nft-restore", "ip6tables-nft-save"],
            Backend::IptablesLegacy => &["ip", "iptables-legacy-restore", "ip6tables-legacy-save"],
        }
    }

    pub fn iptables(self, family6: bool) -> String {
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
    pub fn snapshot(self, ns: &Netns) -> String {
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
    pub fn seed(self, ns: &Netns) {
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
    pub fn copies(self, ns: &Netns) -> Vec<usize> {
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
pub fn init(ns: &Netns, args: &[&str]) -> std::process::Output {
    let mut argv = vec![BIN, "init"];
    argv.extend_from_slice(args);
    ns.run(&argv)
}

pub fn init_ok(ns: &Netns, args: &[&str]) -> String {
    let out = init(ns, args);
    assert!(
        out.status.success(),
        "init {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
