//! `portcullis rules check|explain`: validate rule files before they ship,
//! and ask why a given request would be allowed or denied.
//!
//! Exit codes are meant for CI: `check` exits 0 on a valid set (warnings
//! included, unless `--strict`) and 1 otherwise; `explain` exits 0 when allowed, 1 when
//! denied, and 2 when the rules or the arguments are wrong.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::authz::{
    explain, lint, normalize_path, Connection, DefaultPolicy, HttpRequest, Peer, RuleSet,
};
use crate::identity::TrustDomain;

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Validate rule files and directories: exit 0 when valid, 1 with
    /// `file:line:column: message` lines otherwise. Also warns about rules
    /// that can never match or whose matches another rule already decides.
    Check(CheckArgs),
    /// Explain the decision for one connection or HTTP request: the deciding
    /// rule, the rules that matched, and why the closest others did not.
    /// Exit 0 when allowed, 1 when denied.
    Explain(ExplainArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Rule files, or directories of *.yaml, *.yml and *.json files.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// The sidecars' trust domain (rules naming only others never match).
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Exit 1 on warnings too (a directory with no rule file is one).
    #[arg(long)]
    pub strict: bool,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Rule files or directories (repeat or separate with commas).
    #[arg(long, required = true, value_name = "PATH", value_delimiter = ',')]
    pub rules: Vec<PathBuf>,
    /// The peer: a SPIFFE id or `unauthenticated`.
    #[arg(long, value_name = "ID|unauthenticated")]
    pub from: String,
    /// The destination port.
    #[arg(long)]
    pub port: u16,
    /// HTTP method; giving --method, --path, --host or --header makes the
    /// request HTTP (method GET and path / unless given).
    #[arg(long)]
    pub method: Option<String>,
    /// HTTP path (normalized as the sidecar does; the query is ignored).
    #[arg(long)]
    pub path: Option<String>,
    /// HTTP Host.
    #[arg(long)]
    pub host: Option<String>,
    /// A request header `name=value` (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// The client's address.
    #[arg(long, default_value = "127.0.0.1")]
    pub source_ip: IpAddr,
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    #[arg(long, value_enum, default_value_t = DefaultPolicy::Authenticated)]
    pub default_policy: DefaultPolicy,
    /// Accept %2F and %5C in the path, as `run --allow-encoded-slash`.
    #[arg(long)]
    pub allow_encoded_slash: bool,
    /// Print JSON (the admin endpoint's form) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs one `rules` subcommand and says how the process should exit.
pub fn run(cmd: RulesCommand) -> ExitCode {
    match cmd {
        RulesCommand::Check(args) => check(&args),
        RulesCommand::Explain(args) => match explain_cmd(&args) {
            Ok(code) => code,
            Err(msg) => {
                eprintln!("portcullis: error: {msg}");
                ExitCode::from(2)
            }
        },
    }
}

fn check(args: &CheckArgs) -> ExitCode {
    let td = match TrustDomain::new(&args.trust_domain) {
        Ok(td) => td,
        Err(e) => {
            eprintln!("portcullis: error: --trust-domain: {e}");
            return ExitCode::from(2);
        }
    };
    match crate::authz::check_paths(&args.paths) {
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!("{} error(s); the rules are not valid", errors.len());
            ExitCode::from(1)
        }
        Ok(set) => {
            let mut warnings = empty_dirs(&args.paths);
            for w in &lint(&set, Some(&td)) {
                warnings.push(format!(
                    "{}: warning: rule {}: {}",
                    w.locate(),
                    w.rule,
                    w.message
                ));
            }
            for w in &warnings {
                eprintln!("{w}");
            }
            let summary = format!(
                "{} rule(s) in {} file(s), hash {}, {} warning(s)",
                set.len(),
                set.files().len(),
                set.hash(),
                warnings.len()
            );
            if args.strict && !warnings.is_empty() {
                // Not "ok: …": the exit status would contradict it.
                eprintln!("failed: {summary}, and --strict makes warnings errors");
                ExitCode::from(1)
            } else {
                println!("ok: {summary}");
                ExitCode::SUCCESS
            }
        }
    }
}

/// A warning for each directory given that holds no rule file: the set is
/// valid (no rules), but `run --rules-dir` refuses such a directory, so a
/// check that says only "ok" would mislead.
fn empty_dirs(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .filter(|p| p.is_dir())
        .filter(|p| crate::authz::list_dir(p).is_ok_and(|files| files.is_empty()))
        .map(|p| {
            format!(
                "{}: warning: no *.yaml, *.yml or *.json file: `run --rules-dir` refuses this directory",
                p.display()
            )
        })
        .collect()
}

fn explain_cmd(args: &ExplainArgs) -> Result<ExitCode, String> {
    let td = TrustDomain::new(&args.trust_domain).map_err(|e| format!("--trust-domain: {e}"))?;
    let peer = Peer::parse(&args.from).map_err(|e| format!("--from: {e}"))?;
    let set: RuleSet = crate::authz::check_paths(&args.rules).map_err(|errors| {
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    let mut headers = http::HeaderMap::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once('=')
            .ok_or_else(|| format!("--header {h:?}: expected NAME=VALUE"))?;
        let name = http::HeaderName::from_bytes(k.trim().to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("--header {h:?}: invalid name"))?;
        let value = http::HeaderValue::from_str(v.trim())
            .map_err(|_| format!("--header {h:?}: invalid value"))?;
        headers.append(name, value);
    }
    let is_http = args.method.is_some()
        || args.path.is_some()
        || args.host.is_some()
        || !args.headers.is_empty();
    let raw_path = args.path.as_deref().unwrap_or("/");
    let raw_path = raw_path.split_once('?').map_or(raw_path, |(p, _)| p);
    let path = if is_http {
        match normalize_path(raw_path, args.allow_encoded_slash) {
            Ok(p) => p,
            Err(e) => return Ok(refuse(&format!("400 Bad Request: {e}"))),
        }
    } else {
        String::new()
    };
    let host = args.host.clone().or_else(|| {
        headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    // The sidecar's own host and method checks, so the answer matches it.
    let method = args.method.as_deref().unwrap_or("GET");
    let refused = if method == "CONNECT" {
        Some("405 Method Not Allowed: CONNECT is not served on an application port".to_string())
    } else if method.bytes().any(|b| b.is_ascii_lowercase()) {
        Some("400 Bad Request: a method with lowercase letters".to_string())
    } else {
        None
    };
    let host = match host.map(|h| crate::proxy::http::normalize_host(h.as_bytes())) {
        Some(Err(e)) => return Ok(refuse(&format!("400 Bad Request: bad host: {e}"))),
        Some(Ok(h)) => Some(h),
        None => None,
    };
    if let (Some(why), true) = (refused, is_http) {
        return Ok(refuse(&why));
    }
    let req = HttpRequest {
        method,
        path: &path,
        host: host.as_deref(),
        headers: &headers,
    };
    let conn = Connection {
        peer: &peer,
        source: args.source_ip,
        port: args.port,
    };
    let e = explain(
        &set,
        &td,
        args.default_policy,
        &conn,
        is_http.then_some(&req),
    );
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&e).map_err(|e| e.to_string())?
        );
    } else {
        if is_http && path != raw_path {
            println!("path:     {raw_path} is normalized to {path}");
        }
        print!("{e}");
    }
    Ok(if e.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Prints that the sidecar refuses the request before any rule is asked.
fn refuse(why: &str) -> ExitCode {
    println!("decision: deny\nreason:   the sidecar answers {why}");
    ExitCode::from(1)
}
