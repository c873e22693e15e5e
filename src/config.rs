//! Command-line flags (each also read from `PORTCULLIS_<FLAG>`) and their
//! validation into the settings the rest of the program uses.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod docs;
mod run;
mod tunnel;

pub use docs::{completion, man_page};
pub use tunnel::{TunnelArgs, TunnelClient, TunnelListen};

pub use run::{CertSource, RunArgs, Settings, Upstream, DEFAULT_CA_TOKEN_FILE};

/// Where rule files are mounted by default.
pub const DEFAULT_RULES_DIR: &str = "/etc/portcullis/rules";

/// portcullis: a small service-mesh sidecar.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar.
    Run(Box<RunArgs>),
    /// Make a local CA, issue and inspect certificates.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Run a whole mesh on loopback: a CA, two sidecars and an echo app.
    Demo(DemoArgs),
    /// Install (or with --cleanup remove) the rules that send the pod's TCP
    /// through the sidecar; runs as the pod's init container.
    Init(crate::intercept::InitArgs),
    /// Check authorization rule files, or explain a decision.
    #[command(subcommand)]
    Rules(crate::rules_cli::RulesCommand),
    /// Inject the sidecar into manifests (multi-document YAML) offline.
    Inject(crate::inject::offline::InjectArgs),
    /// Serve the mutating admission webhook that injects the sidecar.
    Webhook(Box<crate::inject::webhook::WebhookArgs>),
    /// Wait until the local sidecar is ready (a postStart hook).
    Await(crate::await_ready::AwaitArgs),
    /// Say whether the sidecar next to you works (readiness, certificate,
    /// trust bundle, rules, identity service, interception, clock) and how
    /// to fix what does not.
    Check(Box<crate::check::CheckArgs>),
    /// Print a shell completion script: `portcullis completion bash > /etc/bash_completion.d/portcullis`.
    Completion {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `portcullis man > portcullis.1`.
    Man,
    /// Print every manifest of a cluster install, with a trust anchor, the
    /// identity service's issuer and the trust bundle (`| kubectl apply -f -`).
    Install(Box<crate::install::InstallArgs>),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Make a root CA: DIR/ca.crt and DIR/ca.key (mode 0600).
    Init {
        /// Directory to write ca.crt and ca.key into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The trust domain the CA signs for (its name constraint).
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// How long the root is valid.
        #[arg(long, default_value = "8760h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a leaf (DIR/tls.crt, DIR/tls.key) or, with --intermediate, an
    /// intermediate CA (DIR/ca.crt with its chain, DIR/ca.key).
    Issue {
        /// Directory of the signing CA (ca.crt, ca.key).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// SPIFFE id of the leaf; for an intermediate, only its trust domain is used.
        #[arg(long)]
        id: String,
        /// How long the certificate is valid (capped at the signing CA's own expiry).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Issue an intermediate CA (for a mounted issuer or the identity
        /// service) instead of a leaf.
        #[arg(long)]
        intermediate: bool,
        /// Directory to write the certificate and key into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Run the identity service: sign sidecars' CSRs after a Kubernetes
    /// TokenReview of their projected service-account token.
    Serve(Box<crate::identity::serve::ServeArgs>),
    /// Make a trust anchor and an issuer for the Helm chart: writes values
    /// (issuer and trust bundle) for `helm install -f FILE`.
    Bootstrap(Box<crate::install::BootstrapArgs>),
    /// Describe certificates: subject, SPIFFE ids, serial, validity, issuer,
    /// and whether each chains to a bundle.
    Inspect {
        /// PEM certificate files (a file may hold a chain).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// PEM roots to check each certificate against.
        #[arg(long, value_name = "FILE")]
        bundle: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Port for the client sidecar's listener (0 = any free port).
    #[arg(long, default_value_t = 0, env = "PORTCULLIS_DEMO_PORT")]
    pub port: u16,
}

/// How the inbound side treats clients that do not speak mesh mTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InboundMode {
    /// Only mesh mTLS is accepted.
    Strict,
    /// Plaintext is accepted too, and its peer is "unauthenticated".
    Permissive,
}

/// A command-line error as one line. When the bad value came from a
/// `PORTCULLIS_*` variable rather than the command line (how Kubernetes
/// passes settings), the variable is named first, since the pod spec has
/// no flag to search for.
pub fn one_line_error(err: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let rendered = err.render().to_string();
    let text = rendered
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:")
        })
        .collect::<Vec<_>>()
        .join(" ");
    let text = text.strip_prefix("error: ").unwrap_or(&text).to_string();
    let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else {
        return text;
    };
    let flag = arg.split([' ', '=']).next().unwrap_or_default();
    let Some(name) = flag.strip_prefix("--") else {
        return text;
    };
    let var = format!("PORTCULLIS_{}", name.to_uppercase().replace('-', "_"));
    let on_command_line = std::env::args().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
    if !on_command_line && std::env::var_os(&var).is_some() {
        format!("{var} (for {flag}): {text}")
    } else {
        text
    }
}

/// Log flags of every long-running command.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// `text`, or `json` (one object per line).
    #[arg(
        long,
        env = "PORTCULLIS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// A tracing filter: `info`, `debug`, `portcullis=debug,warn`…
    #[arg(long, env = "PORTCULLIS_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl LogArgs {
    /// Installs the global log subscriber; the error names the bad flag.
    pub fn init(&self) -> Result<(), String> {
        crate::logging::init(self.log_format, &self.log_level)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A network of `run --mesh-cidrs`/`--passthrough-cidrs`, read with the one
/// parser `init`, the rules and the injector use (a bare address is one
/// host; host bits are refused, never widened), so a value one of them
/// accepts is never refused by another at a pod's start.
pub fn cidr(s: &str) -> Result<ipnet::IpNet, String> {
    let c = crate::intercept::Cidr::parse(s)?;
    ipnet::IpNet::new(c.addr, c.prefix).map_err(|e| e.to_string())
}

/// The `--admin` of `await` and `check`: `HOST:PORT` or `http://HOST:PORT`
/// (a trailing `/` allowed), so each takes what the other's docs show.
/// Returns `HOST:PORT`.
pub fn admin_address(s: &str) -> Result<String, String> {
    let bad = || "use HOST:PORT or http://HOST:PORT".to_string();
    let s = s.trim().trim_end_matches('/');
    let authority = s.strip_prefix("http://").unwrap_or(s);
    let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    let bracketed = host.starts_with('[') && host.ends_with(']');
    if host.is_empty() || host.contains('/') || (host.contains(':') && !bracketed) {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(authority.to_string()),
        _ => Err(bad()),
    }
}

/// A port or an inclusive range of ports, written `80` or `8000-8100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a port (1-65535) or a range like 8000-8100");
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(bad)
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        if first > last {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        let ok = [
            ("80", 80, 80),
            ("8000-8100", 8000, 8100),
            ("1-65535", 1, 65535),
        ];
        for (s, a, b) in ok {
            assert_eq!(
                s.parse::<PortRange>().unwrap(),
                PortRange { first: a, last: b },
                "{s}"
            );
        }
        for bad in ["0", "70000", "9-8", "a", "", "80-", "-80"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
        assert!("8000-8100".parse::<PortRange>().unwrap().contains(8050));
    }

    #[test]
    fn admin_addresses_with_or_without_http() {
        for (s, want) in [
            ("127.0.0.1:15020", "127.0.0.1:15020"),
            ("http://127.0.0.1:15020", "127.0.0.1:15020"),
            ("http://[::1]:15020/", "[::1]:15020"),
            ("[::1]:15020", "[::1]:15020"),
            ("localhost:1", "localhost:1"),
        ] {
            assert_eq!(admin_address(s).as_deref(), Ok(want), "{s}");
        }
        for bad in [
            "nope",
            "https://x:1",
            "http://x",
            "http://:80",
            "x:0",
            "x:99999",
            "::1",
            "http://x:1/ready",
        ] {
            assert_eq!(
                admin_address(bad),
                Err("use HOST:PORT or http://HOST:PORT".into()),
                "{bad}"
            );
        }
    }

    #[test]
    fn cidrs_read_like_init_reads_them() {
        for (s, want) in [
            ("10.96.0.10", "10.96.0.10/32"),
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("fd00::1", "fd00::1/128"),
            ("fd00::/8", "fd00::/8"),
        ] {
            assert_eq!(cidr(s).unwrap().to_string(), want, "{s}");
        }
        let e = cidr("10.0.0.1/8").unwrap_err();
        assert!(
            e.contains("host bits are set (did you mean 10.0.0.0/8?)"),
            "{e}"
        );
        for bad in ["10.0.0.0/33", "nope", "10.0.0/8", ""] {
            assert!(cidr(bad).is_err(), "{bad}");
        }
    }
}
