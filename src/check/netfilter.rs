//! The interception check: reads what of portcullis's NAT rules the
//! current network namespace holds (nft table `inet portcullis`, or the
//! iptables `PORTCULLIS_*` chains), and the TCP listeners in
//! `/proc/net/tcp{,6}`, then compares them with the sidecar's ports.
//!
//! Reading the rules needs NET_ADMIN in the namespace. A sidecar container
//! has none, so there the check is *skipped* (not passed): `check` run from
//! the sidecar container exits 0 with a `skip` line saying how to get it
//! done, and `--strict` turns that skip into a failure.

use std::path::PathBuf;
use std::process::Command;

use super::Finding;
use crate::intercept::iptables::{Saved, INBOUND_CHAIN, OUTBOUND_CHAIN};
use crate::intercept::nft::TABLE;

const NAME: &str = "interception";

/// What the sidecar listens on and runs as.
#[derive(Debug, Clone, Copy)]
pub struct Expected {
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    /// Where peer sidecars open their mTLS tunnels: it must reach the
    /// sidecar's tunnel listener, so it must not be redirected.
    pub tunnel_port: u16,
    pub proxy_uid: u32,
}

/// Our rules as installed, reduced to what matters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// `nft` or the iptables program that showed them.
    pub backend: String,
    /// The inbound and outbound chains are reached from the NAT hooks.
    pub hooked_inbound: bool,
    pub hooked_outbound: bool,
    pub inbound_redirects: Vec<u16>,
    pub outbound_redirects: Vec<u16>,
    /// UIDs whose connections return before any redirect.
    pub uid_exempt: Vec<u32>,
    /// Inbound destination ports that return (inclusive ranges).
    pub inbound_excluded: Vec<(u16, u16)>,
}

/// A listening TCP socket in this namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub port: u16,
    pub uid: u32,
}

/// Why the rules could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no permission to read the netfilter rules (needs root with NET_ADMIN in this network namespace)")]
    NoPermission,
    #[error("neither nft nor iptables-save is installed here")]
    NoTool,
    #[error("{0}")]
    Other(String),
}

/// Reads the rules, compares them and `listeners` with `exp`, and says.
pub fn check(exp: &Expected, listeners: &[Listener]) -> Finding {
    match read_installed() {
        Err(ReadError::NoPermission) => Finding::skip(
            NAME,
            format!("skipped: {}", ReadError::NoPermission),
            Some("run `portcullis check` as root in the pod's network namespace, e.g. from `kubectl debug -it POD --profile=netadmin --image=<the portcullis image> -- portcullis check`".into()),
        ),
        Err(e @ ReadError::NoTool) => Finding::skip(
            NAME,
            format!("skipped: {e}"),
            Some("run `check` where nft or iptables is installed (the portcullis image has both)".into()),
        ),
        Err(e) => Finding::fail(NAME, e.to_string(), "see the message; `portcullis init --dry-run` prints the rules that should be there"),
        Ok(installed) => compare(installed.as_ref(), listeners, exp),
    }
}

/// The verdict on `installed` rules (None: none of ours) and `listeners`.
pub fn compare(installed: Option<&Installed>, listeners: &[Listener], exp: &Expected) -> Finding {
    let Some(rules) = installed else {
        return Finding::fail(
            NAME,
            "no portcullis interception rules in this network namespace: the app's traffic bypasses the sidecar",
            "the pod's init container (`portcullis init`, with NET_ADMIN) must run before the app: check the pod was injected and its init container succeeded (kubectl describe pod POD)",
        );
    };
    let mut problems = Vec::new();
    let mut fixes = Vec::new();
    let init_fix = format!(
        "install matching rules: `portcullis init --inbound-port {} --outbound-port {} --proxy-uid {}` (or start the sidecar with listeners on the ports the rules use)",
        exp.inbound_port, exp.outbound_port, exp.proxy_uid
    );
    if !rules.hooked_outbound || rules.outbound_redirects.is_empty() {
        problems.push("outbound connections are not redirected".to_string());
        fixes.push(init_fix.clone());
    }
    let wrong = |ports: &[u16], want: u16| ports.iter().filter(|p| **p != want).count() > 0;
    if wrong(&rules.outbound_redirects, exp.outbound_port) {
        problems.push(format!(
            "outbound connections are redirected to :{}, the sidecar's outbound port is :{}",
            join(&rules.outbound_redirects),
            exp.outbound_port
        ));
        fixes.push(init_fix.clone());
    }
    let inbound = rules.hooked_inbound && !rules.inbound_redirects.is_empty();
    if wrong(&rules.inbound_redirects, exp.inbound_port) {
        problems.push(format!(
            "inbound connections are redirected to :{}, the sidecar's inbound port is :{}",
            join(&rules.inbound_redirects),
            exp.inbound_port
        ));
        fixes.push(init_fix.clone());
    }
    let excluded = |port: u16| {
        rules
            .inbound_excluded
            .iter()
            .any(|(a, b)| *a <= port && port <= *b)
    };
    // One fix for both ports: a list given to --exclude-inbound-ports
    // replaces the default, so naming only one would drop the other.
    let exclusion_fix = format!(
        "re-run `portcullis init` with --exclude-inbound-ports {},{} (plus any ports of your own)",
        exp.tunnel_port, exp.admin_port
    );
    if inbound && !excluded(exp.tunnel_port) {
        problems.push(format!(
            "the tunnel port :{} is redirected too, so peer sidecars' tunnels reach the inbound listener instead of the tunnel listener",
            exp.tunnel_port
        ));
        fixes.push(exclusion_fix.clone());
    }
    if inbound && !excluded(exp.admin_port) {
        problems.push(format!(
            "the admin port :{} is redirected too, so probes reach the inbound listener",
            exp.admin_port
        ));
        fixes.push(exclusion_fix);
    }
    if !rules.uid_exempt.contains(&exp.proxy_uid) {
        problems.push(format!(
            "the sidecar's UID {} is not exempt (exempt: {}), so its own connections loop back into it",
            exp.proxy_uid,
            if rules.uid_exempt.is_empty() { "none".to_string() } else { join(&rules.uid_exempt) }
        ));
        fixes.push(
            "re-run `portcullis init --proxy-uid UID` with the UID the sidecar runs as (runAsUser)"
                .into(),
        );
    }
    let mut wanted = vec![("outbound", exp.outbound_port)];
    if inbound {
        wanted.push(("inbound", exp.inbound_port));
    }
    for (which, port) in wanted {
        let on_port: Vec<&Listener> = listeners.iter().filter(|l| l.port == port).collect();
        if on_port.is_empty() {
            problems.push(format!(
                "nothing listens on :{port} (the sidecar's {which} listener)"
            ));
            fixes.push("start the sidecar, or point the rules at its ports".into());
        } else if !on_port.iter().any(|l| l.uid == exp.proxy_uid) {
            problems.push(format!(
                "the listener on :{port} runs as UID {}, not the exempt UID {}",
                on_port[0].uid, exp.proxy_uid
            ));
            fixes.push("run the sidecar as the UID given to `portcullis init --proxy-uid` (runAsUser), or pass that UID to `check --proxy-uid`".into());
        }
    }
    if problems.is_empty() {
        let inbound_text = if inbound {
            format!("inbound → :{}", exp.inbound_port)
        } else {
            "inbound not captured".into()
        };
        return Finding::ok(
            NAME,
            format!(
                "{} rules: {inbound_text}, outbound → :{}, UID {} exempt, tunnel :{} and admin :{} not redirected",
                rules.backend, exp.outbound_port, exp.proxy_uid, exp.tunnel_port, exp.admin_port
            ),
        );
    }
    fixes.dedup();
    Finding::fail(
        NAME,
        format!("{} rules: {}", rules.backend, problems.join("; ")),
        fixes.join("; "),
    )
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Finds `program` in PATH or the sbin directories.
fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn denied(stderr: &str) -> bool {
    let s = stderr.to_lowercase();
    s.contains("operation not permitted")
        || s.contains("permission denied")
        || s.contains("must be root")
}

/// Ours from nft, else from any iptables front end; `None` when neither has any.
fn read_installed() -> Result<Option<Installed>, ReadError> {
    let mut tools = 0;
    if let Some(nft) = find("nft") {
        tools += 1;
        let out = Command::new(nft)
            .args(["list", "table", "inet", TABLE])
            .output()
            .map_err(|e| ReadError::Other(format!("running nft: {e}")))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            return Ok(Some(parse_nft(&String::from_utf8_lossy(&out.stdout))));
        }
        if denied(&stderr) {
            return Err(ReadError::NoPermission);
        }
    }
    for program in ["iptables-save", "iptables-nft-save", "iptables-legacy-save"] {
        let Some(path) = find(program) else { continue };
        tools += 1;
        let out = Command::new(path)
            .args(["-t", "nat"])
            .output()
            .map_err(|e| ReadError::Other(format!("running {program}: {e}")))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if denied(&stderr) {
            return Err(ReadError::NoPermission);
        }
        let saved = Saved::parse(&String::from_utf8_lossy(&out.stdout));
        if out.status.success() && saved.has_ours() {
            return Ok(Some(from_saved(program, &saved)));
        }
    }
    if tools == 0 {
        return Err(ReadError::NoTool);
    }
    Ok(None)
}

/// A UID as nft prints it: a number, or a user name.
fn uid(token: &str) -> Option<u32> {
    let t = token.trim_matches('"');
    t.parse().ok().or_else(|| {
        nix::unistd::User::from_name(t)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    })
}

/// `15020`, `8000-8100` or `8000:8100`.
fn port_range(token: &str) -> Option<(u16, u16)> {
    let t = token.trim_matches(|c| c == '{' || c == '}' || c == ',' || c == ' ');
    match t.split_once(['-', ':']) {
        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
        None => t.parse().ok().map(|p| (p, p)),
    }
}

/// Reads `nft list table inet portcullis`.
pub fn parse_nft(text: &str) -> Installed {
    let mut rules = Installed {
        backend: "nft".into(),
        ..Installed::default()
    };
    let mut chain = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("chain ") {
            chain = rest.trim_end_matches('{').trim().to_string();
            continue;
        }
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let after = |word: &str| {
            tokens
                .iter()
                .position(|t| *t == word)
                .and_then(|i| tokens.get(i + 1).copied())
        };
        rules.hooked_inbound |= line.contains("jump inbound");
        rules.hooked_outbound |= line.contains("jump outbound");
        if let Some(port) = line
            .split("redirect to :")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
        {
            match chain.as_str() {
                "inbound" => rules.inbound_redirects.push(port),
                "outbound" => rules.outbound_redirects.push(port),
                _ => {}
            }
        }
        let returns = tokens.contains(&"return");
        if returns && chain == "outbound" {
            if let Some(u) = after("skuid").and_then(uid) {
                rules.uid_exempt.push(u);
            }
        }
        if returns && chain == "inbound" {
            if let Some(i) = tokens.iter().position(|t| *t == "dport") {
                rules.inbound_excluded.extend(
                    tokens[i + 1..]
                        .iter()
                        .take_while(|t| **t != "return" && **t != "comment")
                        .filter_map(|t| port_range(t)),
                );
            }
        }
    }
    rules
}

/// Reads what `iptables-save -t nat` showed of ours.
pub fn from_saved(program: &str, saved: &Saved) -> Installed {
    let mut rules = Installed {
        backend: program.trim_end_matches("-save").to_string(),
        ..Installed::default()
    };
    let jumps_to = |chain: &str| {
        saved
            .jumps
            .iter()
            .any(|j| j.split_whitespace().any(|t| t == chain))
    };
    rules.hooked_inbound = jumps_to(INBOUND_CHAIN);
    rules.hooked_outbound = jumps_to(OUTBOUND_CHAIN);
    for line in &saved.rules {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let after = |word: &str| {
            tokens
                .iter()
                .position(|t| *t == word)
                .and_then(|i| tokens.get(i + 1).copied())
        };
        let chain = tokens.get(1).copied().unwrap_or("");
        if let Some(port) = after("--to-ports").and_then(|p| p.parse().ok()) {
            if chain == INBOUND_CHAIN {
                rules.inbound_redirects.push(port);
            } else if chain == OUTBOUND_CHAIN {
                rules.outbound_redirects.push(port);
            }
        }
        let returns = after("-j") == Some("RETURN");
        if returns && chain == OUTBOUND_CHAIN {
            if let Some(u) = after("--uid-owner").and_then(uid) {
                rules.uid_exempt.push(u);
            }
        }
        if returns && chain == INBOUND_CHAIN {
            if let Some(p) = after("--dport").and_then(port_range) {
                rules.inbound_excluded.push(p);
            }
            if let Some(list) = after("--dports") {
                rules
                    .inbound_excluded
                    .extend(list.split(',').filter_map(port_range));
            }
        }
    }
    rules
}

/// TCP sockets in LISTEN state in this namespace, from `/proc/net/tcp{,6}`.
pub fn read_listeners() -> Vec<Listener> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| parse_proc_net_tcp(&text))
        .collect()
}

/// One `/proc/net/tcp` table: `sl local rem st … uid …`; state 0A is LISTEN.
pub fn parse_proc_net_tcp(text: &str) -> Vec<Listener> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let port = u16::from_str_radix(f.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            let uid = f.get(7)?.parse().ok()?;
            Some(Listener { port, uid })
        })
        .collect()
}

#[cfg(test)]
mod tests;
