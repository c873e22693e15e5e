//! Which netfilter front end writes the rules. Mixing front ends in one
//! namespace works for the kernel but confuses every human and tool that
//! lists only one of them, so `auto` follows what is already there.

use std::fmt;

use clap::ValueEnum;

use super::Error;

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// Our own rules' backend if present, else the one the namespace already
    /// uses, else nft when installed.
    Auto,
    /// Native nftables: one table, `inet portcullis`.
    Nft,
    /// `iptables-nft-restore` (iptables syntax, nf_tables kernel API).
    IptablesNft,
    /// `iptables-legacy-restore` (the x_tables kernel API).
    IptablesLegacy,
}

/// A concrete backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Backend {
    Nft,
    IptablesNft,
    IptablesLegacy,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Nft, Backend::IptablesNft, Backend::IptablesLegacy];

    /// The name used by `--backend`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::IptablesNft => "iptables-nft",
            Backend::IptablesLegacy => "iptables-legacy",
        }
    }

    /// The program whose presence makes this backend usable.
    pub fn program(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::IptablesNft => "iptables-nft-restore",
            Backend::IptablesLegacy => "iptables-legacy-restore",
        }
    }

    /// What to install when the program is missing.
    pub fn install_hint(self) -> &'static str {
        match self {
            Backend::Nft => "install nftables, or pick another --backend",
            Backend::IptablesNft | Backend::IptablesLegacy => {
                "install iptables (1.8 or newer), or pick another --backend"
            }
        }
    }

    pub fn from_choice(choice: BackendChoice) -> Option<Backend> {
        match choice {
            BackendChoice::Auto => None,
            BackendChoice::Nft => Some(Backend::Nft),
            BackendChoice::IptablesNft => Some(Backend::IptablesNft),
            BackendChoice::IptablesLegacy => Some(Backend::IptablesLegacy),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the executor saw in the namespace, per backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// Its program is installed.
    pub installed: bool,
    /// It holds portcullis rules.
    pub ours: bool,
    /// It holds rules that are not ours.
    pub others: bool,
}

/// What the executor saw, for [`choose_backend`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observed {
    pub nft: Seen,
    pub iptables_nft: Seen,
    pub iptables_legacy: Seen,
}

impl Observed {
    pub fn get(&self, backend: Backend) -> Seen {
        match backend {
            Backend::Nft => self.nft,
            Backend::IptablesNft => self.iptables_nft,
            Backend::IptablesLegacy => self.iptables_legacy,
        }
    }
}

/// Picks the backend for `--backend auto`, with the reason to print.
///
/// Order: where our rules already are (so a rerun or a cleanup finds them);
/// then iptables-legacy, then iptables-nft, then nft if the namespace has
/// other rules there; then nft, iptables-nft, iptables-legacy by presence.
pub fn choose_backend(seen: &Observed) -> Result<(Backend, String), Error> {
    let usable = |b: Backend| seen.get(b).installed;
    if let Some(b) = Backend::ALL
        .into_iter()
        .find(|&b| usable(b) && seen.get(b).ours)
    {
        return Ok((b, "portcullis rules are already installed with it".into()));
    }
    for b in [Backend::IptablesLegacy, Backend::IptablesNft, Backend::Nft] {
        if usable(b) && seen.get(b).others {
            return Ok((b, "the namespace already has rules there".into()));
        }
    }
    for b in Backend::ALL {
        if usable(b) {
            return Ok((b, "the namespace has no rules yet; preferring nft".into()));
        }
    }
    Err(Error::NoBackend)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_choice() {
        let inst = Seen {
            installed: true,
            ..Seen::default()
        };
        let with = |ours, others| Seen {
            installed: true,
            ours,
            others,
        };
        let all = Observed {
            nft: inst,
            iptables_nft: inst,
            iptables_legacy: inst,
        };
        let cases: &[(&str, Observed, Option<Backend>)] = &[
            (
                "empty namespace, everything installed",
                all,
                Some(Backend::Nft),
            ),
            (
                "only iptables installed",
                Observed {
                    iptables_nft: inst,
                    iptables_legacy: inst,
                    ..Observed::default()
                },
                Some(Backend::IptablesNft),
            ),
            (
                "only legacy installed",
                Observed {
                    iptables_legacy: inst,
                    ..Observed::default()
                },
                Some(Backend::IptablesLegacy),
            ),
            (
                "legacy rules present",
                Observed {
                    iptables_legacy: with(false, true),
                    ..all
                },
                Some(Backend::IptablesLegacy),
            ),
            (
                "iptables-nft rules present",
                Observed {
                    iptables_nft: with(false, true),
                    ..all
                },
                Some(Backend::IptablesNft),
            ),
            (
                "our rules win over others' rules",
                Observed {
                    iptables_legacy: with(false, true),
                    iptables_nft: with(true, false),
                    ..all
                },
                Some(Backend::IptablesNft),
            ),
            (
                "ours in a backend no longer installed are ignored",
                Observed {
                    nft: with(false, false),
                    iptables_legacy: Seen {
                        installed: false,
                        ours: true,
                        others: false,
                    },
                    ..Observed::default()
                },
                Some(Backend::Nft),
            ),
            ("nothing installed", Observed::default(), None),
        ];
        for (name, seen, want) in cases {
            let got = choose_backend(seen).ok().map(|(b, _)| b);
            assert_eq!(got, *want, "{name}");
        }
    }
}
