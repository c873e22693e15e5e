//! Command-line flags (each also read from `PORTCULLIS_<FLAG>`) and their
//! validation into the settings the rest of the program uses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::authz::DefaultPolicy;
use crate::identity::{SpiffeId, TrustDomain};
use crate::proxy::OutboundPolicy;

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
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Make a root CA: DIR/ca.crt and DIR/ca.key (mode 0600).
    Init {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
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
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(long)]
        intermediate: bool,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// Run the identity service: sign sidecars' CSRs after a Kubernetes
    /// TokenReview of their projected service-account token.
    Serve(Box<crate::identity::serve::ServeArgs>),
    /// Describe certificates: subject, SPIFFE ids, serial, validity, issuer,
    /// and whether each chains to a bundle.
    Inspect {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `portcullis run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[arg(long, env = "PORTCULLIS_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    #[arg(long, env = "PORTCULLIS_NAMESPACE", default_value = "default")]
    pub namespace: String,
    #[arg(long, env = "PORTCULLIS_SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,

    /// Issuer certificate (a CA, then its chain) that signs this sidecar's leaf.
    #[arg(
        long,
        env = "PORTCULLIS_CA_CERT",
        value_name = "FILE",
        requires = "ca_key"
    )]
    pub ca_cert: Option<PathBuf>,
    /// The issuer's private key.
    #[arg(
        long,
        env = "PORTCULLIS_CA_KEY",
        value_name = "FILE",
        requires = "ca_cert"
    )]
    pub ca_key: Option<PathBuf>,
    /// The identity service that signs this sidecar's leaf (Kubernetes),
    /// e.g. https://portcullis-ca.portcullis.svc:15012; instead of --ca-cert/--ca-key.
    #[arg(
        long,
        env = "PORTCULLIS_CA_URL",
        value_name = "URL",
        conflicts_with_all = ["ca_cert", "ca_key"]
    )]
    pub ca_url: Option<String>,
    /// The projected service-account token sent to --ca-url, read afresh for
    /// every request [default: /var/run/secrets/portcullis/token].
    #[arg(
        long,
        env = "PORTCULLIS_CA_TOKEN_FILE",
        value_name = "FILE",
        requires = "ca_url"
    )]
    pub ca_token_file: Option<PathBuf>,
    /// PEM roots that peers' certificates must chain to.
    #[arg(long, env = "PORTCULLIS_TRUST_BUNDLE", value_name = "FILE")]
    pub trust_bundle: PathBuf,
    /// Lifetime of this sidecar's leaf certificate.
    #[arg(long, env = "PORTCULLIS_CERT_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,

    #[arg(long, env = "PORTCULLIS_INBOUND_LISTEN", default_value = "[::]:15006")]
    pub inbound_listen: SocketAddr,
    #[arg(
        long,
        env = "PORTCULLIS_OUTBOUND_LISTEN",
        value_delimiter = ',',
        default_value = "127.0.0.1:15001,[::1]:15001"
    )]
    pub outbound_listen: Vec<SocketAddr>,
    #[arg(long, env = "PORTCULLIS_ADMIN_LISTEN", default_value = "0.0.0.0:15020")]
    pub admin_listen: SocketAddr,

    /// Explicit mode: forward every inbound connection to ADDR.
    #[arg(long, env = "PORTCULLIS_INBOUND_TARGET", value_name = "ADDR")]
    pub inbound_target: Option<SocketAddr>,
    /// Explicit mode: LISTEN=DEST[=SPIFFE_ID] carries connections accepted on
    /// LISTEN over mTLS to the sidecar at DEST.
    #[arg(
        long,
        env = "PORTCULLIS_UPSTREAM",
        value_delimiter = ',',
        value_name = "LISTEN=DEST[=ID]"
    )]
    pub upstream: Vec<String>,

    #[arg(
        long,
        env = "PORTCULLIS_INBOUND_MODE",
        value_enum,
        default_value = "strict"
    )]
    pub inbound_mode: InboundMode,
    /// Ports whose clients may wait for the server to speak first.
    #[arg(
        long,
        env = "PORTCULLIS_OPAQUE_PORTS",
        value_delimiter = ',',
        default_value = "25,587,3306,4444,5432,6379,9300,11211"
    )]
    pub opaque_ports: Vec<PortRange>,
    /// Transparent mode: destinations in these networks have sidecars and
    /// get mTLS; everything else passes through as plain TCP.
    #[arg(
        long,
        env = "PORTCULLIS_MESH_CIDRS",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub mesh_cidrs: Vec<IpNet>,
    /// Never use mTLS to these networks, even inside --mesh-cidrs.
    #[arg(
        long,
        env = "PORTCULLIS_PASSTHROUGH_CIDRS",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub passthrough_cidrs: Vec<IpNet>,
    /// Never use mTLS to these destination ports (ranges like 9000-9100 too).
    #[arg(
        long,
        env = "PORTCULLIS_PASSTHROUGH_PORTS",
        value_delimiter = ',',
        value_name = "PORT"
    )]
    pub passthrough_ports: Vec<PortRange>,
    /// Transparent mode: deliver inbound connections to localhost:PORT
    /// instead of the pod IP (for apps that listen on 127.0.0.1 only).
    #[arg(long, env = "PORTCULLIS_INBOUND_FORWARD_TO_LOCALHOST")]
    pub inbound_forward_to_localhost: bool,

    /// Directory of authorization rule files (*.yaml, *.yml, *.json),
    /// watched and hot-reloaded [default: /etc/portcullis/rules; given
    /// explicitly, it must exist].
    #[arg(long, env = "PORTCULLIS_RULES_DIR", value_name = "DIR")]
    pub rules_dir: Option<PathBuf>,
    /// What happens when no rule matches on a port that no allow rule covers.
    #[arg(
        long,
        env = "PORTCULLIS_DEFAULT_POLICY",
        value_enum,
        default_value = "authenticated"
    )]
    pub default_policy: DefaultPolicy,
    /// Accept `%2F` and `%5C` in request paths instead of answering 400.
    #[arg(long, env = "PORTCULLIS_ALLOW_ENCODED_SLASH")]
    pub allow_encoded_slash: bool,

    #[arg(long, env = "PORTCULLIS_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    #[arg(long, env = "PORTCULLIS_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    #[arg(long, env = "PORTCULLIS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// How long to wait for a client's first bytes before treating it as
    /// opaque (permissive) or closing it (strict).
    #[arg(long, env = "PORTCULLIS_DETECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub detect_timeout: Duration,
    /// A connection with no bytes either way for this long is closed.
    #[arg(long, env = "PORTCULLIS_IDLE_TIMEOUT", default_value = "1h", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// How often mounted files are re-read even without a change event.
    #[arg(long, env = "PORTCULLIS_FILE_POLL_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub file_poll_interval: Duration,

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

/// An explicit upstream: listen locally, carry to a sidecar over mTLS.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub listen: SocketAddr,
    pub dest: SocketAddr,
    pub expect: Option<SpiffeId>,
}

impl Upstream {
    /// Parses `LISTEN=DEST[=SPIFFE_ID]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(3, '=');
        let (Some(l), Some(d)) = (parts.next(), parts.next()) else {
            return Err(format!(
                "--upstream {s:?}: expected LISTEN=DEST[=SPIFFE_ID]"
            ));
        };
        let listen = l.parse().map_err(|_| {
            format!("--upstream {s:?}: {l:?} is not an address like 127.0.0.1:8080")
        })?;
        let dest = d.parse().map_err(|_| {
            format!("--upstream {s:?}: {d:?} is not an address like 10.0.0.2:15006")
        })?;
        let expect = parts
            .next()
            .map(SpiffeId::parse)
            .transpose()
            .map_err(|e| format!("--upstream {s:?}: {e}"))?;
        Ok(Upstream {
            listen,
            dest,
            expect,
        })
    }
}

/// Where this sidecar's leaf comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// A mounted issuer (CA or intermediate) signs the leaf in-process.
    LocalIssuer { cert: PathBuf, key: PathBuf },
    /// The identity service (`ca serve`) signs our CSR.
    Remote {
        url: String,
        token_file: PathBuf,
        /// Connect here instead of resolving the URL's host; the certificate
        /// is still checked against the host. Tests and the demo set it; no
        /// flag does.
        connect_to: Option<SocketAddr>,
    },
}

/// Where the projected token for the identity service is mounted by default.
pub const DEFAULT_CA_TOKEN_FILE: &str = "/var/run/secrets/portcullis/token";

/// Validated settings for `run`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub id: SpiffeId,
    pub cert_source: CertSource,
    pub trust_bundle: PathBuf,
    pub cert_ttl: Duration,
    pub inbound_listen: SocketAddr,
    pub outbound_listen: Vec<SocketAddr>,
    pub admin_listen: SocketAddr,
    pub inbound_target: Option<SocketAddr>,
    pub upstreams: Vec<Upstream>,
    pub inbound_mode: InboundMode,
    pub opaque_ports: Vec<PortRange>,
    pub outbound: OutboundPolicy,
    pub inbound_forward_to_localhost: bool,
    pub rules_dir: PathBuf,
    /// The user named the rules directory, so it must exist.
    pub rules_required: bool,
    pub default_policy: DefaultPolicy,
    pub allow_encoded_slash: bool,
    pub drain_timeout: Duration,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub detect_timeout: Duration,
    pub idle_timeout: Duration,
    pub file_poll_interval: Duration,
}

impl RunArgs {
    /// Checks the flags; the error names the flag at fault.
    pub fn settings(&self) -> Result<Settings, String> {
        let td =
            TrustDomain::new(&self.trust_domain).map_err(|e| format!("--trust-domain: {e}"))?;
        // The Downward API gives an empty string for a pod without one.
        let sa = match self.service_account.as_str() {
            "" => "default",
            sa => sa,
        };
        let id = SpiffeId::workload(&td, &self.namespace, sa)
            .map_err(|e| format!("--namespace/--service-account: {e}"))?;
        let cert_source = match (&self.ca_cert, &self.ca_key, &self.ca_url) {
            (Some(cert), Some(key), None) => CertSource::LocalIssuer {
                cert: cert.clone(),
                key: key.clone(),
            },
            (None, None, Some(url)) => {
                crate::identity::CaUrl::parse(url).map_err(|e| format!("--ca-url: {e}"))?;
                CertSource::Remote {
                    url: url.clone(),
                    token_file: self
                        .ca_token_file
                        .clone()
                        .unwrap_or_else(|| PathBuf::from(DEFAULT_CA_TOKEN_FILE)),
                    connect_to: None,
                }
            }
            _ => return Err(
                "--ca-url, or --ca-cert and --ca-key: something must sign this sidecar's certificate"
                    .into(),
            ),
        };
        if self.cert_ttl < Duration::from_secs(1) {
            return Err("--cert-ttl: must be at least 1s".into());
        }
        let upstreams = self
            .upstream
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| Upstream::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        for timeout in [
            ("--drain-timeout", self.drain_timeout),
            ("--connect-timeout", self.connect_timeout),
            ("--handshake-timeout", self.handshake_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--file-poll-interval", self.file_poll_interval),
        ] {
            if timeout.1.is_zero() {
                return Err(format!("{}: must be more than zero", timeout.0));
            }
        }
        Ok(Settings {
            id,
            cert_source,
            trust_bundle: self.trust_bundle.clone(),
            cert_ttl: self.cert_ttl,
            inbound_listen: self.inbound_listen,
            outbound_listen: self.outbound_listen.clone(),
            admin_listen: self.admin_listen,
            inbound_target: self.inbound_target,
            upstreams,
            inbound_mode: self.inbound_mode,
            opaque_ports: self.opaque_ports.clone(),
            outbound: OutboundPolicy {
                mesh_cidrs: self.mesh_cidrs.clone(),
                passthrough_cidrs: self.passthrough_cidrs.clone(),
                passthrough_ports: self.passthrough_ports.clone(),
            },
            inbound_forward_to_localhost: self.inbound_forward_to_localhost,
            rules_dir: self
                .rules_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_RULES_DIR)),
            rules_required: self.rules_dir.is_some(),
            default_policy: self.default_policy,
            allow_encoded_slash: self.allow_encoded_slash,
            drain_timeout: self.drain_timeout,
            connect_timeout: self.connect_timeout,
            handshake_timeout: self.handshake_timeout,
            detect_timeout: self.detect_timeout,
            idle_timeout: self.idle_timeout,
            file_poll_interval: self.file_poll_interval,
        })
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
    fn upstream_forms() {
        let u = Upstream::parse("127.0.0.1:1=127.0.0.1:2").unwrap();
        assert_eq!(u.dest.port(), 2);
        assert!(u.expect.is_none());
        let u = Upstream::parse("127.0.0.1:1=[::1]:2=spiffe://td/ns/a/sa/b").unwrap();
        assert_eq!(u.expect.unwrap().to_string(), "spiffe://td/ns/a/sa/b");
        for bad in [
            "127.0.0.1:1",
            "x=127.0.0.1:2",
            "127.0.0.1:1=y",
            "127.0.0.1:1=127.0.0.1:2=http://x",
        ] {
            let err = Upstream::parse(bad).unwrap_err();
            assert!(err.starts_with("--upstream"), "{err}");
        }
    }

    #[test]
    fn ca_url_or_issuer_but_not_both() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["portcullis", "run", "--trust-bundle", "b"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
                .map_err(|e| e.to_string())
                .and_then(|cli| {
                    let Command::Run(args) = cli.command else {
                        panic!("not run")
                    };
                    args.settings()
                })
        };
        let url = ["--ca-url", "https://portcullis-ca.portcullis.svc:15012"];
        let s = parse(&url).unwrap();
        assert!(
            matches!(s.cert_source, CertSource::Remote { ref token_file, .. }
            if token_file.to_str() == Some(DEFAULT_CA_TOKEN_FILE))
        );
        assert!(parse(&[&url[..], &["--ca-cert", "c", "--ca-key", "k"]].concat()).is_err());
        assert!(parse(&["--ca-token-file", "t"]).is_err());
        assert!(parse(&[]).unwrap_err().contains("--ca-url"));
        assert!(parse(&["--ca-url", "http://ca:1"])
            .unwrap_err()
            .starts_with("--ca-url"));
    }

    #[test]
    fn bad_flags_name_themselves() {
        let parse = |extra: &[&str]| {
            let mut argv = vec![
                "portcullis",
                "run",
                "--trust-bundle",
                "b",
                "--ca-cert",
                "c",
                "--ca-key",
                "k",
            ];
            argv.extend_from_slice(extra);
            let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not run")
            };
            args.settings()
        };
        assert!(parse(&[]).is_ok());
        assert!(parse(&["--trust-domain", "Bad"])
            .unwrap_err()
            .starts_with("--trust-domain"));
        assert!(parse(&["--namespace", "a/b"])
            .unwrap_err()
            .starts_with("--namespace"));
        assert!(parse(&["--cert-ttl", "10ms"])
            .unwrap_err()
            .starts_with("--cert-ttl"));
        assert!(parse(&["--drain-timeout", "0s"])
            .unwrap_err()
            .starts_with("--drain-timeout"));
    }
}
