//! `portcullis init`: the netfilter rules that send a pod's TCP through its
//! sidecar. It runs once, as the pod's init container (NET_ADMIN, inside the
//! pod's network namespace), so the app never has to know a proxy exists.
//!
//! The work is split so that every decision is a pure function:
//! - [`options`]: flags → validated, normalised [`InitOptions`];
//! - [`plan()`]: options → a backend-neutral [`RulePlan`] (what to redirect,
//!   what to leave alone, and why);
//! - [`nft`] and [`iptables`]: a plan → the exact text fed to `nft -f -` or
//!   `iptables-restore --noflush`, one atomic transaction per IP family;
//! - [`backend`]: which of nft, iptables-nft, iptables-legacy to use;
//! - [`exec`]: the only part that runs programs.
//!
//! See docs/interception.md for the rules themselves.

pub mod backend;
mod exec;
pub mod iptables;
pub mod nft;
pub mod options;
mod plan;

pub use backend::{choose_backend, Backend, BackendChoice, Observed, Seen};
pub use exec::run;
pub use options::{Cidr, InboundPorts, InitOptions, PortRange};
pub use plan::{plan, Match, Rule, RulePlan, Verdict};

use clap::{Args, ValueEnum};

/// An IP family: rules that match addresses exist once per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// "IPv4" or "IPv6", for messages.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// Whether IPv6 traffic is intercepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Ipv6Mode {
    /// On when the namespace has IPv6 (so IPv6 never bypasses the sidecar).
    Auto,
    /// Always (the IPv6 rules fail to load where the kernel has no IPv6).
    On,
    /// Never: IPv6 connections are not intercepted.
    Off,
}

/// `portcullis init` flags. Each is also read from `PORTCULLIS_<FLAG>`;
/// list flags take comma-separated values and may be repeated.
///
/// Lists are taken as strings and checked by [`InitArgs::options`] so that a
/// bad value is reported as one line naming its flag.
#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// Port of the sidecar's inbound listener: inbound TCP is redirected here.
    #[arg(long, env = "PORTCULLIS_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// Port of the sidecar's outbound listener (127.0.0.1 and [::1]): the
    /// app's outgoing TCP is redirected here.
    #[arg(long, env = "PORTCULLIS_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// UID the sidecar runs as: its own connections are never redirected.
    #[arg(long, env = "PORTCULLIS_PROXY_UID", default_value_t = 1500)]
    pub proxy_uid: u32,
    /// GID the sidecar runs as: its own connections are never redirected.
    #[arg(long, env = "PORTCULLIS_PROXY_GID", default_value_t = 1500)]
    pub proxy_gid: u32,
    /// Inbound ports to capture: `*` for all, or ports and ranges (8000-8100);
    /// an empty value captures no inbound traffic.
    #[arg(
        long,
        env = "PORTCULLIS_INCLUDE_INBOUND_PORTS",
        value_delimiter = ',',
        value_name = "PORTS",
        default_value = "*"
    )]
    pub include_inbound_ports: Vec<String>,
    /// Inbound ports that are never redirected (default: the sidecar's
    /// tunnel port 15008 and admin port 15020, which peers, the kubelet and
    /// Prometheus reach directly). A value given here replaces the default,
    /// so keep 15008 and 15020 in it.
    #[arg(
        long,
        env = "PORTCULLIS_EXCLUDE_INBOUND_PORTS",
        value_delimiter = ',',
        value_name = "PORTS",
        default_value = "15008,15020"
    )]
    pub exclude_inbound_ports: Vec<String>,
    /// Destination ports the app reaches directly, without the sidecar.
    #[arg(
        long,
        env = "PORTCULLIS_EXCLUDE_OUTBOUND_PORTS",
        value_delimiter = ',',
        value_name = "PORTS"
    )]
    pub exclude_outbound_ports: Vec<String>,
    /// Source networks whose connections go straight to the app.
    #[arg(
        long,
        env = "PORTCULLIS_EXCLUDE_INBOUND_CIDRS",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub exclude_inbound_cidrs: Vec<String>,
    /// Destination networks the app reaches directly, without the sidecar.
    #[arg(
        long,
        env = "PORTCULLIS_EXCLUDE_OUTBOUND_CIDRS",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub exclude_outbound_cidrs: Vec<String>,
    /// Intercept IPv6 too: `auto` = when the namespace has IPv6.
    #[arg(long, env = "PORTCULLIS_IPV6", value_enum, default_value = "auto")]
    pub ipv6: Ipv6Mode,
    /// Which netfilter front end writes the rules; `auto` follows what the
    /// namespace already uses, else prefers nft.
    #[arg(long, env = "PORTCULLIS_BACKEND", value_enum, default_value = "auto")]
    pub backend: BackendChoice,
    /// Remove the rules this command installs, and nothing else.
    #[arg(long, env = "PORTCULLIS_CLEANUP")]
    pub cleanup: bool,
    /// Print the exact rules (nft script or iptables-restore input) and
    /// change nothing.
    #[arg(long, env = "PORTCULLIS_DRY_RUN")]
    pub dry_run: bool,
}

/// What can stop `init`. Every message is one line that names the problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{flag}: {value:?}: {reason}")]
    BadFlag {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("{0} not found (looked in PATH and the sbin directories); {1}")]
    MissingBinary(String, &'static str),
    #[error("no netfilter tool found: install nftables (nft) or iptables")]
    NoBackend,
    #[error("running {0}: {1}")]
    Spawn(String, std::io::Error),
    #[error("{tool} refused the rules: {detail}{hint}")]
    Refused {
        tool: String,
        detail: String,
        hint: &'static str,
    },
    #[error("{tool} failed: {detail}{hint}")]
    Probe {
        tool: String,
        detail: String,
        hint: &'static str,
    },
    #[error("{first}; rolling back {family} also failed: {rollback}")]
    Rollback {
        first: Box<Error>,
        family: &'static str,
        rollback: Box<Error>,
    },
}
