//! `portcullis run`: its flags and their validation into [`Settings`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use ipnet::IpNet;

use super::{InboundMode, LogArgs, PortRange, DEFAULT_RULES_DIR};
use crate::authz::DefaultPolicy;
use crate::identity::{SpiffeId, TrustDomain};
use crate::proxy::OutboundPolicy;

/// `portcullis run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The mesh's trust domain: the host part of every SPIFFE id.
    #[arg(long, env = "PORTCULLIS_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The pod's namespace, part of this sidecar's SPIFFE id (the injector
    /// sets it from the Downward API).
    #[arg(long, env = "PORTCULLIS_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// The pod's service account, part of this sidecar's SPIFFE id; empty
    /// means `default`.
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
    /// With --ca-url: how often to fetch the identity service's trust
    /// bundle (so a root rotation reaches running pods); 0s turns it off.
    #[arg(long, env = "PORTCULLIS_TRUST_BUNDLE_REFRESH", default_value = "5m", value_parser = humantime::parse_duration)]
    pub trust_bundle_refresh: Duration,
    /// PEM roots that peers' certificates must chain to.
    #[arg(long, env = "PORTCULLIS_TRUST_BUNDLE", value_name = "FILE")]
    pub trust_bundle: PathBuf,
    /// Lifetime of this sidecar's leaf certificate.
    #[arg(long, env = "PORTCULLIS_CERT_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,

    /// Where redirected (and explicit-mode) inbound connections arrive; `[::]`
    /// serves IPv4 too, and falls back to 0.0.0.0 where IPv6 is off.
    #[arg(long, env = "PORTCULLIS_INBOUND_LISTEN", default_value = "[::]:15006")]
    pub inbound_listen: SocketAddr,
    /// Where the app's redirected outgoing connections arrive (comma-separated;
    /// IPv6 traffic is redirected to [::1]).
    #[arg(
        long,
        env = "PORTCULLIS_OUTBOUND_LISTEN",
        value_delimiter = ',',
        default_value = "127.0.0.1:15001,[::1]:15001"
    )]
    pub outbound_listen: Vec<SocketAddr>,
    /// Plain-HTTP `/ready`, `/live`, `/metrics`, `/certs`, `/rules`,
    /// `/authz/explain` and `/shutdown`; excluded from interception.
    #[arg(long, env = "PORTCULLIS_ADMIN_LISTEN", default_value = "0.0.0.0:15020")]
    pub admin_listen: SocketAddr,
    /// Whether `POST /shutdown` (loopback only) may stop the sidecar; the
    /// injector turns it off except for Job pods that need it.
    #[arg(long, env = "PORTCULLIS_ALLOW_SHUTDOWN", default_value_t = true, action = clap::ArgAction::Set)]
    pub allow_shutdown: bool,
    /// Distinct peers that get their own series in per-peer metrics; later
    /// ones count as `other` (portcullis_metrics_peers_overflow_total).
    #[arg(long, env = "PORTCULLIS_METRICS_MAX_PEERS", default_value_t = crate::metrics::peers::DEFAULT_MAX_PEERS)]
    pub metrics_max_peers: usize,
    /// One line per HTTP request and per opaque connection on stdout:
    /// `off`, `json` or `text`.
    #[arg(long, env = "PORTCULLIS_ACCESS_LOG", value_enum, default_value = "off")]
    pub access_log: crate::proxy::access_log::Format,

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

    /// `strict`: inbound connections must be mesh mTLS; `permissive`:
    /// plaintext is accepted too, as the peer "unauthenticated".
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
        value_name = "CIDR",
        value_parser = super::cidr
    )]
    pub mesh_cidrs: Vec<IpNet>,
    /// Never use mTLS to these networks, even inside --mesh-cidrs.
    #[arg(
        long,
        env = "PORTCULLIS_PASSTHROUGH_CIDRS",
        value_delimiter = ',',
        value_name = "CIDR",
        value_parser = super::cidr
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

    /// On SIGTERM: how long open connections may finish before they are closed.
    #[arg(long, env = "PORTCULLIS_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// How long a TCP connect to the app or to a destination may take.
    #[arg(long, env = "PORTCULLIS_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// How long a TLS handshake (inbound or outbound) may take; also how
    /// long strict mode waits for a ClientHello.
    #[arg(long, env = "PORTCULLIS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// Inbound connections still being detected or in their TLS handshake
    /// at once. When full, a new connection closes the oldest pending one
    /// still waiting for its ClientHello (else the oldest pending one),
    /// counted as portcullis_tls_handshakes_total{result="overload"}: a
    /// flood of silent clients cannot lock new ones out. Established
    /// connections do not count.
    #[arg(
        long,
        env = "PORTCULLIS_MAX_PENDING_HANDSHAKES",
        default_value_t = 1024,
        value_name = "N"
    )]
    pub max_pending_handshakes: usize,
    /// Pending inbound connections from one source address at once; past
    /// it the source's own oldest pending connection is closed, counted as
    /// portcullis_tls_handshakes_total{result="source_overload"}.
    #[arg(
        long,
        env = "PORTCULLIS_MAX_PENDING_HANDSHAKES_PER_SOURCE",
        default_value_t = 256,
        value_name = "N"
    )]
    pub max_pending_handshakes_per_source: usize,
    /// An inbound client's first byte and its whole TLS ClientHello must
    /// arrive within this (at most --handshake-timeout). Sidecars send
    /// their hello at once; a client that stays silent is closed in strict
    /// mode, and carried as plaintext in permissive mode.
    #[arg(long, env = "PORTCULLIS_HELLO_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub hello_timeout: Duration,
    /// How long to wait for a client's first bytes when looking for HTTP
    /// (after mTLS, or on plaintext in permissive mode) before carrying the
    /// connection as opaque TCP. A silent client in permissive mode is
    /// carried as plaintext after at most --hello-timeout. Opaque ports
    /// never wait.
    #[arg(long, env = "PORTCULLIS_DETECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub detect_timeout: Duration,
    /// A connection with no bytes either way for this long is closed.
    #[arg(long, env = "PORTCULLIS_IDLE_TIMEOUT", default_value = "1h", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// How often mounted files are re-read even without a change event.
    #[arg(long, env = "PORTCULLIS_FILE_POLL_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub file_poll_interval: Duration,
    /// Threads that run the proxy. One carries a pod's traffic at the least
    /// CPU per request; more let a busy sidecar use more cores; 0 means one
    /// per CPU this process may use (its CPU limit included).
    #[arg(
        long,
        env = "PORTCULLIS_WORKER_THREADS",
        default_value_t = 1,
        value_name = "N",
        value_parser = clap::value_parser!(u16).range(0..=crate::runtime::MAX_WORKER_THREADS as i64)
    )]
    pub worker_threads: u16,

    #[command(flatten)]
    pub tunnel: super::tunnel::TunnelArgs,

    #[command(flatten)]
    pub log: LogArgs,
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
    /// Where the tunnel listener binds (`None`: no tunnel listener).
    pub tunnel_listen: Option<SocketAddr>,
    pub tunnel: crate::proxy::TunnelSettings,
    /// How often the identity service's bundle is fetched (`--ca-url` only; zero: never).
    pub trust_bundle_refresh: Duration,
    pub id: SpiffeId,
    pub cert_source: CertSource,
    pub trust_bundle: PathBuf,
    pub cert_ttl: Duration,
    pub inbound_listen: SocketAddr,
    pub outbound_listen: Vec<SocketAddr>,
    pub admin_listen: SocketAddr,
    pub allow_shutdown: bool,
    pub metrics_max_peers: usize,
    pub access_log: crate::proxy::access_log::Format,
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
    pub max_pending_handshakes: usize,
    pub max_pending_handshakes_per_source: usize,
    pub hello_timeout: Duration,
    pub detect_timeout: Duration,
    pub idle_timeout: Duration,
    pub file_poll_interval: Duration,
    /// Threads of the runtime (`--worker-threads`, 0 resolved).
    pub worker_threads: usize,
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
            ("--hello-timeout", self.hello_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--file-poll-interval", self.file_poll_interval),
        ] {
            if timeout.1.is_zero() {
                return Err(format!("{}: must be more than zero", timeout.0));
            }
        }
        if self.max_pending_handshakes == 0 {
            return Err("--max-pending-handshakes: must be at least 1".into());
        }
        if self.max_pending_handshakes_per_source == 0 {
            return Err("--max-pending-handshakes-per-source: must be at least 1".into());
        }
        // Explicit mode (either flag) binds no tunnel port of its own: several
        // explicit sidecars often share one host.
        let explicit = self.inbound_target.is_some() || !upstreams.is_empty();
        let (tunnel_listen, tunnel) = self.tunnel.settings(explicit)?;
        Ok(Settings {
            tunnel_listen,
            tunnel,
            trust_bundle_refresh: self.trust_bundle_refresh,
            id,
            cert_source,
            trust_bundle: self.trust_bundle.clone(),
            cert_ttl: self.cert_ttl,
            inbound_listen: self.inbound_listen,
            outbound_listen: self.outbound_listen.clone(),
            admin_listen: self.admin_listen,
            allow_shutdown: self.allow_shutdown,
            metrics_max_peers: self.metrics_max_peers,
            access_log: self.access_log,
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
            max_pending_handshakes: self.max_pending_handshakes,
            max_pending_handshakes_per_source: self.max_pending_handshakes_per_source,
            hello_timeout: self.hello_timeout,
            detect_timeout: self.detect_timeout,
            idle_timeout: self.idle_timeout,
            file_poll_interval: self.file_poll_interval,
            worker_threads: crate::runtime::worker_count(self.worker_threads.into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Command};
    use clap::Parser;

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
        assert!(parse(&["--max-pending-handshakes", "0"])
            .unwrap_err()
            .starts_with("--max-pending-handshakes"));
        assert!(parse(&["--max-pending-handshakes-per-source", "0"])
            .unwrap_err()
            .starts_with("--max-pending-handshakes-per-source"));
        assert!(parse(&["--hello-timeout", "0s"])
            .unwrap_err()
            .starts_with("--hello-timeout"));
    }
}
