//! `portcullis check`: one command that says whether the sidecar next to it
//! works, and for each thing that does not, how to fix it. It asks the
//! sidecar's admin port (`/live`, `/ready`, `/certs`, `/rules`) and looks
//! at the local system: the rule files on disk, the identity service, and
//! the netfilter rules of the current network namespace.
//!
//! Every verdict is a pure function over what was read (`certs`,
//! `netfilter::compare`, [`rules_finding`]), so each failure has a table
//! test; the reading lives in `http`, `reach` and `netfilter`.

mod certs;
mod http;
mod netfilter;
mod reach;
mod render;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Args;
use serde::Serialize;

pub use certs::{certificate_findings, CertsView, LeafView, RootView};
pub use netfilter::{compare as compare_interception, Expected, Installed, Listener};

/// `portcullis check` flags.
#[derive(Debug, Args)]
#[command(after_help = EXIT_CODES)]
pub struct CheckArgs {
    /// The sidecar's admin address: HOST:PORT or http://HOST:PORT.
    #[arg(
        long,
        env = "PORTCULLIS_CHECK_ADMIN",
        default_value = "127.0.0.1:15020",
        value_name = "ADDR",
        value_parser = parse_admin
    )]
    pub admin: SocketAddr,
    /// The rule files to compare with the rules in force [default: the
    /// directory the sidecar reports in /rules].
    #[arg(long, env = "PORTCULLIS_RULES_DIR", value_name = "DIR")]
    pub rules_dir: Option<PathBuf>,
    /// The identity service the sidecar uses; checked with a TCP and TLS
    /// connection. Unset: the sidecar signs its own certificate (mounted issuer).
    #[arg(long, env = "PORTCULLIS_CA_URL", value_name = "URL")]
    pub ca_url: Option<String>,
    /// PEM roots that verify the identity service's certificate.
    #[arg(long, env = "PORTCULLIS_TRUST_BUNDLE", value_name = "FILE")]
    pub trust_bundle: Option<PathBuf>,
    /// The port inbound connections must be redirected to (the sidecar's inbound listener).
    #[arg(long, default_value_t = 15006, value_name = "PORT")]
    pub inbound_port: u16,
    /// The port outbound connections must be redirected to (the sidecar's outbound listener).
    #[arg(long, default_value_t = 15001, value_name = "PORT")]
    pub outbound_port: u16,
    /// The sidecar's tunnel port, where peer sidecars open their mTLS
    /// tunnels: inbound connections to it must not be redirected.
    #[arg(long, default_value_t = 15008, value_name = "PORT")]
    pub tunnel_port: u16,
    /// The UID the sidecar runs as, whose connections must not be redirected
    /// [default: the owner of the socket listening on --outbound-port, else 1500].
    #[arg(long, value_name = "UID")]
    pub proxy_uid: Option<u32>,
    /// Do not look at interception (explicit mode, or a sidecar beside an
    /// app on a VM, where no netfilter rules are expected).
    #[arg(long)]
    pub no_interception: bool,
    /// Exit 1 when a check was skipped too (e.g. no permission to read the
    /// netfilter rules), not only when one failed.
    #[arg(long)]
    pub strict: bool,
    /// How long each network step may take.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print JSON ({"ok": bool, "checks": [...]}) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `--admin` in either form `await` takes too; a name is resolved once
/// (its first address).
fn parse_admin(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let authority = crate::config::admin_address(s)?;
    let resolved = authority.to_socket_addrs();
    resolved
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority}: no address"))
}

/// `portcullis init`'s default `--proxy-uid`.
const DEFAULT_PROXY_UID: u32 = 1500;

const EXIT_CODES: &str = "Exit codes:
  0  every check holds (skipped ones are listed, and fail only with --strict)
  1  at least one check failed (each failure has a `fix:` line)
  2  usage error (a bad flag or value)";

/// What `check` can fail at by itself (not a finding about the sidecar).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the report: {0}")]
    Output(#[from] std::io::Error),
    #[error("encoding the report: {0}")]
    Json(#[from] serde_json::Error),
}

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Fail,
    /// Could not be checked here (no permission, nothing to check against).
    Skip,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// A short, stable name: `admin`, `ready`, `certificate`, `clock`,
    /// `trust-bundle`, `rules`, `identity-service`, `interception`.
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
    /// How to fix a failure (or get a skipped check done).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(check: &'static str, detail: impl Into<String>) -> Self {
        Finding {
            check,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            check,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn skip(check: &'static str, detail: impl Into<String>, fix: Option<String>) -> Self {
        Finding {
            check,
            status: Status::Skip,
            detail: detail.into(),
            fix,
        }
    }
}

/// Whether the report passes: no failure, and with `strict` no skip either.
pub fn passes(findings: &[Finding], strict: bool) -> bool {
    findings
        .iter()
        .all(|f| f.status == Status::Ok || (f.status == Status::Skip && !strict))
}

/// Runs every check, prints the report, and returns the exit code.
pub fn run(args: &CheckArgs) -> ExitCode {
    let findings = collect(args);
    let ok = passes(&findings, args.strict);
    let printed = if args.json {
        render::json(&findings, ok)
    } else {
        render::table(&findings)
    };
    if let Err(e) = printed {
        eprintln!("portcullis: check: {e}");
        return ExitCode::from(2);
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Gathers every finding, in the order the report shows them.
fn collect(args: &CheckArgs) -> Vec<Finding> {
    let mut out = Vec::new();
    let admin = args.admin;
    let t = args.timeout;
    match http::get(admin, "/live", t) {
        Ok(_) => out.push(Finding::ok("admin", format!("{admin} answers"))),
        Err(e) => {
            out.push(Finding::fail(
                "admin",
                format!("{admin}: {e}"),
                "start the sidecar, or point --admin at its --admin-listen address (default 127.0.0.1:15020)",
            ));
            for name in ["ready", "certificate", "clock", "trust-bundle", "rules"] {
                out.push(Finding::skip(name, "admin port unreachable", None));
            }
        }
    }
    if out[0].status == Status::Ok {
        out.push(ready_finding(http::get(admin, "/ready", t)));
        match http::get(admin, "/certs", t).and_then(|r| r.json::<CertsView>()) {
            Ok(view) => out.extend(certificate_findings(&view, SystemTime::now())),
            Err(e) => out.push(Finding::fail(
                "certificate",
                format!("/certs: {e}"),
                "use a `check` from the same release as the sidecar",
            )),
        }
        match http::get(admin, "/rules", t).and_then(|r| r.json::<RulesView>()) {
            Ok(view) => {
                let dir = args
                    .rules_dir
                    .clone()
                    .or(view.dir.clone().map(PathBuf::from));
                // Not mounted in this container: compare nothing, say so.
                let on_disk = dir
                    .filter(|d| std::fs::read_dir(d).is_ok())
                    .map(|d| (d.clone(), read_rules(&d)));
                out.push(rules_finding(&view, on_disk));
            }
            Err(e) => out.push(Finding::fail(
                "rules",
                format!("/rules: {e}"),
                "use a `check` from the same release as the sidecar",
            )),
        }
    }
    out.push(reach::identity_service(
        args.ca_url.as_deref(),
        args.trust_bundle.as_deref(),
        t,
    ));
    if args.no_interception {
        out.push(Finding::skip(
            "interception",
            "not checked (--no-interception)",
            None,
        ));
    } else {
        let listeners = netfilter::read_listeners();
        let sidecar_uid = listeners
            .iter()
            .find(|l| l.port == args.outbound_port)
            .map(|l| l.uid);
        let expected = Expected {
            inbound_port: args.inbound_port,
            outbound_port: args.outbound_port,
            admin_port: admin.port(),
            tunnel_port: args.tunnel_port,
            proxy_uid: args.proxy_uid.or(sidecar_uid).unwrap_or(DEFAULT_PROXY_UID),
        };
        out.push(netfilter::check(&expected, &listeners));
    }
    out
}

/// The `ready` finding from `/ready`'s answer.
fn ready_finding(answer: Result<http::Answer, http::Error>) -> Finding {
    let answer = match answer {
        Ok(a) => a,
        Err(e) => return Finding::fail("ready", format!("/ready: {e}"), "see the sidecar's log"),
    };
    let why = answer.body.trim();
    match answer.status {
        200 => Finding::ok("ready", "ready"),
        _ if why.contains("certificate") => Finding::fail(
            "ready",
            why,
            "the sidecar has no certificate yet: see `identity-service` below and the sidecar's log (kubectl logs POD -c portcullis)",
        ),
        _ if why.contains("draining") => Finding::fail(
            "ready",
            why,
            "the sidecar is shutting down; a new pod replaces it",
        ),
        status => Finding::fail(
            "ready",
            format!("/ready answered {status}: {why}"),
            "see the sidecar's log",
        ),
    }
}

/// The body of `/rules`, as far as `check` reads it.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct RulesView {
    pub dir: Option<String>,
    pub hash: String,
    #[serde(default)]
    pub rule_count: usize,
    pub last_error: Option<RulesErrorView>,
}

/// A refused reload, as `/rules` reports it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RulesErrorView {
    pub message: String,
    pub at: String,
}

/// What the rule files on disk say: their hash when valid, else the error.
pub type OnDisk = Result<String, String>;

fn read_rules(dir: &std::path::Path) -> OnDisk {
    crate::authz::load_dir(dir)
        .map(|set| set.hash().to_string())
        .map_err(|e| e.to_string())
}

/// The `rules` finding: the files on disk must be valid and be the rules
/// in force (same hash), and the sidecar must have no refused reload.
pub fn rules_finding(view: &RulesView, on_disk: Option<(PathBuf, OnDisk)>) -> Finding {
    let short = |h: &str| h.chars().take(12).collect::<String>();
    let in_force = format!(
        "{} rule(s) in force (hash {})",
        view.rule_count,
        short(&view.hash)
    );
    match on_disk {
        Some((dir, Err(e))) => Finding::fail(
            "rules",
            format!("the rule files are not valid: {e}; {in_force} stay"),
            format!(
                "fix the file (`portcullis rules check {}` shows every error); the sidecar applies it on the next change",
                dir.display()
            ),
        ),
        Some((dir, Ok(hash))) if hash != view.hash => Finding::fail(
            "rules",
            format!(
                "the files in {} (hash {}) are not the rules in force: {in_force}",
                dir.display(),
                short(&hash)
            ),
            "wait for the next reload (--file-poll-interval) or send the sidecar SIGHUP; if it stays, see last_error in /rules",
        ),
        _ if view.last_error.is_some() => {
            let e = view.last_error.as_ref().expect("checked");
            Finding::fail(
                "rules",
                format!("a reload was refused at {}: {}; {in_force}", e.at, e.message),
                "fix the file named above (`portcullis rules check DIR`)",
            )
        }
        Some((dir, Ok(_))) => Finding::ok(
            "rules",
            format!("{in_force}, the same as the files in {}", dir.display()),
        ),
        None => Finding::ok(
            "rules",
            format!("{in_force}; the rule files are not readable here, so not compared"),
        ),
    }
}

#[cfg(test)]
mod tests;
